"""One search, whatever starts it (the CLI, ``--workers`` children, Ray Tune trials): prepare, run, report, export.

The order in ``Prepared`` rejects bad input before slow work: the run directory and the study's recorded
identity first (reading writes nothing), then data and model, then the teacher's weights and the space,
checked against the study before any trial fine-tunes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

import gkpd
from search.config import SearchConfig
from search.data import load_data
from search.export import export_model, ort_line
from search.files import atomic_text, create_text
from search.models import check_input_shape, check_weights, create_model
from search.progress import Eta, log
from search.report import LATENCY_SHOWN, PREDICTION_SHOWN, best_row, format_table, write_report
from search.sensitivity import study_table_key
from search.storage import open_storage, redact, sqlite_path, without_password
from search.study import (
    check_identity, existing_identity, fail_own_running, file_digest, finished_count, join_study, make_objective,
    open_study, queue_long_finetune, record_own_trials, requeue_interrupted_seeds, run_one, seed_plans,
    study_identity, trial_checkpoint, trial_plan,
)
from search.teacher import find_teacher, get_teacher, load_teacher, teacher_cache_path, teacher_digest
from search.train import evaluate, resolve_precision
from search.latency_table import build_latency_table
from search.trial import SENSITIVITY, TrialContext, latency_cache
from spaces import SearchSpace, build_space

__all__ = [
    "Prepared", "prepare_study", "run_search", "finish", "do_export", "report_run", "export_run", "open_run",
    "read_run_file", "SearchFailed", "Terminated", "interrupted_status", "RUN_FILE", "WORKER_ENV",
]

MAX_FAILURES_IN_A_ROW = 3
RUN_FILE = "run.json"
WORKER_ENV = "GKPD_WORKER"  # set by --workers N in its children ("i/N")


class SearchFailed(RuntimeError):
    """The search cannot go on (not the user's input): one line, exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (the running trial is marked failed, the report written)."""


def interrupted_status(stop: KeyboardInterrupt) -> int:
    """The shell's exit status for a process ended by the signal: 128 + SIGTERM or 128 + SIGINT."""
    return 143 if isinstance(stop, Terminated) else 130


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


# -- the run directory -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunRecord:
    """``OUT/run.json``: the one study a run directory belongs to. ``storage`` None: ``OUT/study.db``."""

    study_name: str
    storage: str | None

    def storage_url(self, out: Path) -> str:
        return self.storage or f"sqlite:///{(out / 'study.db').resolve()}"


def _recorded_storage(config: SearchConfig) -> str | None:
    """What run.json keeps of ``--storage``: nothing for the default (so a copied directory reads its own
    study.db), and never a password (libpq finds it in ~/.pgpass or $PGPASSWORD)."""
    return None if config.storage is None else without_password(config.storage)


def read_run_file(out: Path) -> RunRecord | None:
    """The run directory's record, None if it has none; a damaged one is a one-line ``ValueError``."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a run record ({err}); pass --storage and --study-name instead") from None
    if (not isinstance(doc, dict) or not isinstance(doc.get("study_name"), str) or not doc["study_name"]
            or not isinstance(doc.get("storage"), (str, type(None)))):
        raise ValueError(f"{path}: not a run record (expected {{\"study_name\": ..., \"storage\": ...}}); "
                         "pass --storage and --study-name instead")
    storage = doc["storage"]
    if storage == f"sqlite:///{(out / 'study.db').resolve()}":  # written by older versions: the default
        storage = None
    return RunRecord(doc["study_name"], storage)


def check_run_dir(config: SearchConfig) -> None:
    """``--out`` is a writable directory (or can be made one) and belongs to this study, or to none yet."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot create or write {parent}")
    record = read_run_file(out)
    if record is None:
        return
    if record.study_name != config.study_name:
        raise ValueError(f"--out {out} belongs to study {record.study_name!r} (its {RUN_FILE}); give study "
                         f"{config.study_name!r} another --out, or pass --study-name {record.study_name} to continue")
    if record.storage != _recorded_storage(config):
        where = "the SQLite file in --out" if record.storage is None else redact(record.storage)
        raise ValueError(f"--out {out} belongs to study {record.study_name!r} in {where}, not in --storage "
                         f"{redact(config.storage_url)}; give this run another --out")


