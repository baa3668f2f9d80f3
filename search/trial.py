"""One trial: decompose the teacher by a plan, re-estimate batch norm, screen, fine-tune with distillation, measure.

Early stopping (Optuna's pruners refuse multi-objective studies, so this is our own rule). A trial is
hopeless, and stops, when a finished trial that costs no more than it:
  1. right after decomposition and batch-norm re-estimation, screened more than ``margin`` higher; or
  2. half-way through fine-tuning, already ended more than ``margin`` above this trial's screening accuracy.
A plan that loses to a cheaper plan by that much before fine-tuning is not worth a full fine-tune: the
short fine-tune recovers a few points, not ten.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import gkpd
from search.config import SearchConfig
from search.data import DataSplits
from search import latency
from search.files import atomic_save
from search.fit import fit_factors, summarize
from search.progress import duration, log
from search.sensitivity import SensitivityTable, calibration_images, load_or_measure
from search.teacher import default_cache_dir
from search.train import TeacherLogits, distill, evaluate, recalibrate_bn, resolve_precision
from spaces import SearchSpace

__all__ = ["TrialContext", "TrialResult", "Rival", "Hopeless", "run_trial", "continue_trial", "build_student",
           "sensitivity_cache", "latency_cache", "FINETUNE_LR"]

# Peak SGD learning rate of the fine-tune (5% warm-up, then cosine to zero). Measured on the default run's
# teacher (ResNet-18, Fashion-MNIST, 150 steps of 32, 2,000 val images): allocate@300 MFLOPs reached
# 85.2 / 86.6 / 87.9 / 88.1 / 87.7% val at lr 0.005 / 0.01 / 0.02 / 0.04 / 0.08, allocate@210 84.6 -> 86.6%
# from 0.01 to 0.04. A plan fresh from the SVD is far from the teacher's minimum; a small rate cannot get back.
FINETUNE_LR = 0.04
BN_BATCHES = 10
SCREEN_IMAGES = 1000
# Training images the Kronecker factors are fitted on after the SVD (search/fit.py); 0 keeps the SVD factors.
FIT_IMAGES = 256
# Measure each layer's sensitivity once per study and allocate by it (search/sensitivity.py); False: by the
# sum of relative weight errors, as before.
SENSITIVITY = True


@dataclass(frozen=True)
class Rival:
    """What the stopping rule needs from a finished trial."""

    cost: float
    screen_accuracy: float
    val_accuracy: float


@dataclass(frozen=True)
class TrialResult:
    val_accuracy: float
    test_accuracy: float
    screen_accuracy: float
    mflops: float
    mparams: float
    finetune_steps: int
    seconds: float
    latency: dict = field(default_factory=dict)  # search.latency.LATENCY_KEYS, when measured


class Hopeless(Exception):
    """The stopping rule stopped this trial; ``screen_accuracy`` is what it had reached."""

    def __init__(self, reason: str, screen_accuracy: float) -> None:
        super().__init__(reason)
        self.screen_accuracy = screen_accuracy


@dataclass
class TrialContext:
    """What every trial of a study shares: settings, data, teacher and space (built once per process)."""

    config: SearchConfig
    data: DataSplits
    teacher: nn.Module
    space: SearchSpace
    device: torch.device
    # Measured once per study (cached in the run directory, shared by every worker) unless given or disabled.
    sensitivity: SensitivityTable | None = None
    teacher_logits: TeacherLogits = field(init=False)  # filled as trials fine-tune, reused by the next ones
    _dense_session: object = field(init=False, default=None)  # the teacher in onnxruntime, exported once
    precision: str = field(init=False)  # of the fine-tunes, resolved: fp32 or bf16

    def __post_init__(self) -> None:
        self.precision = resolve_precision(self.config.precision, self.device)
        self.teacher_logits = TeacherLogits(self.teacher, self.data.train_x, device=self.device)
        if self.sensitivity is None and SENSITIVITY:
            self.sensitivity = load_or_measure(self.teacher, self.space, self.data.train_x, self.config.out,
                                               device=self.device, shared_dir=sensitivity_cache(self.config))

    @property
    def scores(self) -> dict | None:
        """What ``space.allocate``/``repair`` minimize (``scores=``): the predicted loss, or None (the error sum)."""
        return self.sensitivity.scores() if self.sensitivity is not None else None


def measure_trial_latency(ctx: TrialContext, student: nn.Module, label: str, *,
                          predicted_ms: float | None = None) -> dict:
    """The student's latency next to the teacher's (search.latency), logged; {} when ``GKPD_LATENCY=0``.

    With ``--budget-ms`` the torch batch-1 time is measured whatever ``GKPD_LATENCY`` says (the budget is checked
    on it), and ``predicted_ms`` (the latency table's prediction) is stored and printed beside it.
    """
    budget = ctx.config.budget_ms
    if not latency.enabled():
        if budget is None:
            return {}
        b1 = latency.torch_latency({"dense": ctx.teacher, "model": student}, ctx.data.input_shape, batch=1,
                                   device=ctx.device)
        measured = {"ms_b1": b1["model"], "dense_ms_b1": b1["dense"], "speedup_b1": b1["dense"] / b1["model"],
                    "latency_device": latency.describe(ctx.device)}
        log(f"{label}: latency on {measured['latency_device']}: batch 1 {measured['ms_b1']:.2f} ms "
            f"({measured['speedup_b1']:.2f}x dense)")
        return {**measured, **_prediction(measured, predicted_ms, budget, _table_dense_ms(ctx), label)}
    if ctx._dense_session is None:
        ctx._dense_session = latency.ort_session(ctx.teacher, ctx.data.input_shape)
    measured = latency.measure_latency(student, ctx.teacher, ctx.data.input_shape, batch=ctx.config.batch_size,
                                       device=ctx.device, dense_session=ctx._dense_session)
    log(f"{label}: latency on {measured['latency_device']}: batch 1 {measured['ms_b1']:.2f} ms "
        f"({measured['speedup_b1']:.2f}x dense), batch {measured['batch']} {measured['ms_batch']:.1f} ms "
        f"({measured['speedup_batch']:.2f}x); onnxruntime CPU batch 1 {measured['ort_ms_b1']:.2f} ms "
        f"({measured['ort_speedup_b1']:.2f}x)")
    return {**measured, **_prediction(measured, predicted_ms, budget, _table_dense_ms(ctx), label)}


def _table_dense_ms(ctx: TrialContext) -> float | None:
    table = ctx.space.latency
    return table.dense_ms() if table is not None else None


def _prediction(measured: dict, predicted_ms: float | None, budget_ms: float | None, table_dense_ms: float | None,
                label: str) -> dict:
    """The latency table's prediction next to the measurement, logged (with ``--budget-ms``).

    A CPU's speed drifts between the table's timing and a trial's: on the 2-core build VM the same dense ResNet-18
    timed 12.5 ms at batch 1 and 16-22 ms minutes later, alone each time. So the measurement is put on the table's
    scale, ``ms_b1_table = ms_b1 x table dense / dense_ms_b1`` (the dense teacher is timed side by side with the
    student): that is what the prediction and the budget are compared with.
    """
    if predicted_ms is None:
        return {}
    measured_ms, dense_ms = measured["ms_b1"], measured["dense_ms_b1"]
    scaled = measured_ms * table_dense_ms / dense_ms if table_dense_ms else measured_ms
    over = f"; OVER --budget-ms {budget_ms:g} as measured" if budget_ms is not None and scaled > budget_ms else ""
    log(f"{label}: latency predicted {predicted_ms:.2f} ms, measured {scaled:.2f} ms at batch 1 on the table's "
        f"scale ({measured_ms:.2f} ms beside the dense model's {dense_ms:.2f} ms, which the table timed at "
        f"{table_dense_ms or dense_ms:.2f} ms; {100 * (predicted_ms / scaled - 1):+.1f}% prediction error){over}")
    return {"predicted_ms_b1": predicted_ms, "ms_b1_table": scaled}


def latency_cache(config: SearchConfig) -> Path:
    """Where per-layer latency tables are kept across studies (search.latency_table): beside the teacher cache."""
    return config.cache_dir / "latency" if config.cache_dir is not None else default_cache_dir() / "latency"


def sensitivity_cache(config: SearchConfig) -> Path:
    """Where measured sensitivity tables are kept across studies: beside the teacher cache."""
    return config.cache_dir / "sensitivity" if config.cache_dir is not None else default_cache_dir() / "sensitivity"


def build_student(ctx: TrialContext, plan: gkpd.Plan, *, fit_images: int | None = None) -> nn.Module:
    """The teacher decomposed by ``plan``, factors fitted to the teacher's layer outputs on ``fit_images``
    training images (default ``FIT_IMAGES``; 0: SVD factors), batch-norm statistics re-estimated."""
    student = gkpd.kroneckerize(ctx.teacher, plan).to(ctx.device)
    fit_images = FIT_IMAGES if fit_images is None else fit_images
    if fit_images and plan:
        start = time.perf_counter()
        fits = fit_factors(student, ctx.teacher, calibration_images(ctx.data.train_x, fit_images), device=ctx.device)
        log(f"  fit: {summarize(fits)} ({duration(time.perf_counter() - start)})")
    recalibrate_bn(student, ctx.data.train_x, batches=BN_BATCHES, batch_size=ctx.config.batch_size, device=ctx.device)
    return student


def _beaten_by(rivals: Sequence[Rival], cost: float, accuracy: float, margin: float, *, final: bool) -> Rival | None:
    for rival in rivals:
        theirs = rival.val_accuracy if final else rival.screen_accuracy
        if rival.cost <= cost and theirs > accuracy + margin:
            return rival
    return None


def run_trial(
    ctx: TrialContext,
    plan: gkpd.Plan,
    *,
    label: str,
    rivals: Callable[[], Sequence[Rival]] = lambda: (),
    checkpoint: Path | None = None,
    seed: int = 0,
    on_screen: Callable[[float], None] | None = None,
) -> TrialResult:
    """Evaluate ``plan``; raises ``Hopeless`` when the stopping rule fires, ``FloatingPointError`` on a NaN loss.

    The search passes every trial the same ``seed``, so all trials fine-tune on the same batches in the same
    order: plans are compared on equal terms (common random numbers), and the teacher's logits on those
    images, cached in ``ctx.teacher_logits``, are computed by the first trial only.
    """
    config, data, start = ctx.config, ctx.data, time.perf_counter()
    expected = ctx.space.cost(plan)
    student = build_student(ctx, plan)
    mflops, params = gkpd.count_mflops(student, data.input_shape), gkpd.count_params(student)
    # The space's instant analytic cost is what keeps plans in budget; it must be what fvcore measures.
    assert math.isclose(mflops, expected.mflops, rel_tol=1e-12) and params == expected.params, (
        f"analytic cost {expected} != fvcore {mflops} MFLOPs, {params} params"
    )
    cost = mflops if config.objective == "mflops" else params / 1e6
    screen_x, screen_y = data.val_x[:SCREEN_IMAGES], data.val_y[:SCREEN_IMAGES]
    screen = evaluate(student, screen_x, screen_y, device=ctx.device)
    log(f"{label}: {mflops:.1f} MFLOPs, {params / 1e6:.3f} Mparams; after decomposition + BN re-estimation "
        f"{screen:.2%} (screen, {len(screen_y)} val images)")
    if on_screen is not None:
        on_screen(screen)
    rival = _beaten_by(rivals(), cost, screen, config.prune_margin, final=False)
    if rival is not None:
        raise Hopeless(f"screened {screen:.2%}; a finished trial at cost {rival.cost:.4g} <= {cost:.4g} "
                       f"screened {rival.screen_accuracy:.2%}", screen)

    steps = config.finetune_steps
    halfway = steps // 2
    shown = {steps * k // 4 for k in range(1, 5)}  # quarters, half-way included

    def should_stop(step: int, loss: float) -> bool:
        if step in shown:
            log(f"{label}:   fine-tune step {step}/{steps}  KD loss {loss:.3f}  {duration(time.perf_counter() - start)}")
        if step != halfway:
            return False
        known = rivals()
        if _beaten_by(known, cost, 0.0, config.prune_margin, final=True) is None:
            return False  # no finished trial could stop it at any accuracy: the evaluation would be wasted
        accuracy = evaluate(student, screen_x, screen_y, device=ctx.device)
        beaten = _beaten_by(known, cost, accuracy, config.prune_margin, final=True)
        if beaten is not None:
            raise Hopeless(f"half-way through fine-tuning {accuracy:.2%}; a finished trial at cost "
                           f"{beaten.cost:.4g} <= {cost:.4g} ended at {beaten.val_accuracy:.2%}", screen)
        return False

    if steps:
        distill(student, ctx.teacher, data, steps=steps, batch_size=config.batch_size, lr=FINETUNE_LR,
                device=ctx.device, seed=seed, should_stop=should_stop, teacher_logits=ctx.teacher_logits,
                precision=ctx.precision)
    val = evaluate(student, data.val_x, data.val_y, device=ctx.device)
    test = evaluate(student, data.test_x, data.test_y, device=ctx.device)
    if checkpoint is not None:
        atomic_save(student.state_dict(), checkpoint)
    seconds = time.perf_counter() - start
    log(f"{label}: val {val:.2%}, test {test:.2%} after {steps} fine-tune steps ({duration(seconds)})")
    measured = measure_trial_latency(ctx, student, label, predicted_ms=expected.ms)
    return TrialResult(val, test, screen, mflops, params / 1e6, steps, seconds, measured)


def continue_trial(
    ctx: TrialContext, plan: gkpd.Plan, weights: Path, *, steps: int, label: str, checkpoint: Path | None = None,
    seed: int = 1,
) -> TrialResult:
    """A longer fine-tune of a finished trial: its weights (``weights``, written by ``run_trial`` for ``plan``)
    distilled ``steps`` more steps (a fresh warm-up and cosine at ``FINETUNE_LR``), then evaluated.

    Every continuation gets the same ``seed``, another than the first fine-tune's, so that it sees new batches
    and continued trials are still compared on equal terms.
    """
    config, data, start = ctx.config, ctx.data, time.perf_counter()
    student = gkpd.kroneckerize(ctx.teacher, plan)
    student.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    student.to(ctx.device)
    mflops, params = gkpd.count_mflops(student, data.input_shape), gkpd.count_params(student)
    shown = {steps * k // 4 for k in range(1, 5)}

    def progress(step: int, total: int, loss: float) -> None:
        if step in shown:
            log(f"{label}:   longer fine-tune step {step}/{total}  KD loss {loss:.3f}  "
                f"{duration(time.perf_counter() - start)}")

    distill(student, ctx.teacher, data, steps=steps, batch_size=config.batch_size, lr=FINETUNE_LR,
            device=ctx.device, seed=seed, progress=progress, teacher_logits=ctx.teacher_logits,
            precision=ctx.precision)
    val = evaluate(student, data.val_x, data.val_y, device=ctx.device)
    test = evaluate(student, data.test_x, data.test_y, device=ctx.device)
    if checkpoint is not None:
        atomic_save(student.state_dict(), checkpoint)
    seconds = time.perf_counter() - start
    log(f"{label}: val {val:.2%}, test {test:.2%} after {steps} more fine-tune steps ({duration(seconds)})")
    measured = measure_trial_latency(ctx, student, label, predicted_ms=ctx.space.cost(plan).ms)
    return TrialResult(val, test, float("nan"), mflops, params / 1e6, steps, seconds, measured)
