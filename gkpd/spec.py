"""What one Kronecker factorization of a layer is, and what it costs.

GKPD (Hameed et al., "Convolutional Neural Network Compression through Generalized Kronecker Product
Decomposition", arXiv 2109.14710) approximates a weight ``W [F, C, Kh, Kw]`` by ``sum_r A_r ⊗ B_r`` with
``A_r [F1, C1, Kh1, Kw1]`` and ``B_r [F2, C2, Kh2, Kw2]``. A linear weight ``[F, C]`` is the 2-D case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["KroneckerSpec", "ConvGeometry", "Order", "ORDERS"]

Order = Literal["ba", "ab"]
ORDERS: tuple[Order, ...] = ("ba", "ab")  # "ba": B first, then A (the design's order); "ab": the mirror


def _shape(value: object, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value)  # type: ignore[union-attr]
        exact = shape == tuple(value)  # type: ignore[arg-type]  # rejects 2.5 and "8", which int() would take
    except (TypeError, ValueError):
        exact = False
    if not exact:
        raise ValueError(f"{what} must be a sequence of ints, got {value!r}")
    if any(v < 1 for v in shape):
        raise ValueError(f"{what} must have positive sizes, got {shape}")
    return shape


@dataclass(frozen=True)
class ConvGeometry:
    """Where a layer runs: input size ``(H, W)``, stride, dilation and zero pads ``(top, bottom, left, right)``.

    A linear layer is a 1x1 convolution over ``(rows, 1)``: ``rows`` is 1 for a ``[N, C]`` input.
    """

    in_hw: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self) -> None:
        for name in ("in_hw", "stride", "dilation"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"ConvGeometry.{name} must be two positive ints, got {value}")
            object.__setattr__(self, name, value)
        pads = tuple(int(v) for v in self.pads)
        if len(pads) != 4 or min(pads) < 0:
            raise ValueError(f"ConvGeometry.pads must be four non-negative ints, got {pads}")
        object.__setattr__(self, "pads", pads)

    @property
    def padded_hw(self) -> tuple[int, int]:
        top, bottom, left, right = self.pads
        return self.in_hw[0] + top + bottom, self.in_hw[1] + left + right

    def out_hw(self, kernel: tuple[int, int]) -> tuple[int, int]:
        """Output size of a dense conv with this geometry and ``kernel (Kh, Kw)``."""
        return tuple(  # type: ignore[return-value]
            (p - d * (k - 1) - 1) // s + 1
            for p, d, k, s in zip(self.padded_hw, self.dilation, kernel, self.stride)
        )


def _spatial(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[2], shape[3]) if len(shape) == 4 else (1, 1)


@dataclass(frozen=True)
class KroneckerSpec:
    """A rank-``rank`` Kronecker factorization of a ``weight_shape`` weight with first factor ``a_shape``."""

    weight_shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    rank: int
    b_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        weight_shape = _shape(self.weight_shape, "weight_shape")
        a_shape = _shape(self.a_shape, "a_shape")
        if len(weight_shape) not in (2, 4):
            raise ValueError(
                f"weight_shape must be 4-D (conv: out, in, kh, kw) or 2-D (linear: out, in), got {weight_shape}"
            )
        if len(a_shape) != len(weight_shape):
            raise ValueError(f"a_shape {a_shape} must have as many dims as weight_shape {weight_shape}")
        bad = [i for i, (w, a) in enumerate(zip(weight_shape, a_shape)) if w % a]
        if bad:
            raise ValueError(
                f"a_shape {a_shape} does not divide weight_shape {weight_shape} in dim {bad[0]} "
                f"({weight_shape[bad[0]]} % {a_shape[bad[0]]} != 0)"
            )
        object.__setattr__(self, "weight_shape", weight_shape)
        object.__setattr__(self, "a_shape", a_shape)
        object.__setattr__(self, "b_shape", tuple(w // a for w, a in zip(weight_shape, a_shape)))
        try:
            integral = not isinstance(self.rank, bool) and int(self.rank) == self.rank
        except (TypeError, ValueError):  # None, "three", ...
            integral = False
        if not integral:
            raise ValueError(f"rank must be an int, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if not 1 <= self.rank <= self.max_rank:
            raise ValueError(
                f"rank {self.rank} is out of range for a_shape {a_shape} of weight_shape {weight_shape}: "
                f"allowed 1..{self.max_rank}"
            )

    @property
    def max_rank(self) -> int:
        """Full Kronecker rank: ``min(prod(a_shape), prod(b_shape))``."""
        return min(math.prod(self.a_shape), math.prod(self.b_shape))

    @property
    def num_params(self) -> int:
        """Parameters in both factors (bias excluded)."""
        return self.rank * (math.prod(self.a_shape) + math.prod(self.b_shape))

    @property
    def dense_params(self) -> int:
        return math.prod(self.weight_shape)

    def with_rank(self, rank: int) -> KroneckerSpec:
        return KroneckerSpec(self.weight_shape, self.a_shape, rank)

    def steps(self, geometry: ConvGeometry, order: Order) -> tuple[dict, dict]:
        """The two convolutions of the factorized forward in ``order``: kernel, stride, dilation, output size.

        The stride goes to whichever step it can: when the second factor is 1 wide on an axis, the first step
        already strides on that axis and computes nothing that is thrown away.
        """
        (f1, c1), (f2, c2) = self.a_shape[:2], self.b_shape[:2]
        ka, kb = _spatial(self.a_shape), _spatial(self.b_shape)
        first_k, second_k = (kb, ka) if order == "ba" else (ka, kb)
        first_dil = geometry.dilation if order == "ba" else tuple(d * k for d, k in zip(geometry.dilation, kb))
        second_dil = tuple(d * k for d, k in zip(geometry.dilation, kb)) if order == "ba" else geometry.dilation
        first_stride = tuple(s if k == 1 else 1 for s, k in zip(geometry.stride, second_k))
        second_stride = tuple(1 if k == 1 else s for s, k in zip(geometry.stride, second_k))
        mid_hw = tuple(
            (p - d * (k - 1) - 1) // s + 1
            for p, d, k, s in zip(geometry.padded_hw, first_dil, first_k, first_stride)
        )
        out_hw = tuple(
            (m - d * (k - 1) - 1) // s + 1 for m, d, k, s in zip(mid_hw, second_dil, second_k, second_stride)
        )
        r = self.rank
        if order == "ba":  # batch N*C1, B stacked [R*F2, C2, Kh2, Kw2]; then batch N*F2, A grouped by R
            first = dict(kernel=first_k, stride=first_stride, dilation=first_dil, out_hw=mid_hw,
                         macs=c1 * r * f2 * c2 * math.prod(kb) * math.prod(mid_hw))
            second = dict(kernel=second_k, stride=second_stride, dilation=second_dil, out_hw=out_hw,
                          macs=f2 * r * f1 * c1 * math.prod(ka) * math.prod(out_hw))
        else:  # batch N*C2, A stacked [R*F1, C1, Kh1, Kw1]; then batch N*F1, B grouped by R
            first = dict(kernel=first_k, stride=first_stride, dilation=first_dil, out_hw=mid_hw,
                         macs=c2 * r * f1 * c1 * math.prod(ka) * math.prod(mid_hw))
            second = dict(kernel=second_k, stride=second_stride, dilation=second_dil, out_hw=out_hw,
                          macs=f1 * r * f2 * c2 * math.prod(kb) * math.prod(out_hw))
        return first, second

    def order_macs(self, geometry: ConvGeometry, order: Order) -> int:
        first, second = self.steps(geometry, order)
        return first["macs"] + second["macs"]

    def cheaper_order(self, geometry: ConvGeometry) -> Order:
        """The contraction order with fewer MACs for this geometry (ties go to ``"ba"``)."""
        return min(ORDERS, key=lambda order: self.order_macs(geometry, order))

    def macs(self, geometry: ConvGeometry) -> int:
        """MACs per sample of the factorized forward (the cheaper order), as fvcore counts them."""
        return self.order_macs(geometry, self.cheaper_order(geometry))

    def dense_macs(self, geometry: ConvGeometry) -> int:
        """MACs per sample of the dense layer this spec replaces."""
        return math.prod(self.weight_shape) * math.prod(geometry.out_hw(_spatial(self.weight_shape)))

    def __str__(self) -> str:
        def fmt(shape: tuple[int, ...]) -> str:
            return "x".join(map(str, shape))

        return f"{fmt(self.a_shape)}⊗{fmt(self.b_shape)} r{self.rank}"
