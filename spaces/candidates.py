"""One layer's candidates: "dense" plus (a_shape, rank) factorizations, each with exact cost and error."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from gkpd import KroneckerSpec, LayerInfo, error_spectrum, fit_error

__all__ = ["DENSE", "Candidate", "LayerSpace", "candidate_key", "family", "pareto", "thin", "SpectrumCache"]

DENSE = "dense"
_ERROR_DIGITS = 9  # errors are rounded before comparisons, so every machine prunes to the same choice lists


def candidate_key(spec: KroneckerSpec | None) -> str:
    """The stable choice string of a spec: ``"dense"``, ``"32x16x3x1/r12"`` (two factors: a_shape, then rank) or
    ``"64x1x1x1*1x32x1x1*1x1x3x1*1x1x1x3/r20"`` (more factors: every shape, then rank)."""
    if spec is None:
        return DENSE
    shapes = (spec.a_shape,) if spec.num_factors == 2 else spec.factor_shapes
    return "*".join("x".join(map(str, s)) for s in shapes) + f"/r{spec.rank}"


def family(spec: KroneckerSpec | None) -> str:
    """What kind of factorization a spec is, for reports: ``dense``, ``svd`` (two factors, one of them only the
    output channels: a low-rank matrix), ``cp`` (one factor per mode, any order) or ``kron2``, ``kron3``, ..."""
    if spec is None:
        return DENSE
    shapes, weight = spec.factor_shapes, spec.weight_shape
    if spec.num_factors == 2 and any(s[0] == weight[0] == math.prod(s) for s in shapes):
        return "svd"
    corner = [tuple(w if i == mode else 1 for i in range(len(weight))) for mode, w in enumerate(weight)]
    if sorted(shapes) == sorted(s for s in corner if math.prod(s) > 1):  # a 1-channel or 1-wide mode needs no factor
        return "cp"
    return f"kron{spec.num_factors}"


@dataclass(frozen=True)
class Candidate:
    """One choice for a layer: ``spec`` (None: keep dense), MACs per sample, weight params, relative error."""

    spec: KroneckerSpec | None
    macs: int
    params: int
    error: float  # ||W - W_R||_F / ||W||_F of the best rank-R approximation; 0 for dense

    @property
    def key(self) -> str:
        return candidate_key(self.spec)

    def __str__(self) -> str:
        return f"{self.key} ({self.macs} MACs, {self.params} params, err {self.error:.4f})"


@dataclass(frozen=True)
class LayerSpace:
    """The fixed, ordered choices of one layer: ``candidates[0]`` is dense."""

    info: LayerInfo
    candidates: tuple[Candidate, ...]

    def __post_init__(self) -> None:
        assert self.candidates and self.candidates[0].spec is None, "the first candidate must be dense"
        object.__setattr__(self, "_by_key", {c.key: c for c in self.candidates})
        object.__setattr__(self, "_by_spec", {c.spec: c for c in self.candidates})

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def dense(self) -> Candidate:
        return self.candidates[0]

    def keys(self) -> list[str]:
        return [c.key for c in self.candidates]

    def by_key(self, key: str) -> Candidate | None:
        return self._by_key.get(key)  # type: ignore[attr-defined]

    def by_spec(self, spec: KroneckerSpec | None) -> Candidate | None:
        return self._by_spec.get(spec)  # type: ignore[attr-defined]


class SpectrumCache:
    """Relative errors per layer: two factors from spectra per (layer, a_shape), where one float64 SVD gives the
    error of every rank; more factors from one CP-ALS fit per (layer, factor shapes, rank), cached in gkpd."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self._weights = weights
        self._spectra: dict[tuple[str, tuple[int, ...]], list[float]] = {}
        self._fits: dict[tuple, float] = {}

    def errors(self, name: str, a_shape: tuple[int, ...]) -> list[float]:
        """``[max_rank]``: entry R-1 is the relative Frobenius error at rank R."""
        key = (name, tuple(a_shape))
        if key not in self._spectra:
            spectrum = error_spectrum(self._weights[name], a_shape)
            self._spectra[key] = [round(float(e), _ERROR_DIGITS) for e in spectrum]
        return self._spectra[key]

    def error(self, name: str, spec: KroneckerSpec | None) -> float:
        if spec is None:
            return 0.0
        if spec.num_factors > 2:
            key = (name, spec.factor_shapes, spec.rank)
            if key not in self._fits:
                self._fits[key] = round(fit_error(self._weights[name], spec), _ERROR_DIGITS)
            return self._fits[key]
        return self.errors(name, spec.a_shape)[spec.rank - 1]

    def __len__(self) -> int:
        return len(self._spectra) + len(self._fits)


