"""Whole models: layer discovery, kroneckerize, and the plan JSON format."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gkpd import (
    PLAN_FORMAT, PLAN_VERSION, ConvGeometry, KroneckerConv2d, KroneckerLinear, KroneckerSpec, compressible_layers,
    decompose, kroneckerize, load_plan, plan_to_dict, reconstruct, save_plan,
)

# TinyResNet (conftest) on a 3x16x16 sample: name -> (weight shape, input hw, stride, pads, output hw, has bias).
EXPECTED_LAYERS = {
    "stem": ((8, 3, 3, 3), (16, 16), (1, 1), (1, 1, 1, 1), (16, 16), True),
    "layer1.conv1": ((8, 8, 3, 3), (16, 16), (1, 1), (1, 1, 1, 1), (16, 16), False),
    "layer1.conv2": ((8, 8, 3, 3), (16, 16), (1, 1), (1, 1, 1, 1), (16, 16), False),
    "layer2.conv1": ((16, 8, 3, 3), (16, 16), (2, 2), (1, 1, 1, 1), (8, 8), False),
    "layer2.conv2": ((16, 16, 3, 3), (8, 8), (1, 1), (1, 1, 1, 1), (8, 8), False),
    "layer2.shortcut.0": ((16, 8, 1, 1), (16, 16), (2, 2), (0, 0, 0, 0), (8, 8), False),
    "fc": ((10, 16), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), True),
}


def test_compressible_layers_of_a_resnet(resnet, input_shape) -> None:
    infos = compressible_layers(resnet(), input_shape)
    assert [info.name for info in infos] == list(EXPECTED_LAYERS)  # call order
    for info in infos:
        weight_shape, in_hw, stride, pads, out_hw, has_bias = EXPECTED_LAYERS[info.name]
        assert info.kind == ("linear" if info.name == "fc" else "conv")
        assert info.weight_shape == weight_shape and info.out_hw == out_hw and info.has_bias == has_bias
        assert info.geometry == ConvGeometry(in_hw, stride, (1, 1), pads)
        assert info.decomposable and info.reason == ""
    dense = {info.name: info.dense_macs for info in infos}
    assert dense == {
        "stem": 8 * 3 * 9 * 256, "layer1.conv1": 8 * 8 * 9 * 256, "layer1.conv2": 8 * 8 * 9 * 256,
        "layer2.conv1": 16 * 8 * 9 * 64, "layer2.conv2": 16 * 16 * 9 * 64, "layer2.shortcut.0": 16 * 8 * 64,
        "fc": 160,
    }


def test_compressible_layers_flags_what_cannot_be_decomposed() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=4),
        nn.Conv2d(4, 6, 3, padding=(1, 2), dilation=(1, 2), padding_mode="reflect"),
        nn.Flatten(2),
        nn.Linear(25, 5),  # applied to [N, 6, 25]: 6 rows
    ).train()
    infos = compressible_layers(model, (4, 7, 7))
    assert model.training  # mode restored
    assert [(i.name, i.decomposable, i.reason) for i in infos] == [
        ("0", False, "groups=4 (grouped convs are not decomposed)"),
        ("1", False, "padding_mode='reflect' (only zero padding is supported)"),
        ("3", True, ""),
    ]
    assert infos[1].geometry == ConvGeometry((5, 5), (1, 1), (1, 2), (1, 1, 2, 2)) and infos[1].out_hw == (5, 5)
    assert infos[2].geometry == ConvGeometry((6, 1)) and infos[2].dense_macs == 6 * 25 * 5
    with pytest.raises(NotImplementedError, match=r"layer '0' cannot be decomposed: groups=4"):
        kroneckerize(model, {"0": KroneckerSpec((4, 1, 3, 3), (2, 1, 1, 1), 1)})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_rank_resnet_gives_the_same_logits(resnet, input_shape, make_plan, seed: int) -> None:
    model = resnet(seed, torch.float64)
    plan = make_plan(compressible_layers(model, input_shape), random.Random(seed), full_rank=True)
    plan |= {"layer2.conv1": KroneckerSpec((16, 8, 3, 3), (4, 2, 3, 1), 24)}  # always one strided split
    compressed = kroneckerize(model, plan)
    x = torch.randn(4, *input_shape, dtype=torch.float64)
    for path in ("factorized", "materialized", "auto"):
        for module in compressed.modules():
            if isinstance(module, (KroneckerConv2d, KroneckerLinear)):
                module.path = path
        torch.testing.assert_close(compressed(x), model(x), rtol=1e-10, atol=1e-10)


def test_low_rank_resnet_equals_the_dense_model_with_rebuilt_weights(resnet, input_shape, make_plan) -> None:
    model = resnet(3, torch.float64)
    plan = make_plan(compressible_layers(model, input_shape), random.Random(3))
    compressed = kroneckerize(model, plan, path="factorized")
    rebuilt = copy.deepcopy(model)
    for name, spec in plan.items():
        layer = rebuilt.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(reconstruct(*decompose(layer.weight, spec)))
        kron = compressed.get_submodule(name)
        assert isinstance(kron, KroneckerConv2d if isinstance(layer, nn.Conv2d) else KroneckerLinear)
        assert kron.spec == spec and kron.path == "factorized"
        if layer.bias is not None:
            assert torch.equal(kron.bias, layer.bias)
    x = torch.randn(4, *input_shape, dtype=torch.float64)
    torch.testing.assert_close(compressed(x), rebuilt(x), rtol=1e-10, atol=1e-10)


def test_kroneckerize_leaves_the_original_alone(resnet, input_shape, make_plan) -> None:
    model = resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {name: type(m) for name, m in model.named_modules()}
    compressed = kroneckerize(model, make_plan(compressible_layers(model, input_shape), random.Random(0)))
    with torch.no_grad():
        for p in compressed.parameters():
            p.add_(1.0)
    assert {name: type(m) for name, m in model.named_modules()} == types
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_plan_round_trips_through_json_to_an_identical_model(resnet, input_shape, make_plan, tmp_path: Path) -> None:
    model = resnet()
    plan = make_plan(compressible_layers(model, input_shape), random.Random(5))
    save_plan(plan, tmp_path / "sub" / "plan.json", meta={"budget_mflops": 1.5})
    loaded = load_plan(tmp_path / "sub" / "plan.json", model=model)
    assert loaded == plan and list(loaded) == list(plan)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["plan.json"]  # no temp file left
    first, second = kroneckerize(model, plan).state_dict(), kroneckerize(model, loaded).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_plan_document_format(tmp_path: Path) -> None:
    plan = {"features.0": KroneckerSpec((8, 4, 3, 3), (2, 2, 3, 1), 3), "fc": KroneckerSpec((10, 16), (2, 4), 2)}
    save_plan(plan, tmp_path / "plan.json", meta={"note": "x"})
    assert json.loads((tmp_path / "plan.json").read_text()) == {
        "format": "gkpd-plan",
        "version": 2,
        "layers": {
            "features.0": {"weight_shape": [8, 4, 3, 3], "factor_shapes": [[2, 2, 3, 1], [4, 2, 1, 3]],
                           "a_shape": [2, 2, 3, 1], "b_shape": [4, 2, 1, 3], "rank": 3},
            "fc": {"weight_shape": [10, 16], "factor_shapes": [[2, 4], [5, 4]], "a_shape": [2, 4], "b_shape": [5, 4],
                   "rank": 2},
        },
        "meta": {"note": "x"},
    }
    assert plan_to_dict(plan)["meta"] == {} and (PLAN_FORMAT, PLAN_VERSION) == ("gkpd-plan", 2)


def test_n_factor_plans_round_trip_to_the_same_model(resnet, tmp_path: Path) -> None:
    cp = KroneckerSpec((8, 8, 3, 3), rank=5, factor_shapes=[(8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)])
    three = KroneckerSpec((8, 8, 3, 3), rank=4, factor_shapes=[(2, 1, 3, 1), (2, 4, 1, 1), (2, 2, 1, 3)])
    plan = {"layer1.conv1": cp, "layer1.conv2": three}
    save_plan(plan, tmp_path / "plan.json")
    entry = json.loads((tmp_path / "plan.json").read_text())["layers"]["layer1.conv1"]
    assert entry == {"weight_shape": [8, 8, 3, 3], "factor_shapes": [[8, 1, 1, 1], [1, 8, 1, 1], [1, 1, 3, 1], [1, 1, 1, 3]],
                     "rank": 5}
    loaded = load_plan(tmp_path / "plan.json", model=resnet())
    assert loaded == plan
    model = resnet()
    first, second = kroneckerize(model, plan).state_dict(), kroneckerize(model, loaded).state_dict()
    assert {k for k in first if k.startswith("layer1.conv1.")} == {f"layer1.conv1.{n}" for n in "abcd"}
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_version_1_plans_are_still_read(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "gkpd-plan", "version": 1, "layers": {"conv": GOOD_ENTRY}}))
    assert load_plan(path) == {"conv": KroneckerSpec((8, 4, 3, 3), (2, 2, 3, 1), 3)}


GOOD_ENTRY = {"weight_shape": [8, 4, 3, 3], "a_shape": [2, 2, 3, 1], "b_shape": [4, 2, 1, 3], "rank": 3}


def _doc(**changes) -> dict:
    doc = {"format": "gkpd-plan", "version": 2, "layers": {"conv": dict(GOOD_ENTRY)}}
    for key, value in changes.items():
        if key in GOOD_ENTRY or key == "factor_shapes":
            doc["layers"]["conv"][key] = value
        else:
            doc[key] = value
    return doc


def _without(key: str) -> dict:
    doc = _doc()
    del doc["layers"]["conv"][key]
    return doc


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "gkpd-plan", ', r"not valid JSON"),
        ("[1, 2]", r"expected a JSON object, got list"),
        (_doc(format="other"), r"'format' must be 'gkpd-plan', got 'other'"),
        ({"version": 1, "layers": {}}, r"'format' must be 'gkpd-plan', got None"),
        (_doc(version=3), r"unsupported version 3; this reader knows 1, 2"),
        (_doc(version="1"), r"unsupported version '1'"),
        (_doc(layers=[]), r"'layers' must be an object"),
        (_doc(layers={"conv": [8, 4, 3, 3]}), r"layer 'conv' needs 'weight_shape', 'factor_shapes' \(or 'a_shape'\) and 'rank'"),
        (_without("rank"), r"layer 'conv' needs 'weight_shape', 'factor_shapes' \(or 'a_shape'\) and 'rank'"),
        (_without("a_shape"), r"layer 'conv' needs 'weight_shape', 'factor_shapes' \(or 'a_shape'\) and 'rank'"),
        (_doc(factor_shapes=[[2, 2, 3, 1], [4, 2, 1, 1]]), r"layer 'conv': factor_shapes .* multiply to \(8, 4, 3, 1\)"),
        (_doc(factor_shapes=[[2, 2, 3, 1]]), r"layer 'conv': factor_shapes needs at least two shapes, got 1"),
        (_doc(factor_shapes=[[4, 2, 1, 3], [2, 2, 3, 1]]), r"layer 'conv': a_shape \(2, 2, 3, 1\) disagrees with factor_shapes\[0\]"),
        (_doc(rank=0), r"layer 'conv': rank 0 is out of range .* allowed 1\.\.12"),
        (_doc(rank=13), r"layer 'conv': rank 13 is out of range .* allowed 1\.\.12"),
        (_doc(rank=1.5), r"layer 'conv': rank must be an int, got 1\.5"),
        (_doc(rank=None), r"layer 'conv': rank must be an int, got None"),
        (_doc(rank="3"), r"layer 'conv': rank must be an int, got '3'"),
        (_doc(a_shape=[2, 2, "3", 1]), r"layer 'conv': a_shape must be a sequence of ints, got \[2, 2, '3', 1\]"),
        (_doc(a_shape=[3, 2, 3, 1]), r"layer 'conv': a_shape \(3, 2, 3, 1\) does not divide"),
        (_doc(weight_shape=8), r"layer 'conv': weight_shape must be a sequence of ints, got 8"),
        (_doc(b_shape=[4, 2, 3, 1]), r"layer 'conv': b_shape \[4, 2, 3, 1\] should be \[4, 2, 1, 3\]"),
        (_doc(b_shape=5), r"layer 'conv': b_shape 5 should be \[4, 2, 1, 3\]"),
    ],
)
def test_malformed_plan_files_raise_value_error(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_plan(path)


def test_b_shape_is_optional_on_read(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_without("b_shape")))
    assert load_plan(path) == {"conv": KroneckerSpec((8, 4, 3, 3), (2, 2, 3, 1), 3)}


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"layer3.conv1": KroneckerSpec((8, 8, 3, 3), (2, 2, 1, 1), 1)},
         r"plan names layer 'layer3.conv1', which the model does not have"),
        ({"layer1.conv1": KroneckerSpec((16, 8, 3, 3), (2, 2, 1, 1), 1)},
         r"plan layer 'layer1.conv1' has weight_shape \(16, 8, 3, 3\) but the model's weight is \(8, 8, 3, 3\)"),
        ({"fc": KroneckerSpec((10, 32), (2, 2), 1)},
         r"plan layer 'fc' has weight_shape \(10, 32\) but the model's weight is \(10, 16\)"),
        ({"layer1.bn1": KroneckerSpec((8, 8), (2, 2), 1)},
         r"plan layer 'layer1.bn1' is a BatchNorm2d, not nn.Conv2d or nn.Linear"),
    ],
)
def test_load_plan_rejects_a_plan_that_does_not_fit_the_model(resnet, tmp_path: Path, plan, message: str) -> None:
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan  # well-formed on its own
    with pytest.raises(ValueError, match=message):
        load_plan(tmp_path / "plan.json", model=resnet())
    with pytest.raises(ValueError, match=message):
        kroneckerize(resnet(), plan)
