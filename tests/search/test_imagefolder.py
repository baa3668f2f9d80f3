"""Your model on your images: a generated ImageFolder (3 classes of 32 px PNGs), every route into a search, and
one whole search of torchvision's MobileNetV2 to its export, read back through optuna-dashboard."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from search.cli import main
from search.config import SearchConfig
from search.data import dataset_fingerprint, load_data
from search.models import check_input_shape, create_model
from search.study import plan_key, trial_plan
from search.teacher import load_teacher, teacher_cache_path, teacher_digest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 80, 20
# Small enough for two busy cores: 1 trial of 2 fine-tune steps, 32 evaluation images.
TINY = ["--dataset", "imagefolder", "--image-size", "32", "--trials", "1", "--long-finetunes", "0",
        "--finetune-steps", "2", "--teacher-steps", "5", "--batch-size", "16", "--max-eval-images", "32"]


def _write_folder(root: Path, *, classes: int = CLASSES, train: int = TRAIN_PER_CLASS, val: int = VAL_PER_CLASS) -> Path:
    """root/{train,val}/class<c>/<i>.png: 32x32 noise with channel c (red, green, blue) raised by 150."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                pixels[:, :, c % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("pets") / "pets")


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """``search.py argv``'s one line on stderr; asserts exit status 2."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1, lines
    return lines[0]


SEARCHED = ("features.17.", "features.18.", "classifier.")  # the rest is --skip: seconds, not minutes, per stage


@pytest.fixture(scope="module")
def mobilenet_run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One whole search of torchvision's mobilenet_v2 on the folder, its last two blocks and classifier searched:
    its run directory."""
    out, cache = tmp_path_factory.mktemp("run") / "run", tmp_path_factory.mktemp("cache")
    modules = create_model("mobilenet_v2", in_channels=3, num_classes=CLASSES).named_modules()
    skip = [name for name, m in modules if (isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1)
            and not name.startswith(SEARCHED)]
    env = {**os.environ, "GKPD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "search.py"), "--model", "mobilenet_v2", *TINY,
                           "--max-train-images", "64", "--data-dir", str(folder), "--budget-mparams", "1.8",
                           "--out", str(out), "--skip", *skip],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_folder_loads_with_a_tenth_held_out_and_labels_in_class_order(folder: Path) -> None:
    data = load_data("imagefolder", data_dir=folder, image_size=32)
    assert data.val_images == CLASSES * TRAIN_PER_CLASS // 10 == 24
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (240 - 24, 24, CLASSES * VAL_PER_CLASS)
    assert (data.num_classes, data.input_shape) == (3, (3, 32, 32))
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        brightest = x.mean((2, 3)).argmax(1)  # class c's images have channel c raised
        assert torch.equal(brightest, y)
    assert len(load_data("imagefolder", data_dir=folder, image_size=16, val_images=100).val_x) == 100


