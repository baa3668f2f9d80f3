"""Training primitives: evaluate, train a teacher, re-estimate batch-norm statistics, distill a student."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from search.config import PRECISIONS
from search.data import DATASETS, DataSplits

__all__ = ["evaluate", "train_teacher", "recalibrate_bn", "distill", "augment_batch", "TeacherLogits", "TrainState",
           "PRECISIONS", "resolve_precision", "autocast"]

Device = torch.device | str
Progress = Callable[[int, int, float], None]  # (step, steps, loss)
TrainState = dict[str, Any]  # {"step", "optimizer", "batches"}: see _fit
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y, indices)


def augment_batch(x: torch.Tensor, *, pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after reflect-padding by `pad`, plus random horizontal flip, for a whole batch [N, C, H, W]."""
    if pad == 0 and not hflip:
        return x
    n, c, h, w = x.shape
    # Offsets are drawn on the CPU generator so a seed gives the same crops on every device.
    di = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    rows = di + torch.arange(h, device=x.device)  # [N, H] rows of the padded image
    cols = dj + torch.arange(w, device=x.device)  # [N, W]
    if hflip:
        flip = (torch.rand(n, 1, generator=generator) < 0.5).to(x.device)
        cols = torch.where(flip, cols.flip(1), cols)
    # Reflect, not zeros: zero is the mean after normalization, not the image's background.
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return xp[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def _lr_at(step: int, *, steps: int, lr: float, warmup: float) -> float:
    """Linear warmup over the first `warmup` fraction of steps, then cosine decay to zero."""
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Batches:
    """Index batches; each epoch is a fresh permutation; the tail that does not fill a batch is dropped.

    Its state (with the generator's) is what an interrupted fine-tune needs to draw the same batches on resume.
    """

    def __init__(self, n: int, *, batch_size: int, generator: torch.Generator) -> None:
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}] for {n} training images, got {batch_size}")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm, self.pos = torch.randperm(n, generator=generator), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        batch = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"perm": self.perm.clone(), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        perm = state["perm"]
        assert isinstance(perm, torch.Tensor) and len(perm) == self.n, "batch state of another training set"
        self.perm, self.pos = perm.clone(), int(state["pos"])
        self.generator.set_state(state["generator"])


def _channels_last(model: nn.Module) -> None:
    """Store 4-D parameters channels_last (faster convs); Module.to(memory_format) would reject 5-D factors."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def _default_layout(model: nn.Module) -> None:
    """Undo ``_channels_last`` after training: what is timed, saved or exported next has the layout of a model
    built or loaded in this process (at batch 1 on the CPU channels_last weights ran ResNet-18 23% slower, so a
    teacher trained here and one read from the cache would otherwise time differently)."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous()


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """A 4-D image batch in channels_last layout; anything else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def resolve_precision(precision: str, device: Device) -> str:
    """"fp32" or "bf16": what ``precision`` ("auto", "fp32", "bf16") means for training on ``device``.

    "auto" is bf16 mixed precision on a CPU with AMX tiles (there oneDNN runs bf16 convolutions on the matrix
    units: on the 2-core build machine, `python bench/precision.py`, alone: a ResNet-18 training step of 32
    images 393 -> 207 ms, a 300-MFLOPs plan's 270 -> 128 ms), fp32 everywhere else (CPUs without AMX emulate or
    barely speed up bf16; GPUs were not measured here). Measured on the default run's teacher, the same plans
    fine-tuned 150 steps ended at 88.10 / 79.90 / 88.30% val in bf16 and 88.15 / 79.30 / 88.25% in fp32
    (allocate@1, uniform, allocate@0.95), and `python bench/teacher.py --lrs 0.05 --augment off --precisions
    bf16,fp32` trained teachers of 88.64 / 88.94% val, 88.54 / 88.53% test in 118 / 237 s.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "bf16" if torch.device(device).type == "cpu" and amx() else "fp32"


