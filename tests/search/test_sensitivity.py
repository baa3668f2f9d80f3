"""Measured sensitivity: interpolation, the allocation it drives, the measurement protocol and its cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gkpd
from search.sensitivity import (
    Point, SensitivityTable, calibration_images, load_or_measure, measure_sensitivity, pick_candidates,
)
from spaces import build_space


def _net() -> nn.Module:
    """conv -> BN -> ReLU, three times, then a linear head: four decomposable layers, two of them alike."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
    ).eval()
    with torch.no_grad():
        net[-1].weight.mul_(30)  # confident outputs: a random net's near-uniform softmax hides every change
    return net


def test_interpolation_hits_measured_points_and_is_monotone() -> None:
    table = SensitivityTable({"l": [Point("a", 0.2, 1.0), Point("b", 0.4, 0.5), Point("c", 0.8, 3.0)]})
    assert table.loss("l", 0.0) == 0.0
    assert table.loss("l", 0.2) == 1.0
    assert table.loss("l", 0.8) == 3.0
    assert table.loss("l", 0.1) == pytest.approx(0.5)  # halfway from (0, 0) to (0.2, 1)
    assert table.loss("l", 0.4) == 1.0  # measured 0.5, below the 1.0 at a smaller error: raised to it
    assert table.loss("l", 0.6) == pytest.approx(2.0)  # halfway from (0.4, 1) to (0.8, 3)
    assert table.loss("l", 1.0) == pytest.approx(4.0)  # the last slope, 5 per unit of error, continued
    errors = [i / 100 for i in range(101)]
    losses = [table.loss("l", e) for e in errors]
    assert losses == sorted(losses)
    with pytest.raises(KeyError, match="no sensitivity measured for layer 'x'"):
        table.loss("x", 0.5)


def test_table_round_trips_through_its_dict() -> None:
    table = SensitivityTable({"l": [Point("a", 0.2, 1.0)]}, meta={"images": 3})
    again = SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.points == table.points and again.meta == {"images": 3}


def test_pick_spreads_along_the_error_axis_and_keeps_both_ends() -> None:
    space = build_space(_net(), (4, 8, 8))
    candidates = space.layers["3"].candidates
    picked = pick_candidates(candidates, 4)
    errors = sorted(c.error for c in candidates if c.spec is not None)
    assert len(picked) == min(4, len(errors))
    assert picked[0].error == errors[0] and picked[-1].error == errors[-1]
    assert all(c.spec is not None for c in picked)


