"""What one Kronecker factorization of a layer is, and what it costs.

GKPD (Hameed et al., "Convolutional Neural Network Compression through Generalized Kronecker Product
Decomposition", arXiv 2109.14710) approximates a weight ``W [F, C, Kh, Kw]`` by ``sum_r A_r ⊗ B_r`` with
``A_r [F1, C1, Kh1, Kw1]`` and ``B_r [F2, C2, Kh2, Kw2]``. A linear weight ``[F, C]`` is the 2-D case. The same
holds for N factors, ``sum_r A1_r ⊗ ... ⊗ AN_r``, whose corner with one factor per mode is CP.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal, Union

__all__ = ["KroneckerSpec", "ConvGeometry", "Order", "ORDERS", "MAX_FACTORS"]

# Two factors: "ba" (B first, then A: the design's order) or "ab" (the mirror). N factors: a permutation of the
# factor indices, the first applied first.
Order = Union[Literal["ba", "ab"], tuple[int, ...]]
ORDERS: tuple[Order, ...] = ("ba", "ab")
_NAMED_ORDERS = {"ba": (1, 0), "ab": (0, 1)}
MAX_FACTORS = 8


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


def _order_perm(order: Order, factors: int) -> tuple[int, ...]:
    """An order as the factor indices in the sequence the chain applies them."""
    if order in _NAMED_ORDERS:
        if factors != 2:
            raise ValueError(f"order {order!r} names a two-factor order; this spec has {factors} factors")
        return _NAMED_ORDERS[order]  # type: ignore[index]
    perm = tuple(order)  # type: ignore[arg-type]
    if sorted(perm) != list(range(factors)):
        raise ValueError(f"order {order!r} must be a permutation of the factor indices 0..{factors - 1}")
    return perm


@dataclass(frozen=True)
class KroneckerSpec:
    """A rank-``rank`` factorization ``W ≈ sum_r F1_r ⊗ F2_r ⊗ ... ⊗ FN_r`` of a ``weight_shape`` weight.

    Give either ``a_shape`` (two factors, the first of shape ``a_shape``; the second's shape follows) or
    ``factor_shapes`` (N >= 2 shapes multiplying, mode by mode, to ``weight_shape``). Both forms of the same
    two-factor split are the same spec. ``a_shape`` is always the first factor's shape and ``b_shape`` the
    shape of the product of the others. With shapes ``(F,1,1,1), (1,C,1,1), (1,1,Kh,1), (1,1,1,Kw)`` this is
    the CP decomposition of the kernel.
    """

    weight_shape: tuple[int, ...]
    a_shape: tuple[int, ...] | None = None
    rank: int = None  # type: ignore[assignment]  # required; a default only so that factor_shapes= can follow
    factor_shapes: tuple[tuple[int, ...], ...] | None = None
    b_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        weight_shape = _shape(self.weight_shape, "weight_shape")
        if len(weight_shape) not in (2, 4):
            raise ValueError(
                f"weight_shape must be 4-D (conv: out, in, kh, kw) or 2-D (linear: out, in), got {weight_shape}"
            )
        if self.factor_shapes is None:
            if self.a_shape is None:
                raise ValueError("give a_shape (two factors) or factor_shapes (two or more)")
            a_shape = _shape(self.a_shape, "a_shape")
            if len(a_shape) != len(weight_shape):
                raise ValueError(f"a_shape {a_shape} must have as many dims as weight_shape {weight_shape}")
            bad = [i for i, (w, a) in enumerate(zip(weight_shape, a_shape)) if w % a]
            if bad:
                raise ValueError(
                    f"a_shape {a_shape} does not divide weight_shape {weight_shape} in dim {bad[0]} "
                    f"({weight_shape[bad[0]]} % {a_shape[bad[0]]} != 0)"
                )
            shapes = (a_shape, tuple(w // a for w, a in zip(weight_shape, a_shape)))
        else:
            try:
                raw = list(self.factor_shapes)
            except TypeError:
                raise ValueError(f"factor_shapes must be a sequence of shapes, got {self.factor_shapes!r}") from None
            if len(raw) < 2:
                raise ValueError(f"factor_shapes needs at least two shapes, got {len(raw)}")
            if len(raw) > MAX_FACTORS:
                raise ValueError(f"factor_shapes holds at most {MAX_FACTORS} shapes, got {len(raw)}")
            shapes = tuple(_shape(s, f"factor_shapes[{i}]") for i, s in enumerate(raw))
            if any(len(s) != len(weight_shape) for s in shapes):
                raise ValueError(f"every factor shape must have as many dims as weight_shape {weight_shape}, "
                                 f"got {list(shapes)}")
            product = tuple(math.prod(dims) for dims in zip(*shapes))
            if product != weight_shape:
                raise ValueError(f"factor_shapes {list(shapes)} multiply to {product}, not weight_shape {weight_shape}")
            if self.a_shape is not None and _shape(self.a_shape, "a_shape") != shapes[0]:
                raise ValueError(f"a_shape {tuple(self.a_shape)} disagrees with factor_shapes[0] {shapes[0]}")
        object.__setattr__(self, "weight_shape", weight_shape)
        object.__setattr__(self, "factor_shapes", shapes)
        object.__setattr__(self, "a_shape", shapes[0])
        object.__setattr__(self, "b_shape", tuple(w // a for w, a in zip(weight_shape, shapes[0])))
        try:
            integral = not isinstance(self.rank, bool) and int(self.rank) == self.rank
        except (TypeError, ValueError):  # None, "three", ...
            integral = False
        if not integral:
            raise ValueError(f"rank must be an int, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if not 1 <= self.rank <= self.max_rank:
            what = f"a_shape {shapes[0]}" if len(shapes) == 2 else f"factor_shapes {list(shapes)}"
            raise ValueError(
                f"rank {self.rank} is out of range for {what} of weight_shape {weight_shape}: "
                f"allowed 1..{self.max_rank}"
            )

    @property
    def num_factors(self) -> int:
        return len(self.factor_shapes)  # type: ignore[arg-type]

    @property
    def max_rank(self) -> int:
        """Two factors: the full Kronecker rank ``min(prod(a_shape), prod(b_shape))``. More: the largest rank a
        tensor of the rearranged shape can have (``prod`` of all factor sizes but the largest)."""
        sizes = [math.prod(s) for s in self.factor_shapes]  # type: ignore[union-attr]
        return math.prod(sizes) // max(sizes)

    @property
    def num_params(self) -> int:
        """Parameters in all factors (bias excluded)."""
        return self.rank * sum(math.prod(s) for s in self.factor_shapes)  # type: ignore[union-attr]

    @property
    def dense_params(self) -> int:
        return math.prod(self.weight_shape)

    def with_rank(self, rank: int) -> KroneckerSpec:
        return KroneckerSpec(self.weight_shape, rank=rank, factor_shapes=self.factor_shapes)

    def orders(self) -> tuple[Order, ...]:
        """Every contraction order: ``"ba"``/``"ab"`` for two factors, permutations of factor indices for more."""
        if self.num_factors == 2:
            return ORDERS
        return tuple(itertools.permutations(range(self.num_factors)))

    def dilations(self, dilation: tuple[int, int]) -> list[tuple[int, int]]:
        """Each factor's dilation: its kernel digit is worth the product of the later factors' kernel sizes."""
        kernels = [_spatial(s) for s in self.factor_shapes]  # type: ignore[union-attr]
        out = []
        for n in range(len(kernels)):
            out.append(tuple(d * math.prod(k[axis] for k in kernels[n + 1:]) for axis, d in enumerate(dilation)))
        return out  # type: ignore[return-value]

    def steps(self, geometry: ConvGeometry, order: Order) -> list[dict]:
        """The convolutions of the factorized forward in ``order``: factor, kernel, stride, dilation, output size, MACs.

        Each factor is a conv at its own dilation, and stride-1 convs commute, so any order is exact. The stride
        goes to the last step whose kernel is wider than 1 on that axis: the steps after it compute on the
        strided grid and nothing is thrown away. A step over factor m maps its ``C_m`` channels to ``F_m`` for
        every rank; MACs = (other modes' current sizes) * R * F_m * C_m * Kh_m * Kw_m * out pixels. The last step
        also sums over the rank (one conv over ``R * C_m`` channels), which fvcore counts as the same MACs.
        """
        perm = _order_perm(order, self.num_factors)
        shapes = self.factor_shapes  # type: ignore[assignment]
        kernels = [_spatial(s) for s in shapes]
        dilations = self.dilations(geometry.dilation)
        strides_at = []
        for axis in (0, 1):
            wide = [i for i, m in enumerate(perm) if kernels[m][axis] > 1]
            strides_at.append(wide[-1] if wide else 0)
        sizes = [s[1] for s in shapes]  # each mode: C_m until its step, F_m after
        hw = geometry.padded_hw
        steps = []
        for i, m in enumerate(perm):
            stride = tuple(geometry.stride[axis] if strides_at[axis] == i else 1 for axis in (0, 1))
            hw = tuple((p - d * (k - 1) - 1) // s + 1 for p, d, k, s in zip(hw, dilations[m], kernels[m], stride))
            others = math.prod(size for j, size in enumerate(sizes) if j != m)
            f_m, c_m = shapes[m][:2]
            macs = others * self.rank * f_m * c_m * math.prod(kernels[m]) * math.prod(hw)
            # A dilation along an axis of kernel size 1 changes nothing but the kernel the backend picks (a 1x1 conv
            # at dilation 3 took 3x as long at batch 1 on the build machine): it is left at 1 there.
            dilation = tuple(d if k > 1 else 1 for d, k in zip(dilations[m], kernels[m]))
            steps.append(dict(factor=m, kernel=kernels[m], stride=stride, dilation=dilation, out_hw=hw, macs=macs))
            sizes[m] = f_m
        return steps

    def order_macs(self, geometry: ConvGeometry, order: Order) -> int:
        return sum(step["macs"] for step in self.steps(geometry, order))

    def cheaper_order(self, geometry: ConvGeometry) -> Order:
        """The contraction order with fewest MACs for this geometry (ties go to the first of ``orders()``)."""
        return min(self.orders(), key=lambda order: self.order_macs(geometry, order))

    def macs(self, geometry: ConvGeometry) -> int:
        """MACs per sample of the factorized forward (the cheapest order), as fvcore counts them."""
        return self.order_macs(geometry, self.cheaper_order(geometry))

    def dense_macs(self, geometry: ConvGeometry) -> int:
        """MACs per sample of the dense layer this spec replaces."""
        return math.prod(self.weight_shape) * math.prod(geometry.out_hw(_spatial(self.weight_shape)))

    def __str__(self) -> str:
        def fmt(shape: tuple[int, ...]) -> str:
            return "x".join(map(str, shape))

        return "⊗".join(fmt(s) for s in self.factor_shapes) + f" r{self.rank}"  # type: ignore[union-attr]
