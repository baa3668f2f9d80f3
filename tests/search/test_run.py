"""The run's bookkeeping without training: run directories, storage URLs and passwords, file modes, the
export that keeps what succeeded, Ray's shared-storage rule, and the dependency floors."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import optuna
import pytest
import torch.nn as nn
from packaging.requirements import Requirement

import search.export
from search.config import SearchConfig
from search.export import export_model
from search.files import atomic_text, create_text
from search.run import SearchFailed, Terminated, check_run_dir, claim_run_dir, read_run_file
from search.storage import driver_url, open_storage, redact, without_password
from search.study import join_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

REPO_ROOT = Path(__file__).resolve().parents[2]
URL = "postgresql://gkpd:s3cret@dbhost:5432/gkpd"


def config(out: Path, **changes) -> SearchConfig:
    return SearchConfig(budget_mflops=25.0, model="resnet20", out=out, **changes)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_text(tmp_path / "report.md", "x")
        create_text(tmp_path / "run.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == mode
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == mode


def test_create_text_never_replaces_an_existing_file(tmp_path: Path) -> None:
    assert create_text(tmp_path / "run.json", "first")
    assert not create_text(tmp_path / "run.json", "second")
    assert (tmp_path / "run.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind


def test_passwords_are_hidden_in_messages_and_dropped_from_files() -> None:
    assert redact(URL) == "postgresql://gkpd:***@dbhost:5432/gkpd"
    assert without_password(URL) == "postgresql://gkpd@dbhost:5432/gkpd"
    assert redact("journal:/tmp/a.log") == "journal:/tmp/a.log"
    # The README's bare URL gets the driver the postgres extra installs (SQLAlchemy 2.1 would want psycopg 3).
    assert driver_url(URL) == "postgresql+psycopg2://gkpd:s3cret@dbhost:5432/gkpd"
    assert driver_url("postgresql+psycopg2://h/d") == "postgresql+psycopg2://h/d"


def test_a_storage_error_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as err:
        open_storage("postgresql://gkpd:s3cret@127.0.0.1:1/gkpd")
    assert "s3cret" not in str(err.value) and "postgresql://gkpd:***@127.0.0.1:1/gkpd" in str(err.value)


def test_run_json_holds_no_password_and_no_absolute_default_path(tmp_path: Path) -> None:
    claim_run_dir(config(tmp_path / "pg", storage=URL))
    assert json.loads((tmp_path / "pg" / "run.json").read_text())["storage"] == "postgresql://gkpd@dbhost:5432/gkpd"
    claim_run_dir(config(tmp_path / "local"))
    record = read_run_file(tmp_path / "local")
    assert record.storage is None  # OUT/study.db, wherever OUT is copied to
    assert record.storage_url(tmp_path / "copy") == f"sqlite:///{(tmp_path / 'copy' / 'study.db').resolve()}"
    # A worker with the password in its URL and one using ~/.pgpass share the run directory.
    check_run_dir(config(tmp_path / "pg", storage="postgresql://gkpd@dbhost:5432/gkpd"))


def test_a_run_directory_belongs_to_one_study(tmp_path: Path) -> None:
    claim_run_dir(config(tmp_path, study_name="first"))
    check_run_dir(config(tmp_path, study_name="first"))
    with pytest.raises(ValueError, match="--out .* belongs to study 'first'.*--study-name first"):
        check_run_dir(config(tmp_path, study_name="second"))
    with pytest.raises(ValueError, match="not in --storage"):
        check_run_dir(config(tmp_path, study_name="first", storage=f"sqlite:///{tmp_path / 'other.db'}"))
    claim_run_dir(config(tmp_path, study_name="second"))  # never repointed
    assert read_run_file(tmp_path).study_name == "first"


@pytest.mark.parametrize("text", ["", "garbage", "[1, 2]", '{"study_name": 3}'])
def test_a_damaged_run_json_is_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(ValueError, match="not a run record") as err:
        read_run_file(tmp_path)
    assert "\n" not in str(err.value)


def test_out_naming_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_run_dir(config(tmp_path / "file"))


def test_a_failed_onnx_export_keeps_plan_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    export_model(model.eval(), {}, tmp_path / "best", input_shape=(1, 8, 8), meta={"trial": 0})
    assert (tmp_path / "best" / "model.onnx").is_file()

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed\nsecond line")

    monkeypatch.setattr(search.export, "export_onnx", broken)
    summary = export_model(model, {}, tmp_path / "best", input_shape=(1, 8, 8), meta={"trial": 1})
    assert summary["onnx_error"] == "RuntimeError: exporter crashed"
    # The new export replaced the old one as a whole: no stale model.onnx of trial 0 beside trial 1's weights.
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["export.json", "model.pt", "plan.json"]
    assert json.loads((tmp_path / "best" / "export.json").read_text())["trial"] == 1


@pytest.mark.parametrize(("diff", "scale", "passes"), [(5e-3, 1e4, True), (5e-3, 1.0, False), (5e-4, 0.01, True)])
def test_the_onnx_check_allows_float_rounding_relative_to_the_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     diff: float, scale: float, passes: bool) -> None:
    def measured(model, input_shape, path):  # onnxruntime's |difference| and the largest |logit|, as given
        path.write_bytes(b"onnx")
        return diff, scale

    monkeypatch.setattr(search.export, "export_onnx", measured)
    summary = export_model(nn.Linear(2, 2), {}, tmp_path / "best", input_shape=(2,), meta={"trial": 0})
    assert ("model.onnx" in summary["files"]) is passes
    if not passes:  # 1e-3 of max(1, 1.0) is less than 5e-3
        assert summary["onnx_error"].startswith("RuntimeError: onnxruntime disagrees with PyTorch (max |diff| 0.005")


def test_a_ray_trial_joins_the_study_and_never_creates_one(tmp_path: Path) -> None:
    """A Tune trial on a node that cannot see the driver's SQLite file fails instead of starting a private study."""
    missing = tmp_path / "elsewhere" / "study.db"
    with pytest.raises(ValueError, match="no such file"):
        open_storage(f"sqlite:///{missing}", create=False)
    assert not missing.parent.exists()
    storage = open_storage(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ValueError, match="no study 'resnet20-fashion-mnist-25mflops'"):
        join_study(config(tmp_path), storage, identity={})
    assert optuna.get_all_study_summaries(storage) == []


