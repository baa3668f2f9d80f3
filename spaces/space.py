"""The search space of a model: per-layer candidates, exact whole-model cost, feasible plans and warm starts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from gkpd import KroneckerSpec, LayerInfo, Plan, compressible_layers, count_macs, count_params
from spaces import knapsack
from spaces.candidates import DENSE, Candidate, LayerSpace, SpectrumCache, family, make_candidate, pareto, thin
from spaces.presets import PRESETS, UNIFORM_RATIOS, UNIFORM_RULES, a_shapes, multi_rank_grid, multi_shapes, rank_grid

__all__ = ["Cost", "LatencyTable", "SearchSpace", "build_space", "DEFAULT_MAX_CANDIDATES", "Scores"]

# Per-layer score of a candidate that allocate/repair minimize instead of the weighted relative error, e.g. a
# measured loss interpolated over the layer's candidates (search.sensitivity). Layers not named keep the error.
Scores = Mapping[str, Callable[[Candidate], float]]

DEFAULT_MAX_CANDIDATES = 32
_MIXES = 11  # with both budgets: Lagrangian cost mixes tried, from all-MACs to all-params


@dataclass(frozen=True)
class Cost:
    """Whole-model cost of one forward pass on one sample: exact MACs (fvcore "flops") and parameters, and the
    predicted milliseconds at batch 1 when the space has a :class:`LatencyTable` (None otherwise)."""

    macs: int
    params: int
    ms: float | None = None

    @property
    def mflops(self) -> float:
        """Millions of MACs, fvcore's unit (torch's FlopCounterMode reports twice this)."""
        return self.macs / 1e6

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    def __str__(self) -> str:
        ms = f", {self.ms:.2f} ms predicted" if self.ms is not None else ""
        return f"{self.mflops:.2f} MFLOPs (MACs), {self.mparams:.3f} M params{ms}"


@dataclass(frozen=True)
class LatencyTable:
    """Measured milliseconds at batch 1 on one device: ``layers`` maps each searchable layer to the time of each
    of its candidates (by key, "dense" included), timed alone on the layer's input; ``remainder_ms`` is the rest
    of the dense model (its whole time minus its searchable layers' dense times). A plan's predicted latency is
    ``remainder_ms`` plus the time of each layer's chosen candidate (search.latency_table builds it)."""

    remainder_ms: float
    layers: Mapping[str, Mapping[str, float]]
    device: str = ""

    def dense_ms(self) -> float:
        """The prediction for the dense model (equal to its measured time, by the remainder's definition)."""
        return self.remainder_ms + sum(times[DENSE] for times in self.layers.values())


class SearchSpace:
    """What the search may choose per layer, and what any choice costs; build it with :func:`build_space`.

    ``layers`` maps each searchable layer name (call order) to its :class:`LayerSpace`; skipped and
    non-decomposable layers are not in it (``dense_only`` says why) and always stay dense. A layer whose only
    choice is "dense" is in ``layers`` but not in ``choices()``.
    """

    def __init__(self, layers: Sequence[LayerSpace], *, baseline: Cost, input_shape: tuple[int, ...], preset: str,
                 spectra: SpectrumCache, uniform: Mapping[str, Mapping[str, tuple[Candidate, ...]]],
                 dense_only: Mapping[str, str]) -> None:
        self.layers: dict[str, LayerSpace] = {layer.name: layer for layer in layers}
        self.input_shape = input_shape
        self.preset = preset
        self.dense_only = dict(dense_only)  # layer name -> why it is kept dense
        self._baseline = baseline
        self._spectra = spectra
        self._uniform = uniform  # rule -> layer -> candidate at each of UNIFORM_RATIOS (dense where not cheaper)
        self.latency: LatencyTable | None = None  # set_latency: what an ms budget is checked against

    def set_latency(self, table: LatencyTable) -> None:
        """Predict latency with ``table`` (it must time every candidate of every searchable layer)."""
        for name, layer in self.layers.items():
            missing = [c.key for c in layer.candidates if c.key not in table.layers.get(name, {})]
            if missing:
                raise ValueError(f"latency table lacks layer {name!r} candidate {missing[0]!r}")
        self.latency = table

    def _ms(self, name: str, candidate: Candidate) -> float:
        assert self.latency is not None
        times = self.latency.layers[name]
        if candidate.key not in times:  # a spec outside the candidate lists: no timing, predict it as dense
            return times[DENSE]
        return times[candidate.key]

    def __repr__(self) -> str:
        sizes = [len(layer.candidates) for layer in self.layers.values()]
        return (f"SearchSpace({len(self.layers)} layers, {sum(sizes)} candidates, preset={self.preset!r}, "
                f"input_shape={self.input_shape}, baseline: {self._baseline})")

    # -- encoding ------------------------------------------------------------------------------------------------

    def choices(self) -> dict[str, list[str]]:
        """Param name (the layer name) -> its fixed choice keys, e.g. ``["dense", "32x16x3x1/r12", ...]``.

        Layers with "dense" as their only choice are left out. For ``trial.suggest_categorical(name, keys)``.
        """
        return {name: layer.keys() for name, layer in self.layers.items() if len(layer.candidates) > 1}

    def plan_from_params(self, params: Mapping[str, str]) -> Plan:
        """The plan a trial's params stand for. Keys that are not layer names (other hyperparameters) are ignored."""
        plan: Plan = {}
        choices = self.choices()
        for name, keys in choices.items():
            if name not in params:
                raise ValueError(f"params lack layer {name!r}; expected a choice for each of {len(choices)} layers")
            candidate = self.layers[name].by_key(str(params[name]))
            if candidate is None:
                raise ValueError(f"layer {name!r}: {params[name]!r} is not one of its choices ({_listed(keys)})")
            if candidate.spec is not None:
                plan[name] = candidate.spec
        return plan

    def params_from_plan(self, plan: Mapping[str, KroneckerSpec]) -> dict[str, str]:
        """The params that rebuild ``plan`` (e.g. for ``study.enqueue_trial``); every spec must be a candidate."""
        self._check_names(plan)
        params = {}
        for name in self.choices():
            candidate = self.layers[name].by_spec(plan.get(name))
            if candidate is None:
                raise ValueError(f"layer {name!r}: {plan[name]} is not a candidate of this space (preset "
                                 f"{self.preset!r}); repair() or allocate() give plans made of candidates")
            params[name] = candidate.key
        for name in plan:
            if name not in params:
                raise ValueError(f"layer {name!r} has only the 'dense' choice in this space, "
                                 f"but the plan sets {plan[name]}")
        return params

    # -- cost and error ----------------------------------------------------------------------------------------

    def baseline_cost(self) -> Cost:
        """The dense model, as fvcore measured it."""
        return self._baseline

    def cost(self, plan: Mapping[str, KroneckerSpec]) -> Cost:
        """Whole-model cost of ``kroneckerize(model, plan)``, exactly as ``gkpd.count_macs`` / ``count_params``."""
        macs, params = self._baseline.macs, self._baseline.params
        resolved = self._resolve(plan)
        for name, candidate in resolved.items():
            dense = self.layers[name].dense
            macs += candidate.macs - dense.macs
            params += candidate.params - dense.params
        if self.latency is None:
            return Cost(macs, params)
        ms = self.latency.remainder_ms + sum(self._ms(name, resolved.get(name, layer.dense))
                                             for name, layer in self.layers.items())
        return Cost(macs, params, ms)

    def error(self, plan: Mapping[str, KroneckerSpec], *, weights: Mapping[str, float] | None = None) -> float:
        """Total weighted approximation error: ``Σ weight[layer] · relative Frobenius error`` (weights default 1)."""
        w = self._weights(weights)
        return sum(w[name] * candidate.error for name, candidate in self._resolve(plan).items())

    def min_cost(self) -> Cost:
        """Least MACs, least params (and least predicted ms) any plan reaches, each minimized on its own: one plan
        need not reach them all."""
        macs, params = self._baseline.macs, self._baseline.params
        for layer in self.layers.values():
            macs += min(c.macs for c in layer.candidates) - layer.dense.macs
            params += min(c.params for c in layer.candidates) - layer.dense.params
        if self.latency is None:
            return Cost(macs, params)
        ms = self.latency.remainder_ms + sum(min(self._ms(name, c) for c in layer.candidates)
                                             for name, layer in self.layers.items())
        return Cost(macs, params, ms)

    def check_budget(self, *, mflops: float | None = None, mparams: float | None = None,
                     ms: float | None = None) -> None:
        """``ValueError`` (one line) unless each given budget lies in [minimum reachable, dense baseline); an ms
        budget needs a latency table (``set_latency``) and only a minimum: the fastest plan's predicted time."""
        if mflops is None and mparams is None and ms is None:
            raise ValueError("give a budget: mflops (millions of MACs), mparams (millions of parameters) and/or ms")
        low, base = self.min_cost(), self._baseline
        if ms is not None:
            if self.latency is None:
                raise ValueError("an ms budget needs the space's latency table (set_latency)")
            if not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0:
                raise ValueError(f"ms budget must be a positive number, got {ms!r}")
            if ms < low.ms:
                where = f" on {self.latency.device}" if self.latency.device else ""
                raise ValueError(f"ms budget {ms:g} is below the fastest plan this space can make: {low.ms:.3f} ms "
                                 f"predicted (batch 1{where}; the dense model: {self.latency.dense_ms():.3f} ms)")
        for what, value, least, dense, unit in (
            ("mflops", mflops, low.mflops, base.mflops, "MFLOPs (fvcore MACs)"),
            ("mparams", mparams, low.mparams, base.mparams, "M params"),
        ):
            if value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{what} budget must be a positive number, got {value!r}")
            if value < least:
                raise ValueError(f"{what} budget {value:g} is below the minimum this space reaches: {least:.6g} {unit}")
            if value >= dense:
                raise ValueError(f"{what} budget {value:g} is at or above the dense model's cost {dense:.6g} {unit}: "
                                 "nothing to compress")

    # -- feasible plans ----------------------------------------------------------------------------------------

    def repair(self, plan: Mapping[str, KroneckerSpec], *, mflops: float | None = None,
               mparams: float | None = None, ms: float | None = None, weights: Mapping[str, float] | None = None,
               scores: Scores | None = None) -> Plan:
        """A plan within budget: greedily move layers to cheaper candidates, least added error per unit of overrun
        removed first. A plan already within budget comes back unchanged. Specs that are not candidates are
        accepted (their cost and error are computed); a layer that is moved gets a candidate. ``scores`` replace
        the weighted error of the layers they name."""
        self.check_budget(mflops=mflops, mparams=mparams, ms=ms)
        current = self._resolve(plan)
        if self._fits(self.cost(plan), mflops, mparams, ms):
            return dict(plan)
        names = list(self.layers)
        options = [list(self.layers[n].candidates) for n in names]
        selection = []
        for n, opts in zip(names, options):
            chosen = current.get(n, self.layers[n].dense)
            if chosen not in opts:
                opts.append(chosen)  # an outside spec stays available: repair may keep it
            selection.append(opts.index(chosen))
        problem = self._problem(names, options, mflops, mparams, weights, scores, ms=ms)
        selection = knapsack.repair(problem, torch.tensor(selection))
        return self._plan(names, options, selection)

    def allocate(self, *, mflops: float | None = None, mparams: float | None = None, ms: float | None = None,
                 weights: Mapping[str, float] | None = None, scores: Scores | None = None,
                 families: Iterable[str] | None = None) -> Plan:
        """The feasible plan of least total weighted error, or of least total score (multiple-choice knapsack).

        Lagrangian relaxation (per layer argmin error + λ·cost, λ bisected to the smallest feasible value), then
        repair, then the leftover budget is spent greedily. With both budgets, the cost is a mix
        ``θ·MACs/budget + (1-θ)·params/budget``, solved for 11 values of θ; the least-error result is kept. An
        ms budget (predicted by the latency table) is one more cost, mixed in the same way.
        ``families`` (e.g. ``{"cp"}``, see ``spaces.candidates.family``) limits every layer to dense and those.
        """
        self.check_budget(mflops=mflops, mparams=mparams, ms=ms)
        names = list(self.layers)
        options = [list(self.layers[n].candidates) for n in names]
        if families is not None:
            allowed = set(families)
            unknown = allowed - {family(c.spec) for layer in self.layers.values() for c in layer.candidates}
            if unknown:
                raise ValueError(f"no candidate of this space is of family {sorted(unknown)[0]!r}")
            options = [[c for c in opts if c.spec is None or family(c.spec) in allowed] for opts in options]
        problem = self._problem(names, options, mflops, mparams, weights, scores, ms=ms)
        mixes = _mixes(sum(b is not None for b in (mflops, mparams, ms)))
        return self._plan(names, options, knapsack.solve(problem, mixes))

    # -- uniform (paper-style) plans -----------------------------------------------------------------------------

    @property
    def uniform_ratios(self) -> tuple[float, ...]:
        """The rank fractions uniform plans use (descending)."""
        return UNIFORM_RATIOS

    def uniform(self, ratio: float, *, rule: str = "paper") -> Plan:
        """Every layer with the same factor-shape ``rule`` and rank ``max(1, round(ratio · max_rank))``.

        ``ratio`` (a fraction of the full Kronecker rank, in (0, 1]) snaps to the nearest of ``uniform_ratios``
        on a log scale. A layer stays dense where that choice costs at least as much as dense in both MACs and
        params, or where the rule has no factorization (e.g. a 1-channel 1x1 conv).
        """
        table = self._uniform_table(rule)
        if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"uniform ratio is the fraction of the full rank kept, in (0, 1]; got {ratio!r}")
        index = min(range(len(UNIFORM_RATIOS)), key=lambda i: abs(math.log(UNIFORM_RATIOS[i] / ratio)))
        return {name: row[index].spec for name, row in table.items() if row[index].spec is not None}

    def uniform_for_budget(self, *, mflops: float | None = None, mparams: float | None = None,
                           ms: float | None = None, rule: str = "paper") -> Plan:
        """The uniform plan with the largest ratio that fits the budgets (all ratios are tried: there are 25)."""
        self.check_budget(mflops=mflops, mparams=mparams, ms=ms)
        self._uniform_table(rule)
        for ratio in UNIFORM_RATIOS:
            plan = self.uniform(ratio, rule=rule)
            if self._fits(self.cost(plan), mflops, mparams, ms):
                return plan
        raise ValueError(f"no uniform {rule!r} plan fits the budget (mflops={mflops}, mparams={mparams}, ms={ms}); "
                         f"the smallest costs {self.cost(self.uniform(UNIFORM_RATIOS[-1], rule=rule))}")

    # -- internals ---------------------------------------------------------------------------------------------

    def _uniform_table(self, rule: str) -> Mapping[str, tuple[Candidate, ...]]:
        if rule not in self._uniform:
            raise ValueError(f"unknown uniform rule {rule!r}; known: {', '.join(sorted(self._uniform))}")
        return self._uniform[rule]

    def _check_names(self, plan: Mapping[str, KroneckerSpec]) -> None:
        for name in plan:
            if name in self.dense_only:
                raise ValueError(f"plan names layer {name!r}, which this space keeps dense ({self.dense_only[name]})")
            if name not in self.layers:
                raise ValueError(f"plan names layer {name!r}, which is not a conv/linear layer of the model; "
                                 f"searchable layers: {_listed(list(self.layers))}")

    def _resolve(self, plan: Mapping[str, KroneckerSpec]) -> dict[str, Candidate]:
        """Each planned layer's candidate; specs outside the candidate lists get their exact cost and error."""
        self._check_names(plan)
        resolved = {}
        for name, spec in plan.items():
            layer = self.layers[name]
            if not isinstance(spec, KroneckerSpec) or spec.weight_shape != layer.info.weight_shape:
                raise ValueError(f"layer {name!r}: expected a KroneckerSpec for weight_shape "
                                 f"{layer.info.weight_shape}, got {spec!r}")
            candidate = layer.by_spec(spec)
            resolved[name] = candidate or make_candidate(layer.info, spec, self._spectra.error(name, spec))
        return resolved

    def _weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        w = {name: 1.0 for name in self.layers}
        for name, value in (weights or {}).items():
            if name not in w:
                raise ValueError(f"weights name layer {name!r}, which is not searchable; "
                                 f"searchable layers: {_listed(list(self.layers))}")
            if not value >= 0:
                raise ValueError(f"weight of layer {name!r} must be >= 0, got {value!r}")
            w[name] = float(value)
        return w

    @staticmethod
    def _fits(cost: Cost, mflops: float | None, mparams: float | None, ms: float | None = None) -> bool:
        return ((mflops is None or cost.macs <= mflops * 1e6) and (mparams is None or cost.params <= mparams * 1e6)
                and (ms is None or cost.ms <= ms))

    def _problem(self, names: list[str], options: list[list[Candidate]], mflops: float | None,
                 mparams: float | None, weights: Mapping[str, float] | None,
                 scores: Scores | None = None, *, ms: float | None = None) -> knapsack.Problem:
        w = self._weights(weights)
        unknown = sorted(set(scores or {}) - set(self.layers))
        if unknown:
            raise ValueError(f"scores name layer {unknown[0]!r}, which is not searchable; "
                             f"searchable layers: {_listed(list(self.layers))}")
        units = [u for u, b in (("macs", mflops), ("params", mparams)) if b is not None]
        budgets = tuple(b * 1e6 for b in (mflops, mparams) if b is not None)
        fixed = tuple(getattr(self._baseline, u) - sum(getattr(self.layers[n].dense, u) for n in names) for u in units)
        costs = [[tuple(getattr(c, u) for u in units) for c in opts] for opts in options]
        if ms is not None:  # the knapsack's costs are integers: predicted milliseconds in nanoseconds
            assert self.latency is not None
            budgets += (ms * 1e6,)
            fixed += (round(self.latency.remainder_ms * 1e6),)
            costs = [[(*row, round(self._ms(n, c) * 1e6)) for row, c in zip(rows, opts)]
                     for n, rows, opts in zip(names, costs, options)]
        score = {n: (scores[n] if scores and n in scores else lambda c, n=n: w[n] * c.error) for n in names}
        errors = [[float(score[n](c)) for c in opts] for n, opts in zip(names, options)]
        return knapsack.Problem(costs, errors, fixed, budgets)

    @staticmethod
    def _plan(names: list[str], options: list[list[Candidate]], selection: torch.Tensor) -> Plan:
        chosen = (opts[int(i)] for opts, i in zip(options, selection))
        return {name: c.spec for name, c in zip(names, chosen) if c.spec is not None}


