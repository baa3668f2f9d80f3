"""The pretrained network every trial compresses: the user's checkpoint, or one trained once and cached."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import filelock
import torch
import torch.nn as nn

from search.config import SearchConfig
from search.data import DataSplits
from search.files import atomic_save
from search.models import create_model, load_checkpoint
from search.progress import log
from search.train import resolve_precision, train_teacher

__all__ = ["default_cache_dir", "teacher_cache_path", "find_teacher", "load_teacher", "teacher_digest", "get_teacher"]

# Chosen on validation (python bench/teacher.py: ResNet-18, Fashion-MNIST, 600 steps of 32, no augmentation, the
# whole 5,000-image validation split): lr 0.025 / 0.05 / 0.1 gave 88.90% / 88.94% / 88.16% val.
TEACHER_LR = 0.05


def default_cache_dir() -> Path:
    """Where trained teachers are kept: ``$GKPD_CACHE`` or ``~/.cache/gkpd-search``."""
    return Path(os.environ.get("GKPD_CACHE", Path.home() / ".cache" / "gkpd-search"))


def teacher_precision(config: SearchConfig) -> str:
    """The precision a new teacher trains in: ``--precision`` resolved for ``--device`` (fp32 or bf16)."""
    from search.run import resolve_device  # search.run imports this module

    return resolve_precision(config.precision, resolve_device(config.device))


def teacher_cache_path(config: SearchConfig) -> Path:
    """One file per (model, dataset and its files, training recipe): a changed recipe or another image folder
    never reuses a stale teacher. ``config.val_images`` must be resolved (``search.run.Prepared`` does it)."""
    recipe = {
        "model": config.model, "dataset": config.dataset, "steps": config.teacher_steps,
        "batch_size": config.batch_size, "lr": TEACHER_LR, "seed": config.seed,
        "max_train_images": config.max_train_images, "val_images": config.val_images,
    }
    # Only when set: the teachers cached for the built-in datasets keep their keys.
    precision = teacher_precision(config)
    recipe.update({key: value for key, value in (("weights", config.weights), ("image_size", config.image_size),
                                                 ("data_fingerprint", config.data_fingerprint),
                                                 ("precision", precision if precision != "fp32" else None)) if value})
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{config.model}-{config.dataset}".replace(":", "-").replace("/", "-")
    return (config.cache_dir or default_cache_dir() / "teachers") / f"{name}-{digest}.pt"


def find_teacher(config: SearchConfig) -> Path | None:
    """The teacher's weights if they exist without training: ``--teacher``, or the cached file of this recipe."""
    if config.teacher is not None:
        return config.teacher
    path = teacher_cache_path(config)
    return path if path.is_file() else None


def load_teacher(config: SearchConfig, path: Path, *, in_channels: int, num_classes: int) -> nn.Module:
    """``--model`` with the weights in ``path``, on the CPU, in eval mode."""
    model = create_model(config.model, in_channels=in_channels, num_classes=num_classes)
    load_checkpoint(model, path)
    return model.eval()


def teacher_digest(model: nn.Module) -> str:
    """sha256 of the weights and buffers (names, dtypes, shapes, values): which teacher a study compresses."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def get_teacher(config: SearchConfig, data: DataSplits, device: torch.device) -> tuple[nn.Module, str]:
    """The teacher in eval mode, and where it came from. Trains and caches one when ``--teacher`` is absent
    (from torchvision's pretrained ``--weights`` when given)."""
    model = create_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes,
                         weights=None if config.teacher is not None else config.weights)
    if config.teacher is not None:
        load_checkpoint(model, config.teacher)
        return model.to(device).eval(), str(config.teacher)
    path = teacher_cache_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Workers sharing the cache wait here while the first one trains; the rest load its file.
    with filelock.FileLock(str(path) + ".lock"):
        if path.exists():
            load_checkpoint(model, path)
            log(f"teacher: loaded cached {path}")
            return model.to(device).eval(), str(path)
        start_from = f" from {config.weights} weights" if config.weights else ""
        precision = teacher_precision(config)
        log(f"teacher: training {config.model}{start_from} on {config.dataset} for {config.teacher_steps} steps "
            f"(batch {config.batch_size}, {precision}); cached at {path} for later runs")
        start = time.perf_counter()
        model = model.to(device)

        def progress(step: int, total: int, loss: float) -> None:
            if step == total or step % max(1, total // 10) == 0:
                elapsed = time.perf_counter() - start
                eta = elapsed / step * (total - step)
                log(f"  teacher step {step}/{total}  loss {loss:.3f}  {elapsed:.0f}s elapsed, ETA {eta:.0f}s")

        train_teacher(model, data, steps=config.teacher_steps, batch_size=config.batch_size, lr=TEACHER_LR,
                      device=device, seed=config.seed, progress=progress, precision=precision)
        model.eval()
        atomic_save(model.state_dict(), path)
        log(f"teacher: trained in {time.perf_counter() - start:.0f}s")  # its accuracy: the run's teacher line
        return model, str(path)
