"""A kroneckerized ResNet exports: ONNX (checked with onnxruntime) and torch.jit.trace, on the factorized path.

torch 2.14's ``torch.onnx.export`` is the dynamo-based exporter by default; it handles these layers as is.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from gkpd import KroneckerConv2d, KroneckerLinear, KroneckerSpec, kroneckerize

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

PLAN = {
    "stem": KroneckerSpec((8, 3, 3, 3), (2, 1, 3, 1), 3),
    "layer1.conv1": KroneckerSpec((8, 8, 3, 3), (2, 2, 1, 3), 4),
    "layer2.conv1": KroneckerSpec((16, 8, 3, 3), (4, 2, 3, 1), 6),  # strided
    "layer2.shortcut.0": KroneckerSpec((16, 8, 1, 1), (4, 2, 1, 1), 3),  # strided 1x1
    "fc": KroneckerSpec((10, 16), (2, 4), 4),
}


def _compressed(resnet, input_shape) -> tuple[nn.Module, nn.Module]:
    model = resnet()
    compressed = kroneckerize(model, PLAN)  # layers on "auto"
    compressed(torch.randn(2, *input_shape))  # let "auto" measure and settle on a path first
    return model, compressed


def _onnx_ops(model: nn.Module, x: torch.Tensor, path: Path) -> Counter:
    torch.onnx.export(model, (x,), str(path))
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_onnx_export_runs_the_factorized_path_and_matches(resnet, input_shape, tmp_path: Path) -> None:
    model, compressed = _compressed(resnet, input_shape)
    x = torch.randn(2, *input_shape)
    dense_ops = _onnx_ops(model, x, tmp_path / "dense.onnx")
    ops = _onnx_ops(compressed, x, tmp_path / "kron.onnx")
    assert all(m.path == "auto" for m in compressed.modules() if isinstance(m, (KroneckerConv2d, KroneckerLinear)))
    # Each factorized conv is two Conv nodes, and the factorized linear is two 1x1 Convs instead of one Gemm.
    replaced_convs = sum(isinstance(compressed.get_submodule(name), KroneckerConv2d) for name in PLAN)
    assert dense_ops["Conv"] == 6 and dense_ops["Gemm"] == 1
    assert ops["Conv"] == dense_ops["Conv"] + replaced_convs + 2 and ops["Gemm"] == 0
    session = ort.InferenceSession(str(tmp_path / "kron.onnx"), providers=["CPUExecutionProvider"])
    x_new = torch.randn(2, *input_shape)  # not the export example
    (logits,) = session.run(None, {session.get_inputs()[0].name: x_new.numpy()})
    with torch.no_grad():
        expected = compressed(x_new).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace")
def test_jit_trace_runs_the_factorized_path_and_matches(resnet, input_shape) -> None:
    model, compressed = _compressed(resnet, input_shape)
    x = torch.randn(2, *input_shape)
    with torch.no_grad():
        traced = torch.jit.trace(compressed, x)
        dense_traced = torch.jit.trace(model, x)
        kinds = Counter(node.kind() for node in traced.inlined_graph.nodes())
        dense_kinds = Counter(node.kind() for node in dense_traced.inlined_graph.nodes())
        assert dense_kinds["aten::_convolution"] + dense_kinds["aten::linear"] == 7
        assert kinds["aten::_convolution"] == dense_kinds["aten::_convolution"] + 4 + 2 and kinds["aten::linear"] == 0
        for batch in (2, 3):  # the trace is not tied to the example's batch size
            x_new = torch.randn(batch, *input_shape)
            torch.testing.assert_close(traced(x_new), compressed(x_new), rtol=1e-5, atol=1e-5)
