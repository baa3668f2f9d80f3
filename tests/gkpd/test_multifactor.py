"""N-factor GKPD (three or four factors; CP is the corner with one factor per mode): the same exactness and cost
checks as for two factors, CP-ALS against known answers and TensorLy, and the CP corner against TensorLy-Torch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gkpd import (
    ConvGeometry, KroneckerConv2d, KroneckerLinear, KroneckerSpec, count_macs, count_params, cp_als, decompose,
    factorized_conv2d, fit_error, kroneckerize, materialized_conv2d, rearrange, rearrange_n, reconstruct,
    unrearrange_n,
)

TOL = dict(rtol=1e-10, atol=1e-10)


def cp_corner(weight_shape: tuple[int, int, int, int], rank: int) -> KroneckerSpec:
    f, c, kh, kw = weight_shape
    return KroneckerSpec(weight_shape, rank=rank, factor_shapes=[(f, 1, 1, 1), (1, c, 1, 1), (1, 1, kh, 1), (1, 1, 1, kw)])


CASES = [  # factor shapes, rank, stride, dilation, pads (top, bottom, left, right), input size
    ([(4, 1, 1, 1), (1, 6, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)], 5, (1, 1), (1, 1), (1, 1, 1, 1), (8, 8)),  # CP
    ([(4, 1, 1, 1), (1, 6, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)], 5, (2, 2), (1, 1), (1, 1, 1, 1), (9, 8)),
    ([(2, 3, 3, 1), (2, 1, 1, 1), (2, 2, 1, 3)], 3, (2, 3), (2, 1), (1, 2, 0, 1), (13, 12)),
    ([(2, 1, 1, 1), (1, 2, 3, 1), (2, 3, 1, 2), (1, 1, 1, 2)], 3, (2, 1), (1, 2), (2, 1, 1, 1), (13, 12)),  # 3x4
    ([(2, 2, 1, 1), (2, 1, 2, 1), (1, 3, 2, 3)], 2, (3, 2), (2, 2), (1, 1, 1, 1), (15, 16)),  # 4x3 kernel
    ([(8, 1, 1, 1), (1, 4, 1, 1), (1, 1, 5, 5)], 7, (1, 1), (1, 1), (2, 2, 2, 2), (7, 7)),  # joint 5x5 kernel
]


def _factors(shapes, rank: int, *, dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.randn(rank, *s, dtype=dtype) for s in shapes]


@pytest.mark.parametrize(("shapes", "rank", "stride", "dilation", "pads", "hw"), CASES)
def test_every_order_of_the_chain_equals_the_dense_conv(shapes, rank, stride, dilation, pads, hw) -> None:
    torch.manual_seed(0)
    factors = _factors(shapes, rank)
    weight = reconstruct(*factors)
    x = torch.randn(2, weight.shape[1], *hw, dtype=torch.float64)
    top, bottom, left, right = pads
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, stride=stride, dilation=dilation)
    spec = KroneckerSpec(tuple(weight.shape), rank=rank, factor_shapes=shapes)
    assert len(spec.orders()) == math.factorial(len(shapes))
    for order in (*spec.orders(), None):
        y = factorized_conv2d(x, *factors, stride=stride, dilation=dilation, pads=pads, order=order)
        torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(materialized_conv2d(x, *factors, stride=stride, dilation=dilation, pads=pads),
                               expected, **TOL)


def test_reconstruct_is_the_nested_kronecker_product() -> None:
    torch.manual_seed(0)
    a, b, c = _factors([(2, 1, 3, 1), (2, 3, 1, 1), (1, 2, 1, 3)], 3)
    expected = sum(torch.kron(torch.kron(a[r], b[r]), c[r]) for r in range(3))
    torch.testing.assert_close(reconstruct(a, b, c), expected, **TOL)
    a, b = _factors([(2, 3), (4, 1)], 2)
    torch.testing.assert_close(reconstruct(a, b), sum(torch.kron(a[r], b[r]) for r in range(2)), **TOL)


def test_rearrange_n_groups_digits_by_factor() -> None:
    weight = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    shapes = [(2, 3, 3, 1), (4, 2, 1, 3)]
    assert torch.equal(rearrange_n(weight, shapes), rearrange(weight, *shapes))  # two factors: the SVD matrix
    corner = [(8, 1, 1, 1), (1, 6, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)]
    assert torch.equal(rearrange_n(weight, corner), weight)  # the CP corner: T is W itself
    three = [(2, 1, 3, 1), (2, 3, 1, 1), (2, 2, 1, 3)]
    assert torch.equal(unrearrange_n(rearrange_n(weight, three), three), weight)
    # A rank-1 N-factor weight rearranges to a rank-1 tensor: the outer product of the flattened factors.
    a, b, c = _factors(three, 1)
    outer = torch.einsum("i,j,k->ijk", a.flatten(), b.flatten(), c.flatten())
    torch.testing.assert_close(rearrange_n(reconstruct(a, b, c), three), outer, **TOL)


def test_cp_als_recovers_an_exact_low_rank_tensor() -> None:
    torch.manual_seed(0)
    truth = [torch.randn(n, 3, dtype=torch.float64) for n in (6, 5, 4, 3)]
    tensor = torch.einsum("ar,br,cr,dr->abcd", *truth)
    columns, error = cp_als(tensor, 3, iterations=300, tol=0)
    assert error < 1e-6
    torch.testing.assert_close(torch.einsum("ar,br,cr,dr->abcd", *columns), tensor, rtol=1e-5, atol=1e-5)


def test_decompose_at_the_largest_rank_is_exact_and_reports_its_error() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    spec = cp_corner((6, 4, 3, 3), rank=24)  # max_rank: 6*4*3*3 / 6 = 36; 24 columns already span it generically
    factors = decompose(weight, spec)
    assert [tuple(f.shape) for f in factors] == [(24, *s) for s in spec.factor_shapes]
    error = fit_error(weight, spec)
    assert error == pytest.approx(float((reconstruct(*factors) - weight).norm() / weight.norm()), rel=1e-9)
    low = fit_error(weight, spec.with_rank(4))
    assert 0 < error < low < 1  # more rank, less error


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")
def test_cp_als_reaches_the_fit_of_tensorly_parafac() -> None:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    for rank in (4, 16):
        cp = parafac(weight.numpy(), rank, init="svd", n_iter_max=40, tol=1e-6, random_state=0)
        theirs = float((torch.from_numpy(tl.cp_to_tensor(cp)) - weight).norm() / weight.norm())
        ours = fit_error(weight, cp_corner((16, 8, 3, 3), rank))
        # Both are local optima of the same problem from an SVD start: equal within a point of relative error.
        assert ours <= theirs + 0.01, (rank, ours, theirs)


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")
def test_the_cp_corner_equals_tensorly_torch_cp_conv_on_the_same_factors() -> None:
    tltorch = pytest.importorskip("tltorch")
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    theirs = tltorch.FactorizedConv.from_conv(conv, rank=5, factorization="cp", implementation="factorized",
                                              decompose_weights=True)
    cp = theirs.weight
    f, c, h, w = (t.detach() for t in cp.factors)
    spec = cp_corner((8, 6, 3, 3), rank=5)
    ours = KroneckerConv2d.from_conv(conv, spec, path="factorized")
    with torch.no_grad():  # TensorLy-Torch's factors, as our four Kronecker factors
        ours.a.copy_((f * cp.weights.detach()).T.reshape(5, 8, 1, 1, 1))
        ours.b.copy_(c.T.reshape(5, 1, 6, 1, 1))
        ours.c.copy_(h.T.reshape(5, 1, 1, 3, 1))
        ours.d.copy_(w.T.reshape(5, 1, 1, 1, 3))
        ours.bias.copy_(theirs.bias)
    x = torch.randn(3, 6, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_cp_layer_macs_are_the_textbook_cp_conv() -> None:
    # CP conv (Lebedev et al.): C -> R 1x1, R depthwise Kh x 1, R depthwise 1 x Kw, R -> F 1x1.
    spec = cp_corner((64, 32, 3, 3), rank=10)
    geometry = ConvGeometry((8, 8), pads=(1, 1, 1, 1))
    assert spec.cheaper_order(geometry) == (1, 2, 3, 0)
    assert spec.macs(geometry) == 32 * 10 * 100 + 10 * 3 * 8 * 10 + 10 * 3 * 64 + 64 * 10 * 64
    assert spec.num_params == 10 * (64 + 32 + 3 + 3) and spec.max_rank == 32 * 9


class _Ordered(nn.Module):
    def __init__(self, spec: KroneckerSpec, geometry: ConvGeometry, order) -> None:
        super().__init__()
        self.factors = nn.ParameterList([nn.Parameter(torch.randn(spec.rank, *s)) for s in spec.factor_shapes])
        self.geometry, self.order = geometry, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return factorized_conv2d(x, *self.factors, stride=g.stride, dilation=g.dilation, pads=g.pads, order=self.order)


@pytest.mark.parametrize(("shapes", "rank", "stride", "dilation", "pads", "hw"), CASES[1:4])
def test_fvcore_counts_each_order_as_the_spec_does(shapes, rank, stride, dilation, pads, hw) -> None:
    weight_shape = tuple(math.prod(d) for d in zip(*shapes))
    spec = KroneckerSpec(weight_shape, rank=rank, factor_shapes=shapes)
    geometry = ConvGeometry(hw, stride, dilation, pads)
    for order in spec.orders():
        assert count_macs(_Ordered(spec, geometry, order), (weight_shape[1], *hw)) == spec.order_macs(geometry, order)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 12))


PLAN = {
    "0": cp_corner((8, 4, 3, 3), 6),
    "2": KroneckerSpec((8, 8, 3, 3), rank=4, factor_shapes=[(2, 1, 3, 1), (2, 4, 1, 1), (2, 2, 1, 3)]),
    "4": KroneckerSpec((12, 128), rank=3, factor_shapes=[(2, 8), (3, 4), (2, 4)]),
}


def test_kroneckerized_n_factor_model_matches_its_rebuilt_weights_and_costs_what_fvcore_counts() -> None:
    model = _net().double()
    compressed = kroneckerize(model, PLAN, path="factorized")
    rebuilt = _net().double()
    with torch.no_grad():
        for name, spec in PLAN.items():
            layer = compressed.get_submodule(name)
            assert layer.spec == spec and len(layer.factors) == spec.num_factors
            rebuilt.get_submodule(name).weight.copy_(layer.weight)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), rebuilt(x), **TOL)
    dense_macs = count_macs(model, (4, 8, 8))
    expected = dense_macs
    for name, spec in PLAN.items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            geometry = ConvGeometry((8, 8) if name == "0" else (8, 8), layer.stride, layer.dilation, (1, 1, 1, 1))
        else:
            geometry = ConvGeometry((1, 1))
        expected += spec.macs(geometry) - spec.dense_macs(geometry)
    assert count_macs(compressed, (4, 8, 8)) == expected
    assert count_params(compressed) == count_params(model) - sum(s.dense_params - s.num_params for s in PLAN.values())


def test_n_factor_layers_train_on_both_paths_alike() -> None:
    torch.manual_seed(0)
    layer = KroneckerLinear(128, 12, rank=3, factor_shapes=[(2, 8), (3, 4), (2, 4)])
    x = torch.randn(5, 128)
    grads = {}
    for path in ("factorized", "materialized"):
        layer.path = path
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads[path] = [f.grad.clone() for f in layer.factors]
    for g1, g2 in zip(grads["factorized"], grads["materialized"]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_n_factor_model_exports_to_onnx_and_matches(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    compressed = kroneckerize(_net(), PLAN).eval()
    x = torch.randn(2, 4, 8, 8)
    torch.onnx.export(compressed, (x,), str(tmp_path / "m.onnx"))
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("Conv") == 4 + 3 + 3  # a conv per factor: CP 4, three factors 3, the linear's 3
    # Both exporters: the TorchScript one (what search/export.py uses) writes permutes as they are, and ONNX
    # Runtime refuses a Transpose with negative axes.
    torch.onnx.export(compressed, (x,), str(tmp_path / "ts.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    x_new = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        expected = compressed(x_new)
    for name in ("m.onnx", "ts.onnx"):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x_new[:2].numpy() if name == "m.onnx" else x_new.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), expected[: len(out)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(factor_shapes=[(4, 1, 1, 1)]), r"factor_shapes needs at least two shapes, got 1"),
        (dict(factor_shapes=[(4, 1, 1, 1), (1, 6, 1, 1), (1, 1, 3, 3), (1, 1, 1, 1)], rank=0), r"rank 0 is out of range"),
        (dict(factor_shapes=[(4, 1, 1, 1), (1, 6, 3, 1)]), r"multiply to \(4, 6, 3, 1\), not weight_shape \(4, 6, 3, 3\)"),
        (dict(factor_shapes=[(4, 1, 1), (1, 6, 3, 3)]), r"every factor shape must have as many dims"),
        (dict(), r"give a_shape \(two factors\) or factor_shapes \(two or more\)"),
    ],
)
def test_bad_factor_shapes_say_what_is_wrong(kwargs, message: str) -> None:
    kwargs.setdefault("rank", 2)
    with pytest.raises(ValueError, match=message):
        KroneckerSpec((4, 6, 3, 3), **kwargs)


def test_two_factor_forms_are_one_spec() -> None:
    by_a = KroneckerSpec((8, 8, 3, 3), (2, 2, 3, 1), 3)
    by_shapes = KroneckerSpec((8, 8, 3, 3), rank=3, factor_shapes=[(2, 2, 3, 1), (4, 4, 1, 3)])
    assert by_a == by_shapes and hash(by_a) == hash(by_shapes) and by_a.num_factors == 2
    assert by_a.cheaper_order(ConvGeometry((8, 8), pads=(1, 1, 1, 1))) in ("ba", "ab")
