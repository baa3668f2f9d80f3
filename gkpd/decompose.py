"""Best rank-R Kronecker approximation (Van Loan–Pitsianis, generalized to 4-D and to N factors): pure functions.

Two factors: one SVD of the rearranged weight gives the optimal factors and the error of every rank. N > 2
factors: the weight rearranged into an N-way tensor (one mode per factor) is fitted by CP alternating least
squares, a local optimum whose error :func:`fit_error` reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch

from gkpd.spec import KroneckerSpec

__all__ = [
    "rearrange", "unrearrange", "rearrange_n", "unrearrange_n", "decompose", "reconstruct", "singular_values",
    "error_spectrum", "cp_als", "fit_error", "ALS_ITERATIONS",
]

# CP-ALS settings of every N > 2 decomposition: fixed, so the space's error for a candidate is the error of the
# factors a trial gets (same weights, same settings, same result). Sweeps are the cost of building a space: one
# fit per rank, each sweep milliseconds on a ResNet-32 kernel; the fit is a start for fine-tuning, not an end.
ALS_ITERATIONS = 25
ALS_TOLERANCE = 1e-5


def _interleaved(a_shape: Sequence[int], b_shape: Sequence[int]) -> list[int]:
    return [size for pair in zip(a_shape, b_shape) for size in pair]


def rearrange(weight: torch.Tensor, a_shape: Sequence[int], b_shape: Sequence[int]) -> torch.Tensor:
    """``W [*(a*b)]`` -> ``M [prod(a), prod(b)]`` with ``M[i, j] = W`` at the Kronecker position of (i, j)."""
    n = weight.ndim
    if len(a_shape) != n or len(b_shape) != n:
        raise ValueError(f"a_shape {tuple(a_shape)} and b_shape {tuple(b_shape)} must be {n}-D like the weight")
    if tuple(a * b for a, b in zip(a_shape, b_shape)) != tuple(weight.shape):
        raise ValueError(f"a_shape {tuple(a_shape)} times b_shape {tuple(b_shape)} != weight {tuple(weight.shape)}")
    perm = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
    return weight.reshape(_interleaved(a_shape, b_shape)).permute(perm).reshape(math.prod(a_shape), -1)


def unrearrange(matrix: torch.Tensor, a_shape: Sequence[int], b_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`rearrange`: ``M [prod(a), prod(b)]`` -> ``W [*(a*b)]``, contiguous (see :func:`unrearrange_n`)."""
    n = len(a_shape)
    perm = [k for i in range(n) for k in (i, n + i)]
    weight_shape = [a * b for a, b in zip(a_shape, b_shape)]
    return matrix.reshape(*a_shape, *b_shape).permute(perm).reshape(weight_shape).contiguous()