def autocast(precision: str, device: Device) -> contextlib.AbstractContextManager:
    """Mixed precision for a training step's forward pass: bf16 matmuls and convolutions, fp32 weights, fp32
    reductions (torch.autocast's policy), or nothing for "fp32". ``precision`` is resolved (fp32 or bf16)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16 here (see resolve_precision), got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _fit(
    model: nn.Module, data: DataSplits, loss_fn: LossFn, *, steps: int, batch_size: int, lr: float,
    weight_decay: float, warmup: float, augment: bool, device: Device, seed: int,
    progress: Progress | None, should_stop: Callable[[int, float], bool] | None,
    resume: TrainState | None = None, on_save: Callable[[TrainState], None] | None = None, save_every: int = 0,
    precision: str = "fp32",
) -> dict[str, float | int | bool]:
    """The loop shared by train_teacher and distill: SGD + Nesterov, warmup + cosine, on-the-fly augmentation.

    Every ``save_every`` steps ``on_save`` gets the loop's state (step, optimizer, batch stream); passing it
    back as ``resume``, with the model's weights of that step restored, continues exactly where it stopped.
    ``precision`` ("fp32" or "bf16", resolved): the forward pass and the loss run under ``autocast``; the
    weights, their gradients and the optimizer stay fp32.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    mixed = autocast(precision, device)  # checked before anything moves
    generator = torch.Generator().manual_seed(seed)
    info = DATASETS.get(data.name)
    pad, hflip = (info.crop_pad, info.hflip) if augment and info is not None else (0, False)
    x, y = data.train_x.to(device), data.train_y.to(device)
    model.to(device)
    _channels_last(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    batches = _Batches(len(x), batch_size=batch_size, generator=generator)
    first = 0
    if resume is not None:  # the model's weights are the caller's to restore; the rest of the loop is here
        optimizer.load_state_dict(resume["optimizer"])
        batches.load_state_dict(resume["batches"])
        first = int(resume["step"])
    losses: list[float] = []
    start, done, stopped = time.perf_counter(), first, False
    try:
        for step in range(first, steps):
            idx = batches.next()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps=steps, lr=lr, warmup=warmup)
            on_device = idx.to(device)
            xb = augment_batch(x[on_device], pad=pad, hflip=hflip, generator=generator)
            with mixed:
                loss = loss_fn(model, _nhwc(xb), y[on_device], idx)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step + 1}/{steps} (lr {lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(value)
            done = step + 1
            if on_save is not None and save_every > 0 and done % save_every == 0 and done < steps:
                on_save({"step": done, "optimizer": optimizer.state_dict(), "batches": batches.state_dict()})
            if progress is not None:
                progress(done, steps, value)
            if should_stop is not None and should_stop(done, value):
                stopped = True
                break
    finally:  # also when stopped by an error or Ctrl-C
        _default_layout(model)
    model.eval()
    seconds = time.perf_counter() - start
    tail = losses[-10:]
    return {
        "steps": done,
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),  # mean of the last 10 steps
        "stopped_early": stopped,
        "seconds": seconds,
        "images_per_s": (done - first) * batch_size / seconds if seconds > 0 else 0.0,
    }


# Images per forward pass in `evaluate`. On the 2-core build machine, alone, a batch of 512 28x28 images ran
# 40% slower per image than one of 64 (dense ResNet-18: 5.0 vs 3.5 ms an image), and a Kronecker layer's first
# forward at a new batch size times its two paths on that batch: a default-run trial's screen (1,000 images,
# path timing included) then validation and test (4,000), on a fresh allocate@1 student, took 33-35 s at 512,
# 17-20 s at 128 and 16-17 s at 64. GPUs want large batches; there it stays at 512, the batch it always had.
EVAL_BATCH_CPU = 64
EVAL_BATCH_GPU = 512


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None,
             device: Device) -> float:
    """Top-1 accuracy in [0, 1] of `model` on x [N, C, H, W], y [N], in eval mode.

    ``batch_size`` None: ``EVAL_BATCH_CPU`` on a CPU, ``EVAL_BATCH_GPU`` elsewhere.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"evaluate needs as many labels as images (> 0), got {len(x)} images and {len(y)} labels")
    if batch_size is None:
        batch_size = EVAL_BATCH_CPU if torch.device(device).type == "cpu" else EVAL_BATCH_GPU
    was_training = model.training
    model.to(device).eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = _nhwc(x[i:i + batch_size].to(device))
            correct += int((model(xb).argmax(1) == y[i:i + batch_size].to(device)).sum())
    model.train(was_training)
    return correct / len(x)


def train_teacher(
    model: nn.Module, data: DataSplits, *, steps: int, batch_size: int, lr: float, device: Device, seed: int,
    progress: Progress | None = None, label_smoothing: float = 0.1, weight_decay: float = 5e-4,
    warmup: float = 0.15, augment: bool = False, precision: str = "fp32",
) -> None:
    """Train `model` from scratch on data.train_* with cross-entropy; leaves it in eval mode.

    ``precision``: "fp32" or "bf16" (see ``resolve_precision``)."""
    # augment is off by default, chosen on validation: below about one epoch it only slows learning
    # (`python bench/teacher.py --lrs 0.05 --augment on|off`: Fashion-MNIST, resnet18, 600 steps of 32, lr 0.05,
    # 5,000 validation images: 83.90% val with crop + flip, 88.94% without).

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)

    _fit(
        model, data, loss_fn, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup=warmup, augment=augment, device=device, seed=seed, progress=progress, should_stop=None,
        precision=precision,
    )


def recalibrate_bn(model: nn.Module, x: torch.Tensor, *, batches: int, batch_size: int, device: Device) -> None:
    """Re-estimate every BatchNorm's running mean/var as the plain average over the first `batches` batches of x."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    was_training = model.training
    model.to(device).eval()  # only the norms train: dropout and the like must behave as at test time
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    try:
        with torch.no_grad():
            n = min(batches * batch_size, len(x))
            for i in range(0, n, batch_size):
                model(_nhwc(x[i:min(i + batch_size, n)].to(device)))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


