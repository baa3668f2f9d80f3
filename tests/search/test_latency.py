"""Measured latency: the columns a trial stores, their ratios, the fast form's folding, and the report."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import torch.nn as nn

import gkpd
from search import latency
from search.report import write_report


def _tiny() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10))
    plan = {"2": gkpd.KroneckerSpec((16, 8, 3, 3), (16, 1, 1, 1), 4),
            "4": gkpd.KroneckerSpec((16, 16, 3, 3), (4, 4, 3, 1), 2)}
    return dense, gkpd.kroneckerize(dense, plan)


def test_fast_form_folds_layers_exactly_and_names_every_kronecker_layer() -> None:
    dense, model = _tiny()
    forms = latency.fast_forms(model, (1, 12, 12))
    assert set(forms) == {"2", "4"} and set(forms.values()) <= {"factorized", "dense"}
    everything_dense = latency.fold(model, {"2": "dense", "4": "dense"})
    assert not any(isinstance(m, gkpd.KroneckerConv2d) for m in everything_dense.modules())
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(everything_dense(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(latency.fold(model, forms)(x), expected, rtol=1e-5, atol=1e-5)


def test_a_trial_stores_positive_latencies_whose_ratios_are_the_stored_times(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKPD_LATENCY", "1")  # tests/search/conftest.py turns it off everywhere else
    assert latency.enabled()
    dense, model = _tiny()
    measured = latency.measure_latency(model, dense, (1, 12, 12), batch=4, device=torch.device("cpu"))
    assert set(measured) == set(latency.LATENCY_KEYS)
    assert measured["latency_device"] == f"cpu ({torch.get_num_threads()} threads)" and measured["batch"] == 4
    for prefix in ("", "ort_"):
        for what in ("ms_b1", "dense_ms_b1", "speedup_b1"):
            assert measured[prefix + what] > 0
    # Through a study and the report, as a search stores them.
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.9, 1.0], user_attrs={"mflops": 1.0, "mparams": 0.01,
                                                                             "test_accuracy": 0.8, **measured}))
    teacher = {"val_accuracy": 0.95, "test_accuracy": 0.9, "mflops": 2.0, "mparams": 0.02}
    write_report(study, tmp_path, objective="mflops", budget=1.5, teacher=teacher, run={"study_name": "t", "model": "m",
                                                                                        "dataset": "d"})
    for name in ("trials.csv", "pareto.csv"):
        row = pd.read_csv(tmp_path / name).iloc[0]
        for column in ("ms_b1", "speedup_b1", "speedup_batch", "ort_ms_b1", "ort_speedup_b1"):
            assert row[column] > 0
        assert row.speedup_b1 == row.dense_ms_b1 / row.ms_b1
        assert row.speedup_batch == row.dense_ms_batch / row.ms_batch
        assert row.ort_speedup_b1 == row.ort_dense_ms_b1 / row.ort_ms_b1
    report = (tmp_path / "report.md").read_text()
    assert "| ms_b1 | speedup_b1 | speedup_batch | ort_ms_b1 | ort_speedup_b1 |" in report
    assert f"torch on cpu ({torch.get_num_threads()} threads) at batch 1" in report
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_latency_is_off_in_the_test_suite() -> None:
    assert not latency.enabled()  # the autouse fixture; a whole tiny search would spend seconds per trial on it


@pytest.mark.parametrize("form", ["compact", "fast"])
def test_export_records_each_layers_form_and_the_onnx_model_equals_the_factors(form: str, tmp_path: Path) -> None:
    import json

    import onnxruntime

    from search.export import export_model, load_exported

    dense, model = _tiny()
    plan = {name: m.spec for name, m in model.named_modules() if isinstance(m, gkpd.KroneckerConv2d)}
    summary = export_model(model, plan, tmp_path / "best", input_shape=(1, 12, 12), meta={}, form=form, dense=dense)
    meta = json.loads((tmp_path / "best/plan.json").read_text())["meta"]
    assert meta["form"] == form and set(meta["forms"]) == {"2", "4"}
    if form == "compact":
        assert set(meta["forms"].values()) == {"factorized"}
    assert summary["ort_speedup_b1"] == summary["ort_dense_ms_b1"] / summary["ort_ms_b1"] > 0
    # model.pt is the factors whatever the form; the ONNX graph computes the same function.
    rebuilt = load_exported(dense, tmp_path / "best")
    x = torch.randn(2, 1, 12, 12)
    session = onnxruntime.InferenceSession(str(tmp_path / "best/model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), rebuilt(x),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown form 'small': allowed compact, fast"):
        export_model(model, plan, tmp_path / "other", input_shape=(1, 12, 12), meta={}, form="small")


def test_an_unknown_export_form_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from search.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["export", "--out", str(tmp_path), "--form", "small"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice: 'small'" in err and "compact" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_timed_onnxruntime_sessions_use_torchs_threads_and_do_not_spin() -> None:
    """Spinning sessions timed in turn fought over the cores (see search.latency.open_session)."""
    session = latency.ort_session(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), (1, 5, 5))
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == torch.get_num_threads() and options.inter_op_num_threads == 1