def singular_values(weight: torch.Tensor, a_shape: Sequence[int]) -> torch.Tensor:
    """Singular values [max_rank] of the rearranged weight, in float64, descending."""
    b_shape = [w // a for w, a in zip(weight.shape, a_shape)]
    matrix = rearrange(weight.detach().double(), a_shape, b_shape)
    return torch.linalg.svdvals(_tall(matrix))


def _tall(matrix: torch.Tensor) -> torch.Tensor:
    # LAPACK's SVD on a wide matrix runs 6-10x slower on CPUs than on its transpose (512x4608: 1.1 s vs 0.18 s).
    return matrix.mT if matrix.shape[0] < matrix.shape[1] else matrix


def decompose(weight: torch.Tensor, spec: KroneckerSpec) -> tuple[torch.Tensor, ...]:
    """Rank-R factors of ``weight``, one ``[R, *shape]`` per factor shape (two: ``a``, ``b``).

    Two factors: the best approximation, by one SVD in float64. More: CP-ALS of the rearranged tensor (float64,
    SVD start, a fixed number of sweeps); results are cached per weight and spec, so a trial that decomposes
    a layer the space already fitted reuses the factors.
    """
    if tuple(weight.shape) != spec.weight_shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match spec weight_shape {spec.weight_shape}")
    if spec.num_factors > 2:
        factors, _ = _cp_factors(weight, spec)
        return tuple(f.to(weight.dtype).contiguous() for f in factors)
    matrix = rearrange(weight.detach().double(), spec.a_shape, spec.b_shape)
    if matrix.shape[0] < matrix.shape[1]:
        v, s, uh = torch.linalg.svd(_tall(matrix), full_matrices=False)  # M^T = V S U^T
        u, vh = uh.mT, v.mT
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[: spec.rank].sqrt()
    a = (u[:, : spec.rank] * root).T.reshape(spec.rank, *spec.a_shape)
    b = (vh[: spec.rank] * root[:, None]).reshape(spec.rank, *spec.b_shape)
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()


def reconstruct(*factors: torch.Tensor) -> torch.Tensor:
    """``sum_r f1[r] ⊗ ... ⊗ fN[r]``: factors ``[R, *shape_n]`` -> ``W [*(prod of shapes, mode by mode)]`` (differentiable)."""
    if len(factors) < 2:
        raise ValueError(f"reconstruct needs at least two factors, got {len(factors)}")
    rank, ndim = factors[0].shape[0], factors[0].ndim
    if any(f.ndim != ndim or f.shape[0] != rank for f in factors):
        raise ValueError(f"factors must share rank and ndim, got {[tuple(f.shape) for f in factors]}")
    shapes = [tuple(f.shape[1:]) for f in factors]
    if len(factors) == 2:
        matrix = factors[0].reshape(rank, -1).T @ factors[1].reshape(rank, -1)
        return unrearrange(matrix, shapes[0], shapes[1])
    # Khatri-Rao of all factors but the largest, then one matmul that sums over the rank.
    flat = [f.reshape(rank, -1) for f in factors]
    last = max(range(len(flat)), key=lambda n: flat[n].shape[1])
    product = None
    for n, f in enumerate(flat):
        if n != last:
            product = f if product is None else (product[:, :, None] * f[:, None, :]).reshape(rank, -1)
    assert product is not None
    sizes = [f.shape[1] for f in flat]
    tensor = (product.T @ flat[last]).reshape(*(s for n, s in enumerate(sizes) if n != last), sizes[last])
    tensor = tensor.movedim(-1, last)
    return unrearrange_n(tensor, shapes)


def rearrange_n(weight: torch.Tensor, shapes: Sequence[Sequence[int]]) -> torch.Tensor:
    """``W`` -> ``T [prod(s1), ..., prod(sN)]``: each mode split into N digits (factor 1's most significant),
    grouped by factor. Two shapes give :func:`rearrange`'s matrix."""
    n, ndim = len(shapes), weight.ndim
    if any(len(s) != ndim for s in shapes):
        raise ValueError(f"factor shapes {[tuple(s) for s in shapes]} must be {ndim}-D like the weight")
    if tuple(math.prod(d) for d in zip(*shapes)) != tuple(weight.shape):
        raise ValueError(f"factor shapes {[tuple(s) for s in shapes]} do not multiply to weight {tuple(weight.shape)}")
    digits = [shapes[k][mode] for mode in range(ndim) for k in range(n)]  # mode-major, factor 1 first
    perm = [mode * n + k for k in range(n) for mode in range(ndim)]
    return weight.reshape(digits).permute(perm).reshape([math.prod(s) for s in shapes])


def unrearrange_n(tensor: torch.Tensor, shapes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Inverse of :func:`rearrange_n`, contiguous like a dense layer's weight.

    The permute's reshape is a view whenever the factor shapes allow it, with strides that can be channels_last's
    (e.g. ``256x1x3x3 ⊗ 1x256x1x1``), and a conv takes its output's layout from its weight as well as from its
    input: one such rebuilt weight made every later layer of a ResNet-18 run on channels_last activations, 2-3x
    slower each at batch 1 on the CPU (the whole model 10.3 ms against 7.8 ms dense).
    """
    n, ndim = len(shapes), len(shapes[0])
    grouped = [size for s in shapes for size in s]  # factor-major
    perm = [k * ndim + mode for mode in range(ndim) for k in range(n)]
    return tensor.reshape(grouped).permute(perm).reshape([math.prod(d) for d in zip(*shapes)]).contiguous()


def _mttkrp(tensor: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """``T_(mode) · KhatriRao(other factors)``: ``[I_mode, R]``. The largest other mode goes first, as one
    ``|T|·R`` matmul; each further mode is an elementwise product and a sum over a smaller tensor."""
    others = sorted((m for m in range(tensor.ndim) if m != mode), key=lambda m: -tensor.shape[m])
    labels = list(range(tensor.ndim))
    first = others[0]
    current = torch.tensordot(tensor, factors[first], dims=([first], [0]))  # [...without first..., R]
    labels.remove(first)
    for m in others[1:]:
        axis = labels.index(m)
        current = (current.movedim(axis, -2) * factors[m]).sum(-2)
        labels.remove(m)
    return current  # [I_mode, R]


def _unfolding_vectors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Each mode's unfolding's left singular vectors ``[I_n, I_n]``, leading first, from its small Gram matrix."""
    out = []
    for mode in range(tensor.ndim):
        unfolded = tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)
        out.append(torch.linalg.eigh(unfolded @ unfolded.T)[1].flip(1))
    return out


def _solve_psd(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``u`` with ``u V = M`` for a symmetric PSD ``V [R, R]``, which is singular when the rank exceeds what
    the tensor holds: Cholesky with a ridge of 1e-12 of the mean diagonal (LAPACK's least squares took 0.3 s
    per 256x256 solve here, Cholesky milliseconds), and the pseudo-inverse if even that fails."""
    ridge = 1e-12 * float(v.diagonal().mean().clamp(min=1e-300))
    eye = torch.eye(len(v), dtype=v.dtype)
    factor, info = torch.linalg.cholesky_ex(v + ridge * eye)
    if int(info) == 0:
        return torch.cholesky_solve(m.T, factor).T
    return m @ torch.linalg.pinv(v, hermitian=True)


def cp_als(
    tensor: torch.Tensor, rank: int, *, iterations: int = ALS_ITERATIONS, tol: float = ALS_TOLERANCE, seed: int = 0,
    singular_vectors: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Rank-``rank`` CP fit ``T ≈ sum_r u1[:, r] ∘ ... ∘ uN[:, r]`` by alternating least squares.

    Start: the leading left singular vectors of each unfolding (random columns past its size, seeded), as
    TensorLy's ``parafac(init="svd")``. Returns the factors ``[I_n, R]`` (scale spread evenly) and the relative
    Frobenius error. Stops after ``iterations`` sweeps or when the error moves by less than ``tol``.
    ``singular_vectors``: each unfolding's left singular vectors, if already known (they do not depend on R).
    """
    t = tensor.detach().double()
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for mode, vectors in enumerate(singular_vectors or _unfolding_vectors(t)):
        u = vectors[:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(t.shape[mode], rank - u.shape[1], generator=generator, dtype=t.dtype)
            u = torch.cat([u, extra / extra.norm(dim=0).clamp(min=1e-300)], 1)
        factors.append(u)
    norm2 = float(t.square().sum())
    if norm2 == 0:
        return [torch.zeros_like(f) for f in factors], 0.0
    weights = torch.ones(rank, dtype=t.dtype)
    error, previous = 1.0, math.inf
    grams = [f.T @ f for f in factors]
    for _ in range(max(1, iterations)):
        for mode in range(t.ndim):
            v = torch.ones(rank, rank, dtype=t.dtype)
            for m, g in enumerate(grams):
                if m != mode:
                    v = v * g
            m_n = _mttkrp(t, factors, mode)
            u = _solve_psd(v, m_n)
            weights = u.norm(dim=0)
            factors[mode] = u / weights.clamp(min=1e-300)
            grams[mode] = factors[mode].T @ factors[mode]
        # ||T - T^||^2 = ||T||^2 - 2 <T, T^> + ||T^||^2, with <T, T^> from the last MTTKRP.
        inner = float((m_n * factors[-1]).sum(0) @ weights) if mode == t.ndim - 1 else 0.0
        hadamard = torch.ones(rank, rank, dtype=t.dtype)
        for g in grams:
            hadamard = hadamard * g
        fitted2 = float(weights @ hadamard @ weights)
        error = math.sqrt(max(norm2 - 2 * inner + fitted2, 0.0) / norm2)
        if abs(previous - error) < tol:
            break
        previous = error
    scale = weights.clamp(min=0) ** (1 / t.ndim)
    return [f * scale for f in factors], error


_CP_CACHE: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], float]] = OrderedDict()
# ALS on a small tensor is thousands of tiny ops: on two cores, one thread ran a 64x64x3x3 fit 20x faster than
# two (0.33 s vs 6.5 s for five ranks, with other jobs on the machine; 2-3x on a quiet one).
_ONE_THREAD_BELOW = 1_000_000


