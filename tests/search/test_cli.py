"""The command line end to end: a whole tiny search with its outputs and resume, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import optuna
import pytest
import torch

import gkpd
from search.cli import main
from search.export import load_exported
from search.models import create_model

REPO_ROOT = Path(__file__).resolve().parents[2]
BUDGET = 25.0  # resnet20 on 1x28x28 is 31.3 MFLOPs dense


def search(args: list[str], env: dict[str, str], *, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "search.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., subprocess.CompletedProcess]:
    """``cli(args, env, cwd=...)``: ``search.py args`` run in this process (no interpreter start and imports: seconds
    per call), with ``env`` as the whole environment; its exit status and what it printed. The entry point itself
    runs as a real process in the whole-search tests and in test_the_entry_point_prints_one_line_and_exits_2."""
    def run(args: list[str], env: dict[str, str], *, cwd: Path | None = None) -> subprocess.CompletedProcess:
        handler, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
        with monkeypatch.context() as patch:
            for key in set(os.environ) - set(env):
                patch.delenv(key)
            for key, value in env.items():
                patch.setenv(key, value)
            if cwd is not None:
                patch.chdir(cwd)
            capsys.readouterr()
            try:
                main(list(args))
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            finally:  # main() installs its SIGTERM handler; a search may set torch's threads
                signal.signal(signal.SIGTERM, handler)
                torch.set_num_threads(threads)
            printed = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, printed.out, printed.err)
    return run


def one_line_error(done: subprocess.CompletedProcess, says: str, *, status: int = 2) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == status and len(lines) == 1 and says in lines[0], done.stderr[-2000:]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher_cache: Path, tiny_args: list[str]) -> tuple[Path, list[str], dict]:
    """A whole search on the tiny setting: 3 trials, report and export."""
    out = tmp_path_factory.mktemp("run")
    env = {**os.environ, "GKPD_CACHE": str(teacher_cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
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


def test_report_and_export_subcommands_reread_the_study(finished_run, cli) -> None:
    out, _, env = finished_run
    before = digest(out / "study.db")
    report = cli(["report", "--out", str(out)], env)
    assert report.returncode == 0, report.stderr
    assert "Pareto frontier" in report.stdout
    trial = int(json.loads((out / "best/plan.json").read_text())["meta"]["trial"])
    export = cli(["export", "--out", str(out), "--trial", str(trial)], env)
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
    (["--storage", "postgresql://gkpd:s3cret@127.0.0.1:1/gkpd"], "postgresql://gkpd:***@127.0.0.1:1/gkpd"),
]


@pytest.mark.parametrize("change, says", BAD_INPUTS, ids=[" ".join(c) for c, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_the_run_stays_intact(finished_run, change, says, tmp_path, cli) -> None:
    out, args, env = finished_run
    before = {p.name: digest(p) for p in (out / "study.db", out / "best/plan.json", out / "best/model.pt")}
    merged = [*args, "--out", str(tmp_path / "fresh")]  # a new run (the same --out belongs to the finished study)
    for i in range(0, len(change), 2):
        if change[i] in merged:
            merged[merged.index(change[i]) + 1] = change[i + 1]
        else:
            merged += change[i:i + 2]
    done = cli(merged, {**env, "GKPD_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "s3cret" not in done.stderr + done.stdout
    assert not (tmp_path / "fresh").exists()
    assert {p.name: digest(p) for p in (out / "study.db", out / "best/plan.json", out / "best/model.pt")} == before


def test_the_entry_point_prints_one_line_and_exits_2(finished_run, tmp_path: Path) -> None:
    """The real ``python search.py`` (the tests above call its main() in-process): one line on stderr, status 2."""
    _, args, env = finished_run
    merged = [*args, "--out", str(tmp_path / "fresh")]
    merged[merged.index("--model") + 1] = "resnet9000"
    assert "resnet9000" in one_line_error(search(merged, {**env, "GKPD_OFFLINE": "1"}), "unknown model")
    assert not (tmp_path / "fresh").exists()


def test_no_budget_missing_data_and_bad_checkpoints(finished_run, tmp_path: Path, cli) -> None:
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
        done = cli(argv, env)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], (argv, done.stderr[-2000:])


def test_resuming_with_another_model_dataset_or_budget_is_refused(finished_run, cli) -> None:
    out, args, env = finished_run
    name = json.loads((out / "run.json").read_text())["study_name"]
    before = digest(out / "study.db")
    for change in (["--model", "resnet32"], ["--budget-mflops", "20"], ["--dataset", "mnist"]):
        merged = [*args, "--study-name", name]
        merged[merged.index(change[0]) + 1] = change[1]
        done = cli(merged, {**env, "GKPD_OFFLINE": "1"})
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and "was created with" in lines[0], done.stderr[-2000:]
    assert digest(out / "study.db") == before


def test_a_second_study_in_the_same_out_is_refused_and_the_run_stays_intact(finished_run, cli) -> None:
    """Checkpoints, run.json and the report belong to one study: another study gets its own --out."""
    out, args, env = finished_run
    before = {p.relative_to(out).as_posix(): digest(p) for p in sorted(out.rglob("*")) if p.is_file()}
    done = cli([*args, "--study-name", "another", "--budget-mflops", "20"], {**env, "GKPD_OFFLINE": "1"})
    line = one_line_error(done, f"--out {out} belongs to study")
    assert "--study-name" in line and "another" in line
    assert {p.relative_to(out).as_posix(): digest(p) for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_checkpoints_are_kept_per_study_and_export_refuses_one_that_was_overwritten(finished_run, tmp_path, cli) -> None:
    out, _, env = finished_run
    name = json.loads((out / "run.json").read_text())["study_name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    for t in done:  # relative to the run directory, one folder per study
        assert t.user_attrs["checkpoint"] == f"checkpoints/{name}/trial-{t.number}.pt"
        assert digest(out / t.user_attrs["checkpoint"]) == t.user_attrs["checkpoint_sha256"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    first, second = done[0], done[1]
    shutil.copy(copy / second.user_attrs["checkpoint"], copy / first.user_attrs["checkpoint"])
    export = cli(["export", "--out", str(copy), "--trial", str(first.number)], env)
    one_line_error(export, f"is not the checkpoint trial {first.number} wrote")


def test_a_copied_run_directory_reports_and_exports_its_own_study_from_any_directory(finished_run, tmp_path, cli) -> None:
    """run.json and the checkpoints are relative to the run directory; the original is moved away meanwhile."""
    out, _, env = finished_run
    shutil.copytree(out, tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "best")
    away = out.with_name(out.name + "-away")
    out.rename(away)
    try:
        report = cli(["report", "--out", "copy"], env, cwd=tmp_path)
        assert report.returncode == 0, report.stderr[-2000:]
        assert "best/" not in report.stdout.splitlines()[-1]  # nothing exported in the copy yet
        export = cli(["export", "--out", "copy"], env, cwd=tmp_path)
        assert export.returncode == 0, export.stderr[-2000:]
    finally:
        away.rename(out)
    assert (tmp_path / "copy" / "best" / "model.onnx").is_file() and not (tmp_path / "copy" / "study.db-journal").exists()
    assert json.loads((tmp_path / "copy" / "best" / "plan.json").read_text())["meta"]["study_name"] == \
        json.loads((out / "run.json").read_text())["study_name"]


def test_resuming_with_other_evaluation_settings_or_another_teacher_is_refused_before_training(
    finished_run, tmp_path: Path, cli
) -> None:
    """What changes the space or how trials are evaluated is the study's identity, checked before any training."""
    out, args, env = finished_run
    env = {**env, "GKPD_OFFLINE": "1"}
    before = digest(out / "study.db")
    random_teacher = tmp_path / "random.pt"
    torch.save(create_model("resnet20", in_channels=1, num_classes=10).state_dict(), random_teacher)
    cases = [
        (["--finetune-steps", "3"], "finetune_steps 2 (this run: 3)"),
        (["--max-eval-images", "64"], "max_eval_images 128 (this run: 64)"),
        (["--batch-size", "16"], "batch_size 32 (this run: 16)"),
        (["--seed", "1"], "seed 0 (this run: 1)"),
        (["--teacher", str(random_teacher)], "teacher_sha256"),
    ]
    # The other training precision, with the study's own teacher named (a bf16 teacher has its own cache file).
    attrs = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}").user_attrs
    recorded, own = attrs["identity"], attrs["run"]["teacher_source"]
    other = "fp32" if recorded["precision"] == "bf16" else "bf16"
    cases.append((["--precision", other, "--teacher", own], f"precision {recorded['precision']!r} (this run: {other!r})"))
    for change, says in cases:
        merged = [*args]
        if change[0] in merged:
            merged[merged.index(change[0]) + 1] = change[1]
        else:
            merged += change
        one_line_error(cli(merged, env), says)
    # A deleted teacher cache: training a new teacher would give a different one, so nothing is trained.
    empty = tmp_path / "cache"
    one_line_error(cli(args, {**env, "GKPD_CACHE": str(empty)}), "that is not here")
    assert not empty.exists()
    assert digest(out / "study.db") == before


