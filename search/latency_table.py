"""The per-layer latency table behind ``--budget-ms``: each searchable layer's candidates timed once, alone.

Every candidate of a layer (dense included) runs at batch 1 on the layer's real input, on the run's device, in
torch, as the whole model runs when a trial times it (inference mode, the input's shape and memory layout as the
layer receives them inside the model, Kronecker layers on their ``auto`` path), interleaved with the layer's other
candidates, median of ``TABLE_REPEATS`` rounds. (Timing layers on channels_last inputs the model never gives them
made ResNet-18's convs sum to 19.6 ms against 9.8 ms on their real inputs and 12.2 ms for the whole model.) The rest of the
model (stem, batch norms, pooling, layers the space keeps dense) is the dense model's measured time minus its
searchable layers' dense times. A plan's predicted latency is that remainder plus its layers' chosen times
(``spaces.LatencyTable``); each trial prints the prediction next to the end-to-end measurement.

Timings are cached on disk (``<cache dir>/<device>-torch<version>-<threads>t-v<format>.json``, the cache dir beside the
teachers: ``search.trial.latency_cache``), one entry per
layer geometry and candidate, and the dense model's time per model: a later study on the same machine, or
another model with the same layer shapes, times nothing again.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filelock
import torch
import torch.nn as nn

import gkpd
from search import latency
from search.files import atomic_text
from search.progress import duration, log
from spaces import DENSE, LatencyTable, SearchSpace

__all__ = ["TABLE_REPEATS", "build_latency_table", "time_calls", "table_path", "layer_key"]

TABLE_REPEATS = 3  # rounds per layer (median): enough for a budget, cheap enough for a few hundred candidates
ROUND_S = 0.003  # each candidate's calls are looped to about this long per round (timer resolution)
# In the file name: a table timed by older code is not read. 2: Kronecker layers rebuild a contiguous dense weight
# (a channels_last-strided one made the materialized candidates of some factor shapes time differently).
# 3: a 1x1 outer factor after the inner one runs copy-free (the square split's factorized chain got faster).
# 4: unpadded 1x1 steps run as one batched matmul, a 1x1 step has no dilation, a chain is planned once per setting.
# 5: a layer at inference keeps its kernels (one image: packed for oneDNN where that ran faster), the bias goes into
# a plain chain's last step, and one channels_last image's 1x1 step is a matmul.
TABLE_FORMAT = 5


def time_calls(fns: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
    """Median ms per call of each function, interleaved (tests replace this with a fake timer)."""
    return latency.median_ms(fns, repeats=TABLE_REPEATS, round_s=ROUND_S)


def table_path(cache_dir: Path, device: torch.device) -> Path:
    """One file per device, torch version and thread count: timings from elsewhere never mix in."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_",
                  f"{name}-torch{torch.__version__}-{torch.get_num_threads()}t-v{TABLE_FORMAT}")
    return cache_dir / f"{slug}.json"


def layer_key(module: nn.Module, input_shape: tuple[int, ...], channels_last: bool = False) -> str:
    """What a layer's time depends on besides the candidate: its kind, weight shape, geometry, input shape and
    input layout."""
    if isinstance(module, nn.Conv2d):
        what = (f"conv w{tuple(module.weight.shape)} s{module.stride} p{module.padding} d{module.dilation} "
                f"g{module.groups} {module.padding_mode}")
    else:
        what = f"linear w{tuple(module.weight.shape)}"
    # The layout is always named: entries of older tables (timed on channels_last inputs, unnamed) never match.
    return f"{what} bias{module.bias is not None} in{tuple(input_shape)} {'nhwc' if channels_last else 'nchw'}"


def _candidate_module(dense: nn.Module, spec: gkpd.KroneckerSpec | None) -> nn.Module:
    """The layer as a plan with ``spec`` builds it (random factors: the time does not depend on their values)."""
    if spec is None:
        return dense
    if isinstance(dense, nn.Conv2d):
        return gkpd.KroneckerConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, rank=spec.rank,
                                    factor_shapes=spec.factor_shapes, stride=dense.stride, padding=dense.padding,
                                    dilation=dense.dilation, groups=dense.groups, bias=dense.bias is not None,
                                    padding_mode=dense.padding_mode)
    return gkpd.KroneckerLinear(dense.in_features, dense.out_features, rank=spec.rank,
                                factor_shapes=spec.factor_shapes, bias=dense.bias is not None)


def _forward(module: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> None:
        with torch.inference_mode():
            module(x)
        sync()
    return run


def _model_key(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    digest = hashlib.sha256(repr(model).encode()).hexdigest()[:16]
    return f"model {type(model).__name__} {digest} in{tuple(input_shape)}"


def build_latency_table(model: nn.Module, space: SearchSpace, *, device: torch.device, cache_dir: Path) -> LatencyTable:
    """Time (or read from the cache in ``cache_dir``) every candidate of every layer of ``space`` and the dense
    ``model`` (whose weights do not matter: an untrained model times as its teacher)."""
    input_shape = tuple(space.input_shape)
    path = table_path(cache_dir, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model = model.to(device).eval()
    try:
        return _build(model, space, input_shape, path, device)
    finally:
        model.train(was_training)


def _build(model: nn.Module, space: SearchSpace, input_shape: tuple[int, ...], path: Path,
           device: torch.device) -> LatencyTable:
    modules = dict(model.named_modules())
    inputs = latency.layer_inputs_as_timed(model, list(space.layers), input_shape, device=device)
    with filelock.FileLock(str(path) + ".lock"):  # --workers N: one process times, the others read
        cache: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        todo = {}  # layer -> its candidates not in the cache (a teacher's space differs from the untrained model's)
        for name, layer in space.layers.items():
            key = layer_key(modules[name], *inputs[name])
            missing = [c for c in layer.candidates if f"{key}|{c.key}" not in cache]
            if missing:
                todo[name] = missing
        model_key = _model_key(model, input_shape)
        start = time.perf_counter()
        if todo or model_key not in cache:
            total = sum(len(missing) for missing in todo.values())
            log(f"latency table: timing {total} candidates of {len(todo)} layers and the dense model at batch 1 on "
                f"{latency.describe(device)} (once; cached in {path})")
        changed = bool(todo) or model_key not in cache
        if model_key not in cache:
            cache[model_key] = latency.torch_latency({"dense": model}, input_shape, batch=1, device=device,
                                                     repeats=TABLE_REPEATS)["dense"]
        for i, (name, candidates) in enumerate(todo.items(), 1):
            shape, channels_last = inputs[name]
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            key = layer_key(modules[name], shape, channels_last)
            layers = {c.key: _candidate_module(modules[name], c.spec).to(device).eval() for c in candidates}
            times = time_calls({k: _forward(m, x, device) for k, m in layers.items()})
            cache.update({f"{key}|{k}": ms for k, ms in times.items()})
            log(f"latency table: {i}/{len(todo)} {name} ({len(candidates)} candidates, {min(times.values()):.3f} to "
                f"{max(times.values()):.3f} ms) {duration(time.perf_counter() - start)}")
        if changed:
            atomic_text(path, json.dumps(cache, indent=0, sort_keys=True) + "\n")
    per_layer = {name: {c.key: cache[f"{layer_key(modules[name], *inputs[name])}|{c.key}"] for c in layer.candidates}
                 for name, layer in space.layers.items()}
    remainder = cache[model_key] - sum(times[DENSE] for times in per_layer.values())
    return LatencyTable(remainder, per_layer, latency.describe(device))
