"""The Optuna side: storage, sampler, the study's identity, warm-start seeds, and the objective."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages._heartbeat import is_heartbeat_enabled  # not re-exported by optuna.storages
from optuna.trial import FrozenTrial, TrialState

import gkpd
from search.config import SearchConfig
from search.progress import log
from search.pareto import pareto_front
from search.trial import FINETUNE_LR, Hopeless, Rival, TrialContext, continue_trial, run_trial
from spaces import SearchSpace
from spaces.candidates import family
from spaces.space import Scores

__all__ = [
    "make_sampler", "existing_identity", "check_identity", "study_identity", "space_digest", "open_study",
    "join_study", "seed_plans", "make_objective", "run_one", "finished_count", "requeue_interrupted_seeds",
    "rivals_of", "leaders", "queue_long_finetune", "trial_plan", "checkpoint_file", "trial_checkpoint",
    "file_digest", "plan_key", "SEED_LADDER", "CATCH", "OVER_BUDGET", "OVER_MEASURED", "CONTINUES", "LONG_FIDELITY",
]

# Seeds: the knapsack allocation at the budget and at smaller budgets (they draw the frontier's lower end),
# and the paper's uniform rule at the budget (the baseline the frontier must beat).
SEED_LADDER = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
# Trials that fail for these reasons are recorded as failed, with the reason, and the study goes on.
CATCH = (FloatingPointError, torch.OutOfMemoryError)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# User attribute of a sampler's proposal that was over budget: it is not evaluated (its repaired plan is, as
# a trial of its own), so it counts as no finished trial.
OVER_BUDGET = "over_budget"
# User attribute of a trial within --budget-ms as predicted but over it as measured (the reason): it stays in
# trials.csv and off the frontier, and the best trial is never one of them.
OVER_MEASURED = "over_budget_measured"
# Proposals over budget in a row (each queues its repaired plan) before run_one returns without an evaluation.
MAX_PROPOSALS = 8
# User attribute of a longer fine-tune of a finished trial (its number): multi-fidelity for the leaders. A
# continued trial reaches LONG_FIDELITY times --finetune-steps in all (3x more steps from the checkpoint).
CONTINUES = "continues"
LONG_FIDELITY = 4


def make_sampler(config: SearchConfig, *, startup_trials: int) -> optuna.samplers.BaseSampler:
    seed = config.seed
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, startup_trials))
    # constant_liar: parallel workers do not all propose the same plan while others are still running.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True,
                                      constant_liar=True)


def existing_identity(storage: optuna.storages.BaseStorage, study_name: str) -> dict[str, Any] | None:
    """The identity recorded by the run that created ``study_name``, or None if there is no such study."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get("identity", {})


def space_digest(space: SearchSpace) -> str:
    """sha256 of every layer's choice list: the categorical distributions every trial of a study must share."""
    return hashlib.sha256(json.dumps(space.choices(), sort_keys=True).encode()).hexdigest()