def test_bad_input_in_a_new_run_fails_before_the_teacher_is_trained(finished_run, tmp_path: Path, cli) -> None:
    _, args, env = finished_run
    cache = tmp_path / "cache"
    env = {**env, "GKPD_OFFLINE": "1", "GKPD_CACHE": str(cache)}
    fresh = [a for a in args]
    fresh[fresh.index("--out") + 1] = str(tmp_path / "new")
    (tmp_path / "a-file").write_text("")
    cases = [
        # Each budget is reachable alone (at least 0.732473 MFLOPs, 3,874 params), not both at once.
        (["--budget-mparams", "0.003875", "--budget-mflops", "0.7325"], "no plan of this space meets both"),
        (["--batch-size", "300"], "--batch-size 300 is more than the 256 training images"),
        (["--out", str(tmp_path / "a-file")], "is a file, not a directory"),
    ]
    for change, says in cases:
        merged = [*fresh]
        for i in range(0, len(change), 2):
            if change[i] in merged:
                merged[merged.index(change[i]) + 1] = change[i + 1]
            else:
                merged += change[i:i + 2]
        one_line_error(cli(merged, env), says)
    assert not cache.exists(), "no teacher was trained"
    assert not (tmp_path / "new").exists()


STUDY_FILES = [
    ('skip = "fc"', 'skip must be a list of strings'),
    ("finetune-steps = 2.5", "finetune-steps must be an integer, got 2.5"),
    ("trials = true", "trials must be an integer, got True"),
    ('budget-mflops = "25"', "budget-mflops must be a number"),
    ('sampler = "grid"', "sampler 'grid' is not one of tpe, nsga2, random"),
]