def test_ray_refuses_a_file_storage_on_a_cluster_of_several_nodes(tmp_path: Path) -> None:
    from search.ray_backend import _check_shared_storage

    _check_shared_storage(config(tmp_path), 1)
    _check_shared_storage(config(tmp_path, storage="postgresql://gkpd@dbhost/gkpd"), 3)
    with pytest.raises(ValueError, match="2 nodes.*postgresql://"):
        _check_shared_storage(config(tmp_path), 2)


def test_dependency_floors_cover_what_the_code_uses() -> None:
    """Optuna 5 (Trial.set_constraint), Python 3.11 (tomllib), torch 2.5 (torch.OutOfMemoryError)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    floors = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        floors[req.name] = min((s.version for s in req.specifier if s.operator == ">="), default=None)
    assert floors["optuna"] == "5.0" and floors["torch"] == "2.5" and floors["torchvision"] == "0.20"


@pytest.mark.parametrize("error, status, says", [
    (OSError(28, "No space left on device", "/runs/x/study.db"), 1, "No space left on device: /runs/x/study.db"),
    (SearchFailed("3 trials in a row failed; last: nan"), 1, "3 trials in a row"),
    (ValueError("--out x is a file, not a directory"), 2, "is a file"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (Terminated(), 143, "interrupted"),
])
def test_main_turns_late_failures_into_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                error: BaseException, status: int, says: str) -> None:
    import search.cli

    def run(argv):
        raise error

    monkeypatch.setattr(search.cli, "run", run)
    monkeypatch.delenv("GKPD_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        search.cli.main(["--budget-mflops", "25"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == status and len(lines) == 1 and says in lines[0], lines
