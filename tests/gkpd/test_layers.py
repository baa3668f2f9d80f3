"""KroneckerConv2d / KroneckerLinear: drop-in exactness, gradients, paths, dense round trip, unsupported features."""

from __future__ import annotations

import copy
import pickle
import time

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import gkpd.layers
from gkpd import KroneckerConv2d, KroneckerLinear, KroneckerSpec, factorized_conv2d, reconstruct, set_path, use_path

# The reference nn.Conv2d warns that it copies the input for an even "same" kernel; that is the case under test.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

TOL = dict(rtol=1e-10, atol=1e-10)
PATHS = ("auto", "factorized", "materialized")


@st.composite
def conv_layers(draw: st.DrawFn, *, covered: bool = False) -> tuple[nn.Conv2d, KroneckerSpec, torch.Tensor]:
    """A float64 nn.Conv2d with any padding form nn.Conv2d accepts, a spec for it, and a valid input.

    ``covered``: the input is large enough that some output pixel sees the image, not only padding.
    """
    a_shape = tuple(draw(st.integers(1, 3)) for _ in range(4))
    b_shape = tuple(draw(st.integers(1, 3)) for _ in range(4))
    f, c, kh, kw = (x * y for x, y in zip(a_shape, b_shape))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    forms = [draw(st.integers(0, 2)), (draw(st.integers(0, 2)), draw(st.integers(0, 2))), "valid"]
    padding = draw(st.sampled_from(forms + (["same"] if stride == (1, 1) else [])))
    conv = nn.Conv2d(c, f, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                     bias=draw(st.booleans()), dtype=torch.float64)
    spec = KroneckerSpec((f, c, kh, kw), a_shape, 1)
    spec = spec.with_rank(draw(st.integers(1, spec.max_rank)))
    ph, pw = (0, 0) if isinstance(padding, str) else nn.modules.utils._pair(padding)
    if covered:
        ph, pw = -stride[0], -stride[1]
    h = max(1, dilation[0] * (kh - 1) + 1 - 2 * ph) + draw(st.integers(0, 3))
    w = max(1, dilation[1] * (kw - 1) + 1 - 2 * pw) + draw(st.integers(0, 3))
    x = torch.randn(draw(st.integers(1, 2)), c, h, w, dtype=torch.float64)
    return conv, spec, x


def _dense_reference(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``conv`` with its weight replaced, through nn.Conv2d's own padding handling."""
    return conv._conv_forward(x, weight, conv.bias)


@settings(max_examples=120, deadline=None)
@given(case=conv_layers())
def test_conv_layer_equals_conv_with_the_reconstructed_weight(case) -> None:
    conv, spec, x = case
    layer = KroneckerConv2d.from_conv(conv, spec)
    expected = _dense_reference(conv, reconstruct(layer.a, layer.b), x)
    for path in PATHS:
        layer.path = path
        torch.testing.assert_close(layer(x), expected, **TOL)
    for order in ("ba", "ab"):
        y = factorized_conv2d(x, layer.a, layer.b, stride=layer.stride, dilation=layer.dilation, pads=layer.pads,
                              order=order)
        torch.testing.assert_close(y if conv.bias is None else y + conv.bias[:, None, None], expected, **TOL)
    torch.testing.assert_close(layer.to_dense()(x), expected, **TOL)
    if conv.bias is not None:
        assert torch.equal(layer.bias, conv.bias)


@settings(max_examples=40, deadline=None)
@given(case=conv_layers())
def test_conv_layer_at_full_rank_equals_the_original(case) -> None:
    conv, spec, x = case
    layer = KroneckerConv2d.from_conv(conv, spec.with_rank(spec.max_rank))
    for path in PATHS:
        layer.path = path
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-9)


def _on_path(path: str):
    """A runner that calls the layer on ``path``."""
    def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layer.path = path
        return layer(x)
    return run