@contextlib.contextmanager
def _one_thread(enabled: bool) -> Iterator[None]:
    threads = torch.get_num_threads()
    if enabled and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


_SVD_START: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
_CP_CACHE_ELEMENTS = 50_000_000  # float64 factors kept (about 400 MB at most)


def _cp_factors(weight: torch.Tensor, spec: KroneckerSpec) -> tuple[tuple[torch.Tensor, ...], float]:
    """CP-ALS factors ``[R, *shape_n]`` (float64) of ``weight`` and their relative error, cached per weight and spec."""
    data = weight.detach().to("cpu", torch.float64).contiguous()
    key = (hashlib.sha1(data.numpy().tobytes()).hexdigest(), spec.factor_shapes, spec.rank, ALS_ITERATIONS)
    if key in _CP_CACHE:
        _CP_CACHE.move_to_end(key)
        return _CP_CACHE[key]
    shapes = spec.factor_shapes
    tensor = rearrange_n(data, shapes)
    start_key = key[:2]
    if start_key not in _SVD_START:  # the SVD start is the same for every rank: one per weight and shapes
        _SVD_START[start_key] = _unfolding_vectors(tensor)
        while len(_SVD_START) > 64:
            _SVD_START.popitem(last=False)
    with _one_thread(tensor.numel() < _ONE_THREAD_BELOW):
        columns, _ = cp_als(tensor, spec.rank, singular_vectors=_SVD_START[start_key])
    factors = tuple(u.T.reshape(spec.rank, *shape).contiguous() for u, shape in zip(columns, shapes))
    total = float(data.square().sum())
    error = float((reconstruct(*factors) - data).square().sum() / total) ** 0.5 if total else 0.0
    _CP_CACHE[key] = (factors, error)
    size = sum(f.numel() for entry in _CP_CACHE.values() for f in entry[0])
    while size > _CP_CACHE_ELEMENTS and len(_CP_CACHE) > 1:
        _, (old, _) = _CP_CACHE.popitem(last=False)
        size -= sum(f.numel() for f in old)
    return factors, error


def fit_error(weight: torch.Tensor, spec: KroneckerSpec) -> float:
    """Relative Frobenius error ``||W - reconstruct(*decompose(W, spec))|| / ||W||`` (exact, float64)."""
    if spec.num_factors > 2:
        return _cp_factors(weight, spec)[1]
    return float(error_spectrum(weight, spec.a_shape)[spec.rank - 1])


def error_spectrum(weight: torch.Tensor, a_shape: Sequence[int]) -> torch.Tensor:
    """Relative Frobenius error of the best rank-R approximation for R = 1..max_rank: ``[max_rank]`` float64.

    ``err[R-1] = sqrt(sum_{r>R} s_r^2) / ||W||``: one SVD gives every rank.
    """
    s2 = singular_values(weight, a_shape).square()
    total = s2.sum()
    if total == 0:
        return torch.zeros_like(s2)
    # Sum the tail from the small end: total - cumsum would cancel away the small errors at high rank.
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0)[1:], s2.new_zeros(1)])
    return (tail / total).sqrt()
