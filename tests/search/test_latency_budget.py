"""--budget-ms: the per-layer latency table's arithmetic and cache, the budget's checks, and the frontier as measured.

Timers are faked where the assertion is about arithmetic: the real ones are seconds each and never exact.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import torch.nn as nn

import gkpd
from search import latency, latency_table
from search.report import write_report
from search.study import OVER_MEASURED
from spaces import DENSE, build_space

SHAPE = (1, 12, 12)
MODEL_MS = 100.0  # the fake timer's dense model


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def fake_ms(key: str) -> float:
    """A known time per candidate key: dense 5 ms, a factorization 1 ms plus a tenth of its rank."""
    return 5.0 if key == DENSE else 1.0 + int(key.rsplit("/r", 1)[1]) / 10


@pytest.fixture
def fake_timers(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the table's timer and the whole-model timer; returns the keys each timing call was given."""
    calls: list[list[str]] = []

    def time_calls(fns):
        calls.append(list(fns))
        return {key: fake_ms(key) for key in fns}

    def torch_latency(models, input_shape, *, batch, device, repeats=latency.REPEATS):
        return {name: MODEL_MS if name == "dense" else 10 * MODEL_MS for name in models}  # trials: over budget

    monkeypatch.setattr(latency_table, "time_calls", time_calls)
    monkeypatch.setattr(latency, "torch_latency", torch_latency)
    return calls


def test_a_plans_prediction_is_the_remainder_plus_its_layers_chosen_times(tmp_path: Path, fake_timers) -> None:
    model = _tiny()
    space = build_space(model, SHAPE)
    table = latency_table.build_latency_table(model, space, device=torch.device("cpu"), cache_dir=tmp_path)
    layers = list(space.layers)
    assert set(table.layers) == set(layers) and len(fake_timers) == len(layers)  # one interleaved call per layer
    assert table.remainder_ms == pytest.approx(MODEL_MS - 5.0 * len(layers))
    assert table.dense_ms() == pytest.approx(MODEL_MS)
    space.set_latency(table)
    assert space.cost({}).ms == pytest.approx(MODEL_MS)  # the dense plan predicts the measured dense model
    plan = {layers[1]: space.layers[layers[1]].candidates[-1].spec, layers[2]: space.layers[layers[2]].candidates[1].spec}
    expected = table.remainder_ms + 5.0 * (len(layers) - 2) + sum(fake_ms(gkpd_key(s)) for s in plan.values())
    assert space.cost(plan).ms == pytest.approx(expected)
    fastest = table.remainder_ms + sum(min(fake_ms(c.key) for c in space.layers[n].candidates) for n in layers)
    assert space.min_cost().ms == pytest.approx(fastest)
    # The budget constrains plans as MFLOPs do: allocation and repair land within it.
    budget = (fastest + MODEL_MS) / 2
    assert space.cost(space.allocate(ms=budget)).ms <= budget
    dense_everywhere = {}
    assert space.cost(space.repair(dense_everywhere, ms=budget)).ms <= budget
    both = space.allocate(ms=budget, mflops=0.9 * space.baseline_cost().mflops)
    assert space.cost(both).ms <= budget and space.cost(both).mflops <= 0.9 * space.baseline_cost().mflops
    with pytest.raises(ValueError, match=rf"below the fastest plan this space can make: {fastest:.3f} ms predicted"):
        space.check_budget(ms=fastest - 0.01)


def gkpd_key(spec: gkpd.KroneckerSpec) -> str:
    from spaces import candidate_key

    return candidate_key(spec)


def test_a_cached_table_times_nothing_again(tmp_path: Path, fake_timers) -> None:
    model = _tiny()
    space = build_space(model, SHAPE)
    first = latency_table.build_latency_table(model, space, device=torch.device("cpu"), cache_dir=tmp_path)
    timed = len(fake_timers)
    path = latency_table.table_path(tmp_path, torch.device("cpu"))
    version = torch.__version__.replace("+", "_")
    assert path.is_file() and f"torch{version}-{torch.get_num_threads()}t" in path.name
    again = latency_table.build_latency_table(model, space, device=torch.device("cpu"), cache_dir=tmp_path)
    assert again == first and len(fake_timers) == timed  # read from disk, not timed