def claim_run_dir(config: SearchConfig) -> None:
    """Write run.json once; a directory's record never changes (check_run_dir refused anything else)."""
    record = {"study_name": config.study_name, "storage": _recorded_storage(config)}
    create_text(config.out / RUN_FILE, json.dumps(record) + "\n")


# -- preparing ---------------------------------------------------------------------------------------------------

def _check_budget(space: SearchSpace, config: SearchConfig, model: torch.nn.Module, device: torch.device) -> None:
    """The budgets against the space; with ``--budget-ms`` the space gets its latency table first (timed once
    on ``device`` with ``model``'s layers, or read from the cache)."""
    if config.budget_ms is not None and space.latency is None:
        space.set_latency(build_latency_table(model, space, device=device, cache_dir=latency_cache(config)))
    try:
        space.check_budget(**config.budget)
    except ValueError as err:
        if config.budget_ms is not None and str(err).startswith("ms budget"):
            raise ValueError(f"--budget-ms {str(err).removeprefix('ms budget ')}") from None
        raise
    if len(config.budget) > 1:
        # Each budget may be reachable alone but not together: a feasible plan must exist for all at once.
        try:
            space.allocate(**config.budget)
        except ValueError as err:
            given = " and ".join(f"--budget-{key} {value:g}" for key, value in config.budget.items())
            both = "both" if len(config.budget) == 2 else "them all"
            raise ValueError(f"{given}: no plan of this space meets {both} ({err})") from None


class Prepared:
    """Everything a trial needs, built once per process, in an order that rejects bad input before slow work.

    ``join=True`` (Ray Tune trials): the storage and the study must exist already; nothing is created.
    """

    def __init__(self, config: SearchConfig, *, join: bool = False) -> None:
        self.config = config
        # 1. The run directory and the study's recorded settings. Reading them writes nothing.
        if not join:
            check_run_dir(config)
        db = sqlite_path(config.storage_url)
        self.storage = None
        found = None
        if join or db is None or db.exists():
            self.storage = open_storage(config.storage_url, create=not join)
            found = existing_identity(self.storage, config.study_name)
            check_identity(config.identity(), found, config.study_name)
        # 2. Data and model: unknown names and missing files fail here, in seconds.
        self.device = resolve_device(config.device)
        if config.weights is not None:
            check_weights(config.model, config.weights)
        self.data = load_data(config.dataset, data_dir=config.data_dir, val_images=config.val_images,
                              seed=config.seed, max_train_images=config.max_train_images,
                              max_eval_images=config.max_eval_images, image_size=config.image_size,
                              download=os.environ.get("GKPD_OFFLINE") != "1")
        if config.val_images is None:  # the default depends on the data's size: now known, and part of the identity
            config = self.config = dataclasses.replace(config, val_images=self.data.val_images)
            check_identity(config.identity(), found, config.study_name)
        if config.batch_size > len(self.data.train_x):
            raise ValueError(f"--batch-size {config.batch_size} is more than the {len(self.data.train_x)} training "
                             "images (see --max-train-images)")
        shape, classes = self.data.input_shape, self.data.num_classes
        model = create_model(config.model, in_channels=shape[0], num_classes=classes)
        check_input_shape(model, config.model, shape, classes)
        # 3. The teacher, if it exists without training, is checked against the study; otherwise the budget is
        #    checked on the untrained model (costs do not depend on the weights) before the teacher trains.
        source = find_teacher(config)
        if source is None:
            if found is not None and "teacher_sha256" in found:
                raise ValueError(f"study {config.study_name!r} compresses a teacher (sha256 "
                                 f"{found['teacher_sha256'][:12]}) that is not here: not in the teacher cache "
                                 f"{teacher_cache_path(config).parent} (training a new one would give another); "
                                 "pass --teacher PATH or --cache-dir DIR")
            _check_budget(build_space(model, shape, preset=config.preset, skip=config.skip), config, model,
                          self.device)
            self.teacher, self.teacher_source = get_teacher(config, self.data, self.device)
        else:
            self.teacher = load_teacher(config, source, in_channels=shape[0], num_classes=classes).to(self.device)
            self.teacher_source = str(source)
        digest = teacher_digest(self.teacher)
        check_identity({"teacher_sha256": digest}, found, config.study_name)
        # 4. The space, built once from the teacher (one SVD per layer and factor shape).
        self.space = build_space(self.teacher, shape, preset=config.preset, skip=config.skip)
        if source is not None or config.budget_ms is not None:  # the table: timed above, read from the cache now
            _check_budget(self.space, config, self.teacher, self.device)
        table = study_table_key(self.teacher, self.space, self.data.train_x) if SENSITIVITY else None
        self.identity = study_identity(config, teacher=digest, space=self.space, sensitivity=table,
                                       precision=resolve_precision(config.precision, self.device))
        check_identity(self.identity, found, config.study_name)
        if self.storage is None:
            config.out.mkdir(parents=True, exist_ok=True)
            self.storage = open_storage(config.storage_url)
        self.ctx = TrialContext(config, self.data, self.teacher, self.space, self.device)

    def teacher_summary(self) -> dict[str, float]:
        base = self.space.baseline_cost()
        return {
            "val_accuracy": evaluate(self.teacher, self.data.val_x, self.data.val_y, device=self.device),
            "test_accuracy": evaluate(self.teacher, self.data.test_x, self.data.test_y, device=self.device),
            "mflops": base.mflops, "mparams": base.mparams,
        }


