"""``python search.py``: search, report and export. Bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

import gkpd
from search.config import BACKENDS, SAMPLERS, SearchConfig
from search.data import DATASETS, load_data
from search.export import export_model
from search.files import atomic_text
from search.models import MODELS, create_model, load_checkpoint
from search.progress import Eta, log
from search.report import best_row, format_table, write_report
from search.study import (
    CATCH, existing_identity, finished_count, make_objective, open_storage, open_study, requeue_interrupted_seeds,
    seed_plans, trial_plan,
)
from search.teacher import get_teacher
from search.train import evaluate
from search.trial import TrialContext
from spaces import PRESETS, build_space

__all__ = ["main", "build_parser", "config_from_args"]

DEFAULTS = SearchConfig(budget_mflops=1.0)  # only to read the defaults for --help
MAX_FAILURES_IN_A_ROW = 3
RUN_FILE = "run.json"
WORKER_ENV = "GKPD_WORKER"  # set by --workers N in its children ("i/N")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = _Parser(
        prog="search.py",
        description=(
            "Search per-layer Kronecker factorizations (GKPD, arXiv 2109.14710) of a trained CNN under a budget. "
            "MFLOPs are millions of multiply-accumulates (MACs) as fvcore counts them (torch's FlopCounterMode "
            "counts 2 per MAC). Subcommands: 'report --out DIR' re-prints and re-draws a run; "
            "'export --out DIR [--trial N]' writes the compressed model."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--study-file", type=Path, help="a TOML file of option defaults (see studies/); "
                   "options on the command line win")
    budget = p.add_argument_group("budget (at least one)")
    budget.add_argument("--budget-mflops", type=float, help="MACs per image, in millions (fvcore's 'MFLOPs')")
    budget.add_argument("--budget-mparams", type=float, help="parameters, in millions")
    what = p.add_argument_group("model and data")
    what.add_argument("--model", default=d.model,
                      help=f"one of {', '.join(MODELS)}, a torchvision model name, or pkg.module:factory")
    what.add_argument("--teacher", type=Path, help="trained weights for --model (a state_dict); "
                      "without it a teacher is trained once and cached")
    what.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)}")
    what.add_argument("--data-dir", type=Path, help="where datasets are (default $GKPD_DATA_DIR or ~/.cache/gkpd-search/data)")
    what.add_argument("--max-train-images", type=int, help="use at most this many training images")
    what.add_argument("--max-eval-images", type=int, default=d.max_eval_images,
                      help="validation and test images used per evaluation")
    work = p.add_argument_group("how much work")
    work.add_argument("--trials", type=int, default=d.trials,
                      help="finished trials the study should reach (a resumed study continues towards it)")
    work.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    work.add_argument("--finetune-steps", type=int, default=d.finetune_steps, help="distillation steps per trial")
    work.add_argument("--teacher-steps", type=int, default=d.teacher_steps, help="training steps of a new teacher")
    work.add_argument("--batch-size", type=int, default=d.batch_size)
    work.add_argument("--prune-margin", type=float, default=d.prune_margin,
                      help="stop a trial whose accuracy trails a no-costlier finished trial by more than this")
    space = p.add_argument_group("search space and sampler")
    space.add_argument("--preset", default=d.preset, help=f"candidate family: {', '.join(PRESETS)}")
    space.add_argument("--skip", nargs="*", default=[], metavar="LAYER", help="layers to keep dense")
    space.add_argument("--sampler", default=d.sampler, choices=SAMPLERS)
    space.add_argument("--seed", type=int, default=d.seed)
    where = p.add_argument_group("storage and execution")
    where.add_argument("--study-name", help="default: <model>-<dataset>-<budget>")
    where.add_argument("--storage", help="Optuna storage URL (default: SQLite file in --out); "
                       "postgresql://... lets workers on many machines share one study")
    where.add_argument("--out", type=Path, help="run directory (default runs/<study-name>)")
    where.add_argument("--cache-dir", type=Path, help="where trained teachers are cached "
                       "(default $GKPD_CACHE/teachers or ~/.cache/gkpd-search/teachers)")
    where.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    where.add_argument("--workers", type=int, default=d.workers, help="worker processes on this machine")
    where.add_argument("--backend", default=d.backend, choices=BACKENDS)
    where.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    where.add_argument("--gpus-per-trial", type=float, default=d.gpus_per_trial)
    where.add_argument("--cpus-per-trial", type=float, default=d.cpus_per_trial)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the search options; a ``--study-file`` supplies defaults that the command line overrides."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.study_file is not None:
        try:
            doc = tomllib.loads(first.study_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise UsageError(f"--study-file {first.study_file}: {err}") from None
        dests = {a.dest for a in parser._actions} - {"help", "study_file"}
        defaults = {key.replace("-", "_"): value for key, value in doc.items()}
        unknown = sorted(set(defaults) - dests)
        if unknown:
            raise UsageError(f"--study-file {first.study_file}: unknown keys {unknown}; allowed: {sorted(dests)}")
        parser.set_defaults(**{k: Path(v) if k in _PATH_OPTIONS else v for k, v in defaults.items()})
    return parser.parse_args(argv)


_PATH_OPTIONS = {"teacher", "data_dir", "out", "cache_dir"}


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(
        budget_mflops=args.budget_mflops, budget_mparams=args.budget_mparams, model=args.model,
        teacher=args.teacher, dataset=args.dataset, data_dir=args.data_dir, trials=args.trials,
        timeout=args.timeout, finetune_steps=args.finetune_steps, teacher_steps=args.teacher_steps,
        max_train_images=args.max_train_images, max_eval_images=args.max_eval_images, batch_size=args.batch_size,
        sampler=args.sampler, study_name=args.study_name or "", storage=args.storage, out=args.out or Path(),
        device=args.device, seed=args.seed, preset=args.preset, skip=tuple(args.skip),
        prune_margin=args.prune_margin, cache_dir=args.cache_dir, workers=args.workers, backend=args.backend,
        ray_address=args.ray_address, gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def _sqlite_file(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


class Prepared:
    """Everything a trial needs, built once per process, in an order that rejects bad input before slow work."""

    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        # 1. The study: a resumed study must keep its model, dataset and budget. Reading it writes nothing.
        db = _sqlite_file(config.storage_url)
        self.storage = None
        if db is None or db.exists():
            self.storage = open_storage(config.storage_url)
            from search.study import check_identity
            check_identity(config, existing_identity(self.storage, config.study_name))
        # 2. Data and model: unknown names and missing files fail here, in seconds.
        self.device = resolve_device(config.device)
        self.data = load_data(config.dataset, data_dir=config.data_dir, val_images=config.val_images,
                              seed=config.seed, max_train_images=config.max_train_images,
                              max_eval_images=config.max_eval_images,
                              download=os.environ.get("GKPD_OFFLINE") != "1")
        model = create_model(config.model, in_channels=self.data.input_shape[0], num_classes=self.data.num_classes)
        if config.teacher is not None:
            load_checkpoint(model, config.teacher)
        # 3. The budget, on the instant analytic cost table (costs do not depend on the weights' values).
        space = build_space(model, self.data.input_shape, preset=config.preset, skip=config.skip)
        space.check_budget(**config.budget)
        # 4. Slow work: the teacher (trained once and cached when not given) and its space.
        self.teacher, self.teacher_source = get_teacher(config, self.data, self.device)
        self.space = build_space(self.teacher, self.data.input_shape, preset=config.preset, skip=config.skip)
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
        "teacher_source": prepared.teacher_source, "preset": config.preset, "skip": list(config.skip),
    }


def prepare_study(config: SearchConfig) -> tuple[Prepared, optuna.Study]:
    """Validate, build (or load) the teacher and space, and create the study with its seeds, or join it."""
    prepared = Prepared(config)
    space = prepared.space
    seeds = [(tag, space.params_from_plan(plan)) for tag, plan in seed_plans(config, space)]
    study = open_study(config, prepared.storage, seeds)
    if "run" not in study.user_attrs:
        teacher = prepared.teacher_summary()
        log(f"teacher: val {teacher['val_accuracy']:.2%}, test {teacher['test_accuracy']:.2%}, "
            f"{teacher['mflops']:.2f} MFLOPs, {teacher['mparams']:.3f} Mparams")
        study.set_user_attr("run", _run_info(config, prepared, teacher))
    config.out.mkdir(parents=True, exist_ok=True)
    atomic_text(config.out / RUN_FILE, json.dumps({"storage": config.storage_url, "study_name": config.study_name}) + "\n")
    return prepared, study


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
            ran: list[optuna.trial.FrozenTrial] = []  # this worker's trial (others may have started later ones)
            study.optimize(objective, n_trials=1, catch=CATCH, callbacks=[lambda _, trial: ran.append(trial)])
            last = ran[-1]
            failures = failures + 1 if last.state == TrialState.FAIL else 0
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise RuntimeError(f"{failures} trials in a row failed; last: {last.user_attrs.get('fail_reason')}")
            log(f"progress: {eta(finished_count(study) - already)}")
    except KeyboardInterrupt:
        requeue_interrupted_seeds(study)
        log("search: interrupted; the running trial is marked failed (a seed plan is queued again), "
            "finished trials are kept")
        if report:
            finish(config, study, elapsed=time.perf_counter() - start, export=False)
        return 130
    if report:
        finish(config, study, elapsed=time.perf_counter() - start, export=True, prepared=prepared)
    return 0


def finish(config: SearchConfig, study: optuna.Study, *, elapsed: float, export: bool,
           prepared: Prepared | None = None) -> None:
    info = study.user_attrs["run"]
    budget = info["budget"].get(info["objective"])
    trials, pareto = write_report(study, config.out, objective=info["objective"], budget=budget,
                                  teacher=info["teacher"], run={**info, "elapsed": elapsed})
    print_summary(info, pareto, config.out)
    best = best_row(pareto)
    if export and best is not None:
        do_export(study, info, config.out, int(best.trial))


def print_summary(info: dict[str, Any], pareto, out: Path) -> None:
    teacher = info["teacher"]
    print("\nPareto frontier (validation accuracy chooses; MFLOPs = fvcore MACs / 1e6, gflops_torch = 2 x MACs / 1e9)")
    print(f"teacher: val {teacher['val_accuracy']:.2%}, test {teacher['test_accuracy']:.2%}, "
          f"{teacher['mflops']:.2f} MFLOPs, {teacher['mparams']:.3f} Mparams")
    if pareto.empty:
        print("no completed in-budget trial yet")
    else:
        print(format_table(pareto, ["trial", "seed", "val_accuracy", "test_accuracy", "mflops", "gflops_torch",
                                    "mparams", "flops_ratio", "params_ratio"]))
    print(f"\nrun directory: {out}  (trials.csv, pareto.csv, pareto.png, report.md, best/)")


def do_export(study: optuna.Study, info: dict[str, Any], out: Path, number: int) -> None:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise UsageError(f"--trial {number}: no such trial; the study has trials 0..{len(trials) - 1}")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise UsageError(f"--trial {number} is {trial.state.name}, not COMPLETE; only completed trials export")
    checkpoint = Path(trial.user_attrs.get("checkpoint", out / "checkpoints" / f"trial-{number}.pt"))
    if not checkpoint.exists():
        raise UsageError(f"checkpoint of trial {number} not found at {checkpoint} (it is written by the worker that "
                         "ran the trial: copy it there, or point --out at that run directory)")
    plan = trial_plan(trial)
    base = create_model(info["model"], in_channels=info["input_shape"][0], num_classes=info["num_classes"])
    model = gkpd.kroneckerize(base, plan)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    mflops = gkpd.count_mflops(model, info["input_shape"])
    meta = {
        "trial": number, "study_name": info["study_name"], "model": info["model"], "dataset": info["dataset"],
        "input_shape": info["input_shape"], "num_classes": info["num_classes"],
        "val_accuracy": trial.values[0], "test_accuracy": trial.user_attrs.get("test_accuracy"),
        "mflops": mflops, "mparams": gkpd.count_params(model) / 1e6, "budget": info["budget"],
        "unit": "mflops = fvcore MACs / 1e6",
    }
    summary = export_model(model, plan, out / "best", input_shape=info["input_shape"], meta=meta)
    log(f"export: trial {number} -> {out / 'best'} (plan.json, model.pt, model.onnx; "
        f"onnxruntime max |diff| {summary['onnx_max_abs_diff']:.2e})")


def _open_run(argv: Sequence[str], command: str) -> tuple[argparse.Namespace, optuna.Study, dict[str, Any]]:
    p = _Parser(prog=f"search.py {command}")
    p.add_argument("--out", type=Path, required=True, help="the run directory of a search")
    p.add_argument("--storage", help="default: the storage recorded in OUT/run.json")
    p.add_argument("--study-name", help="default: the study recorded in OUT/run.json")
    if command == "export":
        p.add_argument("--trial", type=int, help="trial number to export (default: the best in-budget trial)")
    args = p.parse_args(argv)
    recorded: dict[str, Any] = {}
    if (args.out / RUN_FILE).exists():
        recorded = json.loads((args.out / RUN_FILE).read_text())
    elif not (args.storage and args.study_name):
        raise UsageError(f"--out {args.out}: no {RUN_FILE} there; give the run directory of a search, "
                         "or --storage and --study-name")
    storage_url, name = args.storage or recorded["storage"], args.study_name or recorded["study_name"]
    storage = open_storage(storage_url)
    if existing_identity(storage, name) is None:
        raise UsageError(f"no study {name!r} in {storage_url}")
    study = optuna.load_study(study_name=name, storage=storage)
    if "run" not in study.user_attrs:
        raise UsageError(f"study {name!r} has no finished setup yet (no teacher summary); run the search first")
    return args, study, study.user_attrs["run"]


def run_report(argv: Sequence[str]) -> int:
    args, study, info = _open_run(argv, "report")
    budget = info["budget"].get(info["objective"])
    _, pareto = write_report(study, args.out, objective=info["objective"], budget=budget, teacher=info["teacher"],
                             run=info)
    print_summary(info, pareto, args.out)
    return 0


def run_export(argv: Sequence[str]) -> int:
    args, study, info = _open_run(argv, "export")
    number = args.trial
    if number is None:
        budget = info["budget"].get(info["objective"])
        _, pareto = write_report(study, args.out, objective=info["objective"], budget=budget,
                                 teacher=info["teacher"], run=info)
        best = best_row(pareto)
        if best is None:
            raise UsageError("no completed in-budget trial to export yet")
        number = int(best.trial)
    do_export(study, info, args.out, number)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Optuna flags heartbeats, constant_liar and metric names as experimental; they are what we rely on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        if argv[:1] == ["report"]:
            code = run_report(argv[1:])
        elif argv[:1] == ["export"]:
            code = run_export(argv[1:])
        else:
            args = parse_args(argv)
            config = config_from_args(args)
            if config.workers > 1 or config.backend == "ray":
                from search.workers import run_distributed
                code = run_distributed(config, argv)
            else:
                code = run_search(config)
    except (UsageError, ValueError, KeyError, FileNotFoundError, NotImplementedError) as err:
        if os.environ.get("GKPD_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"search.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