def study_identity(config: SearchConfig, *, teacher: str, space: SearchSpace,
                   sensitivity: str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Everything a trial's result depends on: the settings, the fine-tune rate and precision (resolved: fp32
    or bf16), the teacher, the space and the sensitivity table that repairs proposals and ranks the seeds (its
    key; None: not measured)."""
    return {**config.identity(), "finetune_lr": FINETUNE_LR, "precision": precision, "teacher_sha256": teacher,
            "space_sha256": space_digest(space), "sensitivity_key": sensitivity}


def check_identity(wanted: dict[str, Any], found: dict[str, Any] | None, study_name: str) -> None:
    """``ValueError`` naming each difference. Keys a study recorded are checked; ``wanted`` may be partial
    (before the teacher exists), and a study from an older version lacks the newer keys."""
    if found is None:
        return
    diffs = [f"{key} {found[key]!r} (this run: {wanted[key]!r})" for key in wanted
             if key in found and found[key] != wanted[key]]
    if diffs:
        raise ValueError(f"study {study_name!r} was created with {', '.join(diffs)}; "
                         "use the same settings to resume it, or another --study-name")


def _quiet_optuna() -> None:
    # Our log says how each trial ended, in one line; Optuna's warnings repeat it with a traceback (also for
    # Ctrl-C and SIGTERM). Errors Optuna cannot handle are still raised.
    optuna.logging.set_verbosity(logging.ERROR)


def open_study(config: SearchConfig, storage: optuna.storages.BaseStorage, seeds: Sequence[tuple[str, dict]], *,
               identity: dict[str, Any]) -> optuna.Study:
    """Create the study (enqueueing the seeds once) or load it to resume; refuse a different identity."""
    check_identity(identity, existing_identity(storage, config.study_name), config.study_name)
    _quiet_optuna()
    sampler = make_sampler(config, startup_trials=len(seeds) + 2)
    try:
        study = optuna.create_study(study_name=config.study_name, storage=storage, sampler=sampler,
                                    directions=["maximize", "minimize"])
    except optuna.exceptions.DuplicatedStudyError:
        # Another worker (or an earlier run) created it: resume, never re-seed.
        return join_study(config, storage, identity=identity, sampler=sampler)
    study.set_metric_names(["val_accuracy", config.objective])
    study.set_user_attr("identity", identity)
    for tag, params in seeds:
        study.enqueue_trial(params, user_attrs={"seed": tag})
    log(f"study {config.study_name!r}: created with {len(seeds)} seed plans ({', '.join(t for t, _ in seeds)})")
    return study


def join_study(config: SearchConfig, storage: optuna.storages.BaseStorage, *, identity: dict[str, Any],
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Load an existing study (never create one) and check its identity."""
    _quiet_optuna()
    sampler = sampler or make_sampler(config, startup_trials=2)
    try:
        study = optuna.load_study(study_name=config.study_name, storage=storage, sampler=sampler)
    except KeyError:
        raise ValueError(f"no study {config.study_name!r} in this storage; a worker joins a study that the "
                         "driver created, so every worker must reach the same --storage") from None
    check_identity(identity, study.user_attrs.get("identity", {}), config.study_name)
    # Workers joining one study must not replay the same --seed random stream (the sampler's startup
    # phase would propose the same plans in every worker); --seed still fixes the data split and teacher.
    sampler.reseed_rng()
    return study


def seed_plans(config: SearchConfig, space: SearchSpace, *, scores: Scores | None = None) -> list[tuple[str, gkpd.Plan]]:
    """Warm starts: ``allocate`` at the budget and below it, and ``uniform`` at the budget.

    ``scores`` (e.g. ``TrialContext.scores``, the measured sensitivity) is what ``allocate`` minimizes.
    """
    plans: list[tuple[str, gkpd.Plan]] = []
    minimum = space.min_cost()
    for fraction in SEED_LADDER:
        budget = {key: value * fraction for key, value in config.budget.items()}
        if any(value < getattr(minimum, key) for key, value in budget.items()):
            continue
        makers = [(f"allocate@{fraction:g}", functools.partial(space.allocate, scores=scores))]
        if fraction == 1.0:
            makers.append(("uniform", space.uniform_for_budget))
            if any(family(c.spec) == "cp" for layer in space.layers.values() for c in layer.candidates):
                # Every layer CP or dense: the frontier then holds the plain CP decomposition at the budget.
                makers.append(("allocate-cp", functools.partial(space.allocate, scores=scores, families={"cp"})))
        for tag, make in makers:
            try:
                plans.append((tag, make(**budget)))
            except ValueError as err:  # e.g. two budgets that no plan of this family meets together
                log(f"seed {tag}: skipped ({err})")
    unique: list[tuple[str, gkpd.Plan]] = []
    for tag, plan in plans:
        if all(plan != other for _, other in unique):
            unique.append((tag, plan))
    return unique