def _grads(layer: nn.Module, x: torch.Tensor, run, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    x = x.detach().requires_grad_()
    (run(layer, x) * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return grads | {"x": x.grad}


@settings(max_examples=40, deadline=None)
@given(case=conv_layers(covered=True))
def test_conv_gradients_reach_both_factors_and_agree_across_paths(case) -> None:
    conv, spec, x = case
    layer = KroneckerConv2d.from_conv(conv, spec)
    upstream = torch.randn_like(conv(x))

    def with_order(order: str):
        def run(m: KroneckerConv2d, x: torch.Tensor) -> torch.Tensor:
            y = factorized_conv2d(x, m.a, m.b, stride=m.stride, dilation=m.dilation, pads=m.pads, order=order)
            return y if m.bias is None else y + m.bias[:, None, None]
        return run

    reference = _grads(layer, x, _on_path("materialized"), upstream)
    assert reference["a"].abs().sum() > 0 and reference["b"].abs().sum() > 0
    for run in (_on_path("factorized"), _on_path("auto"), with_order("ba"), with_order("ab")):
        grads = _grads(layer, x, run, upstream)
        assert grads.keys() == reference.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], reference[name], **TOL)


@settings(max_examples=40, deadline=None)
@given(
    f1=st.integers(1, 4), f2=st.integers(1, 4), c1=st.integers(1, 4), c2=st.integers(1, 4),
    lead=st.sampled_from([(3,), (2, 5)]), bias=st.booleans(), data=st.data(),
)
def test_linear_layer_equals_the_reconstructed_linear(f1, f2, c1, c2, lead, bias, data) -> None:
    linear = nn.Linear(c1 * c2, f1 * f2, bias=bias, dtype=torch.float64)
    spec = KroneckerSpec((f1 * f2, c1 * c2), (f1, c1), 1)
    rank = data.draw(st.integers(1, spec.max_rank))
    layer = KroneckerLinear.from_linear(linear, spec.with_rank(rank))
    x = torch.randn(*lead, c1 * c2, dtype=torch.float64)
    expected = nn.functional.linear(x, reconstruct(layer.a, layer.b), linear.bias)
    upstream = torch.randn_like(expected)
    reference = _grads(layer, x, _on_path("materialized"), upstream)
    assert reference["a"].abs().sum() > 0 and reference["b"].abs().sum() > 0
    for path in PATHS:
        layer.path = path
        torch.testing.assert_close(layer(x), expected, **TOL)
        grads = _grads(layer, x, _on_path(path), upstream)
        for name in grads:
            torch.testing.assert_close(grads[name], reference[name], **TOL)
    torch.testing.assert_close(layer.to_dense()(x), expected, **TOL)
    layer = KroneckerLinear.from_linear(linear, spec.with_rank(spec.max_rank))
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-9, atol=1e-9)


def test_to_dense_round_trip() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), dtype=torch.float64)
    layer = KroneckerConv2d.from_conv(conv, KroneckerSpec((8, 6, 3, 2), (2, 3, 3, 1), 2))
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d)
    assert (dense.stride, dense.padding, dense.dilation, dense.kernel_size) == ((2, 1), (1, 0), (1, 2), (3, 2))
    assert torch.equal(dense.weight, layer.weight) and torch.equal(dense.bias, layer.bias)
    again = KroneckerConv2d.from_conv(dense, layer.spec)  # the rebuilt weight has exactly this rank
    torch.testing.assert_close(again.weight, layer.weight, **TOL)
    linear = nn.Linear(6, 4, bias=False, dtype=torch.float64)
    klinear = KroneckerLinear.from_linear(linear, KroneckerSpec((4, 6), (2, 3), 4))
    dense_linear = klinear.to_dense()
    assert dense_linear.bias is None
    torch.testing.assert_close(dense_linear.weight, linear.weight, **TOL)


@pytest.mark.parametrize("factor_shapes", [
    [(16, 1, 3, 3), (1, 16, 1, 1)],  # the rebuilt weight was a channels_last-strided view
    [(16, 1, 1, 1), (1, 16, 3, 3)],
    [(4, 4, 3, 1), (4, 4, 1, 3)],
    [(16, 1, 1, 1), (1, 16, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)],
])
@pytest.mark.parametrize("path", PATHS)
def test_the_output_keeps_the_inputs_memory_layout_on_every_path(factor_shapes, path: str) -> None:
    """As nn.Conv2d with a freshly built weight: a default-layout input gives a default-layout output, in training
    and at inference. A conv takes its output's layout from its weight too, so a rebuilt weight with
    channels_last strides turned every later activation of a model channels_last (2-3x slower per conv at
    batch 1 on a CPU)."""
    torch.manual_seed(0)
    layer = KroneckerConv2d(16, 16, 3, rank=2, factor_shapes=factor_shapes, padding=1, path=path)
    x = torch.randn(1, 16, 7, 7)
    assert reconstruct(*layer.factors).is_contiguous()
    assert layer(x).is_contiguous()  # training: the weight rebuilt with autograd
    with torch.inference_mode():
        assert layer.eval()(x).is_contiguous()  # inference: the kept weight


