"""The factorized forward in both contraction orders and the materialized path equal F.conv2d with the rebuilt weight."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import gkpd.functional
from gkpd import KroneckerSpec, factorized_conv2d, kronecker_conv2d, kronecker_linear, materialized_conv2d, reconstruct
from gkpd.spec import ConvGeometry

TOL = dict(rtol=1e-10, atol=1e-10)


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    """Random factors, input, stride, dilation and asymmetric zero pads of a valid float64 conv."""
    a_shape = tuple(draw(st.integers(1, 3)) for _ in range(4))
    b_shape = tuple(draw(st.integers(1, 3)) for _ in range(4))
    spec = KroneckerSpec(tuple(x * y for x, y in zip(a_shape, b_shape)), a_shape, 1)
    rank = draw(st.integers(1, min(3, spec.max_rank)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    # Smallest input that still gives at least one output pixel, plus a little.
    kh, kw = spec.weight_shape[2:]
    h = max(1, dilation[0] * (kh - 1) + 1 - pads[0] - pads[1]) + draw(st.integers(0, 4))
    w = max(1, dilation[1] * (kw - 1) + 1 - pads[2] - pads[3]) + draw(st.integers(0, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return dict(
        x=torch.randn(draw(st.integers(1, 2)), spec.weight_shape[1], h, w, generator=generator, dtype=torch.float64),
        a=torch.randn(rank, *a_shape, generator=generator, dtype=torch.float64),
        b=torch.randn(rank, *b_shape, generator=generator, dtype=torch.float64),
        stride=stride, dilation=dilation, pads=pads,
    )


def _reference(case: dict) -> torch.Tensor:
    top, bottom, left, right = case["pads"]
    x = F.pad(case["x"], (left, right, top, bottom))
    return F.conv2d(x, reconstruct(case["a"], case["b"]), stride=case["stride"], dilation=case["dilation"])


@settings(max_examples=300, deadline=None)
@given(case=conv_cases())
def test_every_path_equals_conv_with_the_reconstructed_weight(case: dict) -> None:
    expected = _reference(case)
    x, a, b = case["x"], case["a"], case["b"]
    kwargs = dict(stride=case["stride"], dilation=case["dilation"], pads=case["pads"])
    for order in ("ba", "ab", None):
        torch.testing.assert_close(factorized_conv2d(x, a, b, order=order, **kwargs), expected, **TOL)
    torch.testing.assert_close(materialized_conv2d(x, a, b, **kwargs), expected, **TOL)
    bias = torch.randn(expected.shape[1], dtype=torch.float64)
    for path in ("factorized", "materialized"):
        torch.testing.assert_close(
            kronecker_conv2d(x, (a, b), bias, path=path, **kwargs), expected + bias[:, None, None], **TOL
        )
    # A layer at inference passes the dense weight it keeps.
    torch.testing.assert_close(kronecker_conv2d(x, (a, b), bias, path="materialized", weight=reconstruct(a, b),
                                                **kwargs), expected + bias[:, None, None], **TOL)


def test_both_spatial_factors_need_the_dilated_second_step() -> None:
    # A 4x4 kernel split 2x2 ⊗ 2x2: step 2 must run A at dilation 2 (B's extent). The paper's public layer
    # drops that dilation, which would give a 4x4 output here instead of the dense conv's 3x3.
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    a, b = torch.randn(1, 2, 1, 2, 2, dtype=torch.float64), torch.randn(1, 1, 2, 2, 2, dtype=torch.float64)
    expected = F.conv2d(x, reconstruct(a, b))
    assert expected.shape == (1, 2, 3, 3)
    torch.testing.assert_close(factorized_conv2d(x, a, b, order="ba"), expected, **TOL)
    torch.testing.assert_close(factorized_conv2d(x, a, b, order="ab"), expected, **TOL)


def test_default_order_is_the_cheaper_one() -> None:
    spec = KroneckerSpec((8, 4, 3, 3), (4, 1, 1, 1), 1)  # "ba" costs 5120 MACs on 8x8 pad 1, "ab" 20032
    assert spec.cheaper_order(ConvGeometry((8, 8), pads=(1, 1, 1, 1))) == "ba"
    spec = KroneckerSpec((4, 8, 3, 3), (1, 4, 1, 1), 1)  # the transpose-like split prefers "ab"
    assert spec.cheaper_order(ConvGeometry((8, 8), pads=(1, 1, 1, 1))) == "ab"


def test_unknown_path_raises() -> None:
    x, a, b = torch.zeros(1, 4, 3, 3), torch.zeros(1, 2, 2, 1, 1), torch.zeros(1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"unknown path 'fast': allowed \('factorized', 'materialized'\)"):
        kronecker_conv2d(x, (a, b), path="fast")  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    f1=st.integers(1, 4), f2=st.integers(1, 4), c1=st.integers(1, 4), c2=st.integers(1, 4), rank=st.integers(1, 3),
    lead=st.sampled_from([(3,), (2, 5), (1, 2, 3)]), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_linear_equals_f_linear(f1, f2, c1, c2, rank, lead, bias, seed) -> None:
    rank = min(rank, f1 * c1, f2 * c2)
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, f1, c1, generator=generator, dtype=torch.float64)
    b = torch.randn(rank, f2, c2, generator=generator, dtype=torch.float64)
    x = torch.randn(*lead, c1 * c2, generator=generator, dtype=torch.float64)
    bias_ = torch.randn(f1 * f2, generator=generator, dtype=torch.float64) if bias else None
    expected = F.linear(x, reconstruct(a, b), bias_)
    assert expected.shape == (*lead, f1 * f2)
    for path in ("factorized", "materialized"):
        torch.testing.assert_close(kronecker_linear(x, (a, b), bias_, path=path), expected, **TOL)


@pytest.mark.parametrize("shapes", [
    [(6, 1, 1, 1), (1, 4, 3, 3)],  # SVD-like, order "ba": conv C -> R, then R -> F
    [(1, 4, 3, 1), (6, 1, 1, 3)],  # its mirror, order "ab"
    [(6, 1, 1, 1), (1, 4, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)],  # CP: 1x1, two depthwise, 1x1
])
def test_plain_chains_run_without_reshapes_and_stay_exact(shapes, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    factors = [torch.randn(3, *s, dtype=torch.float64) for s in shapes]
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    spec = KroneckerSpec((6, 4, 3, 3), rank=3, factor_shapes=shapes)
    geometry = ConvGeometry((7, 7), (2, 1), pads=(1, 1, 1, 1))
    assert gkpd.functional.is_plain(spec, spec.steps(geometry, spec.cheaper_order(geometry)))
    plain: list[int] = []
    real = gkpd.functional._plain_chain
    monkeypatch.setattr(gkpd.functional, "_plain_chain", lambda *args: plain.append(1) or real(*args))
    y = factorized_conv2d(x, *factors, stride=(2, 1), pads=(1, 1, 1, 1))
    assert plain == [1]
    expected = F.conv2d(x, reconstruct(*factors), stride=(2, 1), padding=1)
    torch.testing.assert_close(y, expected, **TOL)
    assert y.is_contiguous(memory_format=torch.channels_last)  # nothing reshaped it back


def test_a_split_that_folds_channels_is_not_plain() -> None:
    spec = KroneckerSpec((6, 4, 3, 3), (2, 2, 3, 1), 1)
    geometry = ConvGeometry((7, 7), pads=(1, 1, 1, 1))
    assert not any(gkpd.functional.is_plain(spec, spec.steps(geometry, order)) for order in spec.orders())


@pytest.mark.parametrize("b_shape, stride, pads", [
    ((4, 5, 3, 3), (1, 1), (1, 1, 1, 1)),  # the square split
    ((4, 5, 3, 3), (2, 2), (1, 1, 1, 1)),  # strided: the stride stays on B's step
    ((4, 5, 3, 1), (1, 2), (1, 0, 0, 0)),  # an asymmetric pad and a 3x1 kernel
    ((4, 5, 1, 1), (1, 1), (0, 0, 0, 0)),  # both 1x1 (a linear layer's chain)
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_1x1_outer_factor_after_the_inner_one_runs_without_permutes_and_stays_exact(
    b_shape, stride, pads, channels_last: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """a (F1,C1,1,1) ⊗ b (F2,C2,kh,kw) in order "ba": B's conv on a view of the input, then A as one 1x1 conv over
    (C1, R), whose output is already in the layer's channel order; no Tensor.permute on the activations."""
    torch.manual_seed(0)
    a, b = torch.randn(3, 6, 2, 1, 1, dtype=torch.float64), torch.randn(3, *b_shape, dtype=torch.float64)
    x = torch.randn(2, 2 * b_shape[1], 9, 8, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    top, bottom, left, right = pads
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), reconstruct(a, b), stride=stride)
    permuted: list[tuple[int, ...]] = []
    real = torch.Tensor.permute
    monkeypatch.setattr(torch.Tensor, "permute", lambda t, *dims: permuted.append(tuple(t.shape)) or real(t, *dims))
    y = factorized_conv2d(x, a, b, stride=stride, pads=pads, order="ba")
    monkeypatch.undo()
    torch.testing.assert_close(y, expected, **TOL)
    assert all(shape == tuple(a.shape[:3]) for shape in permuted)  # only A's [R, F1, C1] view, the kernel