def test_an_over_budget_as_measured_trial_stays_in_trials_csv_and_off_the_frontier(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    common = {"mparams": 0.01, "test_accuracy": 0.8, "ms_b1": 4.0, "dense_ms_b1": 5.0, "speedup_b1": 1.25,
              "latency_device": "cpu (2 threads)"}
    study.add_trial(optuna.trial.create_trial(values=[0.9, 1.0], user_attrs={
        **common, "mflops": 1.0, "predicted_ms_b1": 3.0, "ms_b1": 6.0, "ms_b1_table": 6.0,
        OVER_MEASURED: "over --budget-ms as measured: 6.00 ms > 5 ms (predicted 3.00)"}))
    study.add_trial(optuna.trial.create_trial(values=[0.8, 1.2], user_attrs={**common, "mflops": 1.2,
                                                                             "predicted_ms_b1": 4.4}))
    teacher = {"val_accuracy": 0.95, "test_accuracy": 0.9, "mflops": 2.0, "mparams": 0.02}
    trials, pareto = write_report(study, tmp_path, objective="mflops", budget=None, teacher=teacher,
                                  run={"study_name": "t", "model": "m", "dataset": "d", "budget": {"ms": 5.0}})
    assert list(pareto.trial) == [1]  # the more accurate, cheaper trial 0 ran over the budget as measured
    rows = pd.read_csv(tmp_path / "trials.csv").set_index("trial")
    assert not rows.loc[0, "feasible"] and "over --budget-ms as measured" in rows.loc[0, "note"]
    assert rows.loc[0, "ms_pred_error"] == pytest.approx(3.0 / 6.0 - 1)
    assert pd.read_csv(tmp_path / "pareto.csv").predicted_ms_b1.tolist() == [4.4]
    report = (tmp_path / "report.md").read_text()
    # Trial 1 has no ms_b1_table (recorded before it existed): its error is against ms_b1, 4.4 / 4.0 - 1.
    assert "predicted_ms_b1 | ms_b1_table | ms_pred_error |" in report and "+10.0%" in report
    assert "--budget-ms 5 holds as measured" in report


@pytest.mark.parametrize("value", ["0", "-2", "nan"])
def test_a_non_positive_ms_budget_is_one_line_exit_2(value: str, tmp_path: Path, capsys) -> None:
    from search.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--budget-ms", value, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--budget-ms must be a positive number" in err
    assert not (tmp_path / "out").exists()


def test_the_ms_budget_names_the_study_and_is_in_its_identity() -> None:
    from search.config import SearchConfig

    config = SearchConfig(budget_ms=3.5, model="resnet20")
    assert config.study_name == "resnet20-fashion-mnist-3.5ms" and config.budget == {"ms": 3.5}
    assert config.identity()["budget_ms"] == 3.5 and config.objective == "mflops"
    assert SearchConfig(budget_mflops=20, budget_ms=3.5).study_name.endswith("-20mflops-3.5ms")


def test_a_search_with_an_ms_budget_rejects_the_unreachable_prints_predictions_and_keeps_the_frontier_as_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, fake_timers,
        teacher_cache: Path, tiny_args: list[str]) -> None:
    from search.cli import main

    # The session's tiny teacher and sensitivity table (tests/search/conftest.py), copied: the fake latency table
    # must not land in the shared cache.
    shutil.copytree(teacher_cache, tmp_path / "cache", ignore=shutil.ignore_patterns("warmup"))
    monkeypatch.setenv("GKPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GKPD_OFFLINE", "1")
    args = [a for a in tiny_args]
    del args[args.index("--budget-mflops"):args.index("--budget-mflops") + 2]
    args += ["--long-finetunes", "0"]
    # Faster than the fastest plan: one line, exit 2, nothing in --out (the table is cached).
    with pytest.raises(SystemExit) as stop:
        main([*args, "--budget-ms", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("search.py:")]
    assert stop.value.code == 2 and len(errors) == 1, err[-2000:]
    # The fake dense model takes 100 ms and its 22 layers 5 ms each dense, 1.1 ms and up factorized.
    assert errors[0] == ("search.py: error: --budget-ms 1 is below the fastest plan this space can make: 14.200 ms "
                         f"predicted (batch 1 on cpu ({torch.get_num_threads()} threads); the dense model: 100.000 ms)")
    assert not (tmp_path / "out").exists()
    timed = len(fake_timers)
    # A reachable budget: the trial is "measured" at 1000 ms, so it may not make the frontier.
    with pytest.raises(SystemExit) as stop:
        main([*args, "--budget-ms", "90", "--trials", "1", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert stop.value.code == 0, captured.err[-2000:]
    assert len(fake_timers) == timed  # the table came from the cache
    assert re.search(r"latency predicted [\d.]+ ms, measured 1000.00 ms at batch 1 on the table's scale "
                     r"\(1000.00 ms beside the dense model's 100.00 ms, which the table timed at 100.00 ms; "
                     r"[+-][\d.]+% prediction error\); OVER --budget-ms 90 as measured", captured.err), captured.err[-3000:]
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    done = trials[trials.state == "COMPLETE"]
    assert len(done) == 1 and (done.predicted_ms_b1 <= 90).all() and (done.ms_b1 == 1000).all()
    assert done.note.str.contains("over --budget-ms as measured").all() and not done.feasible.any()
    assert pd.read_csv(tmp_path / "out" / "pareto.csv").empty
    assert not (tmp_path / "out" / "best").exists()
    # The machine got twice as slow since the table was timed: the dense model now takes 200 ms, the plan 150 ms.
    # On the table's scale that is 75 ms, within the budget: the budget holds against the machine the table saw.
    monkeypatch.setattr(latency, "torch_latency", lambda models, input_shape, *, batch, device, repeats=0:
                        {name: 200.0 if name == "dense" else 150.0 for name in models})
    with pytest.raises(SystemExit) as stop:
        main([*args, "--budget-ms", "90", "--trials", "1", "--out", str(tmp_path / "slower")])
    captured = capsys.readouterr()
    assert stop.value.code == 0, captured.err[-2000:]
    assert "measured 75.00 ms at batch 1 on the table's scale (150.00 ms beside the dense model's 200.00 ms" \
        in captured.err
    done = pd.read_csv(tmp_path / "slower" / "trials.csv").query("state == 'COMPLETE'")
    assert len(done) == 1 and done.feasible.all() and (done.ms_b1_table == 75.0).all() and (done.ms_b1 == 150).all()
    assert len(pd.read_csv(tmp_path / "slower" / "pareto.csv")) == 1 and (tmp_path / "slower" / "best").is_dir()


def test_each_layer_is_timed_on_the_input_layout_it_gets_inside_the_model(tmp_path: Path, fake_timers) -> None:
    """At batch 1 a conv's time depends on its input's layout several times over; the model decides the layout."""
    model = _tiny()
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    seen = latency.layer_inputs_as_timed(model, [*convs, "7"], SHAPE, device=torch.device("cpu"))
    assert seen == {"0": ((1, 1, 12, 12), False), "2": ((1, 8, 12, 12), False), "4": ((1, 16, 6, 6), False),
                    "7": ((1, 16), False)}
    # channels_last weights make a conv's output channels_last (the first conv's (8, 1, 3, 3) weight is the same
    # either way: one input channel), so the last conv's input is channels_last.
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    seen = latency.layer_inputs_as_timed(model, convs, SHAPE, device=torch.device("cpu"))
    assert [seen[name][1] for name in convs] == [False, False, True]
    # The table's keys name the layout, so a layer timed on one layout is never read back for the other.
    latency_table.build_latency_table(model, build_space(model, SHAPE), device=torch.device("cpu"), cache_dir=tmp_path)
    keys = [k for k in json.loads(next(tmp_path.glob("*.json")).read_text()) if not k.startswith("model ")]
    assert {k.split("|")[0].rsplit(" ", 1)[1] for k in keys} == {"nchw", "nhwc"}
    assert all(" in(1, 16, 6, 6) nhwc|" in k for k in keys if "w(16, 16, 3, 3)" in k)
