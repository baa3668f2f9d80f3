"""search.models: registry, cost and parameter counts against hand counts, checkpoint errors."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import gkpd
import torch.nn as nn

from search.models import MODELS, create_model, load_checkpoint

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # fvcore imports torch.jit.script
    from fvcore.nn import FlopCountAnalysis


def _fvcore_by_operator(model: nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    flops = FlopCountAnalysis(model.eval(), torch.zeros(shape))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return dict(flops.by_operator())


def test_resnet18_macs_on_fashion_mnist_match_hand_count() -> None:
    model = create_model("resnet18", in_channels=1, num_classes=10)
    ops = _fvcore_by_operator(model, (1, 1, 28, 28))
    k = 9  # 3x3 kernels
    convs = (
        1 * 64 * k * 28 * 28                                   # stem, stride 1, no max-pool
        + 4 * 64 * 64 * k * 28 * 28                            # layer1
        + (64 * 128 * k + 3 * 128 * 128 * k + 64 * 128) * 14 * 14   # layer2 + 1x1 downsample
        + (128 * 256 * k + 3 * 256 * 256 * k + 128 * 256) * 7 * 7  # layer3
        + (256 * 512 * k + 3 * 512 * 512 * k + 256 * 512) * 4 * 4  # layer4: 7 -> 4 at stride 2
    )
    assert ops["conv"] == convs == 455_795_712
    assert ops["linear"] == 512 * 10
    assert sum(ops.values()) == 456_769_024  # + batch-norm and pooling, as fvcore counts them


def test_resnet20_param_count_matches_hand_count() -> None:
    model = create_model("resnet20", in_channels=3, num_classes=10)
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32) + (
        32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64
    )
    norms = 2 * (16 + 6 * 16 + 7 * 32 + 7 * 64)  # weight and bias per channel; 7 = 6 + the downsample BN
    fc = 64 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == convs + norms + fc == 272_474


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_models_run_on_small_images(name: str) -> None:
    model = create_model(name, in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_cifar_resnet_depths() -> None:
    convs = {name: sum(isinstance(m, nn.Conv2d) for m in MODELS[name](3, 10).modules()) for name in ("resnet20", "resnet32", "resnet56")}
    assert convs == {"resnet20": 19 + 2, "resnet32": 31 + 2, "resnet56": 55 + 2}  # + two 1x1 projections


def test_torchvision_model_with_one_input_channel() -> None:
    model = create_model("mobilenet_v3_small", in_channels=1, num_classes=5).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1 and first.stride == (2, 2)
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 5)


def test_user_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def net(in_channels, num_classes):
            return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))
        def fixed():
            return nn.Linear(3, 2)
        def not_a_model():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("my_nets:net", in_channels=2, num_classes=3)
    assert model[0].in_channels == 2 and model[2].out_features == 3
    assert create_model("my_nets:fixed", in_channels=2, num_classes=3).out_features == 3  # head replaced
    with pytest.raises(ValueError, match="returned int, not a torch.nn.Module"):
        create_model("my_nets:not_a_model", in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="cannot load model factory 'my_nets:nope'"):
        create_model("my_nets:nope", in_channels=1, num_classes=2)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError) as info:
        create_model("resnet7", in_channels=3, num_classes=10)
    message = str(info.value)
    assert "'resnet7'" in message and "resnet18, resnet20, resnet32, resnet56, se_resnet20" in message
    assert "torchvision" in message and "pkg.module:factory" in message and "\n" not in message


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return create_model("resnet20", in_channels=1, num_classes=10), create_model("resnet20", in_channels=1, num_classes=10)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module."])
def test_checkpoint_round_trip(tmp_path: Path, wrap: str) -> None:
    source, target = _pair()
    state = source.state_dict()
    obj = {
        "plain": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
        "module.": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "ckpt.pt")
    load_checkpoint(target, tmp_path / "ckpt.pt")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())


def test_checkpoint_shape_mismatch_names_layer(tmp_path: Path) -> None:
    torch.save(create_model("resnet20", in_channels=1, num_classes=10).state_dict(), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"fc\.weight: checkpoint \[10, 64\] vs model \[100, 64\]"):
        load_checkpoint(create_model("resnet20", in_channels=1, num_classes=100), tmp_path / "c.pt")


def test_checkpoint_missing_and_unexpected_keys(tmp_path: Path) -> None:
    source, target = _pair()
    state = source.state_dict()
    state["extra.weight"] = state.pop("conv1.weight")
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"missing keys conv1\.weight; unexpected keys extra\.weight"):
        load_checkpoint(target, tmp_path / "c.pt")


def test_checkpoint_lists_at_most_five_keys(tmp_path: Path) -> None:
    torch.save({f"w{i}": torch.zeros(1) for i in range(8)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"unexpected keys w0, w1, w2, w3, w4 \(\+3 more\)"):
        load_checkpoint(nn.Linear(2, 2), tmp_path / "c.pt")


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"^cannot read checkpoint {tmp_path / 'bad.pt'}: \w+"):
        load_checkpoint(nn.Linear(2, 2), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="cannot read checkpoint .*missing.pt"):
        load_checkpoint(nn.Linear(2, 2), tmp_path / "missing.pt")


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")  # weights_only=True will not unpickle a Module
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(nn.Linear(2, 2), tmp_path / "whole.pt")


def test_factories_of_any_signature_get_the_input_channels_and_classes() -> None:
    # torchvision's factories take (*, weights, progress, **kwargs): in_channels would be a TypeError there.
    model = create_model("torchvision.models:resnet18", in_channels=1, num_classes=7).eval()
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


def test_a_failing_factory_is_one_line_with_its_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_nets.py").write_text("def net(num_classes):\n    raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"model factory 'broken_nets:net' failed: RuntimeError: no GPU here"):
        create_model("broken_nets:net", in_channels=1, num_classes=2)


def test_se_resnet_and_mobilenet_v2_factorize_their_pointwise_and_linear_layers() -> None:
    from spaces import build_space

    se = create_model("se_resnet20", in_channels=1, num_classes=10).eval()
    space = build_space(se, (1, 28, 28))
    gates = [name for name in space.choices() if ".se.fc" in name]
    assert len(gates) == 2 * 9  # both linear layers of the gate in each of the 9 blocks are searchable
    plan = {name: space.layers[name].candidates[1].spec for name in gates}
    with torch.no_grad():
        assert gkpd.kroneckerize(se, plan)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)

    mobile = create_model("mobilenet_v2", in_channels=1, num_classes=10).eval()
    space = build_space(mobile, (1, 28, 28))
    modules = dict(mobile.named_modules())
    depthwise = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    pointwise = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1)]
    assert len(depthwise) == 17 and len(pointwise) == 34
    assert all("groups=" in space.dense_only[n] for n in depthwise)  # depthwise convs stay dense
    assert set(pointwise) <= set(space.choices())  # every pointwise conv can be factorized


def test_mobilenet_v2_cifar_keeps_an_8x_smaller_map_than_torchvisions() -> None:
    maps = {}
    for name in ("mobilenet_v2", "mobilenet_v2_cifar"):
        model = create_model(name, in_channels=3, num_classes=10).eval()
        with torch.no_grad():
            maps[name] = model.features(torch.zeros(1, 3, 32, 32)).shape[-2:]
        assert gkpd.count_params(model) == 2_236_682  # the same layers: only strides differ
    assert maps == {"mobilenet_v2": (1, 1), "mobilenet_v2_cifar": (4, 4)}  # total stride 32 vs 8
    assert gkpd.count_mflops(create_model("mobilenet_v2_cifar", in_channels=1, num_classes=10), (1, 28, 28)) == \
        pytest.approx(75.533376, abs=1e-9)


@pytest.mark.parametrize(("study", "model", "budget", "dense"), [
    ("cifar10-resnet32", "resnet32", 0.1, 466_906),
    ("cifar10-mobilenet-v2", "mobilenet_v2_cifar", 0.56, 2_236_682),
    ("cifar10-se-resnet20", "se_resnet20", 0.07, 280_958),
])
def test_the_papers_three_families_have_a_cifar10_study(study: str, model: str, budget: float, dense: int) -> None:
    from search.cli import config_from_args, parse_args

    config = config_from_args(parse_args(["--study-file", str(Path(__file__).parents[2] / "studies" / f"{study}.toml")]))
    assert (config.model, config.dataset, config.budget_mparams, config.budget_mflops) == (model, "cifar10", budget, None)
    assert gkpd.count_params(create_model(model, in_channels=3, num_classes=10)) == dense  # 4x to 4.7x fewer
    assert 3.99 <= dense / 1e6 / budget <= 4.7