class TeacherLogits:
    """The teacher's logits on the training images, computed once per image and shared by every distillation.

    A trial spends about a third of each fine-tuning step on the teacher's forward pass. Without augmentation
    the teacher's output is a function of the image alone, so trials that fine-tune on the same batches (the
    search gives every trial the same seed) pay for it once. The teacher must not change while this is used.
    """

    def __init__(self, teacher: nn.Module, train_x: torch.Tensor, *, device: Device, batch_size: int = 256) -> None:
        self.teacher, self.train_x, self.device, self.batch_size = teacher, train_x, torch.device(device), batch_size
        self.known = torch.zeros(len(train_x), dtype=torch.bool)
        self.logits: torch.Tensor | None = None  # [N, classes] on the CPU, allocated at the first call

    @property
    def cached(self) -> int:
        """How many training images have their logits stored."""
        return int(self.known.sum())

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for train_x[indices], [len(indices), classes], on the device."""
        indices = indices.cpu()
        missing = indices[~self.known[indices]].unique()
        if len(missing):
            self.teacher.to(self.device).eval()
            # not inference_mode: the stored logits feed autograd graphs later; fp32 even in a bf16 fine-tune
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                for i in range(0, len(missing), self.batch_size):
                    chunk = missing[i:i + self.batch_size]
                    out = self.teacher(_nhwc(self.train_x[chunk].to(self.device))).float().cpu()
                    if self.logits is None:
                        self.logits = torch.empty(len(self.train_x), out.shape[1])
                    self.logits[chunk] = out
                    self.known[chunk] = True
        assert self.logits is not None
        return self.logits[indices].to(self.device)


def distill(
    student: nn.Module, teacher: nn.Module, data: DataSplits, *, steps: int, batch_size: int, lr: float,
    temperature: float = 4.0, alpha: float = 0.9, device: Device, seed: int, progress: Progress | None = None,
    should_stop: Callable[[int, float], bool] | None = None, weight_decay: float = 5e-4, warmup: float = 0.05,
    augment: bool = False, teacher_logits: TeacherLogits | None = None,
    resume: TrainState | None = None, on_save: Callable[[TrainState], None] | None = None, save_every: int = 0,
    precision: str = "fp32",
) -> dict[str, float | int | bool]:
    """Fine-tune `student` with alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE (Hinton et al. 2015).

    `teacher_logits` (for this teacher and data.train_x) replaces the teacher's forward pass by cached logits
    (computed in fp32 whatever `precision` is: they are the targets).
    `resume`, `on_save`, `save_every`: an interruptible fine-tune (see `_fit`); `precision`: "fp32" or "bf16".
    """
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}")
    if teacher_logits is not None and (augment or teacher_logits.train_x is not data.train_x):
        raise ValueError("teacher_logits holds the teacher's outputs on data.train_x as stored; it cannot serve "
                         "augmented images or other data")
    teacher.to(device).eval()

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = teacher(x) if teacher_logits is None else teacher_logits(idx)
            target = F.log_softmax(logits.float() / temperature, dim=1)
        logits = model(x).float()
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, log_target=True, reduction="batchmean")
        # T^2 keeps the soft-target gradients on the same scale as the hard-label ones.
        return alpha * temperature**2 * kd + (1.0 - alpha) * F.cross_entropy(logits, y)

    return _fit(
        student, data, loss_fn, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup=warmup, augment=augment, device=device, seed=seed, progress=progress, should_stop=should_stop,
        resume=resume, on_save=on_save, save_every=save_every, precision=precision,
    )
