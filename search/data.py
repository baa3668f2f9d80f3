"""Datasets, preloaded once as normalized float32 tensors so the input pipeline is never the bottleneck."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from search.files import atomic_write

__all__ = ["DATASETS", "DatasetInfo", "DataSplits", "load_data", "split_indices", "default_data_dir",
           "default_val_images", "dataset_fingerprint", "IMAGE_SIZE"]

IMAGE_SIZE = 64  # imagefolder's default --image-size
MAX_VAL_IMAGES = 5000


@dataclass(frozen=True)
class DatasetInfo:
    """What we need to know about a dataset: its torchvision class, shape, statistics and augmentation."""

    torchvision_class: str  # attribute of torchvision.datasets
    num_classes: int | None  # None: from the folder tree
    input_shape: tuple[int, int, int] | None  # (C, H, W); None: (3, image_size, image_size)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # a mirrored image is still the same class
    crop_pad: int  # random-crop padding, in pixels, for training augmentation


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("FashionMNIST", 10, (1, 28, 28), (0.2860,), (0.3530,), hflip=True, crop_pad=2),
    "mnist": DatasetInfo("MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,), hflip=False, crop_pad=2),
    "cifar10": DatasetInfo(
        "CIFAR10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), hflip=True, crop_pad=4
    ),
    "cifar100": DatasetInfo(
        "CIFAR100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), hflip=True, crop_pad=4
    ),
    "imagefolder": DatasetInfo(
        "ImageFolder", None, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), hflip=True, crop_pad=8
    ),
}

# Debian's `dataset-fashion-mnist` ships the real idx .gz files here; a module constant so tests can move it.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Train / validation (held out from train) / test tensors: x [N, C, H, W] float32, y [N] int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    val_images: int  # held out from train (val_x holds at most max_eval_images of them)


def default_data_dir() -> Path:
    """$GKPD_DATA_DIR, else ~/.cache/gkpd-search/data."""
    env = os.environ.get("GKPD_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gkpd-search" / "data"


def default_val_images(train_images: int) -> int:
    """Validation images held out of ``train_images`` when ``--val-images`` is not given: 10%, at most 5,000."""
    return max(1, min(MAX_VAL_IMAGES, train_images // 10))


def _check_val_images(val_images: int, train_images: int, where: Path | str) -> None:
    if not 1 <= val_images < train_images:
        raise ValueError(f"--val-images {val_images} is out of range for the {train_images} training images in "
                         f"{where}: allowed 1 to {train_images - 1} (default 10%, at most {MAX_VAL_IMAGES})")


def split_indices(n: int, *, val_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, val) indices into n training images, from one seeded permutation."""
    if not 0 <= val_images < n:
        raise ValueError(f"val_images must be in [0, {n}) for {n} training images, got {val_images}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_images:], perm[:val_images]


def _gunzip(src: Path, dst: Path) -> None:
    with gzip.open(src, "rb") as inp, open(dst, "wb") as out:
        shutil.copyfileobj(inp, out, length=1 << 20)


def _install_debian_fashion_mnist(raw: Path) -> bool:
    """Decompress Debian's Fashion-MNIST .gz files into `raw`; False when the package is absent."""
    sources = [DEBIAN_FASHION_MNIST / f"{name}.gz" for name in _MNIST_FILES]
    if not all(src.is_file() for src in sources):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for src, name in zip(sources, _MNIST_FILES):
        if (raw / name).is_file():
            continue
        # Written to a temporary file and renamed: an interrupted run never leaves a truncated file behind.
        atomic_write(raw / name, lambda tmp, src=src: _gunzip(src, Path(tmp)))
    return True


def _missing(name: str, path: Path, exc: BaseException | None) -> FileNotFoundError:
    """One line: what is missing, where we looked, why, and how to get it."""
    hint = "pass --data-dir pointing at a directory that holds it"
    if name == "fashion-mnist":
        hint = f"run `apt-get install dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST}) or {hint}"
    elif name == "imagefolder":
        hint = "pass --data-dir holding train/<class>/*.jpg and val/<class>/*.jpg"
    else:
        hint = f"allow the download or {hint}"
    text = " ".join(str(exc).split()) if exc is not None else ""  # torchvision's messages span lines
    reason = f" ({text[:200]})" if text else ""
    return FileNotFoundError(f"{name} not found under {path}{reason}: {hint}")


def _as_uint8_nchw(data: torch.Tensor | np.ndarray) -> torch.Tensor:
    """torchvision's raw arrays ([N, H, W] or [N, H, W, C], uint8) as [N, C, H, W] uint8."""
    x = torch.as_tensor(data)
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)


