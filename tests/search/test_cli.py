"""The command line end to end: a whole tiny search with its outputs and resume, and every bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import optuna
import pytest
import torch

import gkpd
from search.export import load_exported
from search.models import create_model

REPO_ROOT = Path(__file__).resolve().parents[2]
BUDGET = 25.0  # resnet20 on 1x28x28 is 31.3 MFLOPs dense


def search(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "search.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher_cache: Path, tiny_args: list[str]) -> tuple[Path, list[str], dict]:
    """A whole search on the tiny setting: 3 trials, report and export."""
    out = tmp_path_factory.mktemp("run")
    env = {**__import__("os").environ, "GKPD_CACHE": str(teacher_cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    args = [*tiny_args, "--trials", "3", "--out", str(out)]
    done = search(args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, args, env


def test_search_writes_frontier_plan_model_and_onnx_within_budget(finished_run) -> None:
    out, _, _ = finished_run
    for name in ("trials.csv", "pareto.csv", "pareto.png", "report.md", "best/plan.json", "best/model.pt",
                 "best/model.onnx", "run.json", "study.db"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "best/plan.json").read_text())["meta"]
    base = create_model("resnet20", in_channels=1, num_classes=10)
    model = load_exported(base, out / "best")
    # Within budget by fvcore on the exported model, and equal to what the search recorded.
    mflops = gkpd.count_mflops(model, (1, 28, 28))
    assert mflops <= BUDGET
    assert mflops == pytest.approx(meta["mflops"], rel=1e-12)
    # plan.json round-trips to the same plan.
    plan = gkpd.load_plan(out / "best/plan.json", model=base)
    gkpd.save_plan(plan, out / "again.json")
    assert gkpd.load_plan(out / "again.json") == plan
    # The ONNX file runs and agrees with PyTorch.
    x = torch.randn(3, 1, 28, 28)
    session = onnxruntime.InferenceSession(str(out / "best/model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)


def test_second_invocation_resumes_the_same_study(finished_run) -> None:
    out, args, env = finished_run
    done = search([*args[:-4], "--trials", "4", "--out", str(out)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    studies = optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")
    assert len(studies) == 1
    study = optuna.load_study(study_name=studies[0].study_name, storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) == 4
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    # The seeds were enqueued once, by the run that created the study.
    seeds = [t.user_attrs["seed"] for t in study.trials if "seed" in t.user_attrs]
    assert len(seeds) == len(set(seeds))


def test_report_and_export_subcommands_reread_the_study(finished_run) -> None:
    out, _, env = finished_run
    before = digest(out / "study.db")
    report = search(["report", "--out", str(out)], env)
    assert report.returncode == 0, report.stderr
    assert "Pareto frontier" in report.stdout
    trial = int(json.loads((out / "best/plan.json").read_text())["meta"]["trial"])
    export = search(["export", "--out", str(out), "--trial", str(trial)], env)
    assert export.returncode == 0, export.stderr
    assert json.loads((out / "best/plan.json").read_text())["meta"]["trial"] == trial
    assert digest(out / "study.db") == before


BAD_INPUTS = [
    (["--model", "resnet9000"], "resnet9000"),
    (["--dataset", "imagenet22k"], "imagenet22k"),
    (["--budget-mflops", "0"], "must be a positive"),
    (["--budget-mflops", "-5"], "must be a positive"),
    (["--budget-mflops", "0.001"], "minimum"),
    (["--budget-mflops", "500"], "31.3"),
    (["--trials", "0"], "--trials"),
    (["--storage", "nosuchdb://x"], "nosuchdb"),
]


@pytest.mark.parametrize("change, says", BAD_INPUTS, ids=[" ".join(c) for c, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_the_run_stays_intact(finished_run, change, says) -> None:
    out, args, env = finished_run
    before = {p.name: digest(p) for p in (out / "study.db", out / "best/plan.json", out / "best/model.pt")}
    merged = [*args]
    for i in range(0, len(change), 2):
        if change[i] in merged:
            merged[merged.index(change[i]) + 1] = change[i + 1]
        else:
            merged += change[i:i + 2]
    done = search(merged, {**env, "GKPD_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert {p.name: digest(p) for p in (out / "study.db", out / "best/plan.json", out / "best/model.pt")} == before


def test_no_budget_missing_data_and_bad_checkpoints(finished_run, tmp_path: Path) -> None:
    out, args, env = finished_run
    env = {**env, "GKPD_OFFLINE": "1"}
    no_budget = [a for a in args if a not in ("--budget-mflops", "25")]
    cases = [
        (no_budget, "give a budget"),
        ([*args[:-2], "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")],
         str(tmp_path / "empty")),
    ]
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("resnet32", in_channels=1, num_classes=10).state_dict(), wrong)
    cases += [
        ([*args[:-2], "--teacher", str(corrupt), "--out", str(tmp_path / "o2")], "corrupt.pt"),
        ([*args[:-2], "--teacher", str(wrong), "--out", str(tmp_path / "o3")], "layer"),
    ]
    for argv, says in cases:
        done = search(argv, env)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], (argv, done.stderr[-2000:])


def test_resuming_with_another_model_dataset_or_budget_is_refused(finished_run) -> None:
    out, args, env = finished_run
    name = json.loads((out / "run.json").read_text())["study_name"]
    before = digest(out / "study.db")
    for change in (["--model", "resnet32"], ["--budget-mflops", "20"], ["--dataset", "mnist"]):
        merged = [*args, "--study-name", name]
        merged[merged.index(change[0]) + 1] = change[1]
        done = search(merged, {**env, "GKPD_OFFLINE": "1"})
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and "was created with" in lines[0], done.stderr[-2000:]
    assert digest(out / "study.db") == before
