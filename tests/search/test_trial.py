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


def test_the_frontier_leader_is_continued_to_four_times_the_fine_tune_from_its_checkpoint(
    teacher_cache: Path, tiny_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Multi-fidelity: with one trial left of --trials and --long-finetunes 1, the best frontier trial is queued
    again, continued from its weights for 3x --finetune-steps more (seed + 1), and recorded at fidelity 4."""
    import torch

    import gkpd
    from search.report import fidelity_pairs
    from search.study import CONTINUES, leaders, queue_long_finetune, run_one, trial_checkpoint, trial_plan
    from search.train import TeacherLogits, distill, evaluate
    from search.trial import FINETUNE_LR

    monkeypatch.setenv("GKPD_CACHE", str(teacher_cache))
    torch.set_num_threads(1)
    args = [*tiny_args, "--finetune-steps", "3", "--prune-margin", "1", "--trials", "3", "--long-finetunes", "1",
            "--out", str(tmp_path)]
    prepared = Prepared(config_from_args(parse_args(args)))
    ctx, config = prepared.ctx, prepared.config
    study = optuna.create_study(study_name=config.study_name, directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    objective = make_objective(ctx)
    seeds = [ctx.space.allocate(mflops=f * 25.0, scores=ctx.scores) for f in (1.0, 0.8)]
    for plan in seeds:
        study.enqueue_trial(ctx.space.params_from_plan(plan))
    run_one(study, objective)
    assert queue_long_finetune(study, config) is None  # 2 trials left of 3, 1 reserved (and a seed waits)
    run_one(study, objective)
    short = leaders(study)[0]
    assert queue_long_finetune(study, config) == short.number
    assert queue_long_finetune(study, config) is None  # queued once
    continued = run_one(study, objective)
    assert continued.user_attrs[CONTINUES] == short.number and continued.params == short.params
    assert continued.user_attrs["fidelity"] == 4 and continued.user_attrs["finetune_steps"] == 12
    assert continued.user_attrs["short_val_accuracy"] == short.values[0]
    assert continued.values[1] == short.values[1]  # the same plan, the same cost
    assert queue_long_finetune(study, config) is None  # --trials reached

    # Known answer: the short trial's weights, distilled 9 steps more with seed + 1, give this accuracy.
    student = gkpd.kroneckerize(ctx.teacher, trial_plan(short))
    student.load_state_dict(torch.load(trial_checkpoint(short, tmp_path), weights_only=True))
    distill(student, ctx.teacher, ctx.data, steps=9, batch_size=32, lr=FINETUNE_LR, device="cpu",
            seed=config.seed + 1, teacher_logits=TeacherLogits(ctx.teacher, ctx.data.train_x, device="cpu"),
            precision=ctx.precision)
    assert evaluate(student, ctx.data.val_x, ctx.data.val_y, device="cpu") == continued.values[0]
    pairs = fidelity_pairs(study)
    assert list(pairs.trial) == [short.number] and list(pairs.long_val) == [continued.values[0]]


def test_concordance_counts_pairs_ordered_alike() -> None:
    from search.report import concordance

    assert concordance([0.1, 0.2, 0.3], [0.5, 0.6, 0.7]) == (3, 3)
    assert concordance([0.1, 0.2, 0.3], [0.7, 0.6, 0.5]) == (0, 3)
    assert concordance([0.1, 0.2, 0.3], [0.5, 0.7, 0.6]) == (2, 3)
    assert concordance([0.1, 0.1, 0.3], [0.5, 0.7, 0.6]) == (1, 2)  # a tie orders nothing


def test_the_stopping_rule_evaluates_half_way_only_when_a_finished_trial_could_stop_the_plan(
    teacher_cache: Path, tiny_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Known answers of the rule in search/trial.py with --prune-margin 0: a cheaper rival that screened 100%
    stops the plan at the screen; a cheaper rival that ended at 100% stops it half-way through fine-tuning; a
    costlier one (or one that ended at 0%) never could, and then the half-way evaluation is skipped."""
    import search.trial as trial_module
    from search.trial import Hopeless, Rival, run_trial

    monkeypatch.setenv("GKPD_CACHE", str(teacher_cache))
    args = [*tiny_args, "--finetune-steps", "4", "--prune-margin", "0", "--out", str(tmp_path)]
    ctx = Prepared(config_from_args(parse_args(args))).ctx
    plan = ctx.space.allocate(mflops=25.0, scores=ctx.scores)
    calls: list[int] = []
    evaluate = trial_module.evaluate

    def counted(model, x, y, **kwargs):  # noqa: ANN001, ANN202 - the evaluate signature
        calls.append(len(x))
        return evaluate(model, x, y, **kwargs)

    monkeypatch.setattr(trial_module, "evaluate", counted)

    def outcome(rival: Rival) -> str:
        calls.clear()
        try:
            run_trial(ctx, plan, label="t", rivals=lambda: [rival])
        except Hopeless as stopped:
            return str(stopped).split(";")[0].split(" ")[0]
        return "completed"

    free = 1e9  # a cost above any plan's
    assert outcome(Rival(cost=0.0, screen_accuracy=1.0, val_accuracy=0.0)) == "screened" and len(calls) == 1
    assert outcome(Rival(cost=0.0, screen_accuracy=0.0, val_accuracy=1.0)) == "half-way" and len(calls) == 2
    assert outcome(Rival(cost=free, screen_accuracy=1.0, val_accuracy=1.0)) == "completed" and len(calls) == 3
    assert outcome(Rival(cost=0.0, screen_accuracy=0.0, val_accuracy=0.0)) == "completed" and len(calls) == 3
    # A cheaper rival that ended above 0%: it could stop a plan at 0/128 correct, so the half-way check runs.
    assert outcome(Rival(cost=0.0, screen_accuracy=0.0, val_accuracy=1e-9)) == "completed" and len(calls) == 4
