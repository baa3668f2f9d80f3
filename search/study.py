"""The Optuna side: storage, sampler, the study's identity, warm-start seeds, and the objective."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Sequence
from typing import Any

import optuna
import torch
from optuna.storages._heartbeat import is_heartbeat_enabled  # not re-exported by optuna.storages
from optuna.trial import FrozenTrial, TrialState

import gkpd
from search.config import SearchConfig
from search.progress import log
from search.trial import Hopeless, Rival, TrialContext, run_trial
from spaces import SearchSpace

__all__ = [
    "open_storage", "make_sampler", "existing_identity", "open_study", "seed_plans", "make_objective",
    "finished_count", "requeue_interrupted_seeds", "rivals_of", "trial_plan", "SEED_LADDER", "CATCH",
]

# Seeds: the knapsack allocation at the budget and at smaller budgets (they draw the frontier's lower end),
# and the paper's uniform rule at the budget (the baseline the frontier must beat).
SEED_LADDER = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
# Trials that fail for these reasons are recorded as failed, with the reason, and the study goes on.
CATCH = (FloatingPointError, torch.OutOfMemoryError)
# A worker records a heartbeat every HEARTBEAT_SECONDS; a RUNNING trial silent for GRACE_SECONDS is failed
# (and re-queued once). $GKPD_HEARTBEAT_SECONDS / $GKPD_GRACE_SECONDS override them (tests use 1 s / 5 s).
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
# How long an SQLite writer waits for another process's lock before "database is locked" (pysqlite: 5 s).
SQLITE_TIMEOUT_SECONDS = 60
STORAGE_ATTEMPTS = 5
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage with heartbeats, so a killed worker's trial is failed instead of RUNNING forever."""
    if url.startswith("journal:"):
        path = url.removeprefix("journal:")
        backend = optuna.storages.journal.JournalFileBackend(path)
        return optuna.storages.JournalStorage(backend)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:"):
        # Several worker processes (--workers N) share one SQLite file; wait for a lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_SECONDS}
    heartbeat = _env_seconds("GKPD_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)
    grace = _env_seconds("GKPD_GRACE_SECONDS", GRACE_SECONDS)
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat,
                grace_period=grace,
                # A trial whose worker died is failed after the grace period and re-queued once.
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                engine_kwargs=engine_kwargs,
            )
            if url.startswith("sqlite:"):
                _lock_sqlite_transactions(storage.engine)
            return storage
        except Exception as err:  # sqlalchemy raises many types here: bad scheme, no driver, refused connection
            text = str(err).lower()
            if attempt < STORAGE_ATTEMPTS and ("already exists" in text or "duplicate key" in text):
                # Workers starting together on a new database race to create Optuna's tables (SQLAlchemy's
                # create_all checks, then creates); the loser finds them there on the next try.
                time.sleep(0.2 + random.random())
                continue
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot open storage {url!r}: {reason}") from None
    raise AssertionError("unreachable")