def _mixes(budgets: int) -> list[torch.Tensor]:
    """Lagrangian cost mixes: one budget alone, or ``_MIXES`` mixes of two (all to the first ... all to the
    second); three budgets: every split of them in tenths (the least-error result is kept)."""
    if budgets == 1:
        return [torch.ones(1, dtype=torch.float64)]
    steps = _MIXES - 1
    if budgets == 2:
        return [torch.tensor([t / steps, 1 - t / steps], dtype=torch.float64) for t in range(_MIXES)]
    return [torch.tensor([i / steps, j / steps, (steps - i - j) / steps], dtype=torch.float64)
            for i in range(_MIXES) for j in range(_MIXES - i)]


def _listed(items: list[str], limit: int = 6) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _layer_candidates(info: LayerInfo, spectra: SpectrumCache, preset_name: str, ranks: str | Sequence[int] | None,
                      limit: int, keep: Iterable[Candidate]) -> LayerSpace:
    """Dense plus the thinned Pareto set of the preset's factorizations; ``keep`` (the uniform family) stays."""
    preset = PRESETS[preset_name]
    dense = make_candidate(info, None, 0.0)
    pool = []
    for a_shape in a_shapes(info.weight_shape, preset):
        errors = spectra.errors(info.name, a_shape)
        if ranks is None or isinstance(ranks, str):
            grid = rank_grid(len(errors), ranks or preset.ranks)
        else:
            grid = sorted({int(r) for r in ranks if 1 <= r <= len(errors)})
        for rank in grid:
            candidate = make_candidate(info, KroneckerSpec(info.weight_shape, a_shape, rank), errors[rank - 1])
            if candidate.macs < dense.macs or candidate.params < dense.params:
                pool.append(candidate)
    for shapes in multi_shapes(info.weight_shape, preset):
        top = KroneckerSpec(info.weight_shape, rank=1, factor_shapes=shapes).max_rank
        if ranks is None or isinstance(ranks, str):
            grid = multi_rank_grid(info.weight_shape, shapes, top)
        else:
            grid = sorted({int(r) for r in ranks if 1 <= r <= top})
        for rank in grid:
            spec = KroneckerSpec(info.weight_shape, rank=rank, factor_shapes=shapes)
            candidate = make_candidate(info, spec, spectra.error(info.name, spec))
            if candidate.macs < dense.macs or candidate.params < dense.params:
                pool.append(candidate)
    keep = [c for c in keep if c.spec is not None]
    chosen = thin(pareto(pool), keep, limit)
    return LayerSpace(info, (dense, *sorted(chosen, key=lambda c: (c.macs, c.params, c.error, c.key))))