def test_a_chain_is_planned_once_per_setting_and_each_setting_gets_its_own_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    # Planning (the spec, every order's cost) took ~0.1 ms a call: a third of a 64-channel conv at batch 1.
    costed: list[tuple] = []
    real = KroneckerSpec.steps
    monkeypatch.setattr(KroneckerSpec, "steps", lambda self, g, o: costed.append((g.in_hw, o)) or real(self, g, o))
    gkpd.functional._chain.cache_clear()
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 1, 1, 1, dtype=torch.float64), torch.randn(2, 1, 3, 3, 3, dtype=torch.float64)
    x, wider = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(1, 3, 6, 9, dtype=torch.float64)
    for _ in range(3):
        y, y_wider = factorized_conv2d(x, a, b, pads=(1, 1, 1, 1)), factorized_conv2d(wider, a, b, order="ab")
    # cheaper_order costs both orders of the first setting; the second names its order: one steps() call.
    assert sorted(costed) == sorted([((6, 6), "ab"), ((6, 6), "ba"), ((6, 6), "ba"), ((6, 9), "ab")])
    weight = reconstruct(a, b)
    torch.testing.assert_close(y, F.conv2d(x, weight, padding=1), **TOL)
    torch.testing.assert_close(y_wider, F.conv2d(wider, weight), **TOL)