def _run_info(config: SearchConfig, prepared: Prepared, teacher: dict[str, float]) -> dict[str, Any]:
    return {
        "study_name": config.study_name, "model": config.model, "dataset": config.dataset,
        "input_shape": list(prepared.data.input_shape), "num_classes": prepared.data.num_classes,
        "objective": config.objective, "budget": config.budget, "teacher": teacher,
        "teacher_source": str(Path(prepared.teacher_source).resolve()), "preset": config.preset,
        "skip": list(config.skip), "data_dir": str(config.data_dir.resolve()) if config.data_dir else None,
        "weights": config.weights, "data_fingerprint": config.data_fingerprint,
    }


def prepare_study(config: SearchConfig) -> tuple[Prepared, optuna.Study]:
    """Validate, build (or load) the teacher and space, and create the study with its seeds, or join it."""
    prepared = Prepared(config)
    space = prepared.space
    plans = seed_plans(config, space, scores=prepared.ctx.scores)  # by measured sensitivity (search.sensitivity)
    seeds = [(tag, space.params_from_plan(plan)) for tag, plan in plans]
    study = open_study(config, prepared.storage, seeds, identity=prepared.identity)
    if "run" not in study.user_attrs:
        teacher = prepared.teacher_summary()
        log(f"teacher: val {teacher['val_accuracy']:.2%}, test {teacher['test_accuracy']:.2%}, "
            f"{teacher['mflops']:.2f} MFLOPs, {teacher['mparams']:.3f} Mparams")
        study.set_user_attr("run", _run_info(config, prepared, teacher))
    claim_run_dir(config)
    return prepared, study


def join_prepared(config: SearchConfig) -> tuple[Prepared, optuna.Study]:
    """For a process that only runs trials of a study the driver created (Ray Tune trials)."""
    prepared = Prepared(config, join=True)
    return prepared, join_study(config, prepared.storage, identity=prepared.identity)


# -- running -----------------------------------------------------------------------------------------------------

