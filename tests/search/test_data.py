"""search.data: splits, the Debian Fashion-MNIST fallback, ImageFolder, and the errors a user sees."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

import search.data as data
from search.data import DATASETS, default_data_dir, load_data, split_indices

HAS_DEBIAN_FMNIST = all((data.DEBIAN_FASHION_MNIST / f"{n}.gz").is_file() for n in data._MNIST_FILES)
needs_fmnist = pytest.mark.skipif(not HAS_DEBIAN_FMNIST, reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir filled once from the Debian package."""
    return tmp_path_factory.mktemp("fmnist")


def test_split_indices_are_disjoint_cover_all_and_repeat_by_seed() -> None:
    train, val = split_indices(100, val_images=30, seed=7)
    assert (len(train), len(val)) == (70, 30)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    again_train, again_val = split_indices(100, val_images=30, seed=7)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, split_indices(100, val_images=30, seed=8)[1])


def test_split_indices_rejects_val_larger_than_train() -> None:
    with pytest.raises(ValueError, match=r"val_images must be in \[0, 10\)"):
        split_indices(10, val_images=10, seed=0)


def test_unknown_dataset_names_it_and_lists_known() -> None:
    with pytest.raises(KeyError, match="'svhn'.*fashion-mnist.*cifar10"):
        load_data("svhn", data_dir=None)


def test_default_data_dir_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GKPD_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("GKPD_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "gkpd-search" / "data"


def test_missing_fashion_mnist_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(FileNotFoundError) as info:
        load_data("fashion-mnist", data_dir=tmp_path / "empty", download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "empty" / "FashionMNIST") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_missing_mnist_suggests_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"mnist not found under .*MNIST.*allow the download"):
        load_data("mnist", data_dir=tmp_path, download=False)


def test_interrupted_decompression_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    debian = tmp_path / "debian"
    debian.mkdir()
    for name in data._MNIST_FILES:
        with gzip.open(debian / f"{name}.gz", "wb") as f:
            f.write(b"\0" * 1000)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)

    def crash(src: object, dst: object, length: int = 0) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfileobj", crash)
    raw = tmp_path / "out" / "FashionMNIST" / "raw"
    with pytest.raises(KeyboardInterrupt):
        data._install_debian_fashion_mnist(raw)
    assert list(raw.iterdir()) == []


@needs_fmnist
def test_fashion_mnist_from_debian_full_splits(fmnist_dir: Path) -> None:
    splits = load_data("fashion-mnist", data_dir=fmnist_dir, download=False, val_images=5000, seed=0)
    raw = fmnist_dir / "FashionMNIST" / "raw"
    # idx header (16 bytes) + 28*28 bytes per image: the files were decompressed, not copied.
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 784
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 8 + 10000
    assert (splits.train_x.shape, splits.val_x.shape, splits.test_x.shape) == (
        (55000, 1, 28, 28), (5000, 1, 28, 28), (10000, 1, 28, 28)
    )
    assert splits.train_x.dtype == torch.float32 and splits.train_y.dtype == torch.int64
    assert (splits.num_classes, splits.input_shape, splits.name) == (10, (1, 28, 28), "fashion-mnist")
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert torch.cat([splits.train_y, splits.val_y]).bincount().tolist() == [6000] * 10
    assert splits.test_y.bincount().tolist() == [1000] * 10
    # The mean/std constants are the training set's own statistics.
    all_train = torch.cat([splits.train_x, splits.val_x])
    assert abs(all_train.mean().item()) < 1e-3 and abs(all_train.std().item() - 1) < 1e-3


@needs_fmnist
def test_fashion_mnist_caps_and_seed(fmnist_dir: Path) -> None:
    kwargs = dict(data_dir=fmnist_dir, download=False, val_images=1000, max_train_images=300, max_eval_images=200)
    a = load_data("fashion-mnist", seed=1, **kwargs)
    b = load_data("fashion-mnist", seed=1, **kwargs)
    c = load_data("fashion-mnist", seed=2, **kwargs)
    assert (len(a.train_x), len(a.val_x), len(a.test_x)) == (300, 200, 200)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y) and torch.equal(a.test_x, b.test_x)
    assert not torch.equal(a.val_x, c.val_x)


def _write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_preloads_resized_tensors(tmp_path: Path) -> None:
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for cls, color in colors.items():
        for i in range(6):
            _write_image(tmp_path / "train" / cls / f"{i}.png", color, (20, 12))
        for i in range(2):
            _write_image(tmp_path / "val" / cls / f"{i}.png", color, (9, 9))
    splits = load_data("imagefolder", data_dir=tmp_path, val_images=2, image_size=8)
    assert (splits.train_x.shape, splits.val_x.shape, splits.test_x.shape) == (
        (10, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)
    )
    assert (splits.num_classes, splits.input_shape) == (2, (3, 8, 8))
    info = DATASETS["imagefolder"]
    red = torch.tensor([(1 - info.mean[0]) / info.std[0], -info.mean[1] / info.std[1], -info.mean[2] / info.std[2]])
    for x, y in ((splits.train_x, splits.train_y), (splits.test_x, splits.test_y)):
        cats = x[y == 0]  # ImageFolder sorts classes: cat=0, dog=1
        assert torch.allclose(cats, red.view(1, 3, 1, 1).expand_as(cats), atol=1e-6)


def test_imagefolder_missing_tree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"imagefolder not found under .*train .*: pass --data-dir holding train/<class>"):
        load_data("imagefolder", data_dir=tmp_path)


def test_garbage_idx_files_are_one_clear_line_naming_the_folder(tmp_path: Path) -> None:
    """torchvision's idx reader asserts on a bad header; the user gets a ValueError naming the folder."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data._MNIST_FILES:
        (raw / name).write_bytes(b"not an idx file" * 8)
    with pytest.raises(ValueError) as err:
        load_data("fashion-mnist", data_dir=tmp_path, download=False)
    message = str(err.value)
    assert "\n" not in message and "damaged" in message and str(tmp_path / "FashionMNIST") in message
