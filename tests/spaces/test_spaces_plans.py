"""Feasible plans: repair, allocate (knapsack), uniform; and the Optuna encoding round trip."""

from __future__ import annotations

import random

import optuna
import pytest
import torch
import torch.nn as nn

from gkpd import KroneckerSpec
from spaces import DENSE, SearchSpace, build_space
from spaces.candidates import family
from spaces.knapsack import Problem, fill

BUDGETS = [dict(mflops=120), dict(mflops=300), dict(mflops=420), dict(mparams=1.5), dict(mparams=6),
           dict(mflops=250, mparams=3)]


def within(space: SearchSpace, plan: dict, budget: dict) -> bool:
    cost = space.cost(plan)
    return all(getattr(cost, unit) <= value for unit, value in budget.items())


def random_plan(space: SearchSpace, rng: random.Random) -> dict[str, KroneckerSpec]:
    plan = {}
    for name, layer in space.layers.items():
        candidate = rng.choice(layer.candidates)
        if candidate.spec is not None:
            plan[name] = candidate.spec
    return plan


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_repair_lands_within_budget(space18: SearchSpace, budget: dict) -> None:
    rng = random.Random(0)
    for plan in [{}, *(random_plan(space18, rng) for _ in range(4))]:
        repaired = space18.repair(plan, **budget)
        assert within(space18, repaired, budget), (budget, space18.cost(repaired))
        if within(space18, plan, budget):
            assert repaired == plan
        space18.params_from_plan(repaired)  # made of candidates: it can be enqueued


def test_repair_leaves_a_feasible_plan_unchanged(space18: SearchSpace) -> None:
    plan = space18.allocate(mflops=200)
    assert space18.repair(plan, mflops=300) == plan
    assert space18.repair(plan, mflops=200) == plan


def test_repair_adds_little_error_for_a_small_overrun(space18: SearchSpace) -> None:
    plan = space18.allocate(mflops=320)
    repaired = space18.repair(plan, mflops=300)
    assert within(space18, repaired, dict(mflops=300))
    assert space18.error(repaired) <= space18.error(space18.uniform_for_budget(mflops=300))


def test_repair_keeps_layers_it_does_not_need_to_move(space18: SearchSpace) -> None:
    outside = KroneckerSpec((10, 512), (2, 4), 3)  # not a candidate of fc
    assert space18.layers["fc"].by_spec(outside) is None
    plan = {**random_plan(space18, random.Random(5)), "fc": outside}
    repaired = space18.repair(plan, mflops=150)
    assert within(space18, repaired, dict(mflops=150))
    unchanged = [n for n in plan if repaired.get(n) == plan[n]]
    assert unchanged  # cheap layers stay as they were


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_allocate_is_within_budget_and_beats_uniform(space18: SearchSpace, budget: dict) -> None:
    plan = space18.allocate(**budget)
    uniform = space18.uniform_for_budget(**budget)
    assert within(space18, plan, budget) and within(space18, uniform, budget)
    assert space18.error(plan) <= space18.error(uniform)


def test_allocate_leaves_no_single_move_that_lowers_error(space18: SearchSpace) -> None:
    plan = space18.allocate(mflops=300)
    error = space18.error(plan)
    for name, layer in space18.layers.items():
        for candidate in layer.candidates:
            moved = {n: s for n, s in plan.items() if n != name}
            if candidate.spec is not None:
                moved[name] = candidate.spec
            if within(space18, moved, dict(mflops=300)):
                assert space18.error(moved) >= error - 1e-12, (name, candidate)


def test_allocate_follows_weights(space18: SearchSpace) -> None:
    plain = space18.allocate(mflops=300)
    heavy = space18.allocate(mflops=300, weights={"layer1.0.conv1": 1000.0})
    assert "layer1.0.conv1" not in heavy or heavy["layer1.0.conv1"] != plain.get("layer1.0.conv1")
    assert space18.layers["layer1.0.conv1"].by_spec(heavy.get("layer1.0.conv1")).error <= \
        space18.layers["layer1.0.conv1"].by_spec(plain.get("layer1.0.conv1")).error
    with pytest.raises(ValueError, match="weights name layer 'head'"):
        space18.allocate(mflops=300, weights={"head": 1.0})


def test_uniform_uses_one_rule_and_one_ratio(space18: SearchSpace) -> None:
    plan = space18.uniform(1 / 16)
    assert plan == space18.uniform(0.07)  # snaps to the nearest ratio of the grid
    for name, spec in plan.items():
        f, c = spec.weight_shape[:2]
        assert spec.rank == max(1, round(spec.max_rank / 16))
        if len(spec.weight_shape) == 4:
            assert spec.a_shape[2:] == (spec.weight_shape[2], 1) and spec.b_shape[2] == 1
    assert len(plan) == len(space18.layers)  # at 1/16 every layer is cheaper than dense in params
    dense_at_full = space18.uniform(1.0)
    assert dense_at_full == {}  # full rank costs more than dense everywhere


