"""Whole-model cost from the table equals fvcore on the built model; budgets are checked with clear messages."""

from __future__ import annotations

import random

import pytest
import torch.nn as nn

from gkpd import KroneckerSpec, count_macs, count_mflops, count_params, kroneckerize
from spaces import Cost, SearchSpace, build_space

TINY_INPUT = (3, 16, 16)


def random_plan(space: SearchSpace, rng: random.Random, share: float,
                max_rank: int = 10**9) -> dict[str, KroneckerSpec]:
    """A random candidate of full rank <= ``max_rank`` for each layer with probability ``share`` (dense otherwise).

    ``max_rank`` bounds the SVD that ``kroneckerize`` runs per layer (cost does not depend on it; time does).
    """
    plan = {}
    for name, layer in space.layers.items():
        pool = [c for c in layer.candidates[1:] if c.spec.max_rank <= max_rank]
        if pool and rng.random() < share:
            plan[name] = rng.choice(pool).spec
    return plan


def test_baseline_is_the_dense_model(resnet18: nn.Module, space18: SearchSpace, shape18: tuple) -> None:
    assert space18.baseline_cost() == Cost(count_macs(resnet18, shape18), count_params(resnet18))
    assert space18.cost({}) == space18.baseline_cost()
    assert space18.baseline_cost().mflops == count_mflops(resnet18, shape18)


@pytest.mark.parametrize("seed, share", [(0, 1.0), (1, 0.5)])
def test_cost_equals_fvcore_on_the_kroneckerized_resnet18(resnet18: nn.Module, space18: SearchSpace, shape18: tuple,
                                                          seed: int, share: float) -> None:
    plan = random_plan(space18, random.Random(seed), share, max_rank=256)
    assert len(plan) >= share * len(space18.layers) / 2
    built = kroneckerize(resnet18, plan, path="factorized")
    cost = space18.cost(plan)
    assert cost.macs == count_macs(built, shape18)
    assert cost.mflops == count_mflops(built, shape18)  # the very same float
    assert cost.params == count_params(built)
    assert cost.mparams == count_params(built) / 1e6


def test_specs_outside_the_candidates_are_costed_exactly(tiny: nn.Module) -> None:
    space = build_space(tiny, TINY_INPUT, max_candidates=2)
    plan = {"conv": KroneckerSpec((16, 8, 3, 3), (2, 4, 1, 3), 5), "fc": KroneckerSpec((6, 12), (2, 3), 2)}
    assert all(space.layers[n].by_spec(s) is None for n, s in plan.items())
    built = kroneckerize(tiny, plan, path="factorized")
    assert space.cost(plan) == Cost(count_macs(built, TINY_INPUT), count_params(built))
    assert space.error(plan) > 0


def test_error_is_the_weighted_sum_of_layer_errors(space18: SearchSpace) -> None:
    plan = random_plan(space18, random.Random(3), 0.5)
    per_layer = {n: space18.layers[n].by_spec(s).error for n, s in plan.items()}
    assert space18.error(plan) == pytest.approx(sum(per_layer.values()))
    weights = {n: 2.0 for n in plan}
    assert space18.error(plan, weights=weights) == pytest.approx(2 * sum(per_layer.values()))
    assert space18.error({}) == 0


def test_min_cost_is_each_layer_at_its_cheapest(space18: SearchSpace) -> None:
    low, base = space18.min_cost(), space18.baseline_cost()
    cheapest = {n: min(layer.candidates, key=lambda c: c.macs).spec for n, layer in space18.layers.items()}
    assert space18.cost({n: s for n, s in cheapest.items() if s is not None}).macs == low.macs
    assert low.macs < base.macs / 10 and low.params < base.params / 10


def test_plan_with_a_wrong_layer_or_shape_is_refused(space18: SearchSpace) -> None:
    with pytest.raises(ValueError, match="plan names layer 'layer9.conv'"):
        space18.cost({"layer9.conv": KroneckerSpec((64, 64, 3, 3), (8, 8, 3, 1), 2)})
    with pytest.raises(ValueError, match="layer 'conv1': expected a KroneckerSpec for weight_shape \\(64, 1, 3, 3\\)"):
        space18.cost({"conv1": KroneckerSpec((64, 64, 3, 3), (8, 8, 3, 1), 2)})


@pytest.mark.parametrize("budget, message", [
    (dict(mflops=0), "mflops budget must be a positive number, got 0"),
    (dict(mparams=-1.5), "mparams budget must be a positive number, got -1.5"),
    (dict(mflops=float("nan")), "mflops budget must be a positive number"),
    (dict(mflops=0.001), "mflops budget 0.001 is below the minimum this space reaches: "),
    (dict(mparams=0.0001), "mparams budget 0.0001 is below the minimum this space reaches: "),
    (dict(mflops=5000), "mflops budget 5000 is at or above the dense model's cost 456.769 MFLOPs"),
    (dict(mparams=11.172810), "mparams budget 11.1728 is at or above the dense model's cost 11.1728 M params"),
    ({}, "give a budget"),
])
def test_budget_errors_say_what_is_allowed(space18: SearchSpace, budget: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        space18.check_budget(**budget)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
    if "minimum" in message:
        unit = "mflops" if "mflops" in budget else "mparams"
        assert f"{getattr(space18.min_cost(), unit):.6g}" in text


def test_budgets_inside_the_range_pass(space18: SearchSpace) -> None:
    space18.check_budget(mflops=300)
    space18.check_budget(mparams=2, mflops=space18.min_cost().mflops)
