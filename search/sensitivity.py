"""Measured layer sensitivity: what the network loses when only one layer is decomposed.

The knapsack alone minimizes the sum of relative Frobenius errors, which weighs every layer alike. Here, once
per study, each searchable layer is decomposed on its own at a few candidates spread along its error axis, and
the distillation loss to the teacher is measured on a fixed set of training images (AIMET's per-layer "eval
score" table is the same idea). Interpolated over the layer's candidates (piecewise linear in the relative
error, monotone), the table gives every candidate a predicted loss, which ``SearchSpace.allocate`` and
``repair`` then minimize instead of the error sum (``scores=``).

Protocol of one measurement: ``kroneckerize(teacher, {layer: spec})``, batch norm on the calibration batch's
own statistics (the same as re-estimating it on those images and evaluating: what every trial does before
screening), then ``KL(teacher || student)`` of the softmax outputs, minus the same quantity for the dense
model under this protocol (so "dense" scores 0). Losses are assumed additive over layers.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import filelock
import torch
import torch.nn as nn
import torch.nn.functional as F

import gkpd
from search.files import atomic_text
from search.progress import duration, log
from spaces import Candidate, SearchSpace

__all__ = ["Point", "SensitivityTable", "pick_candidates", "measure_sensitivity", "calibration_images",
           "table_key", "study_table_key", "load_or_measure", "CALIBRATION_IMAGES", "POINTS_PER_LAYER"]

# 256 training images: on ResNet-32 the losses of the chosen candidates move by a few percent between two
# disjoint sets of 256, far less than the factor-of-ten spread between layers that the table is for.
CALIBRATION_IMAGES = 256
POINTS_PER_LAYER = 4
# Work cap of one table, in MACs of forward passes: a big model gets fewer images (ResNet-18 on 1x28x28, 21
# layers x 4 points x 457 MMACs: 130 images; ResNet-32, 34 x 4 x 69 MMACs: all 256). Measured on the shared
# 2-core machine, ResNet-32's 256-image table took 147 s; the default run has about 5 minutes to spare.
CALIBRATION_MACS = 5e12
MIN_CALIBRATION_IMAGES = 64
CALIBRATION_SEED = 1234  # its own stream: the table must not depend on --seed's data split order
_VERSION = 1  # bump when the protocol changes: a cached table of another protocol is never reused


@dataclass(frozen=True)
class Point:
    """One measurement: layer decomposed by candidate ``key`` (relative error ``error``), loss added ``loss``."""

    key: str
    error: float
    loss: float


class SensitivityTable:
    """Per layer, measured (relative error, added KD loss) points; interpolation gives any candidate's loss."""

    def __init__(self, points: Mapping[str, Sequence[Point]], *, meta: Mapping[str, object] | None = None) -> None:
        self.points = {name: tuple(sorted(p, key=lambda q: (q.error, q.key))) for name, p in points.items()}
        self.meta = dict(meta or {})
        self._curves = {name: _monotone_curve(p) for name, p in self.points.items()}

    def __repr__(self) -> str:
        count = sum(len(p) for p in self.points.values())
        return f"SensitivityTable({len(self.points)} layers, {count} measurements)"

    def loss(self, name: str, error: float) -> float:
        """Predicted loss added by decomposing layer ``name`` to relative error ``error`` (0 for dense).

        Piecewise linear through (0, 0) and the measured points, made non-decreasing in the error (a running
        maximum: a larger error never predicts a smaller loss); past the largest measured error it continues
        with the last segment's slope.
        """
        if name not in self._curves:
            raise KeyError(f"no sensitivity measured for layer {name!r}; measured: {', '.join(self._curves)}")
        errors, losses = self._curves[name]
        if error <= 0:
            return 0.0
        i = bisect.bisect_left(errors, error)
        if i < len(errors) and errors[i] == error:
            return losses[i]
        if i == len(errors):  # extrapolate with the last segment's slope
            i -= 1
        e0, e1, l0, l1 = errors[i - 1], errors[i], losses[i - 1], losses[i]
        return max(0.0, l0 + (l1 - l0) * (error - e0) / (e1 - e0))

    def scores(self) -> dict[str, Callable[[Candidate], float]]:
        """``SearchSpace.allocate(scores=...)``: each measured layer's candidates scored by predicted loss."""
        return {name: (lambda c, name=name: self.loss(name, c.error)) for name in self.points}

    def predict(self, space: SearchSpace, plan: Mapping[str, gkpd.KroneckerSpec]) -> float:
        """Predicted loss of a whole plan: the sum over its layers (layers the table lacks count as 0)."""
        total = 0.0
        for name, spec in plan.items():
            candidate = space.layers[name].by_spec(spec)
            if candidate is None:
                raise ValueError(f"layer {name!r}: {spec} is not a candidate of this space")
            if name in self.points:
                total += self.loss(name, candidate.error)
        return total

    def to_dict(self) -> dict[str, object]:
        return {"version": _VERSION, "meta": self.meta,
                "layers": {name: [[p.key, p.error, p.loss] for p in pts] for name, pts in self.points.items()}}

    @classmethod
    def from_dict(cls, doc: Mapping[str, object]) -> SensitivityTable:
        if doc.get("version") != _VERSION:
            raise ValueError(f"sensitivity table version {doc.get('version')!r}, expected {_VERSION}")
        layers = doc["layers"]
        assert isinstance(layers, dict)
        points = {name: [Point(str(k), float(e), float(v)) for k, e, v in rows] for name, rows in layers.items()}
        return cls(points, meta=doc.get("meta"))  # type: ignore[arg-type]