def test_attributes_match_nn_conv2d() -> None:
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    layer = KroneckerConv2d.from_conv(conv, KroneckerSpec((8, 4, 3, 3), (2, 2, 3, 1), 3))
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert layer.a.shape == (3, 2, 2, 3, 1) and layer.b.shape == (3, 4, 2, 1, 3)
    assert list(layer.state_dict()) == ["a", "b", "bias"]
    assert "kron=2x2x3x1⊗4x2x1x3 r3" in repr(layer) and "path=auto" in repr(layer)


def test_fresh_layer_init_matches_the_dense_weight_variance() -> None:
    torch.manual_seed(0)
    layer = KroneckerConv2d(64, 64, 3, a_shape=(8, 8, 1, 1), rank=16, padding=1)
    dense = nn.Conv2d(64, 64, 3, padding=1)
    assert layer.weight.var().item() == pytest.approx(dense.weight.var().item(), rel=0.15)


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), r"groups > 1 \(got groups=2\)"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), r"padding_mode='zeros' \(got 'reflect'\)"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), r"padding_mode='zeros' \(got 'circular'\)"),
    ],
)
def test_unsupported_conv_features_raise_not_implemented(conv: nn.Conv2d, message: str) -> None:
    spec = KroneckerSpec(tuple(conv.weight.shape), (2, 1, 1, 1), 1)
    with pytest.raises(NotImplementedError, match=message):
        KroneckerConv2d.from_conv(conv, spec)