def make_candidate(info: LayerInfo, spec: KroneckerSpec | None, error: float) -> Candidate:
    if spec is None:
        return Candidate(None, info.dense_macs, info.dense_params, 0.0)
    return Candidate(spec, spec.macs(info.geometry), spec.num_params, error)


def pareto(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Candidates not dominated in (MACs, params, error), sorted by error; equal triples keep the first.

    Sweep in order of error; a staircase of the kept (MACs, params) answers "is anything at most as costly
    in both?" by bisection, so this is O(n log n) for the common case.
    """
    ordered = sorted(candidates, key=lambda c: (c.error, c.macs, c.params))
    stair_macs: list[int] = []    # ascending
    stair_params: list[int] = []  # strictly descending along stair_macs
    kept = []
    for c in ordered:
        i = bisect.bisect_right(stair_macs, c.macs)
        if i and stair_params[i - 1] <= c.params:
            continue  # something with no more error costs at most as much in both
        kept.append(c)
        # Insert (macs, params), dropping the staircase points it dominates in cost: those with equal MACs
        # (all have more params, or c would be dominated) and the run after them with at least c's params.
        start, end = bisect.bisect_left(stair_macs, c.macs), i
        while end < len(stair_macs) and stair_params[end] >= c.params:
            end += 1
        stair_macs[start:end] = [c.macs]
        stair_params[start:end] = [c.params]
    return kept


def _front(candidates: Sequence[Candidate], cost: str) -> list[Candidate]:
    """The 2-D front in (cost, error): what a single-budget knapsack can ever pick."""
    front, best = [], math.inf
    for c in sorted(candidates, key=lambda c: (getattr(c, cost), c.error)):
        if c.error < best:
            front.append(c)
            best = c.error
    return front


def thin(candidates: Sequence[Candidate], keep: Iterable[Candidate], limit: int) -> list[Candidate]:
    """At most ``limit`` of ``candidates`` (more only if ``keep`` is larger), evenly spread along error.

    ``keep`` and the ends (least MACs, least params, least error) always stay. The MAC-error and params-error
    fronts are filled first, alternately, each time with the point farthest in error from those chosen.
    """
    if not candidates:
        return list(keep)
    chosen = dict.fromkeys(keep)
    for end in (min(candidates, key=lambda c: (c.macs, c.error)), min(candidates, key=lambda c: (c.params, c.error)),
                min(candidates, key=lambda c: (c.error, c.macs))):
        chosen.setdefault(end)
    pools = [_front(candidates, "macs"), _front(candidates, "params"), list(candidates)]
    # Distance in error from each candidate to the nearest chosen one, updated after every pick.
    gap = {c: min((abs(c.error - k.error) for k in chosen), default=math.inf) for c in candidates}

    def farthest(pool: list[Candidate]) -> Candidate | None:
        return max((c for c in pool if c not in chosen), key=lambda c: gap[c], default=None)

    turn = 0
    while len(chosen) < limit:
        # Alternate the two fronts; once both are used up, the rest of the 3-D front.
        order = [pools[turn % 2], pools[1 - turn % 2], pools[2]]
        pick = next((p for p in (farthest(pool) for pool in order) if p is not None), None)
        if pick is None:
            break
        chosen[pick] = None
        for c in candidates:
            gap[c] = min(gap[c], abs(c.error - pick.error))
        turn += 1
    return list(chosen)
