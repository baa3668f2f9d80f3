"""Whole models: find the layers, swap in Kronecker layers by a plan, and save/load plans as JSON."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gkpd.layers import KroneckerConv2d, KroneckerLinear, LayerPath, conv_pads
from gkpd.spec import ConvGeometry, KroneckerSpec

__all__ = [
    "Plan", "LayerInfo", "compressible_layers", "kroneckerize", "check_plan",
    "save_plan", "load_plan", "plan_to_dict", "plan_from_dict", "spec_to_dict", "PLAN_FORMAT", "PLAN_VERSION",
]

Plan = dict[str, KroneckerSpec]  # module name -> spec; layers absent from a plan stay dense
PLAN_FORMAT = "gkpd-plan"
PLAN_VERSION = 2  # 2: "factor_shapes" (N factors); version 1 files (two factors, "a_shape") are still read
_READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class LayerInfo:
    """One conv or linear layer as the model runs it on one sample."""

    name: str
    kind: str  # "conv" or "linear"
    weight_shape: tuple[int, ...]
    geometry: ConvGeometry
    out_hw: tuple[int, int]
    has_bias: bool
    decomposable: bool
    reason: str = ""  # why not, when not decomposable

    @property
    def dense_macs(self) -> int:
        """MACs per sample of the dense layer, as fvcore counts them."""
        return self.dense_params * self.out_hw[0] * self.out_hw[1]

    @property
    def dense_params(self) -> int:
        return int(torch.Size(self.weight_shape).numel())


def _why_not(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups} (grouped convs are not decomposed)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only zero padding is supported)"
    return ""


def compressible_layers(model: nn.Module, input_shape: Sequence[int]) -> list[LayerInfo]:
    """Every nn.Conv2d and nn.Linear of ``model`` in call order, with its geometry on one ``input_shape`` sample."""
    infos: dict[str, LayerInfo] = {}
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        name = names[module]
        if name in infos:  # a layer called twice keeps its first geometry
            return
        x = args[0]
        if isinstance(module, nn.Conv2d):
            geometry = ConvGeometry(tuple(x.shape[-2:]), module.stride, module.dilation,
                                    conv_pads(module.padding, module.kernel_size, module.dilation))
            infos[name] = LayerInfo(name, "conv", tuple(module.weight.shape), geometry, tuple(output.shape[-2:]),
                                    module.bias is not None, not _why_not(module), _why_not(module))
        else:
            rows = int(torch.Size(x.shape[1:-1]).numel())
            infos[name] = LayerInfo(name, "linear", tuple(module.weight.shape), ConvGeometry((rows, 1)), (rows, 1),
                                    module.bias is not None, True)

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(infos.values())


def check_plan(model: nn.Module, plan: Mapping[str, KroneckerSpec]) -> None:
    """Raise ``ValueError`` unless every plan entry names a conv/linear layer of ``model`` with that weight shape."""
    modules = dict(model.named_modules())
    for name, spec in plan.items():
        if name not in modules:
            known = [n for n, m in modules.items() if type(m) in (nn.Conv2d, nn.Linear)]
            raise ValueError(f"plan names layer {name!r}, which the model does not have; its layers: {known[:8]}...")
        module = modules[name]
        if type(module) not in (nn.Conv2d, nn.Linear):
            raise ValueError(f"plan layer {name!r} is a {type(module).__name__}, not nn.Conv2d or nn.Linear")
        if tuple(module.weight.shape) != spec.weight_shape:
            raise ValueError(
                f"plan layer {name!r} has weight_shape {spec.weight_shape} but the model's weight is "
                f"{tuple(module.weight.shape)}"
            )
        if _why_not(module):
            raise NotImplementedError(f"layer {name!r} cannot be decomposed: {_why_not(module)}")


def kroneckerize(model: nn.Module, plan: Mapping[str, KroneckerSpec], *, path: LayerPath = "auto") -> nn.Module:
    """A copy of ``model`` with each planned layer replaced by its Kronecker layer, factors from ``decompose``."""
    check_plan(model, plan)
    model = copy.deepcopy(model)
    for name, spec in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            layer = KroneckerConv2d.from_conv(module, spec, path=path)
        else:
            layer = KroneckerLinear.from_linear(module, spec, path=path)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def plan_to_dict(plan: Mapping[str, KroneckerSpec], *, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document of a plan (format ``gkpd-plan``, version 2; see README "Plan files")."""
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "layers": {name: spec_to_dict(spec) for name, spec in plan.items()},
        "meta": dict(meta or {}),
    }


def spec_to_dict(spec: KroneckerSpec) -> dict[str, Any]:
    """One layer's entry: ``weight_shape``, ``factor_shapes`` and ``rank`` (two factors: also ``a_shape``/``b_shape``)."""
    entry: dict[str, Any] = {"weight_shape": list(spec.weight_shape),
                             "factor_shapes": [list(s) for s in spec.factor_shapes]}
    if spec.num_factors == 2:
        entry.update(a_shape=list(spec.a_shape), b_shape=list(spec.b_shape))
    entry["rank"] = spec.rank
    return entry


def plan_from_dict(doc: Any, *, source: str = "plan") -> Plan:
    """Validate a plan document and return its plan; ``ValueError`` says what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != PLAN_FORMAT:
        raise ValueError(f"{source}: 'format' must be {PLAN_FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"{source}: unsupported version {doc.get('version')!r}; this reader knows "
                         f"{', '.join(map(str, _READABLE_VERSIONS))}")
    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{source}: 'layers' must be an object mapping layer names to specs")
    plan: Plan = {}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not {"weight_shape", "rank"} <= entry.keys() or not (
                "a_shape" in entry or "factor_shapes" in entry):
            raise ValueError(f"{source}: layer {name!r} needs 'weight_shape', 'factor_shapes' (or 'a_shape') and 'rank'")
        try:
            spec = KroneckerSpec(entry["weight_shape"], entry.get("a_shape"), entry["rank"], entry.get("factor_shapes"))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: layer {name!r}: {err}") from None
        if "b_shape" in entry and entry["b_shape"] != list(spec.b_shape):
            raise ValueError(f"{source}: layer {name!r}: b_shape {entry['b_shape']} should be {list(spec.b_shape)}")
        plan[name] = spec
    return plan


def save_plan(plan: Mapping[str, KroneckerSpec], path: str | os.PathLike, *, meta: Mapping[str, Any] | None = None) -> None:
    """Write ``plan`` as JSON, atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(plan_to_dict(plan, meta=meta), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a plan is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_plan(path: str | os.PathLike, *, model: nn.Module | None = None) -> Plan:
    """Read a plan file; with ``model``, also check that it fits the model. Bad files raise ``ValueError``."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    plan = plan_from_dict(doc, source=str(path))
    if model is not None:
        check_plan(model, plan)
    return plan
