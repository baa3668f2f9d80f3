"""``--backend ray``: Ray Tune schedules the trials; each Tune trial runs one Optuna trial of the shared study.

Why not Ray's ``OptunaSearch``: it keeps the Optuna study in the Tune driver and proposes each trial there
through ``study.ask()``, one Tune trial at a time; the worker only sees a config dict, so our objective (the
repair into the budget, ``set_constraint``, the plan, checkpoint and failure reason as user attributes, the
early-stopping rule that reads finished trials) cannot run as it does on the other backends, and its
searcher state lives in Tune's experiment checkpoint rather than in the study that ``report`` and
``export`` read. Here the Tune trial itself joins the study in the Optuna storage (SQLite on one machine,
PostgreSQL on a cluster) and calls ``study.optimize(n_trials=1)`` with the same objective: the same sampler
(TPE with constant liar sees the other RUNNING trials), seeds, repair, stopping rule and heartbeats.
Tune only places the work (``tune.with_resources``) and receives the metrics.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.config import SearchConfig
from search.progress import duration, log
from search.run import SearchFailed, finish, interrupted_status, join_prepared, prepare_study
from search.storage import is_local_file, redact
from search.study import finished_count, make_objective, run_one
from search.teacher import default_cache_dir

__all__ = ["LOCAL_RAY_ENV", "run_ray"]

REPO_ROOT = Path(__file__).resolve().parent.parent
# A local Ray binds to 127.0.0.1 only, asks for no token, and sends no usage statistics. Ray reads these at
# import time, so they are set before ``import ray``.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP = loopback
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Our Ctrl-C handling, not Tune's: Tune's handler ends fit() quietly and we would start the next round.
DRIVER_ENV = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0"}
RAY_CONNECT_TIMEOUT = 10.0
# Rounds of Tune trials in a row that finish no Optuna trial before the driver gives up.
MAX_ROUNDS_WITHOUT_PROGRESS = 2


def run_ray(config: SearchConfig) -> int:
    start = time.perf_counter()
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--backend ray needs Ray Tune: pip install 'ray[tune]' (or gkpd-search[ray])")
    config = _absolute_paths(config)  # Tune trials may run elsewhere: no path may depend on a working directory
    head = _check_reachable(config.ray_address) if config.ray_address is not None else "127.0.0.1"
    prepared, study = prepare_study(config)  # bad input fails here; the teacher is trained once, seeds enqueued once
    storage = prepared.storage
    del prepared
    ray = _connect(config, head)
    run_id = uuid.uuid4().hex[:8]
    already = finished_count(study)
    interrupted: KeyboardInterrupt | None = None
    failed: SearchFailed | None = None
    try:
        _check_shared_storage(config, len([node for node in ray.nodes() if node.get("Alive")]))
        _tune_rounds(config, study, run_id=run_id, start=start)
    except KeyboardInterrupt as stop:
        interrupted = stop
        log("ray: interrupted; stopping Ray and marking this run's running trials failed")
    except SearchFailed as err:
        failed = err
    finally:
        ray.shutdown()  # ends this run's trials wherever they run
    if interrupted is not None or failed is not None:
        _fail_running(study, storage, run_id, reason="interrupted" if interrupted is not None else str(failed))
        finish(config, study, elapsed=time.perf_counter() - start, export=False)
        if failed is not None:
            raise failed
        return interrupted_status(interrupted)
    elapsed = time.perf_counter() - start
    log(f"ray: {finished_count(study) - already} trials finished in {duration(elapsed)}")
    finish(config, study, elapsed=elapsed, export=True)
    return 0


def _absolute_paths(config: SearchConfig) -> SearchConfig:
    def absolute(path: Path | None) -> Path | None:
        return None if path is None else path.expanduser().resolve()

    storage = config.storage
    for prefix in ("sqlite:///", "journal:"):
        if storage and storage.startswith(prefix) and not storage.startswith(prefix + "/"):
            storage = prefix + str(absolute(Path(storage.removeprefix(prefix))))
    return dataclasses.replace(
        config, out=absolute(config.out), teacher=absolute(config.teacher), data_dir=absolute(config.data_dir),
        cache_dir=absolute(config.cache_dir or default_cache_dir() / "teachers"), storage=storage,
    )


def _check_shared_storage(config: SearchConfig, nodes: int) -> None:
    """A storage that is a file on this machine cannot be shared by Tune trials on other machines."""
    if nodes > 1 and is_local_file(config.storage_url):
        raise ValueError(f"--storage {redact(config.storage_url)} is a file on this machine, but the Ray cluster "
                         f"has {nodes} nodes whose trials must all reach it: use --storage postgresql://...")


def _connect(config: SearchConfig, head: str | None):
    """Start a local Ray on 127.0.0.1, or join ``--ray-address``; the trials see our code and GKPD_* settings."""
    os.environ.update(DRIVER_ENV)
    if head in ("127.0.0.1", "localhost", "::1"):
        # Otherwise Ray replaces a loopback address by this machine's outward IP (and a loopback-bound head
        # is then unreachable).
        os.environ.update(LOCAL_RAY_ENV)
    import ray

    env_vars = {key: value for key, value in os.environ.items() if key.startswith("GKPD_")}
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env_vars["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    runtime_env = {"env_vars": env_vars}
    if config.ray_address is not None:
        log(f"ray: connecting to {config.ray_address}")
        try:
            ray.init(address=config.ray_address, runtime_env=runtime_env, log_to_driver=True)
        except (ConnectionError, ValueError) as err:
            raise ValueError(f"--ray-address {config.ray_address}: cannot connect: {err}") from None
    else:
        # address="local": always a new instance; None would join any Ray already running on this machine.
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=os.cpu_count(), runtime_env=runtime_env, log_to_driver=True)
    log(f"ray: cluster resources {ray.cluster_resources()}")
    return ray


def _check_reachable(address: str) -> str | None:
    """The host of ``--ray-address`` after a TCP check (``ray.init`` retries an unreachable head forever)."""
    if address in ("auto", "local"):
        return None
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray-address {address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as err:
        raise ValueError(f"--ray-address {address}: cannot reach {host}:{port} ({err}); is the Ray head "
                         "running there (ray start --head) and the port open?") from None
    return host


def _slots(resources: dict[str, float], config: SearchConfig) -> int:
    """How many trials fit on the cluster at once."""
    slots = int(resources.get("CPU", 0) // config.cpus_per_trial) if config.cpus_per_trial > 0 else 1 << 30
    if config.gpus_per_trial > 0:
        slots = min(slots, int(resources.get("GPU", 0) // config.gpus_per_trial))
    if slots < 1:
        raise ValueError(f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) "
                         f"cannot fit one trial of --cpus-per-trial {config.cpus_per_trial:g} "
                         f"--gpus-per-trial {config.gpus_per_trial:g}")
    return slots


def _tune_rounds(config: SearchConfig, study: optuna.Study, *, run_id: str, start: float) -> None:
    """Run rounds of Tune trials, one Optuna trial each, until the study holds ``--trials`` finished ones.

    A round asks for as many trials as are missing; trials that fail (and those of a worker that died, once
    their heartbeat is stale) leave the count short, and the next round makes up for them.
    """
    import ray
    from ray import tune

    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    # Ray 2.x no longer hides the GPUs from a trial given none (ray-project/ray#54868): "auto" must not
    # pick a GPU that Ray did not reserve for it.
    trial_config = config
    if config.device == "auto" and config.gpus_per_trial == 0:
        trial_config = dataclasses.replace(config, device="cpu")
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, config=trial_config, run_id=run_id),
                                    resources)
    slots = _slots(ray.cluster_resources(), config)
    stalled, round_number = 0, 0
    while True:
        optuna.storages.fail_stale_trials(study)
        done = finished_count(study)
        if done >= config.trials:
            return
        elapsed = time.perf_counter() - start
        if config.timeout is not None and elapsed > config.timeout:
            log(f"ray: --timeout {config.timeout:g}s reached")
            return
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        wanted = config.trials - done - running
        if wanted <= 0:  # other workers are finishing the last trials, or a dead one awaits its grace period
            time.sleep(2)
            continue
        round_number += 1
        log(f"ray: round {round_number}: {wanted} trials, at most {min(slots, wanted)} at a time "
            f"({config.cpus_per_trial:g} CPU, {config.gpus_per_trial:g} GPU each)")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                num_samples=wanted, max_concurrent_trials=min(slots, wanted), reuse_actors=True,
                time_budget_s=None if config.timeout is None else max(1.0, config.timeout - elapsed),
            ),
            run_config=tune.RunConfig(
                name=f"{config.study_name}-{run_id}-{round_number}", storage_path=str(config.out / "ray"),
                # The trials log their own progress; Tune's status tables would bury it.
                failure_config=tune.FailureConfig(max_failures=0), verbose=0,
            ),
        )
        results = tuner.fit()
        errors = [result.error for result in results if result.error is not None]
        for error in errors:
            last = (str(error).strip().splitlines() or [""])[-1]
            log(f"ray: a Tune trial raised {type(error).__name__}: {last}")
        stalled = stalled + 1 if finished_count(study) == done else 0
        if stalled >= MAX_ROUNDS_WITHOUT_PROGRESS:
            failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            reason = failed[-1].user_attrs.get("fail_reason") if failed else None
            if reason is None and errors:
                reason = (str(errors[-1]).strip().splitlines() or [type(errors[-1]).__name__])[-1]
            raise SearchFailed(f"{stalled} rounds of Ray trials finished no trial; last failure: {reason or 'unknown'}")


_PREPARED: dict[SearchConfig, Any] = {}


def _tune_trial(_: dict, *, config: SearchConfig, run_id: str) -> None:
    """One Tune trial: join the study and run one Optuna trial with the objective every backend uses."""
    import torch
    from ray import tune

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # as main() does
    torch.set_num_threads(max(1, round(config.cpus_per_trial)))
    if config not in _PREPARED:  # once per worker process: Tune reuses actors between trials
        # Join only: a node that cannot see the driver's storage must fail, not start a private study.
        _PREPARED[config] = join_prepared(config)
    prepared, study = _PREPARED[config]
    objective = make_objective(prepared.ctx)
    tune_trial_id = tune.get_context().get_trial_id()

    def objective_on_ray(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("ray_trial_id", tune_trial_id)
        trial.set_user_attr("ray_run", run_id)
        return objective(trial)

    trial = run_one(study, objective_on_ray)
    metrics: dict[str, Any] = {"optuna_trial": trial.number, "optuna_state": trial.state.name}
    if trial.values is not None:
        metrics["val_accuracy"], metrics[config.objective] = trial.values
    for key in ("test_accuracy", "mflops", "mparams", "fail_reason", "stopped"):
        if key in trial.user_attrs:
            metrics[key] = trial.user_attrs[key]
    tune.report(metrics)


def _fail_running(study: optuna.Study, storage: optuna.storages.BaseStorage, run_id: str, *, reason: str) -> None:
    """Mark this run's RUNNING trials failed (their Ray workers are gone), so nobody waits on them."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("ray_run") != run_id:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it finished in the meantime
