"""``python search.py``: turn the command line into a ``SearchConfig`` and run it (``search.run``).

Bad input is one line on stderr and exit status 2; a search that cannot go on (disk full, failures in a
row, a failed export) is one line and exit status 1; Ctrl-C and SIGTERM exit 130 and 143 after the report.
``GKPD_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from search.config import BACKENDS, PRECISIONS, SAMPLERS, SearchConfig
from search.data import DATASETS
from search.finetune import DEFAULT_STEPS
from search.latency import FORMS
from search.models import MODELS
from search.trial import FINETUNE_LR
from search.run import (  # Prepared and run_search: also what callers used to import from here
    Prepared, SearchFailed, Terminated, export_run, interrupted_status, report_run, run_search,
)
from spaces import PRESETS

__all__ = ["main", "build_parser", "parse_args", "config_from_args", "Prepared", "run_search"]

DEFAULTS = SearchConfig(budget_mflops=1.0)  # only to read the defaults for --help

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
            "'export --out DIR [--trial N]' writes the compressed model; 'finetune --out DIR [--trial N] "
            "[--steps N]' fine-tunes the chosen plan longer, then exports it."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--study-file", type=Path, help="a TOML file of option defaults (see studies/); "
                   "options on the command line win")
    budget = p.add_argument_group("budget (at least one)")
    budget.add_argument("--budget-mflops", type=float, help="MACs per image, in millions (fvcore's 'MFLOPs')")
    budget.add_argument("--budget-mparams", type=float, help="parameters, in millions")
    budget.add_argument("--budget-ms", type=float,
                        help="latency in milliseconds at batch 1 on the run's --device, torch (not onnxruntime): "
                             "predicted per plan from a per-layer table timed once and cached in --cache-dir; every "
                             "trial is also measured end to end (even with GKPD_LATENCY=0), and only trials within "
                             "the budget as measured make the frontier")
    what = p.add_argument_group("model and data")
    what.add_argument("--model", default=d.model,
                      help=f"one of {', '.join(MODELS)}, a torchvision model name, or pkg.module:factory (any "
                           "signature: the first conv and the classifier are replaced when it takes no "
                           "in_channels/num_classes)")
    what.add_argument("--weights", help="torchvision's pretrained weights to train a new teacher from "
                      "(e.g. DEFAULT, IMAGENET1K_V1; the classifier is new)")
    what.add_argument("--teacher", type=Path, help="trained weights for --model (a state_dict, or a checkpoint "
                      "with one under 'state_dict' or 'model'); without it a teacher is trained once and cached")
    what.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)}")
    what.add_argument("--data-dir", type=Path, help="where datasets are (default $GKPD_DATA_DIR or ~/.cache/gkpd-search/data)")
    what.add_argument("--val-images", type=int, help="validation images held out of the training images "
                      "(None: 10%% of them, at most 5000)")
    what.add_argument("--image-size", type=int, help="imagefolder only: images are resized and center-cropped "
                      "to this many pixels (None: 64)")
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
    work.add_argument("--long-finetunes", type=int, default=d.long_finetunes,
                      help="of --trials, how many continue the frontier's leaders to 4x --finetune-steps "
                           "(multi-fidelity; the report says how well the short fine-tune ranked them; not with --backend ray)")
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
    where.add_argument("--cache-dir", type=Path, help="where trained teachers are cached, and the sensitivity and "
                       "latency tables beside them (default $GKPD_CACHE/teachers or ~/.cache/gkpd-search/teachers)")
    where.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    where.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                       help="of training (teacher, fine-tunes): auto is bf16 mixed precision on a CPU with AMX "
                            "(about 2x faster there), fp32 elsewhere; evaluation and export are always fp32 "
                            "(default: %(default)s)")
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
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "study_file")}
        defaults = {key.replace("-", "_"): value for key, value in doc.items()}
        unknown = sorted(set(defaults) - set(actions))
        if unknown:
            raise UsageError(f"--study-file {first.study_file}: unknown keys {unknown}; allowed: {sorted(actions)}")
        parser.set_defaults(**{key: _study_value(actions[key], value, first.study_file)
                               for key, value in defaults.items()})
    return parser.parse_args(argv)


def _study_value(action: argparse.Action, value: Any, source: Path) -> Any:
    """A study-file value as the option would parse it, or ``UsageError`` naming the key and the type wanted."""
    key = action.dest.replace("_", "-")
    kind = action.type or str
    if action.nargs == "*":
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        wanted = f'a list of strings, e.g. {key} = ["a", "b"]'
    elif kind is int:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:  # str and Path
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise UsageError(f"--study-file {source}: {key} must be {wanted}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"--study-file {source}: {key} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return Path(value) if kind is Path else float(value) if kind is float else value


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(
        budget_mflops=args.budget_mflops, budget_mparams=args.budget_mparams, budget_ms=args.budget_ms,
        model=args.model, weights=args.weights, val_images=args.val_images, image_size=args.image_size,
        teacher=args.teacher, dataset=args.dataset, data_dir=args.data_dir, trials=args.trials,
        timeout=args.timeout, finetune_steps=args.finetune_steps, teacher_steps=args.teacher_steps,
        max_train_images=args.max_train_images, max_eval_images=args.max_eval_images, batch_size=args.batch_size,
        sampler=args.sampler, study_name=args.study_name or "", storage=args.storage, out=args.out or Path(),
        device=args.device, precision=args.precision, seed=args.seed, preset=args.preset, skip=tuple(args.skip),
        prune_margin=args.prune_margin, long_finetunes=args.long_finetunes, cache_dir=args.cache_dir,
        workers=args.workers, backend=args.backend,
        ray_address=args.ray_address, gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
    )




def _run_parser(command: str) -> _Parser:
    p = _Parser(prog=f"search.py {command}")
    p.add_argument("--out", type=Path, required=True, help="the run directory of a search")
    p.add_argument("--storage", help="default: the storage recorded in OUT/run.json")
    p.add_argument("--study-name", help="default: the study recorded in OUT/run.json")
    if command in ("export", "finetune"):
        p.add_argument("--trial", type=int, help=f"trial number to {command} (default: the best in-budget trial)")
    if command == "export":
        p.add_argument("--form", default="fast", choices=FORMS,
                       help="model.onnx: 'compact' keeps every Kronecker layer factorized (fewest parameters); "
                            "'fast' exports each layer in whichever exact form runs faster on onnxruntime (CPU, "
                            "batch 1, measured): factorized or folded into one dense conv (default: %(default)s)")
    if command == "finetune":
        p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="distillation steps (default: %(default)s, "
                       "about 10 minutes for the default run's plan on two CPU cores)")
        p.add_argument("--lr", type=float, default=FINETUNE_LR, help="peak learning rate (default: %(default)s)")
        p.add_argument("--teacher", type=Path, help="the study's teacher (default: where the search found it)")
        p.add_argument("--data-dir", type=Path, help="the study's data (default: where the search found it)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
        p.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="of the fine-tune: auto is bf16 mixed precision on a CPU with AMX, fp32 elsewhere "
                            "(default: %(default)s)")
    return p


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def run(argv: Sequence[str]) -> int:
    """The exit status of ``search.py argv``; errors propagate as exceptions."""
    if argv[:1] in (["report"], ["export"], ["finetune"]):
        args = _run_parser(argv[0]).parse_args(argv[1:])
        if argv[0] == "report":
            return report_run(args.out, storage=args.storage, study_name=args.study_name)
        if argv[0] == "finetune":
            from search.finetune import finetune_run
            return finetune_run(args.out, trial=args.trial, steps=args.steps, lr=args.lr, teacher=args.teacher,
                                data_dir=args.data_dir, device=args.device, precision=args.precision, storage=args.storage,
                                study_name=args.study_name)
        return export_run(args.out, storage=args.storage, study_name=args.study_name, trial=args.trial,
                          form=args.form)
    config = config_from_args(parse_args(argv))
    if config.workers > 1 or config.backend == "ray":
        from search.workers import run_distributed
        return run_distributed(config, argv)
    return run_search(config)


USER_ERRORS = (UsageError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, NotImplementedError)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Optuna flags heartbeats, constant_liar and metric names as experimental; they are what we rely on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    signal.signal(signal.SIGTERM, _terminate)  # a batch system's kill is Ctrl-C: trial failed, report written
    try:
        code = run(argv)
    except (*USER_ERRORS, SearchFailed, OSError, KeyboardInterrupt) as err:
        if os.environ.get("GKPD_DEBUG"):
            raise
        if isinstance(err, KeyboardInterrupt):  # before the search loop (data, teacher): nothing to mark
            print("search.py: interrupted", file=sys.stderr)
            sys.exit(interrupted_status(err))
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if isinstance(err, OSError) and not isinstance(err, USER_ERRORS) and err.strerror:
            message = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        print(f"search.py: error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(err, USER_ERRORS) else 1)
    sys.exit(code)
