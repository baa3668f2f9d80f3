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
