"""Which factorizations of a layer are enumerated: the presets, and the factor-shape rule of uniform plans.

A factorization is the first factor's shape ``a_shape`` (``(F1, C1, Kh1, Kw1)`` for a conv, ``(F1, C1)`` for a
linear layer); the second factor's shape follows as ``weight_shape / a_shape``. A preset picks the spatial split
(which part of the kernel each factor holds), the channel split and the rank grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Preset", "PRESETS", "UNIFORM_RULES", "UNIFORM_RATIOS", "divisors", "nearest_divisor", "a_shapes", "rank_grid",
    "multi_shapes", "multi_rank_grid",
]


def divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def nearest_divisor(n: int, target: float, *, prefer_larger: bool = True) -> int:
    """The divisor of ``n`` nearest to ``target`` on a log scale (ties, as for 512 -> sqrt, go to the larger)."""
    def distance(d: int) -> float:
        return round(abs(math.log(d / target)), 9)  # rounded so that exact ties stay ties

    return min(divisors(n), key=lambda d: (distance(d), -d if prefer_larger else d))


# Spatial splits: the kernel part ``(Kh1, Kw1)`` that the first factor holds; the second holds the rest.
def _spatial_all(kh: int, kw: int) -> list[tuple[int, int]]:
    return [(h, w) for h in divisors(kh) for w in divisors(kw)]


def _spatial_separable(kh: int, kw: int) -> list[tuple[int, int]]:
    return [(kh, 1)]  # A is Kh x 1, B is 1 x Kw: the paper's separable split


def _spatial_common(kh: int, kw: int) -> list[tuple[int, int]]:
    # Separable both ways (A holds Kh or A holds Kw), kernel all in B (A mixes channels only), kernel all in A.
    # With A = (F, 1, 1, Kw) the second factor is (1, C, Kh, 1): W[f, c, h, w] = sum_r A_r[f, w] B_r[c, h].
    return list(dict.fromkeys([(kh, 1), (1, kw), (1, 1), (kh, kw)]))


# Channel splits ``(F1, C1)``.
def _channels_all(f: int, c: int) -> list[tuple[int, int]]:
    return [(f1, c1) for f1 in divisors(f) for c1 in divisors(c)]


def _spread(n: int) -> list[int]:
    return list(dict.fromkeys(nearest_divisor(n, n**p) for p in (0.25, 0.5, 0.75)))


def _channels_spread(f: int, c: int) -> list[tuple[int, int]]:
    return [(f1, c1) for f1 in _spread(f) for c1 in _spread(c)]


def _channels_default(f: int, c: int) -> list[tuple[int, int]]:
    # F1 and C2 = C / C1 large: those splits can save MACs (DESIGN: FLOPs drop only when F1 and C2 are large
    # enough; the cheaper contraction order covers the mirror case F2, C1 large).
    return [(f1, c // c2) for f1 in dict.fromkeys((nearest_divisor(f, f**0.5), f))
            for c2 in dict.fromkeys((nearest_divisor(c, c**0.5), c))]


# Factorizations with more than two factors: lists of factor shapes for a conv weight (F, C, Kh, Kw).
def _multi_none(weight_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], ...]]:
    return []


def _multi_cp(weight_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], ...]]:
    """The CP corner (one factor per mode; three factors for a kernel that is 1 wide on an axis): conv kernels."""
    if len(weight_shape) != 4 or weight_shape[2] * weight_shape[3] == 1:
        return []  # a 1x1 conv or linear layer: CP of a matrix is the SVD, already a two-factor candidate
    f, c, kh, kw = weight_shape
    corner = ((f, 1, 1, 1), (1, c, 1, 1), (1, 1, kh, 1), (1, 1, 1, kw))
    return [tuple(s for s in corner if math.prod(s) > 1)]


def _multi_all(weight_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], ...]]:
    """The CP corner and CP with the kernel kept whole (F, C, Kh x Kw)."""
    shapes = _multi_cp(weight_shape)
    if shapes and len(shapes[0]) == 4:
        f, c, kh, kw = weight_shape
        shapes.append(((f, 1, 1, 1), (1, c, 1, 1), (1, 1, kh, kw)))
    return shapes


@dataclass(frozen=True)
class Preset:
    """How to enumerate a layer's factorizations: spatial split, channel split, rank grid ("all" or "geometric"),
    and the factor-shape lists with more than two factors (fitted by CP-ALS, one fit per rank)."""

    description: str
    spatial: Callable[[int, int], list[tuple[int, int]]]
    channels: Callable[[int, int], list[tuple[int, int]]]
    ranks: str
    max_rank: int | None = None  # leave out factorizations of higher full rank: their SVD dominates build time
    multi: Callable[[tuple[int, ...]], list[tuple[tuple[int, ...], ...]]] = _multi_none
    # Layers with more weights than this get no multi-factor candidates: each rank is an ALS fit, and a
    # 512x512x3x3 conv takes seconds per rank on two cores.
    multi_max_weights: int | None = None


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "channel splits with F1 and C2 in {sqrt, all}; kernel separable (Kh x 1 then 1 x Kw), all in A or all in B; "
        "full rank at most 1024; ranks on a geometric grid; plus CP (one factor per mode) for kernels of at most "
        "40k weights (a 64x64x3x3 conv; more cost seconds per rank)",
        _spatial_common, _channels_default, "geometric", max_rank=1024, multi=_multi_cp, multi_max_weights=40_000,
    ),
    "paper": Preset(
        "the paper's separable spatial factors (A Kh x 1, B 1 x Kw) with channel splits near n^1/4, n^1/2, n^3/4; "
        "ranks on a geometric grid",
        _spatial_separable, _channels_spread, "geometric",
    ),
    "all": Preset(
        "every divisor factorization of (F, C, Kh, Kw) and every rank, plus CP and CP with the kernel whole "
        "(slow: minutes for a ResNet-18)",
        _spatial_all, _channels_all, "all", multi=_multi_all,
    ),
}


def a_shapes(weight_shape: tuple[int, ...], preset: Preset) -> list[tuple[int, ...]]:
    """The preset's first-factor shapes for ``weight_shape``, without the trivial ones (a or b all ones)."""
    f, c = weight_shape[:2]
    spatial = preset.spatial(*weight_shape[2:]) if len(weight_shape) == 4 else [()]
    shapes = [(f1, c1, *k) for f1, c1 in preset.channels(f, c) for k in spatial]
    total = math.prod(weight_shape)
    limit = preset.max_rank or total

    def full_rank(a: tuple[int, ...]) -> int:
        return min(math.prod(a), total // math.prod(a))

    return [a for a in dict.fromkeys(shapes) if 1 < math.prod(a) < total and full_rank(a) <= limit]


def multi_shapes(weight_shape: tuple[int, ...], preset: Preset) -> list[tuple[tuple[int, ...], ...]]:
    """The preset's factor-shape lists with more than two factors for ``weight_shape`` (none above its size cap)."""
    if preset.multi_max_weights is not None and math.prod(weight_shape) > preset.multi_max_weights:
        return []
    return preset.multi(weight_shape)


def multi_rank_grid(weight_shape: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], max_rank: int) -> list[int]:
    """Ranks fitted for a multi-factor family: the rank at which the factors hold half the dense weights, and
    halvings of it, seven ranks at most (1/2 to 1/128 of the dense size).

    Each rank costs its own ALS fit (CP is not nested like the SVD), so the grid is coarser than two-factor
    grids; above half the dense size the two-factor candidates, exact and optimal, fill in.
    """
    per_rank = sum(math.prod(s) for s in shapes)
    top = min(max_rank, math.prod(weight_shape) // (2 * per_rank))
    return sorted({top >> k for k in range(7) if top >> k >= 1})


def rank_grid(max_rank: int, kind: str) -> list[int]:
    """Ranks to consider: every rank, or a geometric grid with four steps per octave (1, 2, 3, 4, 5, 6, 8, 10, ...)."""
    if kind == "all":
        return list(range(1, max_rank + 1))
    if kind != "geometric":
        raise ValueError(f"unknown rank grid {kind!r}: allowed 'all', 'geometric' or a sequence of ints")
    steps = int(4 * math.log2(max_rank)) + 1
    return sorted({min(max_rank, round(2 ** (k / 4))) for k in range(steps + 1)})


# Uniform (paper-style) plans: one factor-shape rule for every layer and the same fraction of its full rank.
def _uniform_paper(weight_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Separable A (Kh x 1) / B (1 x Kw), channels split near the square root (F1 rounded up, C1 down)."""
    f, c = weight_shape[:2]
    channels = (nearest_divisor(f, f**0.5), nearest_divisor(c, c**0.5, prefer_larger=False))
    shape = (*channels, weight_shape[2], 1) if len(weight_shape) == 4 else channels
    return shape if 1 < math.prod(shape) < math.prod(weight_shape) else None


UNIFORM_RULES: dict[str, Callable[[tuple[int, ...]], tuple[int, ...] | None]] = {
    "paper": _uniform_paper,
}

# Fractions of the full Kronecker rank a uniform plan may keep: two steps per octave, 1 down to 1/4096.
UNIFORM_RATIOS: tuple[float, ...] = tuple(2 ** (-k / 2) for k in range(25))
