"""Data-aware factors: refit each Kronecker layer so that it reproduces the teacher layer's outputs.

The SVD initialization minimizes ``||W - W_R||_F``, which treats every input direction alike; what matters is
the layer's output on the inputs it actually sees. After ``kroneckerize``, one forward pass of the student over
a few hundred training images visits the Kronecker layers in call order; just before each one runs, its
factors are fitted (L-BFGS, a few iterations) so that on the student's own input, which carries the error of
the layers fitted before it, the layer's output matches the teacher layer's output on the teacher's input:

    min over factors  ||P_s W^T + bias - Y_t||^2 / ||Y_t||^2,   W = the layer's reconstructed weight [F, D]

with ``P_s [M, D]`` the student's input patches at M sampled output positions and ``Y_t [M, F]`` the teacher
layer's outputs there. The fit uses ``layer.weight`` (differentiable in the factors) and optimizes the
layer's factors (``layer.factors`` where a layer names them, else every parameter but ``bias``), so it holds
for any number of factors. Held-out positions decide: a fit that does not lower their error is undone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gkpd

__all__ = ["LayerFit", "fit_factors", "factor_parameters", "FIT_ROWS", "HOLDOUT_ROWS", "FIT_ITERATIONS", "FIT_MAX_MACS", "summarize"]

FIT_ROWS = 4096  # sampled output positions per layer that the factors are fitted on
HOLDOUT_ROWS = 1024  # further positions that only judge the fit
FIT_ITERATIONS = 15  # L-BFGS iterations per layer
# A layer whose L-BFGS evaluation would cost more than this (F * (D + 1)^2 multiply-adds) keeps its SVD factors.
# Every ResNet-32 layer is far below it (64 * 577^2 = 2.1e7); of ResNet-18's, the 3x3 convs of layers 3 and 4
# are above (256 * 2305^2 = 1.4e9, 512 * 4609^2 = 1.1e10): measured on the shared 2-core machine, fitting 8
# such layers took minutes, more than a whole trial's fine-tune.
FIT_MAX_MACS = 5e8


@dataclass(frozen=True)
class LayerFit:
    """Held-out relative output error ``||Y - Y_t||^2 / ||Y_t||^2`` of one layer before and after its fit."""

    name: str
    before: float
    after: float
    kept: bool  # False: the fit did not lower the held-out error, and the SVD factors were restored


def factor_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters the fit may change: ``layer.factors`` if the layer has them, else all but ``bias``."""
    factors = getattr(layer, "factors", None)
    if factors is not None:
        return list(factors)
    return [p for name, p in layer.named_parameters(recurse=False) if name != "bias"]


def _is_kronecker(module: nn.Module) -> bool:
    return isinstance(module, (gkpd.KroneckerConv2d, gkpd.KroneckerLinear))