def test_uniform_for_budget_takes_the_largest_ratio_that_fits(space18: SearchSpace) -> None:
    plan = space18.uniform_for_budget(mflops=300)
    ratios = space18.uniform_ratios
    index = next(i for i, r in enumerate(ratios) if space18.uniform(r) == plan)
    assert all(not within(space18, space18.uniform(r), dict(mflops=300)) for r in ratios[:index])


def test_uniform_errors(space18: SearchSpace) -> None:
    with pytest.raises(ValueError, match="unknown uniform rule 'tt'; known: paper"):
        space18.uniform(0.5, rule="tt")
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        space18.uniform(0)


def test_params_round_trip(space18: SearchSpace) -> None:
    rng = random.Random(2)
    plans = [{}, space18.allocate(mflops=300), space18.repair(random_plan(space18, rng), mparams=2),
             space18.uniform(1 / 32), space18.uniform_for_budget(mflops=250, mparams=3),
             *(random_plan(space18, rng) for _ in range(3))]
    for plan in plans:
        params = space18.params_from_plan(plan)
        assert set(params) == set(space18.choices())
        assert all(value in space18.choices()[name] for name, value in params.items())
        assert space18.plan_from_params(params) == plan


def test_a_fixed_trial_rebuilds_the_plan(space18: SearchSpace) -> None:
    plan = space18.allocate(mflops=300)
    choices = space18.choices()

    def objective(trial: optuna.Trial) -> dict:
        return space18.plan_from_params({n: trial.suggest_categorical(n, keys) for n, keys in choices.items()})

    assert objective(optuna.trial.FixedTrial(space18.params_from_plan(plan))) == plan
    # And through a real study: the enqueued plan comes back as the first trial's plan.
    study = optuna.create_study()
    study.enqueue_trial(space18.params_from_plan(plan))
    trial = study.ask({n: optuna.distributions.CategoricalDistribution(keys) for n, keys in choices.items()})
    assert space18.plan_from_params(trial.params) == plan


def test_plan_from_params_ignores_other_hyperparameters(space18: SearchSpace) -> None:
    params = {**space18.params_from_plan({}), "lr": 0.1}
    assert space18.plan_from_params(params) == {}
    assert all(value == DENSE for name, value in params.items() if name != "lr")


def test_bad_params_are_refused(space18: SearchSpace) -> None:
    params = space18.params_from_plan({})
    with pytest.raises(ValueError, match="layer 'conv1': '3x3/r1' is not one of its choices"):
        space18.plan_from_params({**params, "conv1": "3x3/r1"})
    del params["fc"]
    with pytest.raises(ValueError, match="params lack layer 'fc'"):
        space18.plan_from_params(params)


def test_plan_outside_the_candidates_has_no_params(space18: SearchSpace) -> None:
    with pytest.raises(ValueError, match="layer 'fc': .* is not a candidate of this space"):
        space18.params_from_plan({"fc": KroneckerSpec((10, 512), (2, 4), 3)})


def test_both_budgets_that_no_plan_meets_are_refused(tiny: nn.Module) -> None:
    space = build_space(tiny, (3, 16, 16))
    low = space.min_cost()
    # Each budget alone is reachable; check that repair/allocate either meet both or say they cannot.
    for plan_maker in (lambda: space.allocate(mflops=low.mflops, mparams=low.mparams),
                       lambda: space.repair({}, mflops=low.mflops, mparams=low.mparams)):
        try:
            plan = plan_maker()
        except ValueError as err:
            assert "no plan in this space fits all the given budgets" in str(err)
        else:
            assert within(space, plan, dict(mflops=low.mflops, mparams=low.mparams))


def test_fill_spends_free_improvements_first() -> None:
    # One budget of 10; layer 0 can drop error for free, layer 1 only by spending 5.
    problem = Problem([[(4,), (4,)], [(1,), (6,)]], [[1.0, 0.2], [1.0, 0.0]], (0,), (10.0,))
    selection = fill(problem, torch.tensor([0, 0]))
    assert selection.tolist() == [1, 1] and problem.feasible(selection)


def test_allocate_within_cp_keeps_every_layer_cp_or_dense_and_in_budget() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    space = build_space(net, (3, 8, 8))
    budget = space.baseline_cost().mparams * 0.6
    plan = space.allocate(mparams=budget, families={"cp"})
    assert plan and all(family(spec) == "cp" for spec in plan.values())
    assert space.cost(plan).mparams <= budget
    with pytest.raises(ValueError, match="no candidate of this space is of family 'tucker'"):
        space.allocate(mparams=budget, families={"tucker"})