@pytest.mark.parametrize(("flag", "says"), [
    (["--val-images", "240"], "--val-images 240 is out of range for the 240 training images in "),
    (["--val-images", "0"], "--val-images must be at least 1, got 0"),
    (["--weights", "IMAGENET9K"], "unknown --weights 'IMAGENET9K' for mobilenet_v2; allowed: DEFAULT, IMAGENET1K_V1, "
                                  "IMAGENET1K_V2"),
    (["--model", "vit_b_16"], "--model vit_b_16 cannot take 3x32x32 inputs (AssertionError: Wrong image height!"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(folder: Path, tmp_path: Path, capsys, flag, says) -> None:
    argv = ["--model", "mobilenet_v2", *TINY, "--data-dir", str(folder), "--budget-mparams", "1",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *flag]
    assert says in _error(argv, capsys)
    assert sorted(tmp_path.iterdir()) == []


def test_image_size_is_for_image_folders_only(capsys) -> None:
    says = _error(["--dataset", "fashion-mnist", "--image-size", "32", "--budget-mflops", "1"], capsys)
    assert says == "search.py: error: --image-size applies to --dataset imagefolder only, not fashion-mnist"


def test_val_and_train_must_have_the_same_classes(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "val" / "class2")
    with pytest.raises(ValueError, match=r"train/ and val/ must have the same class folders; only in train/: class2$"):
        load_data("imagefolder", data_dir=copy)
    shutil.copytree(folder / "val" / "class2", copy / "val" / "zebra")
    with pytest.raises(ValueError, match=r"only in train/: class2; only in val/: zebra$"):
        load_data("imagefolder", data_dir=copy)


def test_one_class_or_an_empty_class_is_refused(tmp_path: Path) -> None:
    one = _write_folder(tmp_path / "one", classes=1, train=3, val=1)
    with pytest.raises(ValueError, match=r"one/train has 1 class folder \(class0\); a classifier needs at least 2"):
        load_data("imagefolder", data_dir=one)
    two = _write_folder(tmp_path / "two", classes=2, train=3, val=1)
    for png in (two / "train" / "class1").iterdir():
        png.unlink()
    with pytest.raises(ValueError, match=r"two/train: class folder class1 holds no images$"):
        load_data("imagefolder", data_dir=two)


def test_the_fingerprint_tells_folders_apart_in_the_study_name_identity_and_teacher_cache(folder: Path,
                                                                                          tmp_path: Path) -> None:
    moved = tmp_path / "pets"
    shutil.copytree(folder, moved)
    assert dataset_fingerprint("imagefolder", moved) == dataset_fingerprint("imagefolder", folder)  # content only
    assert dataset_fingerprint("cifar10", folder) == ""  # the official files, wherever they lie
    Image.new("RGB", (32, 32)).save(moved / "train" / "class0" / "extra.png")
    configs = [SearchConfig(budget_mparams=1, model="mobilenet_v2", dataset="imagefolder", data_dir=d)
               for d in (folder, moved)]
    prints = [c.data_fingerprint for c in configs]
    assert prints[0] != prints[1] and all(len(p) == 12 for p in prints)
    assert [c.study_name for c in configs] == [f"mobilenet_v2-imagefolder-pets-{p[:8]}-1mparams" for p in prints]
    assert [c.identity()["data_fingerprint"] for c in configs] == prints
    resolved = [SearchConfig(**{**c.__dict__, "val_images": 24}) for c in configs]
    assert teacher_cache_path(resolved[0]) != teacher_cache_path(resolved[1])
    assert configs[0].identity()["image_size"] == 64  # the default, recorded


def test_factories_of_odd_signatures_fit_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "odd_nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def tiny(width=8, *, head_bias=False):
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, 1000, bias=head_bias))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("odd_nets:tiny", in_channels=1, num_classes=3)
    assert (model[0].in_channels, model[0].out_channels, model[4].out_features, model[4].bias) == (1, 8, 3, None)
    check_input_shape(model, "odd_nets:tiny", (1, 32, 32), 3)
    tv = create_model("mobilenet_v2", in_channels=3, num_classes=3)
    check_input_shape(tv, "mobilenet_v2", (3, 32, 32), 3)
    with pytest.raises(ValueError, match=r"maps 2 images of 3x32x32 to \[2, 3\], not \[2, 5\] logits"):
        check_input_shape(tv, "mobilenet_v2", (3, 32, 32), 5)


def test_pretrained_weights_initialize_all_but_the_new_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's weights, without the download: the grey-image stem sums the RGB kernel (timm's rule)."""
    torch.manual_seed(0)
    reference = create_model("mobilenet_v2", in_channels=3, num_classes=1000).state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: reference)
    model = create_model("mobilenet_v2", in_channels=1, num_classes=3, weights="IMAGENET1K_V2")
    state = model.state_dict()
    assert torch.equal(state["features.0.0.weight"], reference["features.0.0.weight"].sum(1, keepdim=True))
    assert torch.equal(state["features.18.0.weight"], reference["features.18.0.weight"])
    assert state["classifier.1.weight"].shape == (3, 1280)
    with pytest.raises(ValueError, match="'resnet20' is one of ours and has no pretrained weights"):
        create_model("resnet20", in_channels=1, num_classes=3, weights="DEFAULT")


def test_the_search_exports_mobilenet_v2_with_pointwise_layers_factorized(mobilenet_run) -> None:
    out = mobilenet_run
    export = json.loads((out / "best" / "export.json").read_text())
    assert export["files"] == ["plan.json", "model.pt", "model.onnx"] and export["mparams"] <= 1.8
    plan = json.loads((out / "best" / "plan.json").read_text())["layers"]
    modules = dict(create_model("mobilenet_v2", in_channels=3, num_classes=3).named_modules())
    assert plan and all(name.startswith(SEARCHED) for name in plan)
    # The pointwise convs are factorized; features.17.conv.1.0, the depthwise conv, stays dense.
    assert {name for name in plan if isinstance(modules[name], nn.Conv2d)} <= {
        "features.17.conv.0.0", "features.17.conv.2", "features.18.0"}
    assert any(isinstance(modules[name], nn.Conv2d) for name in plan)


def test_teacher_checkpoints_load_as_a_state_dict_or_under_state_dict_or_model(mobilenet_run, folder: Path,
                                                                               tmp_path: Path, capsys) -> None:
    out = mobilenet_run
    run = optuna.load_study(study_name=json.loads((out / "run.json").read_text())["study_name"],
                            storage=f"sqlite:///{out / 'study.db'}").user_attrs["run"]
    state = torch.load(run["teacher_source"], weights_only=True)
    config = SearchConfig(budget_mparams=1.8, model="mobilenet_v2", dataset="imagefolder", data_dir=folder)
    wanted = teacher_digest(load_teacher(config, Path(run["teacher_source"]), in_channels=3, num_classes=3))
    for form in ({"state_dict": state, "epoch": 5}, {"model": state}):
        torch.save(form, tmp_path / "ckpt.pt")
        assert teacher_digest(load_teacher(config, tmp_path / "ckpt.pt", in_channels=3, num_classes=3)) == wanted
    del state["features.0.0.weight"]
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    says = _error(["--model", "mobilenet_v2", *TINY, "--data-dir", str(folder), "--budget-mparams", "1.8",
                   "--teacher", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "out")], capsys)
    assert says.endswith("does not match the model: missing keys features.0.0.weight")
    assert not (tmp_path / "out").exists()


def _get(app, path: str) -> dict:
    """GET ``path`` from a WSGI app in this process: the JSON it answers."""
    answer: dict = {}
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr}
    body = b"".join(app(environ, lambda status, headers, exc_info=None: answer.update(status=status)))
    assert answer["status"].startswith("200"), (path, answer, body[:300])
    return json.loads(body)


def test_optuna_dashboard_shows_each_trials_seed_plan_accuracies_and_cost(mobilenet_run) -> None:
    optuna_dashboard = pytest.importorskip("optuna_dashboard", reason="pip install 'gkpd-search[dashboard]'")
    out = mobilenet_run
    app = optuna_dashboard.wsgi(f"sqlite:///{out / 'study.db'}")  # what `optuna-dashboard URL` serves
    app.catchall = False
    [summary] = _get(app, "/api/studies")["study_summaries"]
    trials = _get(app, f"/api/studies/{summary['study_id']}")["trials"]
    shown = {attr["key"]: attr["value"] for attr in trials[0]["user_attrs"]}
    trial = optuna.load_study(study_name=summary["study_name"], storage=f"sqlite:///{out / 'study.db'}").trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert shown["seed"] == "allocate@1" and shown["random_seed"] == "0"
    assert shown["plan_key"] == plan_key(trial_plan(trial))
    for key in ("val_accuracy", "test_accuracy", "mflops", "mparams"):
        assert float(shown[key]) == pytest.approx(trial.user_attrs[key], rel=1e-6)
    assert trial.user_attrs["val_accuracy"] == trial.values[0]
    assert shown["stop_reason"] == "completed 2 fine-tune steps"