CP = [(6, 1, 1, 1), (1, 4, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)]  # a 1x1 C -> R, two depthwise, a 1x1 R -> F


@pytest.mark.parametrize("shapes, order, pads, matmuls", [
    ([(6, 1, 1, 1), (1, 4, 3, 3)], "ba", (1, 1, 1, 1), 1),  # SVD-like: the R -> F step
    (CP, (1, 2, 3, 0), (0, 0, 0, 0), 2),  # CP: its first and last steps
    (CP, (1, 2, 3, 0), (1, 1, 1, 1), 1),  # padded: the first 1x1 step pads, so it stays a conv
    ([(3, 2, 1, 1), (2, 2, 3, 3)], "ba", (1, 1, 1, 1), 1),  # the square split: A's step over (C1, R)
])
def test_unpadded_1x1_steps_run_as_one_batched_matmul_and_traced_graphs_keep_the_conv(
    shapes, order, pads, matmuls: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    factors = [torch.randn(3, *s, dtype=torch.float64) for s in shapes]
    spec = KroneckerSpec(tuple(math.prod(d) for d in zip(*shapes)), rank=3, factor_shapes=shapes)
    x = torch.randn(2, spec.weight_shape[1], 7, 6, dtype=torch.float64)
    top, bottom, left, right = pads
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), reconstruct(*factors))
    run = lambda x: factorized_conv2d(x, *factors, pads=pads, order=order)  # noqa: E731
    calls: list[str] = []
    real = {name: getattr(torch, name) for name in ("bmm", "mm")}
    for name in real:
        monkeypatch.setattr(torch, name, lambda a, b, name=name: calls.append(name) or real[name](a, b))
    torch.testing.assert_close(run(x), expected, **TOL)
    assert calls == ["bmm"] * matmuls
    calls.clear()
    torch.testing.assert_close(run(x[:1]), expected[:1], **TOL)
    assert calls == ["mm"] * matmuls  # one image: a plain matmul
    calls.clear()
    traced = torch.jit.trace(run, x, check_trace=False)  # the check would rerun it untraced
    graph = str(traced.graph)
    assert calls == [] and "aten::bmm" not in graph and "aten::mm" not in graph and "aten::_convolution" in graph
    torch.testing.assert_close(traced(x), expected, **TOL)


