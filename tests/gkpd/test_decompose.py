"""Rearrangement, SVD decomposition, reconstruction and the error spectrum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gkpd import KroneckerSpec, decompose, error_spectrum, rearrange, reconstruct, singular_values, unrearrange

FAST = settings(max_examples=40, deadline=None)


@st.composite
def factor_shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(a_shape, b_shape)``: 4-D conv or 2-D linear, every factor size 1..3 (small weights, any split)."""
    ndim = draw(st.sampled_from([4, 4, 2]))
    sizes = st.integers(1, 3)
    return tuple(draw(sizes) for _ in range(ndim)), tuple(draw(sizes) for _ in range(ndim))


def _weight(a_shape: tuple[int, ...], b_shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn([a * b for a, b in zip(a_shape, b_shape)], generator=generator, dtype=dtype)


def _rel_err(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approx.double() - weight.double()).norm() / weight.double().norm())


@FAST
@given(shapes=factor_shapes(), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_full_rank_reconstructs_the_weight(shapes, seed: int, dtype: torch.dtype) -> None:
    a_shape, b_shape = shapes
    weight = _weight(a_shape, b_shape, dtype, seed)
    spec = KroneckerSpec(tuple(weight.shape), a_shape, 1)
    a, b = decompose(weight, spec.with_rank(spec.max_rank))
    assert a.dtype == b.dtype == dtype
    assert a.shape == (spec.max_rank, *a_shape) and b.shape == (spec.max_rank, *b_shape)
    assert _rel_err(reconstruct(a, b), weight) < (1e-5 if dtype == torch.float32 else 1e-10)


@FAST
@given(shapes=factor_shapes(), seed=st.integers(0, 2**16))
def test_error_at_rank_is_the_singular_value_tail(shapes, seed: int) -> None:
    a_shape, b_shape = shapes
    weight = _weight(a_shape, b_shape, torch.float64, seed)
    spec = KroneckerSpec(tuple(weight.shape), a_shape, 1)
    errors = error_spectrum(weight, a_shape)
    s = torch.linalg.svdvals(rearrange(weight, a_shape, b_shape))
    assert errors.shape == (spec.max_rank,) and errors.dtype == torch.float64
    for rank in range(1, spec.max_rank + 1):
        measured = _rel_err(reconstruct(*decompose(weight, spec.with_rank(rank))), weight)
        tail = float(s[rank:].square().sum().sqrt() / weight.norm())
        assert errors[rank - 1].item() == pytest.approx(measured, abs=1e-10)
        assert errors[rank - 1].item() == pytest.approx(tail, abs=1e-12)
    assert errors[-1].item() == 0.0
    assert bool((errors[1:] <= errors[:-1]).all())  # never rises with rank


def test_error_spectrum_of_an_exact_rank_two_sum() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 2, 3, 3, 1, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 4, 2, 1, 3, generator=generator, dtype=torch.float64)
    weight = torch.kron(a[0], b[0]) + torch.kron(a[1], b[1])
    errors = error_spectrum(weight, (2, 3, 3, 1))
    assert errors.shape == (18,) and errors[0] > 0.01
    assert float(errors[1:].max()) < 1e-12
    assert _rel_err(reconstruct(*decompose(weight, KroneckerSpec(tuple(weight.shape), (2, 3, 3, 1), 2))), weight) < 1e-12


def test_error_spectrum_of_zero_weight_is_zero() -> None:
    assert torch.equal(error_spectrum(torch.zeros(4, 4, 3, 3), (2, 2, 1, 1)), torch.zeros(4, dtype=torch.float64))


def test_error_spectrum_is_exact_at_high_rank() -> None:
    # A tiny tail under a huge head: total - cumsum would round it to 0 (or NaN); summing the tail keeps it.
    weight = torch.zeros(2, 2, dtype=torch.float64)
    weight[0, 0], weight[1, 1] = 1e9, 1.0  # a (2,1), b (1,2): M = [[1e9, 0], [0, 1]], s = (1e9, 1)
    errors = error_spectrum(weight, (2, 1))
    assert errors.tolist() == pytest.approx([1.0 / (1e18 + 1.0) ** 0.5, 0.0], rel=1e-12)


@FAST
@given(shapes=factor_shapes(), seed=st.integers(0, 2**16))
def test_rearrange_round_trips_and_maps_a_kron_to_an_outer_product(shapes, seed: int) -> None:
    a_shape, b_shape = shapes
    weight = _weight(a_shape, b_shape, torch.float64, seed)
    matrix = rearrange(weight, a_shape, b_shape)
    assert matrix.shape == (torch.Size(a_shape).numel(), torch.Size(b_shape).numel())
    assert torch.equal(unrearrange(matrix, a_shape, b_shape), weight)
    a = torch.randn(a_shape, dtype=torch.float64)
    b = torch.randn(b_shape, dtype=torch.float64)
    assert torch.equal(rearrange(torch.kron(a, b), a_shape, b_shape), torch.outer(a.flatten(), b.flatten()))


@FAST
@given(shapes=factor_shapes(), rank=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_reconstruct_is_the_sum_of_torch_kron(shapes, rank: int, seed: int) -> None:
    a_shape, b_shape = shapes
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, *a_shape, generator=generator, dtype=torch.float64)
    b = torch.randn(rank, *b_shape, generator=generator, dtype=torch.float64)
    expected = sum(torch.kron(a[r], b[r]) for r in range(rank))
    torch.testing.assert_close(reconstruct(a, b), expected, rtol=1e-12, atol=1e-12)


def test_decompose_gives_kron_factors_in_svd_order() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(4, 2, 1, 1, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    weight = 3 * torch.kron(a, b)  # exactly rank 1
    spec = KroneckerSpec((8, 8, 3, 3), (4, 2, 1, 1), 1)
    fa, fb = decompose(weight, spec)
    torch.testing.assert_close(torch.kron(fa[0], fb[0]), weight, rtol=1e-12, atol=1e-12)
    # Singular value split evenly: ||a_1|| = ||b_1|| = sqrt(s_1).
    s1 = singular_values(weight, (4, 2, 1, 1))[0]
    assert fa[0].norm().item() == pytest.approx(s1.sqrt().item()) == pytest.approx(fb[0].norm().item())


def test_float32_weight_gives_float32_factors_from_a_float64_svd() -> None:
    weight = torch.randn(6, 4, 3, 3)
    spec = KroneckerSpec((6, 4, 3, 3), (3, 2, 3, 1), 3)
    a, b = decompose(weight, spec)
    a64, b64 = decompose(weight.double(), spec)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(reconstruct(a, b).double(), reconstruct(a64, b64), rtol=0, atol=1e-5)


def test_bad_arguments_raise_value_error() -> None:
    spec = KroneckerSpec((6, 4, 3, 3), (3, 2, 3, 1), 3)
    with pytest.raises(ValueError, match=r"weight shape \(6, 4, 3, 1\) does not match spec weight_shape \(6, 4, 3, 3\)"):
        decompose(torch.zeros(6, 4, 3, 1), spec)
    with pytest.raises(ValueError, match=r"a_shape \(3, 2\) .* must be 4-D"):
        rearrange(torch.zeros(6, 4, 3, 3), (3, 2), (2, 2))
    with pytest.raises(ValueError, match=r"times b_shape \(2, 2, 1, 1\) != weight \(6, 4, 3, 3\)"):
        rearrange(torch.zeros(6, 4, 3, 3), (3, 2, 3, 1), (2, 2, 1, 1))
    with pytest.raises(ValueError, match="must share rank and ndim"):
        reconstruct(torch.zeros(2, 3, 2), torch.zeros(3, 2, 2))