def run_search(config: SearchConfig) -> int:
    start = time.perf_counter()
    prepared, study = prepare_study(config)
    # A child of --workers N only runs trials: its parent writes the report and export once, at the end.
    report = not os.environ.get(WORKER_ENV)

    objective = make_objective(prepared.ctx)
    already = finished_count(study)
    eta = Eta(max(0, config.trials - already), config.timeout)
    log(f"search: {already} finished trials in the study, target {config.trials}; budget "
        + ", ".join(f"{v:g} {k}" for k, v in config.budget.items()) + f"; out {config.out}")
    failures = 0
    own = record_own_trials(study)
    try:
        while True:
            done = finished_count(study)
            if done >= config.trials:
                break
            if config.timeout is not None and time.perf_counter() - start > config.timeout:
                log(f"search: --timeout {config.timeout:g}s reached")
                break
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if done + running >= config.trials:
                # Others are finishing the last trials; wait, failing any whose worker died (no heartbeat).
                optuna.storages.fail_stale_trials(study)
                time.sleep(2)
                continue
            queue_long_finetune(study, config)
            last = run_one(study, objective)
            failures = failures + 1 if last.state == TrialState.FAIL else 0
            if failures >= MAX_FAILURES_IN_A_ROW:
                if report:
                    finish(config, study, elapsed=time.perf_counter() - start, export=False)
                raise SearchFailed(f"{failures} trials in a row failed (a systematic problem, not bad luck); "
                                   f"last: {last.user_attrs.get('fail_reason')}")
            log(f"progress: {eta(finished_count(study) - already)}")
    except KeyboardInterrupt as stop:
        fail_own_running(study, own)  # one interrupted inside Optuna's ask(), outside its guard
        requeue_interrupted_seeds(study)
        log("search: interrupted; the running trial is marked failed (a seed plan is queued again), "
            "finished trials are kept")
        if report:
            finish(config, study, elapsed=time.perf_counter() - start, export=False)
        return interrupted_status(stop)
    if report:
        finish(config, study, elapsed=time.perf_counter() - start, export=True)
    return 0


def finish(config: SearchConfig, study: optuna.Study, *, elapsed: float, export: bool) -> None:
    """Write the report; export the best in-budget trial when ``export`` (and there is one)."""
    info = study.user_attrs["run"]
    budget = info["budget"].get(info["objective"])
    _, pareto = write_report(study, config.out, objective=info["objective"], budget=budget,
                             teacher=info["teacher"], run={**info, "elapsed": elapsed})
    best = best_row(pareto) if export else None
    print_summary(info, pareto, config.out, exported=best is not None)
    if best is not None:
        do_export(study, info, config.out, int(best.trial))


def print_summary(info: dict[str, Any], pareto: pd.DataFrame, out: Path, *, exported: bool) -> None:
    teacher = info["teacher"]
    print("\nPareto frontier (validation accuracy chooses; MFLOPs = fvcore MACs / 1e6, gflops_torch = 2 x MACs / 1e9)")
    print(f"teacher: val {teacher['val_accuracy']:.2%}, test {teacher['test_accuracy']:.2%}, "
          f"{teacher['mflops']:.2f} MFLOPs, {teacher['mparams']:.3f} Mparams")
    if pareto.empty:
        print("no completed in-budget trial yet")
    else:
        measured = "ms_b1" in pareto and pareto.ms_b1.notna().any()
        predicted = "predicted_ms_b1" in pareto and pareto.predicted_ms_b1.notna().any()
        print(format_table(pareto, ["trial", "seed", "fidelity", "val_accuracy", "test_accuracy", "mflops",
                                    "gflops_torch", "mparams", "flops_ratio", "params_ratio",
                                    *(LATENCY_SHOWN if measured else []), *(PREDICTION_SHOWN if predicted else [])]))
        if measured:
            print("latency: ms_b1 = torch at batch 1 on the run's device, speedup_* = dense ms / model ms (torch at "
                  "batch 1 and at --batch-size), ort_* = onnxruntime CPU at batch 1, fast form; medians of 5")
        if predicted:
            budget_ms = info["budget"].get("ms")
            print("predicted_ms_b1 = the per-layer latency table's prediction, ms_pred_error = predicted / measured - 1"
                  + (f"; --budget-ms {budget_ms:g} holds as measured (trials over it: trials.csv, note)"
                     if budget_ms is not None else ""))
    files = "trials.csv, pareto.csv, pareto.png, report.md" + (", best/" if exported else "")
    print(f"\nrun directory: {out}  ({files})")