class _Calls(TorchFunctionMode):
    """Records the name of every torch function called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shapes, order, eager, traced_adds", [
    ([(1, 4, 3, 1), (6, 1, 1, 3)], "ab", ("conv2d", "conv2d"), 0),  # the last step a 1x3 conv: the bias goes into it
    ([(6, 1, 1, 1), (1, 4, 3, 3)], "ba", ("baddbmm", "addmm"), 0),  # the last step a matmul: into it
    ([(3, 2, 3, 1), (2, 2, 1, 3)], "ba", ("add", "add"), 1),  # a chain that folds channels: one add after it
])
def test_the_bias_goes_into_the_last_step_of_a_plain_chain(shapes, order, eager, traced_adds: int) -> None:
    torch.manual_seed(0)
    factors = [torch.randn(3, *s, dtype=torch.float64) for s in shapes]
    weight = reconstruct(*factors)
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    x = torch.randn(2, weight.shape[1], 7, 6, dtype=torch.float64)
    chain = gkpd.functional.plan(factors, (7, 6), pads=(1, 1, 1, 1), order=order)
    run = lambda x: chain.run(x, chain.kernels(factors), bias)  # noqa: E731
    expected = F.conv2d(x, weight, bias, padding=1)
    for images, last in zip((x, x[:1]), eager):  # batch 2, then one image
        with _Calls() as calls:
            y = run(images)
        torch.testing.assert_close(y, expected[: len(images)], **TOL)
        ops = [name for name in calls.names if name in ("conv2d", "mm", "addmm", "bmm", "baddbmm", "add")]
        assert ops[-1] == last and ops.count("add") == (last == "add")
    traced = torch.jit.trace(run, x, check_trace=False)
    assert str(traced.graph).count("aten::add") == traced_adds
    torch.testing.assert_close(traced(x), expected, **TOL)


PLAIN_CHAINS = [  # (factor shapes, stride, pads): every plain route a packed kernel can meet
    ([(16, 1, 1, 1), (1, 8, 3, 3)], (1, 1), (1, 1, 1, 1)),  # the SVD-like split: a 3x3 conv, then a matmul
    ([(16, 1, 1, 1), (1, 8, 3, 3)], (2, 2), (1, 1, 1, 1)),  # strided
    ([(16, 1, 1, 3), (1, 8, 3, 1)], (1, 1), (0, 1, 1, 0)),  # two convs; asymmetric pads (F.pad first)
    ([(16, 1, 1, 1), (1, 8, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)], (1, 1), (1, 1, 1, 1)),  # CP: depthwise middle steps
]


@pytest.mark.skipif(not gkpd.functional._PACKED_OPS, reason="this torch has no oneDNN packed-conv ops")
@pytest.mark.parametrize("shapes, stride, pads", PLAIN_CHAINS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_kernels_give_the_same_conv_and_the_inputs_layout(shapes, stride, pads, channels_last: bool) -> None:
    torch.manual_seed(0)
    factors = [torch.randn(2, *s) for s in shapes]
    weight = reconstruct(*factors)
    bias = torch.randn(weight.shape[0])
    x = torch.randn(1, weight.shape[1], 9, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    top, bottom, left, right = pads
    # float64 reference; the packed convs add in float32 and in their own order
    expected = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), weight.double(), bias.double(), stride=stride)
    chain = gkpd.functional.plan(factors, (9, 8), stride, pads=pads)
    assert chain.route == "plain" and gkpd.functional.packs(x)
    packed = chain.pack(chain.kernels(factors))
    convs = [not p for p in chain.pointwise]
    assert [k.is_mkldnn for k in packed] == convs and any(convs)
    with torch.inference_mode():
        y = chain.run(x, packed, bias)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_only_one_float32_image_in_eager_mode_packs_and_only_a_plain_chain_packs() -> None:
    x = torch.randn(1, 8, 5, 5)
    assert gkpd.functional.packs(x) == gkpd.functional._PACKED_OPS
    assert not gkpd.functional.packs(torch.randn(2, 8, 5, 5))
    assert not gkpd.functional.packs(x.double())
    folding = [torch.randn(2, 3, 2, 3, 1), torch.randn(2, 2, 2, 1, 3)]
    chain = gkpd.functional.plan(folding, (5, 5), pads=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="only a plain chain packs its kernels, not a 'general' one"):
        chain.pack(chain.kernels(folding))
