"""Study bookkeeping that needs no training: re-queueing interrupted seeds, the Pareto front."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from search.pareto import pareto_front
from search.study import requeue_interrupted_seeds


def test_an_interrupted_seed_is_queued_again_once_and_a_failed_one_is_not() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"x": "a"}, user_attrs={"seed": "uniform"})
    study.enqueue_trial({"x": "b"}, user_attrs={"seed": "allocate@1"})

    def interrupted(trial: optuna.Trial):
        trial.suggest_categorical("x", ["a", "b"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.optimize(interrupted, n_trials=1)

    def nan(trial: optuna.Trial):
        trial.suggest_categorical("x", ["a", "b"])
        trial.set_user_attr("fail_reason", "FloatingPointError: loss became nan")
        raise FloatingPointError("nan")

    study.optimize(nan, n_trials=1, catch=(FloatingPointError,))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert requeue_interrupted_seeds(study) == ["uniform"]
    assert requeue_interrupted_seeds(study) == []
    study.optimize(lambda trial: (1.0, float(len(trial.suggest_categorical("x", ["a", "b"])))), n_trials=1)
    replay = study.trials[-1]
    assert (replay.state, replay.params, replay.user_attrs["seed"]) == (TrialState.COMPLETE, {"x": "a"}, "uniform")


def test_pareto_front_keeps_the_non_dominated_points_by_cost() -> None:
    points = [(0.90, 300.0), (0.85, 200.0), (0.80, 250.0), (0.91, 400.0), (0.85, 210.0), (0.70, 100.0)]
    assert pareto_front(points) == [5, 1, 0, 3]


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_an_over_budget_proposal_is_told_infeasible_and_its_repair_runs_as_its_own_trial(
    tmp_path, monkeypatch: pytest.MonkeyPatch, sampler: str
) -> None:
    """The sampler learns only from plans that ran: a proposal over budget ends PRUNED with its own
    (positive) violation, and the repaired plan is evaluated as a new trial whose parameters are that plan."""
    from types import SimpleNamespace

    import search.study
    from search.config import SearchConfig
    from search.models import create_model
    from search.study import OVER_BUDGET, finished_count, make_objective, make_sampler, run_one
    from search.trial import TrialResult
    from spaces import build_space

    space = build_space(create_model("resnet20", in_channels=1, num_classes=10), (1, 28, 28))
    config = SearchConfig(budget_mflops=10.0, model="resnet20", out=tmp_path, study_name="repair", sampler=sampler)
    evaluated = []

    def run_trial(ctx, plan, *, checkpoint, **kwargs):
        evaluated.append(plan)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"weights")
        cost = space.cost(plan)
        return TrialResult(0.5, 0.5, 0.5, cost.mflops, cost.mparams, 0, 0.0)

    monkeypatch.setattr(search.study, "run_trial", run_trial)
    study = optuna.create_study(study_name="repair", directions=["maximize", "minimize"],
                                sampler=make_sampler(config, startup_trials=1))
    dense = space.params_from_plan({})  # every layer dense: 31.3 MFLOPs, over the 10 MFLOPs budget
    study.enqueue_trial(dense)
    ran = run_one(study, make_objective(SimpleNamespace(config=config, space=space, scores=None)))
    assert len(study.trials) == 2

    objective = make_objective(SimpleNamespace(config=config, space=space, scores=None))
    for _ in range(3):  # the sampler's own proposals, with the infeasible one in its history, run as well
        run_one(study, objective)

    proposal, repaired = study.trials[:2]
    assert (proposal.state, proposal.params, proposal.user_attrs[OVER_BUDGET]) == (TrialState.PRUNED, dense, True)
    assert proposal.constraints == {"mflops": pytest.approx(space.baseline_cost().mflops - 10.0)}
    assert ran.number == repaired.number and repaired.state == TrialState.COMPLETE
    assert repaired.user_attrs["repair_of"] == proposal.number and repaired.constraints["mflops"] <= 0
    # The parameters told are the plan that ran, every time.
    assert evaluated == [space.plan_from_params(t.params) for t in study.trials if not t.user_attrs.get(OVER_BUDGET)]
    assert all(space.cost(plan).mflops <= 10.0 for plan in evaluated)
    assert finished_count(study) == 4
    assert repaired.user_attrs["checkpoint"] == "checkpoints/repair/trial-1.pt"
    # What optuna-dashboard shows: the pruned proposal carries its own cost and key too (dense resnet20 on 1x28x28).
    from search.study import plan_key

    dense_cost = space.baseline_cost()
    assert (proposal.user_attrs["mflops"], proposal.user_attrs["mparams"]) == (dense_cost.mflops, dense_cost.mparams)
    assert (dense_cost.mflops, dense_cost.mparams) == (31.332416, 0.272186)
    assert proposal.user_attrs["plan_key"] == plan_key({}) != repaired.user_attrs["plan_key"]
    assert proposal.user_attrs["stop_reason"] == f"over budget: its repair {repaired.user_attrs['plan_key']} is queued"
    assert repaired.user_attrs["plan_key"] == plan_key(space.plan_from_params(repaired.params))
    assert (repaired.user_attrs["random_seed"], repaired.user_attrs["val_accuracy"]) == (config.seed, 0.5)
    assert repaired.user_attrs["stop_reason"] == "completed 0 fine-tune steps"