def record_own_trials(study: optuna.Study) -> set[int]:
    """From now on, record the id of every trial this process sets RUNNING in ``study``'s storage (a new one, or a
    queued one it takes) until it sets it finished, for :func:`fail_own_running`.

    ``study.optimize`` guards only the objective: a Ctrl-C inside ``study.ask()`` (the sampler samples after the
    trial is RUNNING in the storage) left the trial RUNNING with no heartbeat ever written, so nothing failed it,
    and a resumed run waited on it. Only its creator knows it is its own (other workers may share the study).
    """
    storage, own = study._storage, set()
    create, set_state = storage.create_new_trial, storage.set_trial_state_values

    def create_new_trial(study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = create(study_id, template_trial)
        if template_trial is None or template_trial.state == TrialState.RUNNING:
            own.add(trial_id)
        return trial_id

    def set_trial_state_values(trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        updated = set_state(trial_id, state, values)
        if updated and state == TrialState.RUNNING:
            own.add(trial_id)
        elif updated and state.is_finished():
            own.discard(trial_id)  # only running ones are looked up on an interrupt
        return updated

    storage.create_new_trial, storage.set_trial_state_values = create_new_trial, set_trial_state_values
    return own


def fail_own_running(study: optuna.Study, own: set[int]) -> None:
    """Mark FAIL every trial of ``own`` (:func:`record_own_trials`) still RUNNING after an interrupt."""
    for trial_id in list(own):
        if study._storage.get_trial(trial_id).state == TrialState.RUNNING:
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


def requeue_interrupted_seeds(study: optuna.Study) -> list[str]:
    """Queue again each seed plan whose trial was interrupted (Ctrl-C marks it FAIL), so resuming evaluates it."""
    trials = study.get_trials(deepcopy=False)
    covered = {t.user_attrs.get("seed") for t in trials if t.state != TrialState.FAIL}
    queued = []
    for t in trials:
        tag = t.user_attrs.get("seed")
        if t.state == TrialState.FAIL and tag and "fail_reason" not in t.user_attrs and tag not in covered:
            study.enqueue_trial(t.params, user_attrs={"seed": tag})
            covered.add(tag)
            queued.append(tag)
    return queued


def finished_count(study: optuna.Study) -> int:
    """Trials that evaluated a plan to the end or were stopped by the rule (over-budget proposals are neither)."""
    return sum(not t.user_attrs.get(OVER_BUDGET) for t in study.get_trials(deepcopy=False, states=FINISHED))


def run_one(study: optuna.Study, objective: Any) -> FrozenTrial:
    """Run trials until one evaluates a plan (a proposal over budget only queues its repaired plan); return it."""
    for _ in range(MAX_PROPOSALS):
        ran: list[FrozenTrial] = []  # this worker's trial (others may have started later ones)
        study.optimize(objective, n_trials=1, catch=CATCH, callbacks=[lambda _, trial: ran.append(trial)])
        if not ran[-1].user_attrs.get(OVER_BUDGET):
            break
    return ran[-1]


def rivals_of(study: optuna.Study) -> list[Rival]:
    """Finished trials a new one is compared with: the short fine-tunes only (like with like), none measured over
    --budget-ms (a plan that does not meet the budget must not stop one that may)."""
    return [
        Rival(t.values[1], t.user_attrs["screen_accuracy"], t.values[0])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "screen_accuracy" in t.user_attrs and CONTINUES not in t.user_attrs and OVER_MEASURED not in t.user_attrs
    ]


def _in_budget(trial: FrozenTrial) -> bool:
    return all(c <= 0 for c in trial.constraints.values()) and OVER_MEASURED not in trial.user_attrs


def leaders(study: optuna.Study) -> list[FrozenTrial]:
    """The short-fine-tune trials on the in-budget frontier, best validation accuracy first."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if CONTINUES not in t.user_attrs and _in_budget(t) and "checkpoint" in t.user_attrs]
    front = [done[i] for i in pareto_front([(t.values[0], t.values[1]) for t in done])]
    return sorted(front, key=lambda t: (-t.values[0], t.values[1], t.number))


def queue_long_finetune(study: optuna.Study, config: SearchConfig) -> int | None:
    """Multi-fidelity: when the trials left are the ``--long-finetunes`` reserved for it, queue the longer
    fine-tune of the best frontier trial not yet continued; return that trial's number (None: nothing queued).
    """
    trials = study.get_trials(deepcopy=False)
    continued = {t.user_attrs[CONTINUES] for t in trials
                 if CONTINUES in t.user_attrs and t.state != TrialState.FAIL}
    left = config.trials - finished_count(study)
    if left <= 0 or left > config.long_finetunes - len(continued):
        return None
    waiting = any(t.state == TrialState.WAITING for t in trials)  # a seed or repair goes first
    candidates = [t for t in leaders(study) if t.number not in continued]
    if waiting or not candidates:
        return None
    leader = candidates[0]
    study.enqueue_trial(leader.params, user_attrs={CONTINUES: leader.number})
    log(f"search: trial {leader.number} leads the frontier ({leader.values[0]:.2%} val): its fine-tune is "
        f"continued to {LONG_FIDELITY}x the steps")
    return leader.number


def trial_plan(trial: FrozenTrial) -> gkpd.Plan:
    """The plan a trial evaluated (after repair), as stored in its user attributes."""
    return gkpd.plan_from_dict({"format": gkpd.PLAN_FORMAT, "version": gkpd.PLAN_VERSION,
                                "layers": trial.user_attrs["plan"]}, source=f"trial {trial.number}")


def checkpoint_file(study_name: str, number: int) -> Path:
    """Where trial ``number``'s weights go, relative to the run directory: one folder per study, so that
    studies sharing a run directory never overwrite each other's trials."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study_name)
    if safe != study_name:  # two names that map to one folder must not collide
        safe += "-" + hashlib.sha256(study_name.encode()).hexdigest()[:8]
    return Path("checkpoints") / safe / f"trial-{number}.pt"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trial_checkpoint(trial: optuna.trial.FrozenTrial, out: Path) -> Path:
    """The trial's weights, checked to be the file that trial wrote (not another study's or trial's)."""
    recorded = trial.user_attrs.get("checkpoint")
    if recorded is None:
        raise ValueError(f"trial {trial.number} recorded no checkpoint")
    # Recorded relative to the run directory (older runs: as given, relative to their working directory).
    path = Path(recorded) if Path(recorded).is_absolute() else out / recorded
    if not path.is_file() and not Path(recorded).is_absolute() and Path(recorded).is_file():
        path = Path(recorded)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint of trial {trial.number} not found at {path} (it is written by the "
                                "worker that ran the trial: copy it there, or point --out at that run directory)")
    wanted = trial.user_attrs.get("checkpoint_sha256")
    if wanted is not None and file_digest(path) != wanted:
        raise ValueError(f"{path} is not the checkpoint trial {trial.number} wrote (its sha256 differs): another "
                         "run overwrote it; re-run that trial or export another with --trial N")
    return path


def plan_key(plan: gkpd.Plan) -> str:
    """sha256 (12 hex digits) of a plan's layers as stored in a trial: equal plans, equal keys, in any study."""
    layers = gkpd.plan_to_dict(plan)["layers"]
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:12]


def make_objective(ctx: TrialContext):
    """The Optuna objective: (validation accuracy up, MFLOPs or Mparams down), budget as a constraint."""
    config, space = ctx.config, ctx.space

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        storage = trial.study._storage
        if is_heartbeat_enabled(storage):
            # Optuna's heartbeat thread writes its first beat asynchronously; a worker killed before it
            # would leave a trial that is never found stale. Beat once now, before any work.
            storage.record_heartbeat(trial._trial_id)
        params = {name: trial.suggest_categorical(name, choices) for name, choices in space.choices().items()}
        proposed = space.plan_from_params(params)
        plan = space.repair(proposed, **config.budget, scores=ctx.scores)  # in budget by construction
        cost = space.cost(proposed)
        # The constraints are the proposal's: an over-budget proposal is what the sampler must learn to avoid.
        for key, budget in config.budget.items():
            trial.set_constraint(key, getattr(cost, key) - budget)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (logs, tests)
        # What a person looking at the study (optuna-dashboard) needs on every trial, pruned ones included: the
        # plan's key and analytic cost (what fvcore measures, asserted in run_trial), and the fine-tune's seed.
        source = trial.user_attrs.get(CONTINUES)
        trial.set_user_attr("plan_key", plan_key(proposed))
        trial.set_user_attr("mflops", cost.mflops)
        trial.set_user_attr("mparams", cost.mparams)
        trial.set_user_attr("random_seed", config.seed if source is None else config.seed + 1)
        if plan != proposed:
            # The sampler is told only what ran: this proposal ends unevaluated and infeasible (TPE and NSGA-II
            # rank it by its violation), and the repaired plan is evaluated as a trial of its own, whose
            # parameters are that plan.
            trial.set_user_attr(OVER_BUDGET, True)
            trial.set_user_attr("stop_reason", f"over budget: its repair {plan_key(plan)} is queued")
            trial.study.enqueue_trial(space.params_from_plan(plan), user_attrs={"repair_of": trial.number})
            log(f"trial {trial.number}: proposal over budget ({cost}); its repaired plan is queued")
            raise optuna.TrialPruned("over budget; repaired plan queued")
        trial.set_user_attr("plan", gkpd.plan_to_dict(plan)["layers"])
        tag = trial.user_attrs.get("seed") or (f"repair of {trial.user_attrs['repair_of']}"
                                               if "repair_of" in trial.user_attrs else "")
        if source is not None:
            tag = f"trial {source}, {LONG_FIDELITY}x the fine-tune"
        label = f"trial {trial.number}" + (f" [{tag}]" if tag else "")
        checkpoint = checkpoint_file(trial.study.study_name, trial.number)
        try:
            if source is None:
                trial.set_user_attr("fidelity", 1)
                result = run_trial(ctx, plan, label=label, rivals=lambda: rivals_of(trial.study),
                                   checkpoint=config.out / checkpoint,
                                   seed=config.seed,  # the same batches for every trial: see run_trial
                                   on_screen=lambda acc: trial.set_user_attr("screen_accuracy", acc))
            else:
                short = {t.number: t for t in trial.study.get_trials(deepcopy=False)}[source]
                trial.set_user_attr("fidelity", LONG_FIDELITY)
                trial.set_user_attr("short_val_accuracy", short.values[0])
                trial.set_user_attr("screen_accuracy", short.user_attrs.get("screen_accuracy"))
                extra = (LONG_FIDELITY - 1) * short.user_attrs["finetune_steps"]
                result = continue_trial(ctx, plan, trial_checkpoint(short, config.out), steps=extra, label=label,
                                        checkpoint=config.out / checkpoint, seed=config.seed + 1)
                result = dataclasses.replace(result, finetune_steps=short.user_attrs["finetune_steps"] + extra)
        except Hopeless as stop:
            trial.set_user_attr("stopped", str(stop))
            trial.set_user_attr("stop_reason", f"stopped early: {stop}")
            log(f"{label}: stopped early: {stop}")
            raise optuna.TrialPruned(str(stop)) from None
        except CATCH as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
            trial.set_user_attr("stop_reason", f"failed: {type(err).__name__}: {err}")
            log(f"{label}: failed: {type(err).__name__}: {err}")
            raise
        for key, value in {"val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                           "stop_reason": f"completed {result.finetune_steps} fine-tune steps", "mflops": result.mflops,
                           "mparams": result.mparams, "finetune_steps": result.finetune_steps,
                           "seconds": result.seconds, "checkpoint": checkpoint.as_posix(),
                           "checkpoint_sha256": file_digest(config.out / checkpoint), **result.latency}.items():
            trial.set_user_attr(key, value)
        measured_ms = result.latency.get("ms_b1_table", result.latency.get("ms_b1"))  # search.trial._prediction
        if config.budget_ms is not None and measured_ms is not None and measured_ms > config.budget_ms:
            # Predicted in budget (the constraint), over it as measured: kept in trials.csv, off the frontier.
            trial.set_user_attr(OVER_MEASURED, f"over --budget-ms as measured: {measured_ms:.2f} ms > "
                                f"{config.budget_ms:g} ms (predicted {result.latency.get('predicted_ms_b1', 0):.2f})")
        return result.val_accuracy, result.mflops if config.objective == "mflops" else result.mparams

    return objective
