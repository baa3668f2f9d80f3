"""Cost of a model or a layer: measured with fvcore, or counted from a spec and the layer's geometry.

Unit: fvcore counts one multiply-accumulate (MAC) as one "flop"; ``count_mflops`` returns MACs / 1e6.
torch's FlopCounterMode counts 2 flops per MAC, so its numbers are twice these.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from gkpd.convert import LayerInfo
from gkpd.layers import use_path
from gkpd.spec import KroneckerSpec

__all__ = ["count_macs", "count_mflops", "count_params", "layer_cost"]


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass on one ``input_shape`` sample, by fvcore, Kronecker layers on their factorized path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore imports torch.jit.script-decorated code
        from fvcore.nn import FlopCountAnalysis

    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    was_training = model.training
    model.eval()
    try:
        # Reported cost is always that of the factorized computation, whichever path runs fastest.
        with use_path(model, "factorized"), torch.no_grad():
            analysis = FlopCountAnalysis(model, torch.zeros(1, *input_shape, device=device, dtype=dtype))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        model.train(was_training)


def count_mflops(model: nn.Module, input_shape: Sequence[int]) -> float:
    """Millions of MACs (fvcore's "flops") of one forward pass on one ``input_shape`` sample."""
    return count_macs(model, input_shape) / 1e6


def count_params(model: nn.Module) -> int:
    """Number of parameters (factors, biases and everything else)."""
    return sum(p.numel() for p in model.parameters())


def layer_cost(info: LayerInfo, spec: KroneckerSpec | None) -> tuple[int, int]:
    """``(MACs, weight params)`` per sample of layer ``info`` built from ``spec`` (``None``: kept dense).

    The bias, when present, is the same either way and is not included.
    """
    if spec is None:
        return info.dense_macs, info.dense_params
    if spec.weight_shape != info.weight_shape:
        raise ValueError(f"spec weight_shape {spec.weight_shape} does not match layer {info.name!r} {info.weight_shape}")
    return spec.macs(info.geometry), spec.num_params