def _positions(shape: torch.Size, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct flat output positions (image, row, column) of an output ``[N, F, (Ho, Wo)]``."""
    total = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    return torch.randperm(total, generator=generator)[: min(count, total)]


def _rows(output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer output at flat positions: ``[M, F]``."""
    if output.dim() == 2:
        return output[positions.to(output.device)]
    n, f, h, w = output.shape
    return output.permute(0, 2, 3, 1).reshape(n * h * w, f)[positions.to(output.device)]


def _patches(layer: nn.Module, x: torch.Tensor, positions: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The layer's input patches at flat output positions: ``[M, D]``, D in ``weight.reshape(F, -1)`` order."""
    if x.dim() == 2:
        return x[positions.to(x.device)]
    top, bottom, left, right = layer.pads
    xp = F.pad(x, (left, right, top, bottom))
    (sh, sw), (dh, dw), (kh, kw) = layer.stride, layer.dilation, layer.kernel_size
    positions = positions.to(x.device)
    ho, wo = out_hw
    n, rest = positions // (ho * wo), positions % (ho * wo)
    i, j = rest // wo, rest % wo
    rows = i[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh  # [M, Kh]
    cols = j[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw  # [M, Kw]
    # [M, Kh, Kw, C] -> [M, C, Kh, Kw]
    picked = xp.permute(0, 2, 3, 1)[n[:, None, None], rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2).reshape(len(positions), -1)


def _weight_and_bias(layer: nn.Module, outputs: int) -> torch.Tensor:
    """``[W, bias]`` as one ``[F, D + 1]`` matrix (bias column 0 when the layer has none), differentiable in W."""
    weight = layer.weight.reshape(outputs, -1)
    bias = layer.bias if getattr(layer, "bias", None) is not None else weight.new_zeros(outputs)
    return torch.cat([weight, bias.detach()[:, None]], dim=1)


def _fit_layer(layer: nn.Module, p: torch.Tensor, y: torch.Tensor, holdout: int, iterations: int) -> tuple[float, float, bool]:
    """Fit the factors on rows ``holdout:``, judge on rows ``:holdout``; returns (before, after, kept).

    The squared error is a quadratic in ``[W, b]``: with the Gram matrices ``H = P^T P`` and ``G = P^T Y`` of
    the fitting rows (float64, computed once), each L-BFGS evaluation costs ``F * D^2`` instead of
    ``M * D * F``.
    """
    outputs = y.shape[1]
    ones = p.new_ones(len(p), 1)
    p = torch.cat([p, ones], dim=1)  # the bias column
    p_fit, y_fit, p_held, y_held = p[holdout:].double(), y[holdout:].double(), p[:holdout], y[:holdout]
    gram, cross, scale = p_fit.T @ p_fit, p_fit.T @ y_fit, float((y_fit**2).sum().clamp(min=1e-30))
    gram, cross = gram.float(), cross.float()  # accumulated in float64; float32 evaluations are 2-3x faster
    params = factor_parameters(layer)

    def held_out() -> float:
        out = p_held @ _weight_and_bias(layer, outputs).T
        return float(((out - y_held) ** 2).sum() / (y_held**2).sum().clamp(min=1e-30))

    with torch.no_grad():
        before = held_out()
        saved = [q.detach().clone() for q in params]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=iterations, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        w = _weight_and_bias(layer, outputs)
        # ||P w^T - Y||^2 = tr(w H w^T) - 2 tr(w G) + ||Y||^2
        loss = (((w @ gram) * w).sum() - 2 * (w * cross.T).sum()) / scale + 1.0
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    for q in params:
        q.grad = None
    with torch.no_grad():
        after = held_out()
        kept = after < before  # NaN never counts as better
        if not kept:
            for q, old in zip(params, saved):
                q.copy_(old)
    return before, (after if kept else before), kept


def fit_factors(
    student: nn.Module, teacher: nn.Module, x: torch.Tensor, *, names: Sequence[str] | None = None,
    rows: int = FIT_ROWS, holdout: int = HOLDOUT_ROWS, iterations: int = FIT_ITERATIONS, seed: int = 0,
    device: torch.device | str = "cpu", max_macs: float = FIT_MAX_MACS,
) -> list[LayerFit]:
    """Fit every Kronecker layer of ``student`` (or those in ``names``) to the same-named layer of ``teacher``.

    ``x [N, C, H, W]``: training images (a few hundred). Both models run in eval mode (batch norm with the
    teacher's statistics: re-estimate it afterwards). Layers are fitted in call order on the student's own
    inputs, so each one also absorbs the error of those before it. Returns the held-out errors per fitted layer
    (layers over ``max_macs`` per evaluation keep their SVD factors and are not listed).
    """
    student.to(device).eval()
    teacher.to(device).eval()
    x = x.to(device)
    modules = dict(student.named_modules())
    chosen = [n for n, m in modules.items() if _is_kronecker(m)] if names is None else list(names)
    for name in chosen:
        if not _is_kronecker(modules.get(name, nn.Identity())):
            raise ValueError(f"{name!r} is not a Kronecker layer of the student")
    generator = torch.Generator().manual_seed(seed)
    targets: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
    handles = []

    def capture(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            positions = _positions(output.shape, rows + holdout, generator)
            hw = tuple(output.shape[2:]) if output.dim() == 4 else (1, 1)
            targets[name] = (positions, _rows(output, positions).float(), hw)  # type: ignore[assignment]
        return hook

    teacher_modules = dict(teacher.named_modules())
    for name in chosen:
        handles.append(teacher_modules[name].register_forward_hook(capture(name)))
    try:
        with torch.no_grad():
            teacher(x)
    finally:
        for h in handles:
            h.remove()

    results: list[LayerFit] = []

    def refit(name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            positions, y, hw = targets[name]
            depth = math.prod(module.spec.weight_shape[1:]) + 1
            if y.shape[1] * depth**2 > max_macs:
                return
            p = _patches(module, args[0].float(), positions, hw)
            before, after, kept = _fit_layer(module, p, y, min(holdout, len(y) // 5), iterations)
            results.append(LayerFit(name, before, after, kept))
        return pre_hook

    handles = [modules[name].register_forward_pre_hook(refit(name)) for name in chosen]
    try:
        with torch.no_grad(), gkpd.use_path(student, "materialized"):
            student(x)
    finally:
        for h in handles:
            h.remove()
    return results


def summarize(results: Sequence[LayerFit]) -> str:
    """One line: how many layers the fit improved and the mean held-out error before and after."""
    if not results:
        return "no layer refitted (a Kronecker layer over FIT_MAX_MACS per evaluation keeps its SVD factors)"
    kept = sum(r.kept for r in results)
    before = sum(r.before for r in results) / len(results)
    after = sum(r.after for r in results) / len(results)
    return f"{kept}/{len(results)} layers refitted, held-out output error {before:.4f} -> {after:.4f} (mean)"