def test_bad_construction_raises() -> None:
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        KroneckerConv2d(4, 4, 3, a_shape=(2, 2, 1, 1), rank=1, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding 'full' is not supported"):
        KroneckerConv2d(4, 4, 3, a_shape=(2, 2, 1, 1), rank=1, padding="full")
    with pytest.raises(ValueError, match=r"unknown path 'gpu'"):
        KroneckerConv2d(4, 4, 3, a_shape=(2, 2, 1, 1), rank=1, path="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"spec weight_shape \(4, 4, 1, 1\) does not match conv weight \(4, 4, 3, 3\)"):
        KroneckerConv2d.from_conv(nn.Conv2d(4, 4, 3), KroneckerSpec((4, 4, 1, 1), (2, 2, 1, 1), 1))
    with pytest.raises(TypeError, match="from_conv expects nn.Conv2d, got Linear"):
        KroneckerConv2d.from_conv(nn.Linear(4, 4), KroneckerSpec((4, 4, 1, 1), (2, 2, 1, 1), 1))
    with pytest.raises(TypeError, match="from_linear expects nn.Linear, got Conv2d"):
        KroneckerLinear.from_linear(nn.Conv2d(4, 4, 1), KroneckerSpec((4, 4), (2, 2), 1))


def test_auto_measures_once_per_setting_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gkpd.layers, "_AUTO_CHOICE", {})
    calls: list[tuple] = []
    measure = gkpd.layers._measure_path

    def recording(x, factors, run):
        calls.append((tuple(x.shape), factors[0].requires_grad and torch.is_grad_enabled()))
        choice = measure(x, factors, run)
        assert choice in ("factorized", "materialized")
        return choice

    monkeypatch.setattr(gkpd.layers, "_measure_path", recording)
    torch.manual_seed(0)
    spec = KroneckerSpec((8, 8, 3, 3), (2, 2, 3, 1), 2)
    convs = [nn.Conv2d(8, 8, 3, stride=s, padding=1, dtype=torch.float64) for s in (1, 2)]
    layers = [KroneckerConv2d.from_conv(conv, spec) for conv in convs]
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    for _ in range(2):
        for conv, layer in zip(convs, layers):
            with torch.no_grad():
                expected = _dense_reference(conv, layer.weight, x)
                torch.testing.assert_close(layer(x), expected, **TOL)
    # Same spec and input, different stride: two settings, each measured once.
    assert calls == [((2, 8, 8, 8), False), ((2, 8, 8, 8), False)]
    layers[0](x).sum().backward()  # training is a setting of its own
    layers[0](x[:1])  # so is another batch size
    assert calls[2:] == [((2, 8, 8, 8), True), ((1, 8, 8, 8), True)]


def _fake_paths(seconds: dict[str, float], calls: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch):
    """A `run` for _measure_path whose paths take fixed times per row, recording (path, rows) per call.

    The times are read from a fake clock, not slept: on a loaded machine a sleep overshoots by more than the
    few-percent differences these tests compare."""
    took: list[float] = []

    def run(x: torch.Tensor, factors: tuple[torch.Tensor, ...], path: str) -> torch.Tensor:
        calls.append((path, len(x)))
        took.append(seconds[path] * len(x))
        return x.sum() * factors[0].sum() * factors[1].sum()

    def clock(fn) -> float:
        before = len(took)
        fn()
        return sum(took[before:])

    monkeypatch.setattr(gkpd.layers, "_seconds", clock)
    return run


def test_auto_probe_keeps_a_far_slower_path_off_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    rows, a, b = torch.ones(64, 2), torch.ones(1, 2), torch.ones(1, 2)
    run = _fake_paths({"materialized": 2e-5, "factorized": 1e-3}, calls, monkeypatch)  # 50x apart
    assert gkpd.layers._measure_path(rows, (a, b), run) == "materialized"
    probe = gkpd.layers.PROBE_ROWS
    # Warm-ups, first timings, then one round: the fast path in a loop of ~2 ms (16 rows take 0.32 ms: 6 calls),
    # the slow one (16 ms) once.
    assert gkpd.layers.TIMED_SECONDS == 2e-3
    assert calls == [("materialized", probe), ("factorized", probe)] * 2 + [("materialized", probe)] * 6 + [
        ("factorized", probe)]


def test_auto_times_close_paths_on_the_whole_batch_and_keeps_the_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    rows, a, b = torch.ones(64, 2), torch.ones(1, 2), torch.ones(1, 2)
    run = _fake_paths({"materialized": 3e-4, "factorized": 1.5e-4}, calls, monkeypatch)  # 2x apart: both go on
    assert gkpd.layers._measure_path(rows, (a, b), run, repeats=2) == "factorized"
    # Warm-up, first timing, then two interleaved rounds (19.2 and 9.6 ms a call: one call a round).
    assert [c for c in calls if c[1] == 64] == [("materialized", 64), ("factorized", 64)] * 4


@pytest.mark.parametrize(("factorized", "chosen"), [(0.97, "materialized"), (0.90, "factorized")])
def test_auto_keeps_the_dense_like_path_unless_factorized_wins_by_the_margin(factorized: float, chosen: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # 3% faster is within the 5% margin (noise): the dense-like path stays; 10% faster wins.
    calls: list[tuple[str, int]] = []
    rows, a, b = torch.ones(8, 2), torch.ones(1, 2), torch.ones(1, 2)
    run = _fake_paths({"materialized": 2e-3, "factorized": factorized * 2e-3}, calls, monkeypatch)
    assert gkpd.layers.DENSE_MARGIN == 0.05
    assert gkpd.layers._measure_path(rows, (a, b), run, repeats=3) == chosen


@pytest.mark.parametrize("path, a_shape", [
    ("materialized", (2, 2, 3, 1)),  # the dense weight
    ("factorized", (2, 2, 3, 1)),  # a chain that folds channels: its kernels
    ("factorized", (6, 1, 1, 1)),  # a plain chain (SVD-like): its kernels
])
def test_inference_keeps_the_dense_weight_or_the_kernels_until_a_factor_changes(path: str, a_shape) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    layer = KroneckerConv2d.from_conv(conv, KroneckerSpec((6, 4, 3, 3), a_shape, 2), path=path)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    rebuilt: list[int] = []
    real, real_kernels = gkpd.layers.reconstruct, gkpd.functional.Chain.kernels
    with pytest.MonkeyPatch.context() as mp:
        if path == "materialized":
            mp.setattr(gkpd.layers, "reconstruct", lambda *f: rebuilt.append(1) or real(*f))
        else:
            mp.setattr(gkpd.functional.Chain, "kernels", lambda chain, f: rebuilt.append(1) or real_kernels(chain, f))
        layer.eval()
        with torch.no_grad():
            first, again = layer(x), layer(x)
        assert len(rebuilt) == 1  # built once, then reused
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        layer.train()
        layer(x).sum().backward()  # training builds them with the graph, and drops the kept ones
        assert len(rebuilt) == 2 and layer._inference_cache == {}
        optimizer.step()  # the factors change in place
        layer.eval()

        def reference() -> torch.Tensor:
            return torch.nn.functional.conv2d(x, real(layer.a, layer.b), layer.bias, padding=1)

        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference(), **TOL)
            layer.load_state_dict({k: v + 1 for k, v in layer.state_dict().items()})
            torch.testing.assert_close(layer(x), reference(), **TOL)
        assert len(rebuilt) == 4  # one rebuild after the step, one after load_state_dict


@pytest.mark.parametrize("cls", [KroneckerConv2d, KroneckerLinear])
def test_inference_reuses_its_settled_call_until_something_it_depends_on_changes(cls) -> None:
    """At inference a layer settles its call once (path, kept weight or kernels) and reuses it for inputs of the
    same shape, strides, dtype and device; a changed factor or bias, path, input or thread count settles it again,
    and every answer is the dense layer's on the current weight."""
    torch.manual_seed(0)
    if cls is KroneckerConv2d:
        dense = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
        layer = KroneckerConv2d.from_conv(dense, KroneckerSpec((6, 4, 3, 3), (6, 1, 1, 1), 2), path="materialized")
        inputs = [torch.randn(1, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 7, 7, dtype=torch.float64)]
        op = lambda x, w, b: nn.functional.conv2d(x, w, b, padding=1)  # noqa: E731
    else:
        dense = nn.Linear(6, 4, dtype=torch.float64)
        layer = KroneckerLinear.from_linear(dense, KroneckerSpec((4, 6), (2, 3), 2), path="materialized")
        inputs = [torch.randn(3, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)]
        op = nn.functional.linear
    settled: list[int] = []
    real = layer._inference_call
    layer._inference_call = lambda x, factors: settled.append(1) or real(x, factors)
    layer.eval()

    def check(x: torch.Tensor, settles: int) -> None:
        with torch.inference_mode():
            y = layer(x)
        torch.testing.assert_close(y, op(x, reconstruct(*layer.factors).detach(), layer.bias), **TOL)
        assert len(settled) == settles

    x, other = inputs
    check(x, 1)
    check(x, 1)  # reused: nothing changed
    with torch.no_grad():
        layer.a.mul_(2)  # in place: a new version
    check(x, 2)
    with torch.no_grad():
        layer.bias.add_(1)
    check(x, 3)
    layer.bias = nn.Parameter(torch.zeros_like(layer.bias))  # replaced
    check(x, 4)
    set_path(layer, "factorized")
    check(x, 5)
    check(other, 6)  # another shape
    check(x, 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        check(x, 8)
    finally:
        torch.set_num_threads(threads)
    del layer._inference_call  # the counting wrapper (a local function) would not pickle
    copied = pickle.loads(pickle.dumps(copy.deepcopy(layer)))
    assert "_fast_call" in vars(layer) and "_fast_call" not in vars(copied)
    layer.train()
    layer(x).sum().backward()  # training drops what inference kept
    assert "_fast_call" not in vars(layer) and layer.a.grad is not None


def test_a_traced_layer_reads_its_factors_not_the_kernels_kept_for_inference() -> None:
    """ONNX export and fvcore trace the model: the graph must hold the factors, so that it is the layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    layer = KroneckerConv2d.from_conv(conv, KroneckerSpec((6, 4, 3, 3), (6, 1, 1, 1), 2), path="factorized").eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        layer(x)  # the kernels are kept now
        traced = torch.jit.trace(layer, x)
    graph = str(traced.graph)
    assert 'name="a"' in graph and 'name="b"' in graph
    with torch.no_grad():
        layer.a.mul_(2)  # the traced module shares the parameters
        torch.testing.assert_close(traced(x), conv._conv_forward(x, reconstruct(layer.a, layer.b), conv.bias), **TOL)


@pytest.mark.skipif(not gkpd.functional._PACKED_OPS, reason="this torch has no oneDNN packed-conv ops")
@pytest.mark.parametrize("packed_wins", [True, False])
def test_one_image_at_inference_runs_on_packed_kernels_only_where_they_ran_faster(
    packed_wins: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    timings: list[set[str]] = []

    def least_seconds(fns: dict, repeats: int) -> dict[str, float]:
        timings.append(set(fns))
        for fn in fns.values():
            fn()
        # 4% faster is within the margin: the plain kernels stay
        return {"packed": 0.5 if packed_wins else 0.96, "plain": 1.0}

    monkeypatch.setattr(gkpd.layers, "_least_seconds", least_seconds)
    monkeypatch.setattr(gkpd.layers, "_PACK_CHOICE", {})
    assert gkpd.layers.PACK_MARGIN == 0.05
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = KroneckerConv2d.from_conv(conv, KroneckerSpec((16, 8, 3, 3), (16, 1, 1, 1), 3), path="factorized")
    x = torch.randn(1, 8, 6, 6)

    def expected() -> torch.Tensor:
        weight = reconstruct(*(f.double() for f in layer.factors))
        return nn.functional.conv2d(x.double(), weight, layer.bias.double(), padding=1)

    layer.eval()
    with torch.inference_mode():
        outputs = [layer(x), layer(x)]
    assert timings == [{"packed", "plain"}]  # once per chain
    packed = layer._inference_cache.get((layer._chains[(6, 6)], "packed"))
    assert (packed is not None) == packed_wins
    if packed_wins:
        assert [k.is_mkldnn for k in packed[1]] == [True, False]  # the 3x3 conv packed; the 1x1 step a matmul
        assert packed[1][1].is_contiguous()  # the matmul's kernel laid out once, not a transposed view
    for y in outputs:
        torch.testing.assert_close(y.double(), expected(), rtol=1e-4, atol=1e-4)
    copied = pickle.loads(pickle.dumps(copy.deepcopy(layer)))  # the kept (opaque) kernels are not copied
    assert "_inference_cache" not in vars(copied)
    with torch.inference_mode():
        torch.testing.assert_close(copied(x), outputs[0], rtol=0, atol=0)
    layer.train()
    y = layer(x)  # training builds the kernels with the graph: nothing packed
    y.sum().backward()
    assert layer._inference_cache == {} and layer.a.grad is not None
    torch.testing.assert_close(y.double(), expected(), rtol=1e-4, atol=1e-4)
    assert len(timings) == 1


@pytest.mark.parametrize("frozen", ["a", "b"])
def test_a_layer_with_one_frozen_factor_still_trains_the_other(frozen: str) -> None:
    """One image in float32 (where inference would pack kernels): with one factor frozen the forward still needs
    autograd for the other, so nothing is kept or packed and the gradient is the dense conv's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    layer = KroneckerConv2d.from_conv(conv, KroneckerSpec((16, 8, 3, 3), (16, 1, 1, 1), 3), path="factorized")
    getattr(layer, frozen).requires_grad_(False)
    x = torch.randn(1, 8, 6, 6)
    y = layer(x)
    y.square().sum().backward()
    trained = layer.b if frozen == "a" else layer.a
    reference = trained.detach().clone().requires_grad_(True)
    factors = (layer.a.detach(), reference) if frozen == "a" else (reference, layer.b.detach())
    expected = nn.functional.conv2d(x, reconstruct(*factors), padding=1)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained.grad, reference.grad, rtol=1e-4, atol=1e-4)
    assert getattr(layer, frozen).grad is None and layer._inference_cache == {}


def test_set_path_and_use_path() -> None:
    model = nn.Sequential(
        KroneckerConv2d(4, 4, 3, a_shape=(2, 2, 1, 1), rank=1),
        nn.ReLU(),
        KroneckerLinear(4, 4, a_shape=(2, 2), rank=1, path="materialized"),
    )
    layers = [model[0], model[2]]
    set_path(model, "factorized")
    assert [m.path for m in layers] == ["factorized", "factorized"]
    model[2].path = "materialized"
    with use_path(model, "auto"):
        assert [m.path for m in layers] == ["auto", "auto"]
    assert [m.path for m in layers] == ["factorized", "materialized"]
    with pytest.raises(RuntimeError, match="boom"), use_path(model, "materialized"):
        raise RuntimeError("boom")
    assert [m.path for m in layers] == ["factorized", "materialized"]  # restored on error too
    with pytest.raises(ValueError, match=r"unknown path 'fast': allowed \('auto', 'factorized', 'materialized'\)"):
        set_path(model, "fast")  # type: ignore[arg-type]