def _load_torchvision(name: str, root: Path, *, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official (train_x, train_y, test_x, test_y) as uint8 [N, C, H, W] and int64 [N]."""
    cls = getattr(torchvision.datasets, DATASETS[name].torchvision_class)
    where = root / getattr(cls, "base_folder", cls.__name__)  # CIFAR: cifar-10-batches-py; MNIST: MNIST/raw
    raw = root / cls.__name__ / "raw"  # torchvision's layout: <root>/FashionMNIST/raw/*-ubyte
    if name == "fashion-mnist" and not all((raw / f).is_file() for f in _MNIST_FILES):
        try:  # the local Debian package beats the network
            _install_debian_fashion_mnist(raw)
        except OSError as exc:
            raise _missing(name, where, exc) from exc
    try:
        # `.data` / `.targets` are the whole split as arrays: no per-item __getitem__, seconds not minutes.
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError, ValueError) as exc:  # torchvision: "Dataset not found", URLError, bad md5
        raise _missing(name, where, exc) from exc
    except (AssertionError, IndexError, EOFError) as exc:  # torchvision's idx reader asserts on a bad header
        detail = " ".join(str(exc).split())[:100] or "not the idx format torchvision reads"
        raise ValueError(f"{name} files under {where} are damaged ({detail}); delete them and run again") from exc
    y = [torch.as_tensor(ds.targets, dtype=torch.int64) for ds in (train, test)]
    return _as_uint8_nchw(train.data), y[0], _as_uint8_nchw(test.data), y[1]


def _image_folder(root: Path, split: str) -> torchvision.datasets.ImageFolder:
    """The ImageFolder tree root/split with at least two classes and an image in each, or a one-line error."""
    try:
        # allow_empty: an empty class is named by our message, not torchvision's list of extensions.
        ds = torchvision.datasets.ImageFolder(str(root / split), allow_empty=True)
    except (FileNotFoundError, NotADirectoryError) as exc:  # missing tree, or no class folders in it
        raise _missing("imagefolder", root / split, exc) from exc
    if len(ds.classes) < 2:
        raise ValueError(f"imagefolder {root / split} has {len(ds.classes)} class folder"
                         f"{'' if len(ds.classes) == 1 else 's'} ({', '.join(ds.classes) or 'none'}); "
                         "a classifier needs at least 2")
    counts = torch.bincount(torch.tensor(ds.targets, dtype=torch.int64), minlength=len(ds.classes))
    empty = [name for name, count in zip(ds.classes, counts.tolist()) if count == 0]
    if empty:
        raise ValueError(f"imagefolder {root / split}: class folder{'s' if len(empty) > 1 else ''} "
                         f"{', '.join(empty)} hold{'' if len(empty) > 1 else 's'} no images")
    return ds


def _same_classes(root: Path, train: list[str], val: list[str]) -> None:
    """``ValueError`` naming the difference: labels are class indices in sorted order, so one missing class
    would silently shift every label after it."""
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    if only_train or only_val:
        parts = [f"only in train/: {', '.join(only_train)}" if only_train else "",
                 f"only in val/: {', '.join(only_val)}" if only_val else ""]
        raise ValueError(f"imagefolder {root}: train/ and val/ must have the same class folders; "
                         + "; ".join(part for part in parts if part))


def dataset_fingerprint(name: str, data_dir: str | Path | None) -> str:
    """What identifies the data beyond its name: for "imagefolder", sha256 (12 hex digits) of the sorted relative
    paths and sizes of every file under ``data_dir/train`` and ``data_dir/val`` (a stat per file, no reads);
    "" for the torchvision datasets, which are the same official files wherever they lie."""
    if name != "imagefolder":
        return ""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    digest = hashlib.sha256()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise _missing("imagefolder", root / split, None)
        for folder, dirs, files in os.walk(root / split, followlinks=True):
            dirs.sort()
            for file in sorted(files):
                path = Path(folder, file)
                digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:12]


def _decode(ds: torchvision.datasets.ImageFolder, indices: torch.Tensor, *, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `indices` of `ds`, resized and center-cropped to image_size: uint8 [N, 3, S, S], int64 [N]."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), v2.PILToTensor()])
    x = torch.empty(len(indices), 3, image_size, image_size, dtype=torch.uint8)
    y = torch.empty(len(indices), dtype=torch.int64)
    for row, i in enumerate(indices.tolist()):
        path, label = ds.samples[i]
        x[row] = transform(ds.loader(path).convert("RGB"))
        y[row] = label
    return x, y


def _normalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32, scaled to [0, 1] then standardized per channel."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return ((x.float() / 255.0) - mean) / std


def load_data(
    name: str,
    *,
    data_dir: str | Path | None,
    val_images: int | None = None,
    seed: int = 0,
    max_train_images: int | None = None,
    max_eval_images: int | None = None,
    download: bool = True,
    image_size: int | None = None,
) -> DataSplits:
    """Load a dataset as tensors; val is held out from train by a seeded permutation, test is the official one.

    `val_images` (default `default_val_images`) are held out of the training images; `max_train_images` caps
    train; `max_eval_images` caps val and test (first N after a fixed shuffle). `image_size` (default 64) only
    applies to "imagefolder" (`data_dir/train`, `data_dir/val`, the same class folders), which is resized to
    image_size and center-cropped so that it can be preloaded.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    for option, value in (("max_train_images", max_train_images), ("max_eval_images", max_eval_images)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if image_size is not None and name != "imagefolder":
        raise ValueError(f"--image-size applies to --dataset imagefolder only; {name} images are "
                         f"{'x'.join(map(str, DATASETS[name].input_shape[1:]))} px as they are")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be at least 1, got {image_size}")
    info = DATASETS[name]
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    gen = torch.Generator().manual_seed(seed)

    if name == "imagefolder":
        # Decode only the images we keep: a full ImageNet tree would not fit in memory as floats.
        train_ds, test_ds = _image_folder(root, "train"), _image_folder(root, "val")
        _same_classes(root, train_ds.classes, test_ds.classes)
        image_size = image_size or IMAGE_SIZE
        val_images = default_val_images(len(train_ds)) if val_images is None else val_images
        _check_val_images(val_images, len(train_ds), root / "train")
        train_idx, val_idx = split_indices(len(train_ds), val_images=val_images, seed=seed)
        test_idx = torch.randperm(len(test_ds), generator=gen)[:max_eval_images]
        train_x, train_y = _decode(train_ds, train_idx[:max_train_images], image_size=image_size)
        val_x, val_y = _decode(train_ds, val_idx[:max_eval_images], image_size=image_size)
        test_x, test_y = _decode(test_ds, test_idx, image_size=image_size)
        num_classes, input_shape = len(train_ds.classes), (3, image_size, image_size)
    else:
        all_x, all_y, test_x, test_y = _load_torchvision(name, root, download=download)
        val_images = default_val_images(len(all_x)) if val_images is None else val_images
        _check_val_images(val_images, len(all_x), f"{name}'s training split")
        train_idx, val_idx = split_indices(len(all_x), val_images=val_images, seed=seed)
        train_idx, val_idx = train_idx[:max_train_images], val_idx[:max_eval_images]
        train_x, train_y, val_x, val_y = all_x[train_idx], all_y[train_idx], all_x[val_idx], all_y[val_idx]
        if max_eval_images is not None and max_eval_images < len(test_x):
            keep = torch.randperm(len(test_x), generator=gen)[:max_eval_images]
            test_x, test_y = test_x[keep], test_y[keep]
        assert info.num_classes is not None and info.input_shape is not None
        num_classes, input_shape = info.num_classes, info.input_shape

    return DataSplits(
        train_x=_normalize(train_x, info), train_y=train_y,
        val_x=_normalize(val_x, info), val_y=val_y,
        test_x=_normalize(test_x, info), test_y=test_y,
        num_classes=num_classes, input_shape=input_shape, name=name, val_images=val_images,
    )