def _uniform_family(info: LayerInfo, spectra: SpectrumCache, rule: str) -> tuple[Candidate, ...]:
    """The rule's candidate at each of UNIFORM_RATIOS (dense where it would not be cheaper in MACs or params)."""
    dense = make_candidate(info, None, 0.0)
    a_shape = UNIFORM_RULES[rule](info.weight_shape)
    if a_shape is None:
        return (dense,) * len(UNIFORM_RATIOS)
    errors = spectra.errors(info.name, a_shape)
    family = []
    for ratio in UNIFORM_RATIOS:
        rank = max(1, round(ratio * len(errors)))
        candidate = make_candidate(info, KroneckerSpec(info.weight_shape, a_shape, rank), errors[rank - 1])
        family.append(candidate if candidate.macs < dense.macs or candidate.params < dense.params else dense)
    return tuple(family)


def build_space(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    preset: str = "default",
    skip: Iterable[str] = (),
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    ranks: str | Sequence[int] | None = None,
) -> SearchSpace:
    """Candidates for every conv/linear layer of ``model`` on one ``input_shape`` sample ``(C, H, W)``.

    ``preset``: which factorizations to enumerate (see ``spaces.PRESETS``). ``skip``: layer names kept dense.
    ``max_candidates``: per-layer cap on factorized candidates (the uniform family and the cheapest and most
    accurate ones are always kept). ``ranks``: override the preset's rank grid ("all", "geometric", or ranks).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 1:
        raise ValueError(f"max_candidates must be a positive int, got {max_candidates!r}")
    if isinstance(ranks, str) and ranks not in ("all", "geometric"):
        raise ValueError(f"unknown rank grid {ranks!r}: allowed 'all', 'geometric' or a sequence of ints")
    input_shape = tuple(int(s) for s in input_shape)
    infos = compressible_layers(model, input_shape)
    skip = list(dict.fromkeys([skip] if isinstance(skip, str) else skip))
    unknown = [name for name in skip if name not in {info.name for info in infos}]
    if unknown:
        raise ValueError(f"skip names {unknown[0]!r}, which is not a conv/linear layer of the model; "
                         f"its layers: {', '.join(info.name for info in infos)}")
    modules = dict(model.named_modules())
    weights = {info.name: modules[info.name].weight.detach().to("cpu", copy=True)
               for info in infos if info.decomposable and info.name not in skip}
    spectra = SpectrumCache(weights)
    dense_only = {name: "skipped" for name in skip}
    dense_only.update({info.name: info.reason for info in infos if not info.decomposable})
    uniform: dict[str, dict[str, tuple[Candidate, ...]]] = {rule: {} for rule in UNIFORM_RULES}
    layers = []
    for info in infos:
        if info.name in dense_only:
            continue
        for rule in UNIFORM_RULES:
            uniform[rule][info.name] = _uniform_family(info, spectra, rule)
        keep = list(dict.fromkeys(c for rule in UNIFORM_RULES for c in uniform[rule][info.name]))
        layers.append(_layer_candidates(info, spectra, preset, ranks, max_candidates, keep))
    baseline = Cost(count_macs(model, input_shape), count_params(model))
    return SearchSpace(layers, baseline=baseline, input_shape=input_shape, preset=preset, spectra=spectra,
                       uniform=uniform, dense_only=dense_only)
