"""Trials in one process share the teacher's logits, because every trial fine-tunes on the same batches."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search.cli import Prepared, config_from_args, parse_args
from search.study import make_objective


def test_trials_fine_tune_on_the_same_batches_so_the_teacher_runs_once(
    teacher_cache: Path, tiny_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GKPD_CACHE", str(teacher_cache))
    # --prune-margin 1: no trial stops early, so both fine-tune in full.
    args = [*tiny_args, "--finetune-steps", "3", "--prune-margin", "1", "--out", str(tmp_path)]
    prepared = Prepared(config_from_args(parse_args(args)))
    ctx = prepared.ctx
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    objective = make_objective(ctx)

    def complete(count: int) -> list[optuna.trial.FrozenTrial]:
        # An over-budget proposal is pruned unevaluated and its repaired plan queued: run until `count` complete.
        for _ in range(2 * count + 2):
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            if len(done) >= count:
                return done
            study.optimize(objective, n_trials=1)
        return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    assert len(complete(1)) == 1
    batch = ctx.config.batch_size
    assert ctx.teacher_logits.cached == 3 * batch  # 3 steps of 32 distinct images (256 in the training set)
    done = complete(2)
    assert len(done) == 2 and done[0].params != done[1].params
    assert all(t.user_attrs.get("over_budget") for t in study.trials if t not in done)
    assert ctx.teacher_logits.cached == 3 * batch  # the second plan saw the same images: nothing new to compute
