"""Measured latency: a compressed model next to the dense teacher, in the same process, interleaved.

Three settings, each the median of ``REPEATS`` interleaved rounds (other load on the machine hits both models
alike, and the ratio is what a reader compares): torch on the run's device at batch 1 and at the fine-tune's
batch size (Kronecker layers on their ``auto`` path, which keeps the dense weight at inference when that is
faster), and onnxruntime on the CPU at batch 1 of the model's *fast* form: each Kronecker layer exported in
whichever exact form runs faster there, factorized or folded back into one dense conv (:func:`fast_forms`).

``GKPD_LATENCY=0`` turns the per-trial measurement off (the test suite does, except for its one latency test).
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn

import gkpd
from gkpd.layers import DENSE_MARGIN

__all__ = ["LATENCY_ENV", "REPEATS", "Form", "FORMS", "enabled", "median_ms", "torch_latency", "ort_session",
           "open_session", "ort_latency", "fast_forms", "fold", "measure_latency", "describe", "LATENCY_KEYS"]

LATENCY_ENV = "GKPD_LATENCY"
REPEATS = 5
Form = Literal["factorized", "dense"]
FORMS = ("compact", "fast")  # export --form: every Kronecker layer factorized, or each in its faster form
# What a trial stores (user attributes, trials.csv): the model's and the dense teacher's times and their ratio.
LATENCY_KEYS = ("ms_b1", "dense_ms_b1", "speedup_b1", "ms_batch", "dense_ms_batch", "speedup_batch", "batch",
                "ort_ms_b1", "ort_dense_ms_b1", "ort_speedup_b1", "latency_device")


def enabled() -> bool:
    """Whether trials measure latency (``GKPD_LATENCY=0`` turns it off)."""
    return os.environ.get(LATENCY_ENV, "1") != "0"


def median_ms(fns: Mapping[str, Callable[[], Any]], *, repeats: int = REPEATS,
              round_s: float = 0.01) -> dict[str, float]:
    """Median milliseconds per call of each function, the functions interleaved in every round.

    Each function is warmed up once (allocations, kernel and path selection); calls under ``round_s`` (10 ms)
    are timed in a loop of up to 20 so that the timer's resolution and Python's overhead do not decide the ratio.
    """
    loops = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        loops[name] = max(1, min(20, int(round_s / max(time.perf_counter() - start, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            times[name].append(1e3 * (time.perf_counter() - start) / loops[name])
    return {name: statistics.median(t) for name, t in times.items()}


def _inputs(input_shape: Sequence[int], batch: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x  # as search.train evaluates


def torch_latency(models: Mapping[str, nn.Module], input_shape: Sequence[int], *, batch: int,
                  device: torch.device, repeats: int = REPEATS) -> dict[str, float]:
    """Median ms of a forward (eval mode, no autograd) of each model at ``batch``, interleaved."""
    x = _inputs(input_shape, batch, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(x)
            sync()
        return run

    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.to(device).eval()
    try:
        return median_ms({name: forward(model) for name, model in models.items()}, repeats=repeats)
    finally:
        for name, model in models.items():
            model.train(modes[name])


def ort_session(model: nn.Module, input_shape: Sequence[int]):
    """An onnxruntime CPU session of ``model`` (exported as traced: Kronecker layers factorized), torch's threads."""
    model = copy.deepcopy(model).eval().cpu()  # the caller's model stays where it is
    x = torch.zeros(1, *input_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is the legacy one
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["input"], output_names=["output"],
                          opset_version=17)
    return open_session(buffer.getvalue())


def open_session(onnx: bytes | str):
    """An onnxruntime CPU session of an ONNX model (bytes or a file) on as many threads as torch uses, its
    threads not spinning between runs.

    With spinning (onnxruntime's default) two sessions timed in turn in one process, next to torch's own
    threads, fought over the 2 cores: four back-to-back medians of the same dense ResNet-18 read 8.3, 5.5, 8.5
    and 16.4 ms, and one plan's speedup 1.55x, 1.29x, 0.60x, 1.97x. Without: 4.2-4.5 ms, 1.11-1.14x, and the
    per-layer fast-form choice agreed in 11 of 12 repeats instead of 8 (the default run's plans, alone, on the
    2-core build machine; `python bench/latency.py` times the same way).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


def ort_latency(sessions: Mapping[str, Any], input_shape: Sequence[int], *, repeats: int = REPEATS) -> dict[str, float]:
    """Median ms of one batch-1 run of each onnxruntime session, interleaved."""
    x = _inputs(input_shape, 1, torch.device("cpu")).contiguous().numpy()
    return median_ms({name: (lambda s=s: s.run(None, {"input": x})) for name, s in sessions.items()},
                     repeats=repeats)


def _kronecker_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (gkpd.KroneckerConv2d, gkpd.KroneckerLinear))}


def _layer_inputs(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The input shape (batch 1) of each named layer, from one forward with hooks."""
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # None: the output stays
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [modules[name].register_forward_hook(record(name)) for name in names]
    was_training = model.training
    try:
        with torch.no_grad():  # eval mode: a forward in training mode would move batch-norm statistics
            model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


