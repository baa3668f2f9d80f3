"""Export a compressed model: plan.json (gkpd.load_plan), model.pt (a state_dict), model.onnx, checked by onnxruntime."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import gkpd
from search import latency
from search.files import unique_dir

__all__ = ["export_model", "export_onnx", "load_exported", "ort_line"]


# onnxruntime may differ from PyTorch by float32 rounding, which grows with the logits' size: the check allows
# this much relative to the largest |logit| (or absolutely, for logits below 1).
ONNX_RTOL = 1e-3


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: Path) -> tuple[float, float]:
    """Write ``model`` as ONNX (its layers as given, dynamic batch); return onnxruntime's max |difference| from
    PyTorch and the largest |logit| PyTorch gave."""
    import numpy as np
    import onnxruntime

    model = model.eval().cpu()
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is the legacy one
        # dynamo=False: the traced exporter handles the reshapes and grouped dilated convs of the
        # factorized path without a graph break, and needs no extra packages.
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    return float(np.abs(got - expected).max()), float(np.abs(expected).max())


def ort_line(summary: dict) -> str:
    """The export's log line of its measured onnxruntime latency, next to the dense model's."""
    return (f"export: onnxruntime CPU, batch 1, {torch.get_num_threads()} threads, median of {latency.REPEATS}: "
            f"model.onnx {summary['ort_ms_b1']:.2f} ms, dense model {summary['ort_dense_ms_b1']:.2f} ms "
            f"({summary['ort_speedup_b1']:.2f}x)")


def export_model(
    model: nn.Module,
    plan: Mapping[str, gkpd.KroneckerSpec],
    out_dir: Path,
    *,
    input_shape: Sequence[int],
    meta: Mapping[str, Any],
    form: str = "fast",
    dense: nn.Module | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/{plan.json, model.pt, model.onnx, export.json}``, replacing an older export as a whole.

    ``form`` is the ONNX graph's: "compact" keeps every Kronecker layer factorized (fewest parameters); "fast"
    exports each in whichever exact form runs faster on onnxruntime (CPU, batch 1, measured: factorized or
    folded into one dense conv). plan.json's meta records the form of every layer; model.pt is always the
    factors. With ``dense`` (the uncompressed model), the ONNX model's onnxruntime latency at batch 1 is
    measured next to the dense model's (``ort_ms_b1``, ``ort_dense_ms_b1``, ``ort_speedup_b1``).
    A failed ONNX export does not lose the rest: ``out_dir`` then holds plan.json, model.pt and export.json
    (no model.onnx), and the summary's ``onnx_error`` says why.
    """
    if form not in latency.FORMS:
        raise ValueError(f"unknown form {form!r}: allowed {', '.join(latency.FORMS)}")
    out_dir = Path(out_dir)
    model = model.cpu().eval()
    if form == "fast":
        forms = latency.fast_forms(model, input_shape)
        graph = latency.fold(model, forms)
    else:
        forms = {name: "factorized" for name in plan}
        graph = model
    meta = {**meta, "form": form, "forms": forms}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_dir(out_dir.parent, prefix=f".{out_dir.name}-")
    try:
        gkpd.save_plan(plan, tmp / "plan.json", meta=meta)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        summary = {**meta, "files": ["plan.json", "model.pt"]}
        try:
            onnx_diff, scale = export_onnx(graph, input_shape, tmp / "model.onnx")
            if not onnx_diff <= ONNX_RTOL * max(1.0, scale):
                raise RuntimeError(f"onnxruntime disagrees with PyTorch (max |diff| {onnx_diff:.3g} at logits up "
                                   f"to {scale:.3g}; allowed {ONNX_RTOL:g} of that)")
            summary.update(onnx_max_abs_diff=onnx_diff, onnx_max_abs_logit=scale, files=[*summary["files"], "model.onnx"])
            if dense is not None:
                ms = latency.ort_latency({"dense": latency.ort_session(dense, input_shape),
                                          "model": latency.open_session(str(tmp / "model.onnx"))}, input_shape)
                summary.update(ort_ms_b1=ms["model"], ort_dense_ms_b1=ms["dense"],
                               ort_speedup_b1=ms["dense"] / ms["model"])
        except Exception as err:  # the exporter and onnxruntime raise many types; the other files stand
            (tmp / "model.onnx").unlink(missing_ok=True)
            summary["onnx_error"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        (tmp / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
        # Swap in the new export; an older one is removed only once the new one is complete.
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_exported(base_model: nn.Module, export_dir: Path) -> nn.Module:
    """Rebuild an exported compressed model: ``base_model`` (untrained is fine) + plan.json + model.pt."""
    export_dir = Path(export_dir)
    plan = gkpd.load_plan(export_dir / "plan.json", model=base_model)
    model = gkpd.kroneckerize(base_model, plan)
    model.load_state_dict(torch.load(export_dir / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()