def _lock_sqlite_transactions(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins (``BEGIN IMMEDIATE``).

    pysqlite starts no transaction before a SELECT, so Optuna's "read the WAITING trial, then set it
    RUNNING" is not atomic on SQLite, and two workers can pop the same queued trial (PostgreSQL locks the
    row). This is SQLAlchemy's recipe for pysqlite transactions; worker transactions are short, and
    writers wait up to SQLITE_TIMEOUT_SECONDS for each other.
    """
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_pysqlite_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage set itself up predate the listeners


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${name} must be a whole number of seconds >= 1, got {value!r}")
    return int(value)


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


def check_identity(config: SearchConfig, found: dict[str, Any] | None) -> None:
    if found is None:
        return
    wanted = config.identity()
    diffs = [f"{key} {found.get(key)!r} (this run: {wanted[key]!r})" for key in wanted if found.get(key) != wanted[key]]
    if diffs:
        raise ValueError(f"study {config.study_name!r} was created with {', '.join(diffs)}; "
                         "use the same settings to resume it, or another --study-name")


def open_study(config: SearchConfig, storage: optuna.storages.BaseStorage, seeds: Sequence[tuple[str, dict]]) -> optuna.Study:
    """Create the study (enqueueing the seeds once) or load it to resume; refuse a different identity."""
    check_identity(config, existing_identity(storage, config.study_name))
    optuna.logging.set_verbosity(logging.WARNING)
    sampler = make_sampler(config, startup_trials=len(seeds) + 2)
    try:
        study = optuna.create_study(study_name=config.study_name, storage=storage, sampler=sampler,
                                    directions=["maximize", "minimize"])
    except optuna.exceptions.DuplicatedStudyError:
        # Another worker (or an earlier run) created it: resume, never re-seed.
        study = optuna.load_study(study_name=config.study_name, storage=storage, sampler=sampler)
        check_identity(config, study.user_attrs.get("identity", {}))
        # Workers joining one study must not replay the same --seed random stream (the sampler's startup
        # phase would propose the same plans in every worker); --seed still fixes the data split and teacher.
        sampler.reseed_rng()
        return study
    study.set_metric_names(["val_accuracy", config.objective])
    study.set_user_attr("identity", config.identity())
    for tag, params in seeds:
        study.enqueue_trial(params, user_attrs={"seed": tag})
    log(f"study {config.study_name!r}: created with {len(seeds)} seed plans ({', '.join(t for t, _ in seeds)})")
    return study


def seed_plans(config: SearchConfig, space: SearchSpace) -> list[tuple[str, gkpd.Plan]]:
    """Warm starts: ``allocate`` at the budget and below it, and ``uniform`` at the budget."""
    plans: list[tuple[str, gkpd.Plan]] = []
    minimum = space.min_cost()
    for fraction in SEED_LADDER:
        budget = {key: value * fraction for key, value in config.budget.items()}
        if any(value < getattr(minimum, key) for key, value in budget.items()):
            continue
        makers = [(f"allocate@{fraction:g}", space.allocate)]
        if fraction == 1.0:
            makers.append(("uniform", space.uniform_for_budget))
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
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def rivals_of(study: optuna.Study) -> list[Rival]:
    return [
        Rival(t.values[1], t.user_attrs["screen_accuracy"], t.values[0])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "screen_accuracy" in t.user_attrs
    ]


def trial_plan(trial: FrozenTrial) -> gkpd.Plan:
    """The plan a trial evaluated (after repair), as stored in its user attributes."""
    return gkpd.plan_from_dict({"format": gkpd.PLAN_FORMAT, "version": gkpd.PLAN_VERSION,
                                "layers": trial.user_attrs["plan"]}, source=f"trial {trial.number}")


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
        plan = space.repair(proposed, **config.budget)  # every trial is in budget by construction
        cost = space.cost(plan)
        trial.set_user_attr("plan", gkpd.plan_to_dict(plan)["layers"])
        trial.set_user_attr("repaired", plan != proposed)
        for key, budget in config.budget.items():
            trial.set_constraint(key, getattr(cost, key) - budget)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (logs, tests)
        seed_tag = trial.user_attrs.get("seed")
        label = f"trial {trial.number}" + (f" [{seed_tag}]" if seed_tag else "")
        checkpoint = config.out / "checkpoints" / f"trial-{trial.number}.pt"
        try:
            result = run_trial(ctx, plan, label=label, rivals=lambda: rivals_of(trial.study), checkpoint=checkpoint,
                               seed=config.seed,  # the same batches for every trial: see run_trial
                               on_screen=lambda acc: trial.set_user_attr("screen_accuracy", acc))
        except Hopeless as stop:
            trial.set_user_attr("stopped", str(stop))
            log(f"{label}: stopped early: {stop}")
            raise optuna.TrialPruned(str(stop)) from None
        except CATCH as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
            log(f"{label}: failed: {type(err).__name__}: {err}")
            raise
        for key, value in {"test_accuracy": result.test_accuracy, "mflops": result.mflops,
                           "mparams": result.mparams, "finetune_steps": result.finetune_steps,
                           "seconds": result.seconds, "checkpoint": str(checkpoint)}.items():
            trial.set_user_attr(key, value)
        return result.val_accuracy, result.mflops if config.objective == "mflops" else result.mparams

    return objective