def _monotone_curve(points: Sequence[Point]) -> tuple[list[float], list[float]]:
    """Strictly increasing errors (from 0) and their non-decreasing losses; equal errors keep the larger loss."""
    errors, losses = [0.0], [0.0]
    for p in points:
        if p.error <= 0:
            continue
        loss = max(losses[-1], p.loss)
        if p.error == errors[-1]:
            losses[-1] = loss
        else:
            errors.append(p.error)
            losses.append(loss)
    return errors, losses


def pick_candidates(candidates: Sequence[Candidate], count: int) -> list[Candidate]:
    """Up to ``count`` factorized candidates spread evenly along the error axis, both ends included."""
    factorized = sorted((c for c in candidates if c.spec is not None), key=lambda c: (c.error, c.key))
    if not factorized or count < 1:
        return []
    low, high = factorized[0].error, factorized[-1].error
    targets = [low + (high - low) * k / max(1, count - 1) for k in range(count)] if count > 1 else [high]
    chosen: list[Candidate] = []
    for target in targets:
        best = min((c for c in factorized if c not in chosen), key=lambda c: abs(c.error - target), default=None)
        if best is not None:
            chosen.append(best)
    return sorted(chosen, key=lambda c: (c.error, c.key))


def calibration_images(train_x: torch.Tensor, count: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """A fixed random subset of the training images (never validation or test): ``[count, C, H, W]``."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    index = torch.randperm(len(train_x), generator=generator)[:count]
    return train_x[index]


def _kd_loss(model: nn.Module, x: torch.Tensor, target_log_probs: torch.Tensor, batch_size: int) -> float:
    """``KL(teacher || model)`` of the softmax outputs, mean per image, with batch norm on batch statistics."""
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean, m.running_var, m.num_batches_tracked, m.track_running_stats) for m in norms]
    for m in norms:  # train-mode normalization without touching the stored statistics
        m.train()
        m.track_running_stats = False
        m.running_mean = m.running_var = None
    try:
        with torch.no_grad():
            log_probs = F.log_softmax(model(x[:batch_size]).float(), dim=1)
            for i in range(batch_size, len(x), batch_size):
                log_probs = torch.cat([log_probs, F.log_softmax(model(x[i:i + batch_size]).float(), dim=1)])
    finally:
        for m, (mean, var, count, track) in zip(norms, saved):
            m.running_mean, m.running_var, m.num_batches_tracked, m.track_running_stats = mean, var, count, track
            m.eval()
    return float(F.kl_div(log_probs, target_log_probs, log_target=True, reduction="batchmean"))


def measure_sensitivity(
    teacher: nn.Module, space: SearchSpace, x: torch.Tensor, *, points: int = POINTS_PER_LAYER,
    device: torch.device | str = "cpu", batch_size: int | None = None, layers: Sequence[str] | None = None,
) -> SensitivityTable:
    """Decompose each searchable layer alone at ``points`` candidates and measure the added KD loss on ``x``.

    ``batch_size``: images per batch-norm batch (default: all of ``x`` at once, so every measurement sees the
    same statistics as a whole-batch re-estimation). ``layers``: a subset of the space's layers.
    """
    start = time.perf_counter()
    x = x.to(device)
    batch_size = batch_size or len(x)
    teacher = teacher.to(device).eval()
    with torch.no_grad():
        target = torch.cat([F.log_softmax(teacher(x[i:i + batch_size]).float(), dim=1)
                            for i in range(0, len(x), batch_size)])
    floor = _kd_loss(teacher, x, target, batch_size)  # dense under this protocol: batch statistics
    names = list(layers) if layers is not None else [n for n, layer in space.layers.items()
                                                      if len(layer.candidates) > 1]
    table: dict[str, list[Point]] = {}
    for number, name in enumerate(names, 1):
        table[name] = []
        for candidate in pick_candidates(space.layers[name].candidates, points):
            assert candidate.spec is not None
            student = gkpd.kroneckerize(teacher, {name: candidate.spec}, path="materialized")
            loss = max(0.0, _kd_loss(student, x, target, batch_size) - floor)
            table[name].append(Point(candidate.key, candidate.error, loss))
        worst = max((p.loss for p in table[name]), default=0.0)
        log(f"sensitivity {number}/{len(names)} {name}: {len(table[name])} candidates, added KD loss up to "
            f"{worst:.4f} ({duration(time.perf_counter() - start)})")
    meta = {"images": len(x), "points": points, "floor": floor, "seconds": time.perf_counter() - start}
    return SensitivityTable(table, meta=meta)


def table_key(teacher: nn.Module, space: SearchSpace, x: torch.Tensor, *, points: int) -> str:
    """Hash of what the table depends on: the teacher's weights, the space's choices, the calibration images
    ``x`` and the protocol."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    choices = {name: [c.key for c in layer.candidates] for name, layer in space.layers.items()}
    digest.update(json.dumps({"choices": choices, "images": len(x), "points": points, "seed": CALIBRATION_SEED,
                              "version": _VERSION}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _calibration_count(space: SearchSpace, train_x: torch.Tensor, *, images: int, points: int) -> int:
    # A small training set (tests, --max-train-images) gets a quarter of it: the table stays cheap beside it.
    images = min(images, max(32, len(train_x) // 4), len(train_x))
    measurements = max(1, points * len(space.choices()))
    affordable = int(CALIBRATION_MACS / (measurements * max(1, space.baseline_cost().macs)))
    return min(images, max(MIN_CALIBRATION_IMAGES, affordable))


def study_table_key(teacher: nn.Module, space: SearchSpace, train_x: torch.Tensor, *,
                    images: int = CALIBRATION_IMAGES, points: int = POINTS_PER_LAYER) -> str:
    """The key of the table ``load_or_measure`` gives for these arguments (part of a study's identity)."""
    count = _calibration_count(space, train_x, images=images, points=points)
    return table_key(teacher, space, calibration_images(train_x, count), points=points)


def load_or_measure(
    teacher: nn.Module, space: SearchSpace, train_x: torch.Tensor, run_dir: Path, *,
    device: torch.device | str = "cpu", images: int = CALIBRATION_IMAGES, points: int = POINTS_PER_LAYER,
    shared_dir: Path | None = None,
) -> SensitivityTable:
    """The study's table from ``run_dir/sensitivity-<key>.json``, measured (under a file lock) if absent.

    Every worker of a study gets the same table: the first measures it, the others wait and read its file.
    ``shared_dir`` (the cache beside the teachers): a table measured by any earlier study of the same teacher,
    space and images is copied from there instead of measured again, and a new one is left there too.
    """
    count = _calibration_count(space, train_x, images=images, points=points)
    x = calibration_images(train_x, count)
    name = f"sensitivity-{table_key(teacher, space, x, points=points)}.json"
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        if path.exists():
            table = SensitivityTable.from_dict(json.loads(path.read_text()))
            log(f"sensitivity: loaded {path.name} ({table})")
            return table
        shared = Path(shared_dir) / name if shared_dir is not None else None
        if shared is not None and shared.is_file():
            try:
                text = shared.read_text()
                table = SensitivityTable.from_dict(json.loads(text))
            except (OSError, ValueError, KeyError) as err:  # a damaged cache entry is measured again
                log(f"sensitivity: ignoring cached {shared} ({type(err).__name__})")
            else:
                atomic_text(path, text)
                log(f"sensitivity: {table} from the cache ({shared})")
                return table
        log(f"sensitivity: measuring {len(space.choices())} layers x {points} candidates on {count} training "
            f"images; saved to {path.name}")
        table = measure_sensitivity(teacher, space, x, points=points, device=device)
        text = json.dumps(table.to_dict(), indent=1) + "\n"
        atomic_text(path, text)
        if shared is not None:
            try:
                shared.parent.mkdir(parents=True, exist_ok=True)
                atomic_text(shared, text)
            except OSError as err:  # a read-only cache costs the next study a measurement, nothing more
                log(f"sensitivity: could not cache the table in {shared.parent} ({err.strerror})")
        log(f"sensitivity: {table} in {duration(float(table.meta['seconds']))}")  # type: ignore[arg-type]
        return table