def do_export(study: optuna.Study, info: dict[str, Any], out: Path, number: int, *, form: str = "fast") -> None:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ValueError(f"--trial {number}: no such trial; the study has trials 0..{len(trials) - 1}")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE or "plan" not in trial.user_attrs:
        raise ValueError(f"--trial {number} is {trial.state.name}, not COMPLETE; only completed trials export")
    checkpoint = trial_checkpoint(trial, out)
    plan = trial_plan(trial)
    base = create_model(info["model"], in_channels=info["input_shape"][0], num_classes=info["num_classes"])
    model = gkpd.kroneckerize(base, plan)
    try:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    except RuntimeError as err:  # shapes of another plan
        reason = str(err).strip().splitlines()[0]
        raise ValueError(f"{checkpoint} does not fit trial {number}'s plan ({reason})") from None
    mflops = gkpd.count_mflops(model, info["input_shape"])
    meta = {
        "trial": number, "study_name": info["study_name"], "model": info["model"], "dataset": info["dataset"],
        "input_shape": info["input_shape"], "num_classes": info["num_classes"],
        "val_accuracy": trial.values[0], "test_accuracy": trial.user_attrs.get("test_accuracy"),
        "mflops": mflops, "mparams": gkpd.count_params(model) / 1e6, "budget": info["budget"],
        "unit": "mflops = fvcore MACs / 1e6",
    }
    # The dense model's latency does not depend on its weights: the untrained architecture stands in for it.
    dense = create_model(info["model"], in_channels=info["input_shape"][0], num_classes=info["num_classes"])
    summary = export_model(model, plan, out / "best", input_shape=info["input_shape"], meta=meta, form=form,
                           dense=dense)
    if "onnx_error" in summary:
        raise SearchFailed(f"export: trial {number}: ONNX failed ({summary['onnx_error']}); "
                           f"{out / 'best'} holds plan.json and model.pt")
    folded = sum(f == "dense" for f in summary["forms"].values())
    log(f"export: trial {number} -> {out / 'best'} (plan.json, model.pt, model.onnx; form {form}: "
        f"{len(summary['forms']) - folded} Kronecker layers factorized, {folded} folded into dense convs; "
        f"onnxruntime max |diff| {summary['onnx_max_abs_diff']:.2e} at logits up to "
        f"{summary['onnx_max_abs_logit']:.3g})")
    log(ort_line(summary))


# -- report and export of an existing run ------------------------------------------------------------------------

def open_run(out: Path, *, storage: str | None, study_name: str | None) -> tuple[optuna.Study, dict[str, Any]]:
    """The study of run directory ``out`` (or the one named), read-only use; one-line errors otherwise."""
    record = read_run_file(out)
    if record is None and not (storage and study_name):
        raise ValueError(f"--out {out}: no {RUN_FILE} there; give the run directory of a search, "
                         "or --storage and --study-name")
    url = storage or record.storage_url(out)
    name = study_name or record.study_name
    opened = open_storage(url, create=False)
    if existing_identity(opened, name) is None:
        raise ValueError(f"no study {name!r} in {redact(url)}")
    study = optuna.load_study(study_name=name, storage=opened)
    if "run" not in study.user_attrs:
        raise ValueError(f"study {name!r} has no finished setup yet (no teacher summary); run the search first")
    return study, study.user_attrs["run"]


def report_run(out: Path, *, storage: str | None = None, study_name: str | None = None) -> int:
    study, info = open_run(out, storage=storage, study_name=study_name)
    budget = info["budget"].get(info["objective"])
    _, pareto = write_report(study, out, objective=info["objective"], budget=budget, teacher=info["teacher"],
                             run=info)
    print_summary(info, pareto, out, exported=(out / "best").is_dir())
    return 0


def export_run(out: Path, *, storage: str | None = None, study_name: str | None = None,
               trial: int | None = None, form: str = "fast") -> int:
    study, info = open_run(out, storage=storage, study_name=study_name)
    if trial is None:
        budget = info["budget"].get(info["objective"])
        _, pareto = write_report(study, out, objective=info["objective"], budget=budget,
                                 teacher=info["teacher"], run=info)
        best = best_row(pareto)
        if best is None:
            raise ValueError("no completed in-budget trial to export yet")
        trial = int(best.trial)
    do_export(study, info, out, trial, form=form)
    return 0