def layer_inputs_as_timed(model: nn.Module, names: Sequence[str], input_shape: Sequence[int], *,
                          device: torch.device) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Each named layer's input in the whole-model forward that :func:`torch_latency` times at batch 1: its shape,
    and whether it is channels_last (True) or in the default layout. Activations take their layout from the
    input and the weights, and at batch 1 a conv's time depends on it several times over on a CPU, so a layer
    timed alone must get the layout it gets inside the model."""
    seen: dict[str, tuple[tuple[int, ...], bool]] = {}
    modules = dict(model.named_modules())

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # None: the output stays
            x = args[0]
            channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            seen.setdefault(name, (tuple(x.shape), channels_last))
        return hook

    hooks = [modules[name].register_forward_hook(record(name)) for name in names]
    was_training = model.training
    try:
        with torch.inference_mode():
            model.to(device).eval()(_inputs(input_shape, 1, device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen


# (layer repr, input shape, threads) -> the faster form on onnxruntime at batch 1, measured once per process.
_FORM_CHOICE: dict[tuple, Form] = {}


def _layer_form(layer: nn.Module, shape: tuple[int, ...]) -> Form:
    key = (type(layer).__name__, repr(layer), layer.bias is not None, shape, torch.get_num_threads())
    if key not in _FORM_CHOICE:
        probe = layer
        sessions = {"factorized": ort_session(probe, shape[1:]), "dense": ort_session(probe.to_dense(), shape[1:])}
        x = torch.zeros(shape).numpy()
        ms = median_ms({form: (lambda s=s: s.run(None, {"input": x})) for form, s in sessions.items()})
        # As path="auto": the factorized form must win by the margin; a near tie keeps the dense conv.
        _FORM_CHOICE[key] = "factorized" if ms["factorized"] < (1 - DENSE_MARGIN) * ms["dense"] else "dense"
    return _FORM_CHOICE[key]


def fast_forms(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Form]:
    """Each Kronecker layer's faster exact form on onnxruntime (CPU, batch 1), timed alone on its own input
    shape, factorized against folded into one dense conv (cached per layer geometry and spec)."""
    layers = _kronecker_layers(model)
    shapes = _layer_inputs(model, list(layers), input_shape)
    return {name: _layer_form(layer, shapes[name]) for name, layer in layers.items() if name in shapes}


def fold(model: nn.Module, forms: Mapping[str, Form]) -> nn.Module:
    """A copy of ``model`` with the layers whose form is "dense" replaced by their dense conv (or linear)."""
    folded = copy.deepcopy(model).cpu().eval()
    for name, form in forms.items():
        if form == "dense":
            parent_name, _, child = name.rpartition(".")
            parent = folded.get_submodule(parent_name) if parent_name else folded
            setattr(parent, child, parent.get_submodule(child).to_dense())
    return folded


def measure_latency(model: nn.Module, dense: nn.Module, input_shape: Sequence[int], *, batch: int,
                    device: torch.device, dense_session: Any = None) -> dict[str, Any]:
    """The trial's latency columns (:data:`LATENCY_KEYS`): ``model`` next to the dense teacher ``dense``.

    ``dense_session``: the teacher's onnxruntime session, when the caller keeps one (it does not change).
    """
    torch_b1 = torch_latency({"dense": dense, "model": model}, input_shape, batch=1, device=device)
    torch_batch = torch_latency({"dense": dense, "model": model}, input_shape, batch=batch, device=device)
    fast = fold(model, fast_forms(model, input_shape))
    sessions = {"dense": dense_session or ort_session(dense, input_shape), "model": ort_session(fast, input_shape)}
    ort = ort_latency(sessions, input_shape)
    return {
        "ms_b1": torch_b1["model"], "dense_ms_b1": torch_b1["dense"], "speedup_b1": torch_b1["dense"] / torch_b1["model"],
        "ms_batch": torch_batch["model"], "dense_ms_batch": torch_batch["dense"],
        "speedup_batch": torch_batch["dense"] / torch_batch["model"], "batch": batch,
        "ort_ms_b1": ort["model"], "ort_dense_ms_b1": ort["dense"], "ort_speedup_b1": ort["dense"] / ort["model"],
        "latency_device": describe(device),
    }


def describe(device: torch.device) -> str:
    """The device in words, e.g. "cpu (2 threads)" or "cuda:0 (NVIDIA H200)"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