def test_a_very_sensitive_layer_stays_dense() -> None:
    space = build_space(_net(), (4, 8, 8))
    # Half of one 16x16 conv's parameters must go: either of the two alike convs could give them alone.
    budget = (space.baseline_cost().params - 16 * 16 * 9 // 2) / 1e6
    plain = space.allocate(mparams=budget)
    victim = "6" if "6" in plain else "3"  # a layer the error-sum allocation factorizes
    assert victim in plain
    others = [name for name in space.choices() if name != victim]
    table = SensitivityTable({
        victim: [Point("x", 1e-6, 1e6)],  # any decomposition of it costs a fortune
        **{name: [Point("x", 1.0, 1.0)] for name in others},
    })
    plan = space.allocate(mparams=budget, scores=table.scores())
    assert victim not in plan and ({"3", "6"} - {victim}) <= set(plan)  # its alike twin gives the cut
    assert space.cost(plan).params <= budget * 1e6
    # repair moves the cheap layers, not the sensitive one
    over = space.allocate(mparams=space.baseline_cost().mparams * 0.99)
    repaired = space.repair({n: s for n, s in over.items() if n != victim}, mparams=budget, scores=table.scores())
    assert victim not in repaired and space.cost(repaired).params <= budget * 1e6
    assert table.predict(space, plan) == pytest.approx(sum(table.loss(n, space.layers[n].by_spec(s).error)
                                                           for n, s in plan.items()))
    with pytest.raises(ValueError, match="scores name layer 'nope'"):
        space.allocate(mparams=budget, scores={"nope": lambda c: 0.0})


def test_measured_loss_is_zero_at_full_rank_and_grows_with_the_error() -> None:
    teacher = _net()
    space = build_space(teacher, (4, 8, 8))
    x = torch.randn(64, 4, 8, 8)
    table = measure_sensitivity(teacher, space, x, points=3)
    assert set(table.points) == set(space.choices())
    conv = table.points["3"]
    assert len(conv) == 3
    assert max(p.loss for p in conv) > 1e-3  # a coarse decomposition changes the output
    # Exact (full-rank) decomposition: the protocol's own floor is subtracted, so nothing is lost.
    layer = space.layers["3"]
    a_shape = next(c.spec.a_shape for c in layer.candidates if c.spec is not None)
    full = gkpd.KroneckerSpec(layer.info.weight_shape, a_shape, gkpd.KroneckerSpec(layer.info.weight_shape, a_shape, 1).max_rank)
    exact = measure_sensitivity_of(teacher, {"3": full}, x)
    assert exact == pytest.approx(0.0, abs=1e-5)


def measure_sensitivity_of(teacher: nn.Module, plan: dict, x: torch.Tensor) -> float:
    from search.sensitivity import _kd_loss
    import torch.nn.functional as F
    with torch.no_grad():
        target = F.log_softmax(teacher(x), dim=1)
    floor = _kd_loss(teacher, x, target, len(x))
    return _kd_loss(gkpd.kroneckerize(teacher, plan), x, target, len(x)) - floor


def test_cached_beside_the_study_and_keyed_by_the_teacher(tmp_path: Path) -> None:
    teacher = _net()
    space = build_space(teacher, (4, 8, 8))
    train_x = torch.randn(100, 4, 8, 8)
    first = load_or_measure(teacher, space, train_x, tmp_path, images=32, points=2)
    files = list(tmp_path.glob("sensitivity-*.json"))
    assert len(files) == 1
    again = load_or_measure(teacher, space, train_x, tmp_path, images=32, points=2)  # read, not measured
    assert again.points == first.points and again.meta["seconds"] == first.meta["seconds"]
    with torch.no_grad():
        teacher[0].weight.mul_(1.01)
    load_or_measure(teacher, space, train_x, tmp_path, images=32, points=2)
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 2  # another teacher: another table


def test_a_table_is_shared_between_studies_of_the_same_teacher_space_and_images(tmp_path: Path) -> None:
    from search.sensitivity import study_table_key

    teacher = _net()
    space = build_space(teacher, (4, 8, 8))
    train_x = torch.randn(100, 4, 8, 8)
    shared = tmp_path / "cache"
    first = load_or_measure(teacher, space, train_x, tmp_path / "a", images=32, points=2, shared_dir=shared)
    key = study_table_key(teacher, space, train_x, images=32, points=2)
    assert [f.name for f in shared.iterdir()] == [f"sensitivity-{key}.json"]
    assert (tmp_path / "a" / f"sensitivity-{key}.json").read_text() == (shared / f"sensitivity-{key}.json").read_text()
    second = load_or_measure(teacher, space, train_x, tmp_path / "b", images=32, points=2, shared_dir=shared)
    assert second.meta["seconds"] == first.meta["seconds"]  # copied, not measured again
    assert (tmp_path / "b" / f"sensitivity-{key}.json").is_file()
    # Other training images (another dataset, split or --max-train-images): another table.
    other = torch.randn(100, 4, 8, 8)
    assert study_table_key(teacher, space, other, images=32, points=2) != key
    load_or_measure(teacher, space, other, tmp_path / "c", images=32, points=2, shared_dir=shared)
    assert len(list(shared.glob("sensitivity-*.json"))) == 2
    # A damaged cache entry is measured again, not trusted.
    (shared / f"sensitivity-{key}.json").write_text("{")
    third = load_or_measure(teacher, space, train_x, tmp_path / "d", images=32, points=2, shared_dir=shared)
    assert third.points == first.points


def test_calibration_images_are_a_fixed_subset_of_the_training_images() -> None:
    train_x = torch.arange(50.0).reshape(50, 1, 1, 1)
    a, b = calibration_images(train_x, 10), calibration_images(train_x, 10)
    assert torch.equal(a, b) and len(a.unique()) == 10
