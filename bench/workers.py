"""Trials per hour with ``--workers 1`` and ``--workers 2`` on this machine, measured side by side in one run.

All runs search the same tiny-but-not-trivial study (ResNet-20 on Fashion-MNIST, 1024 training images,
20 distillation steps of 64 images per trial, every trial fine-tuned in full: ``--prune-margin 1``) from
the same cached teacher, each into its own fresh study. Three configurations:
  * ``--workers 1``: one process with torch's default threads (all cores), what a user gets;
  * ``--workers 1`` with ``OMP_NUM_THREADS=cores/2``: one process with a worker's share of the cores;
  * ``--workers 2``: two processes with cores // 2 threads each.
The middle one separates the gain of running processes side by side from the cost of torch's threads
fighting over cores that other processes also use. Prints the rate over the search phase (first trial
started to last trial finished, from the study's timestamps) and end to end (the command's wall time:
imports, data, search space, report and export included), and the ratios.

    python bench/workers.py [--trials 6] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

SETTING = ["--model", "resnet20", "--dataset", "fashion-mnist", "--budget-mflops", "25",
           "--max-train-images", "1024", "--max-eval-images", "512", "--teacher-steps", "60",
           "--finetune-steps", "20", "--batch-size", "64", "--prune-margin", "1"]


def run(name: str, workers: int, trials: int, root: Path, env: dict[str, str]) -> dict[str, float]:
    import optuna

    from search.storage import open_storage
    from search.study import FINISHED

    out = root / name
    args = [*SETTING, "--trials", str(trials), "--workers", str(workers), "--out", str(out), "--study-name", name]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "search.py"), *args], check=False, cwd=REPO_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=(out.parent / f"{out.name}.log").open("w"))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name} failed (status {done.returncode}); see {out.parent / (out.name + '.log')}")
    study = optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{out / 'study.db'}"))
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    search = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {"trials": len(finished), "search_s": search, "wall_s": wall,
            "search_rate": 3600 * len(finished) / search, "wall_rate": 3600 * len(finished) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="finished trials per run")
    parser.add_argument("--repeats", type=int, default=1, help="run the three configurations this many times")
    args = parser.parse_args()
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    cores = os.cpu_count() or 1
    share = str(max(1, cores // 2))
    print(f"cores: {cores}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other processes on this machine share the cores)")
    with tempfile.TemporaryDirectory(prefix="gkpd-bench-workers-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "GKPD_CACHE": str(root / "cache"), "PYTHONPATH": str(REPO_ROOT)}
        for var in ("GKPD_WORKER", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(var, None)
        # Train the teacher once, outside every measurement (the same Prepared a search builds).
        code = "import sys; from search.cli import Prepared, parse_args, config_from_args; " \
               "Prepared(config_from_args(parse_args(sys.argv[1:])))"
        subprocess.run([sys.executable, "-c", code, *SETTING, "--out", str(root / "warmup")], cwd=REPO_ROOT,
                       env=env, check=True, stderr=subprocess.DEVNULL)
        configs = {  # label -> (workers, extra environment)
            f"1 worker, {cores} threads": (1, {}),
            f"1 worker, {share} threads": (1, {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share}),
            f"2 workers, {share} threads each": (2, {}),
        }
        results: dict[str, list[dict[str, float]]] = {label: [] for label in configs}
        for repeat in range(args.repeats):
            for i, (label, (workers, extra)) in enumerate(configs.items()):
                r = run(f"config{i}-repeat{repeat}", workers, args.trials, root, {**env, **extra})
                results[label].append(r)
                print(f"{label:>26}: {r['trials']} trials; search phase {r['search_s']:4.0f}s = "
                      f"{r['search_rate']:4.0f} trials/hour; end to end {r['wall_s']:4.0f}s = "
                      f"{r['wall_rate']:4.0f} trials/hour", flush=True)
    best = {label: max(rs, key=lambda r: r["search_rate"]) for label, rs in results.items()}
    one, one_share, two = (best[label] for label in configs)
    print(f"\nsetting: {' '.join(SETTING)} --trials {args.trials}")
    for key, what in (("search_rate", "search phase"), ("wall_rate", "end to end")):
        print(f"{what:>12}: 2 workers / 1 worker = {two[key] / one[key]:.2f}x; "
              f"2 workers / 1 worker at {share} threads = {two[key] / one_share[key]:.2f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cores: {cores}")


if __name__ == "__main__":
    main()
