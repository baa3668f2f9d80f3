"""Multiple-choice knapsack over layers: pick one option per layer, minimize total error, stay within budgets.

Pure functions over padded tensors: ``costs [L, J, K]`` (int64; K budgets, e.g. MACs and params),
``errors [L, J]`` (float64, already weighted; ``inf`` pads missing options), ``fixed [K]`` (cost outside the
layers), ``budgets [K]`` (float64). A selection is ``[L]`` option indices.
"""

from __future__ import annotations

import torch

__all__ = ["Problem", "lagrangian", "repair", "fill", "solve"]

_BISECTIONS = 60


class Problem:
    """The padded options of every layer and the budgets they must fit."""

    def __init__(self, costs: list[list[tuple[int, ...]]], errors: list[list[float]],
                 fixed: tuple[int, ...], budgets: tuple[float, ...]) -> None:
        layers, width, k = len(costs), max((len(c) for c in costs), default=1), len(budgets)
        self.costs = torch.zeros(layers, width, k, dtype=torch.int64)
        self.errors = torch.full((layers, width), torch.inf, dtype=torch.float64)
        for i, (c, e) in enumerate(zip(costs, errors)):
            self.costs[i, : len(c)] = torch.tensor(c, dtype=torch.int64).reshape(len(c), k)
            self.errors[i, : len(e)] = torch.tensor(e, dtype=torch.float64)
        self.valid = torch.isfinite(self.errors)
        self.fixed = torch.tensor(fixed, dtype=torch.int64)
        self.budgets = torch.tensor(budgets, dtype=torch.float64)
        self.rows = torch.arange(layers)

    def totals(self, selection: torch.Tensor) -> torch.Tensor:
        """``[K]`` whole-model cost of ``selection``."""
        return self.fixed + self.costs[self.rows, selection].sum(0)

    def excess(self, totals: torch.Tensor) -> torch.Tensor:
        """Budget overrun, each budget relative to itself and summed: 0 when feasible. ``totals [..., K]``."""
        return ((totals.double() - self.budgets).clamp(min=0) / self.budgets).sum(-1)

    def feasible(self, selection: torch.Tensor) -> bool:
        return bool((self.totals(selection).double() <= self.budgets).all())

    def error(self, selection: torch.Tensor) -> float:
        return float(self.errors[self.rows, selection].sum())


def lagrangian(problem: Problem, mix: torch.Tensor) -> torch.Tensor | None:
    """Per layer ``argmin error + λ·cost`` with ``cost = Σ_k mix_k · cost_k / budget_k``; bisect the smallest
    feasible λ. ``None`` when even λ -> ∞ (the cheapest plan in that mix) is over budget."""
    scaled = (problem.costs.double() * (mix / problem.budgets)).sum(-1)  # [L, J]

    def select(lam: float) -> torch.Tensor:
        score = torch.where(problem.valid, problem.errors + lam * scaled, torch.inf)
        return score.argmin(1)

    cheapest = torch.where(problem.valid, scaled, torch.inf).argmin(1)
    if not problem.feasible(cheapest):
        return None
    low, high = 0.0, 1.0
    best = select(low)
    if problem.feasible(best):
        return best
    while not problem.feasible(best := select(high)):
        high *= 4
        if high > 1e18:
            return cheapest
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        trial = select(mid)
        if problem.feasible(trial):
            high, best = mid, trial
        else:
            low = mid
    return best


def repair(problem: Problem, selection: torch.Tensor) -> torch.Tensor:
    """Move layers to cheaper options until within budget, each time the move with least added error per unit
    of overrun removed. A feasible selection comes back unchanged. ``ValueError`` if no move helps."""
    selection = selection.clone()
    totals = problem.totals(selection)
    excess = problem.excess(totals)
    while excess > 0:
        current = problem.costs[problem.rows, selection]  # [L, K]
        new_totals = totals + problem.costs - current[:, None, :]  # [L, J, K]
        removed = excess - problem.excess(new_totals)  # [L, J]
        added = problem.errors - problem.errors[problem.rows, selection][:, None]
        score = torch.where(problem.valid & (removed > 1e-15), added / removed.clamp(min=1e-300), torch.inf)
        flat = int(score.argmin())
        if not torch.isfinite(score.view(-1)[flat]):
            raise ValueError("no plan in this space fits all the given budgets")
        layer, option = divmod(flat, score.shape[1])
        selection[layer] = option
        totals = problem.totals(selection)
        excess = problem.excess(totals)
    return selection


def fill(problem: Problem, selection: torch.Tensor) -> torch.Tensor:
    """Spend what is left of the budgets: repeatedly take the feasible move with most error removed per unit of
    budget used (free improvements first) until no move lowers the error."""
    selection = selection.clone()
    while True:
        slack = problem.budgets - problem.totals(selection).double()  # [K]
        current = problem.costs[problem.rows, selection]
        added = (problem.costs - current[:, None, :]).double()  # [L, J, K]
        fits = (added <= slack).all(-1) & problem.valid
        gain = problem.errors[problem.rows, selection][:, None] - problem.errors  # [L, J]
        use = (added / problem.budgets).amax(-1)
        score = torch.where(use > 0, gain / use.clamp(min=1e-300), torch.inf)
        score = torch.where(fits & (gain > 1e-12), score, -torch.inf)
        free = score.isposinf()
        if bool(free.any()):  # free improvements all score inf: take the one removing the most error
            flat = int(torch.where(free, gain, -torch.inf).argmax())
        else:
            flat = int(score.argmax())
            if score.view(-1)[flat] == -torch.inf:
                return selection
        layer, option = divmod(flat, score.shape[1])
        selection[layer] = option


def solve(problem: Problem, mixes: list[torch.Tensor]) -> torch.Tensor:
    """Least-error feasible selection found from the Lagrangian plan of each cost mix, repaired and filled."""
    best, best_error = None, torch.inf
    for mix in mixes:
        start = lagrangian(problem, mix)
        if start is None:
            continue
        selection = fill(problem, repair(problem, start))
        if problem.error(selection) < best_error:
            best, best_error = selection, problem.error(selection)
    if best is None:
        raise ValueError("no plan in this space fits all the given budgets")
    return best
