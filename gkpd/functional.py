"""The Kronecker-factorized convolution, every execution path. Pure functions over tensors.

Two-step forward (exact for any factorization, stride, padding and dilation; see DESIGN.md):
with B first, conv the padded input viewed ``[N*C1, C2, H, W]`` with B stacked ``[R*F2, C2, Kh2, Kw2]`` at
dilation d, then conv with A stacked ``[R*F1, C1, Kh1, Kw1]`` in R groups at dilation ``(Kh2*d, Kw2*d)``, and
sum over R. The mirror order (A first at dilation ``Kh2*d``, then B at dilation d) is exact too.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from gkpd.decompose import reconstruct
from gkpd.spec import ConvGeometry, KroneckerSpec, Order

__all__ = ["Path", "PATHS", "kronecker_conv2d", "kronecker_linear", "factorized_conv2d", "materialized_conv2d"]

Path = Literal["factorized", "materialized"]
PATHS: tuple[Path, ...] = ("factorized", "materialized")


def _spec_of(a: torch.Tensor, b: torch.Tensor) -> KroneckerSpec:
    weight_shape = tuple(x * y for x, y in zip(a.shape[1:], b.shape[1:]))
    return KroneckerSpec(weight_shape, tuple(a.shape[1:]), a.shape[0])


def _pad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` padded as far as the first conv cannot do it, and the ``padding`` left for that conv.

    A conv pads symmetric zeros itself without copying the input (measured on 2 CPU cores: the copy made a
    64->64 3x3 conv at batch 64 20-50% slower); only asymmetric pads ("same", even kernel) need ``F.pad``.
    """
    top, bottom, left, right = pads
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _geometry(x: torch.Tensor, stride, dilation, pads) -> ConvGeometry:
    return ConvGeometry((x.shape[-2], x.shape[-1]), stride, dilation, pads)


def factorized_conv2d(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    order: Order | None = None,
) -> torch.Tensor:
    """Two-step forward: ``x [N, C, H, W]``, ``a [R, F1, C1, Kh1, Kw1]``, ``b [R, F2, C2, Kh2, Kw2]`` -> ``[N, F, Ho, Wo]``.

    ``order`` defaults to the cheaper contraction for this input size.
    """
    spec = _spec_of(a, b)
    geometry = _geometry(x, stride, dilation, pads)
    order = order or spec.cheaper_order(geometry)
    first, second = spec.steps(geometry, order)
    rank, (f1, c1), (f2, c2) = spec.rank, spec.a_shape[:2], spec.b_shape[:2]
    n = x.shape[0]
    x, padding = _pad(x, pads)
    hp, wp = x.shape[-2:]
    if order == "ba":
        y = F.conv2d(x.reshape(n * c1, c2, hp, wp), b.reshape(rank * f2, c2, *b.shape[3:]),
                     stride=first["stride"], padding=padding, dilation=first["dilation"])
        y = y.reshape(n, c1, rank, f2, *y.shape[-2:]).permute(0, 3, 2, 1, 4, 5).reshape(n * f2, rank * c1, *y.shape[-2:])
        y = F.conv2d(y, a.reshape(rank * f1, c1, *a.shape[3:]), stride=second["stride"],
                     dilation=second["dilation"], groups=rank)
        y = y.reshape(n, f2, rank, f1, *y.shape[-2:]).sum(2).transpose(1, 2)
    else:
        y = x.reshape(n, c1, c2, hp, wp).transpose(1, 2).reshape(n * c2, c1, hp, wp)
        y = F.conv2d(y, a.reshape(rank * f1, c1, *a.shape[3:]), stride=first["stride"], padding=padding,
                     dilation=first["dilation"])
        y = y.reshape(n, c2, rank, f1, *y.shape[-2:]).permute(0, 3, 2, 1, 4, 5).reshape(n * f1, rank * c2, *y.shape[-2:])
        y = F.conv2d(y, b.reshape(rank * f2, c2, *b.shape[3:]), stride=second["stride"],
                     dilation=second["dilation"], groups=rank)
        y = y.reshape(n, f1, rank, f2, *y.shape[-2:]).sum(2)
    return y.reshape(n, f1 * f2, *y.shape[-2:])


def materialized_conv2d(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> torch.Tensor:
    """Rebuild ``W = sum_r a[r] ⊗ b[r]`` and run one dense conv (as fast as dense on CPUs)."""
    x, padding = _pad(x, pads)
    return F.conv2d(x, reconstruct(a, b), stride=stride, padding=padding, dilation=dilation)


def kronecker_conv2d(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    path: Path = "factorized",
) -> torch.Tensor:
    """Conv of ``x [N, C, H, W]`` with ``sum_r a[r] ⊗ b[r]`` (cross-correlation, zero pads ``(top, bottom, left, right)``)."""
    if path == "factorized":
        y = factorized_conv2d(x, a, b, stride=stride, dilation=dilation, pads=pads)
    elif path == "materialized":
        y = materialized_conv2d(x, a, b, stride=stride, dilation=dilation, pads=pads)
    else:
        raise ValueError(f"unknown path {path!r}: allowed {PATHS}")
    # The bias is one add after the sum; fvcore counts no MACs for it, as for a dense conv's bias.
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def kronecker_linear(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *, path: Path = "factorized"
) -> torch.Tensor:
    """``x [..., C]`` times ``(sum_r a[r] ⊗ b[r])^T`` with ``a [R, F1, C1]``, ``b [R, F2, C2]`` -> ``[..., F]``.

    A linear layer is a 1x1 convolution, so it shares the conv paths (and their exact cost).
    """
    if path == "materialized":
        return F.linear(x, reconstruct(a, b), bias)
    lead, c = x.shape[:-1], x.shape[-1]
    y = kronecker_conv2d(x.reshape(-1, c, 1, 1), a[..., None, None], b[..., None, None], path=path)
    y = y.reshape(*lead, -1)
    return y if bias is None else y + bias