@pytest.mark.parametrize("line, says", STUDY_FILES, ids=[line for line, _ in STUDY_FILES])
def test_study_file_values_are_type_checked(tmp_path: Path, line: str, says: str, cli) -> None:
    study = tmp_path / "study.toml"
    study.write_text(f'model = "resnet20"\nbudget-mflops = 25\n{line}\n'.replace("budget-mflops = 25\nbudget", "budget"))
    done = cli(["--study-file", str(study), "--out", str(tmp_path / "out")], {**os.environ, "GKPD_OFFLINE": "1"})
    one_line_error(done, says)


@pytest.mark.parametrize("text", ["", "{not json", '{"storage": null}'])
def test_report_with_an_empty_or_garbage_run_json_is_one_line(tmp_path: Path, text: str, cli) -> None:
    (tmp_path / "run.json").write_text(text)
    one_line_error(cli(["report", "--out", str(tmp_path)], dict(os.environ)), "not a run record")


def test_finetune_continues_the_best_trial_exports_it_and_resumes_exactly_after_an_interrupt(
    finished_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`finetune` on two copies of one run: straight through, and interrupted after step 4 then run again.
    Both end with the same weights, bit for bit; best/ and report.md carry the accuracy before and after."""
    import search.finetune
    from search.data import load_data
    from search.train import evaluate

    out, args, env = finished_run
    monkeypatch.setenv("GKPD_CACHE", env["GKPD_CACHE"])
    monkeypatch.setenv("GKPD_OFFLINE", "1")
    torch.set_num_threads(1)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    shutil.copytree(out, straight)
    shutil.copytree(out, interrupted)
    monkeypatch.setattr(search.finetune, "SAVE_EVERY", 2)
    assert search.finetune.finetune_run(straight, steps=6, device="cpu") == 0

    real_distill = search.finetune.distill

    def stopped_at_4(*a, **kw):
        def progress(step, total, loss):
            if step == 4:
                raise KeyboardInterrupt
        return real_distill(*a, **{**kw, "progress": progress})

    monkeypatch.setattr(search.finetune, "distill", stopped_at_4)
    with pytest.raises(KeyboardInterrupt):
        search.finetune.finetune_run(interrupted, steps=6, device="cpu")
    assert not (interrupted / "best/export.json").read_text().count('"finetune"')  # best/ untouched so far
    monkeypatch.setattr(search.finetune, "distill", real_distill)
    assert search.finetune.finetune_run(interrupted, steps=6, device="cpu") == 0

    a = torch.load(straight / "best/model.pt", weights_only=True)
    b = torch.load(interrupted / "best/model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((straight / "best/export.json").read_text())
    name = json.loads((out / "run.json").read_text())["study_name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{straight / 'study.db'}")
    trial = study.trials[meta["trial"]]
    done = meta["finetune"]
    assert done["steps"] == 6 and done["before"]["val_accuracy"] == trial.values[0]
    assert done["before"]["test_accuracy"] == trial.user_attrs["test_accuracy"]
    # The accuracy recorded after is the exported model's, on the study's own validation split.
    data = load_data("fashion-mnist", data_dir=None, seed=0, max_train_images=256, max_eval_images=128,
                     download=False)
    model = load_exported(create_model("resnet20", in_channels=1, num_classes=10), straight / "best")
    assert evaluate(model, data.val_x, data.val_y, device="cpu") == done["after"]["val_accuracy"]
    assert meta["val_accuracy"] == done["after"]["val_accuracy"]
    assert (straight / "best/model.onnx").is_file()
    # Its onnxruntime latency is measured next to the dense model's, as a search's export does.
    assert meta["ort_speedup_b1"] == pytest.approx(meta["ort_dense_ms_b1"] / meta["ort_ms_b1"]) and meta["ort_ms_b1"] > 0
    report = (straight / "report.md").read_text()
    assert "## Final fine-tune (best/)" in report and f"{100 * done['after']['val_accuracy']:.2f}%" in report
    # Run again: the finished fine-tune is re-exported, not trained again.
    monkeypatch.setattr(search.finetune, "distill", None)  # would fail if called
    assert search.finetune.finetune_run(straight, steps=6, device="cpu") == 0
    again = torch.load(straight / "best/model.pt", weights_only=True)
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_finetune_bad_input_is_one_line_exit_2(finished_run, tmp_path: Path, cli) -> None:
    out, _, env = finished_run
    env = {**env, "GKPD_OFFLINE": "1"}
    name = json.loads((out / "run.json").read_text())["study_name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    before = digest(out / "study.db")
    cases = [(["--out", str(tmp_path)], "no run.json"), (["--out", str(out), "--trial", "999"], "no such trial"),
             (["--out", str(out), "--steps", "0"], "--steps must be at least 1")]
    pruned = [t.number for t in study.trials if t.state.name != "COMPLETE"]
    if pruned:
        cases.append((["--out", str(out), "--trial", str(pruned[0])], "not COMPLETE"))
    other = tmp_path / "other-teacher.pt"
    torch.save(create_model("resnet20", in_channels=1, num_classes=10).state_dict(), other)
    cases.append((["--out", str(out), "--teacher", str(other)], "is not the teacher this study compressed"))
    for argv, says in cases:
        one_line_error(cli(["finetune", *argv], env), says)
    assert digest(out / "study.db") == before
    assert not (out / "finetune").exists()


def test_a_bf16_teacher_has_its_own_cache_file_and_an_fp32_one_keeps_its_old_name(tmp_path: Path) -> None:
    from search.config import SearchConfig
    from search.teacher import teacher_cache_path

    fp32 = SearchConfig(budget_mflops=300, val_images=5000, precision="fp32", cache_dir=tmp_path)
    # The file name of the default teacher before precision existed (its recipe hash): old caches stay valid.
    assert teacher_cache_path(fp32) == tmp_path / "resnet18-fashion-mnist-38df902ff4b0.pt"
    bf16 = teacher_cache_path(SearchConfig(budget_mflops=300, val_images=5000, precision="bf16", cache_dir=tmp_path))
    assert bf16.parent == tmp_path and bf16.name.startswith("resnet18-fashion-mnist-") and bf16 != teacher_cache_path(fp32)
