"""The Kronecker-factorized convolution, every execution path. Pure functions over tensors.

Factorized forward (exact for any factorization, stride, padding and dilation; see DESIGN.md): a chain of
convolutions, one per factor, each over the channels its factor owns, at the dilation its kernel digit is worth
(``d`` times the product of the later factors' kernel sizes). For two factors with B first: conv the padded input
viewed ``[N*C1, C2, H, W]`` with B stacked ``[R*F2, C2, Kh2, Kw2]`` at dilation d, then conv with A arranged
``[F1, R*C1, Kh1, Kw1]`` at dilation ``(Kh2*d, Kw2*d)``, which also sums over R. Stride-1 convs commute, so every
order is exact; they cost differently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from gkpd.decompose import reconstruct
from gkpd.spec import ConvGeometry, KroneckerSpec, Order

__all__ = [
    "Path", "PATHS", "Chain", "plan", "packs", "kronecker_conv2d", "kronecker_linear", "factorized_conv2d",
    "materialized_conv2d", "is_plain",
]

Path = Literal["factorized", "materialized"]
PATHS: tuple[Path, ...] = ("factorized", "materialized")


def in_graph() -> bool:
    """Whether this call is being traced (the TorchScript ONNX exporter, fvcore) or compiled (torch.export,
    torch.compile): the graph must then hold the factors and the portable ops, not values kept for eager runs."""
    return torch._C._get_tracing_state() is not None or torch.compiler.is_compiling()


# oneDNN's conv op on a kernel packed ahead into oneDNN's blocked layout: the pair torch.compile's CPU backend runs
# frozen weights with. F.conv2d repacks its kernel and sets up the conv on every call; at batch 1 that is a large
# share of a thin conv (see :func:`packs`).
_PACKED_OPS = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op) for op in ("_reorder_convolution_weight", "_convolution_pointwise"))


def packs(x: torch.Tensor) -> bool:
    """Whether a plain chain's convs on ``x`` may run on packed kernels (:meth:`Chain.pack`): one float32 image on a
    CPU with oneDNN on, eager (a caller that keeps the packed kernels also runs without autograd).

    Measured on the 2-core build machine (torch 2.14.1), one image: the SVD-like split's thin first conv took
    128 us packed against 152 us through F.conv2d (64 -> 14 channels at 32x32), 110 against 189 us (512 -> 115 at
    4x4). At batch 64 the packed conv, whose output comes channels_last, made the chain slower (0.43x -> 0.47x dense).
    """
    return (_PACKED_OPS and x.shape[0] == 1 and x.dtype == torch.float32 and x.device.type == "cpu"
            and torch._C._get_mkldnn_enabled() and not in_graph())


def _pad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` padded as far as the first conv cannot do it, and the ``padding`` left for that conv.

    A conv pads symmetric zeros itself without copying the input (measured on 2 CPU cores: the copy made a
    64->64 3x3 conv at batch 64 20-50% slower); only asymmetric pads ("same", even kernel) need ``F.pad``.
    """
    padding = _conv_padding(pads)
    if padding is not None:
        return x, padding
    top, bottom, left, right = pads
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _conv_padding(pads: tuple[int, int, int, int]) -> tuple[int, int] | None:
    """The ``padding`` a conv does itself for ``pads (top, bottom, left, right)``; None when they are asymmetric."""
    top, bottom, left, right = pads
    return (top, left) if top == bottom and left == right else None


def factorized_conv2d(
    x: torch.Tensor,
    *factors: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    order: Order | None = None,
) -> torch.Tensor:
    """The chain of convolutions: ``x [N, C, H, W]``, factors ``[R, F_n, C_n, Kh_n, Kw_n]`` -> ``[N, F, Ho, Wo]``.

    The tensor travels as ``[N, R, m_1, ..., m_N, H, W]``, mode n holding C_n channels until its factor's step
    and F_n after. A step folds every other mode into the batch and convolves the ``R * C_n`` channels: the first
    step (no rank axis yet) maps ``C_n`` to ``R * F_n``; a middle step is grouped by rank; the last sums over the
    rank inside one conv (A arranged ``[F_n, R * C_n, kh, kw]``), so no ``R * F`` intermediate is made.
    ``order`` (the factor indices in the sequence applied; "ba"/"ab" for two) defaults to the cheapest.
    """
    chain = plan(factors, (x.shape[-2], x.shape[-1]), stride, dilation, pads, order)
    return chain.run(x, chain.kernels(factors))


def plan(factors: Sequence[torch.Tensor], in_hw: tuple[int, int], stride: tuple[int, int] = (1, 1),
         dilation: tuple[int, int] = (1, 1), pads: tuple[int, int, int, int] = (0, 0, 0, 0),
         order: Order | None = None) -> Chain:
    """The :class:`Chain` of ``factors`` on ``in_hw`` maps, worked out once per setting (cached)."""
    # ints: while tracing (ONNX export) sizes are tensors, which would hash by identity
    return _chain(tuple(tuple(map(int, f.shape)) for f in factors), (int(in_hw[0]), int(in_hw[1])), tuple(stride),
                  tuple(dilation), tuple(pads), order)


@dataclasses.dataclass(frozen=True, eq=False)
class Chain:
    """One setting's factorized forward: its spec, its steps in order, and how it runs.

    ``route``: "plain" (every step a plain conv, :func:`is_plain`), "inner first" (:func:`_inner_first_then_1x1`)
    or "general" (channels folded into the batch between steps). ``pointwise``: per step of a plain chain, whether
    it is an unpadded 1x1 stride-1 conv over all channels (:func:`_pointwise`); ``convs``: per step of a plain
    chain, its conv's stride, padding, dilation and groups (asymmetric ``pads`` are done by ``F.pad`` first, and
    the first conv pads none).

    :meth:`kernels` arranges the factors as the steps' kernels (views where the layout allows, so gradients flow);
    a layer at inference keeps them between calls, packed for oneDNN where :func:`packs` allows (:meth:`pack`).
    :meth:`run` applies the chain to any batch.
    """

    spec: KroneckerSpec
    steps: tuple[dict, ...]
    route: str
    pointwise: tuple[bool, ...]
    convs: tuple[tuple[tuple[int, int], tuple[int, int], tuple[int, int], int], ...]
    pads: tuple[int, int, int, int]

    def kernels(self, factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Each step's kernel: the first maps ``C_m`` to ``R * F_m`` (``[R*F_m, C_m, kh, kw]``), a middle one is
        the same grouped by rank, the last sums over the rank (``[F_m, R*C_m, kh, kw]``); the inner-first route's
        A step sums over ``(C1, R)`` (``[F1, C1*R, 1]``)."""
        rank, last, kernels = factors[0].shape[0], len(self.steps) - 1, []
        for i, step in enumerate(self.steps):
            weight = factors[step["factor"]]
            f_m, c_m, kernel_hw = weight.shape[1], weight.shape[2], weight.shape[3:]
            if self.route == "inner first" and i == 1:
                kernels.append(weight.reshape(rank, f_m, c_m).permute(1, 2, 0).reshape(f_m, c_m * rank, 1))
            elif i == last:
                kernels.append(weight.transpose(0, 1).reshape(f_m, rank * c_m, *kernel_hw))
            else:
                kernels.append(weight.reshape(rank * f_m, c_m, *kernel_hw))
        return tuple(kernels)

    def pack(self, kernels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """A plain chain's :meth:`kernels` with every conv's kernel packed into oneDNN's layout (an opaque tensor:
        no autograd, no storage) and the matmul steps' laid out contiguously; :meth:`run` on an input that
        :func:`packs`."""
        if self.route != "plain":
            raise ValueError(f"only a plain chain packs its kernels, not a {self.route!r} one")
        return tuple(kernel.contiguous() if pointwise else torch.ops.mkldnn._reorder_convolution_weight(
            kernel.contiguous(), padding, stride, dilation, groups)
            for kernel, pointwise, (stride, padding, dilation, groups) in zip(kernels, self.pointwise, self.convs))

    def run(self, x: torch.Tensor, kernels: Sequence[torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
        """The chain on ``x [N, C, H, W]`` with :meth:`kernels` (or :meth:`pack`'s); ``bias`` goes into a plain chain's
        last step, else it is added after."""
        x, padding = _pad(x, self.pads)
        if self.route == "plain":
            return _plain_chain(x, kernels, self.pointwise, self.convs, bias)  # the bias goes into the last step
        if self.route == "inner first":
            y = _inner_first_chain(x, kernels, self.steps, padding, self.spec)
        else:
            y = _general_chain(x, kernels, self.steps, padding, self.spec)
        # The bias is one add after the sum; fvcore counts no MACs for it, as for a dense conv's bias.
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def _general_chain(x: torch.Tensor, kernels: Sequence[torch.Tensor], steps: Sequence[dict],
                   padding: tuple[int, int], spec: KroneckerSpec) -> torch.Tensor:
    """The chain that folds the other modes' channels into the batch at each step (see :func:`factorized_conv2d`)."""
    rank, count, n = spec.rank, len(steps), x.shape[0]
    sizes = [s[1] for s in spec.factor_shapes]  # current size of each mode
    y = x.reshape(n, 1, *sizes, *x.shape[-2:])
    labels = ["n", "r", *range(count)]  # axis labels before the two spatial axes
    for i, (step, kernel) in enumerate(zip(steps, kernels)):
        m = step["factor"]
        f_m, c_m = spec.factor_shapes[m][:2]
        first, last = i == 0, i == count - 1
        others = [j for j in range(count) if j != m]
        layout = ["n", *others, "r", m]
        # Explicit (non-negative) spatial axes: ONNX Runtime rejects a Transpose perm with negative entries.
        spatial = (len(labels), len(labels) + 1)
        y = y.permute(*[labels.index(a) for a in layout], *spatial)
        batch = n * math.prod(sizes[j] for j in others)
        y = y.reshape(batch, (1 if first else rank) * c_m, *y.shape[-2:])
        y = F.conv2d(y, kernel, stride=step["stride"], padding=padding if first else 0,
                     dilation=step["dilation"], groups=1 if first or last else rank)
        sizes[m] = f_m
        y = y.reshape(n, *(sizes[j] for j in others), 1 if last else rank, f_m, *y.shape[-2:])
        labels = layout
    # Back to [N, m_1, ..., m_N, Ho, Wo] (the rank axis is 1 now): factor 1's digit is the most significant.
    y = y.permute(*[labels.index(a) for a in ["n", *range(count)]], labels.index("r"), len(labels), len(labels) + 1)
    return y.reshape(n, spec.weight_shape[0], *y.shape[-2:])


@functools.lru_cache(maxsize=4096)
def _chain(factor_shapes: tuple[tuple[int, ...], ...], in_hw: tuple[int, int], stride: tuple[int, int],
           dilation: tuple[int, int], pads: tuple[int, int, int, int], order: Order | None
           ) -> Chain:
    """The :class:`Chain` of a setting: its spec, steps and route ("plain", "inner first" or "general"), and for a
    plain chain which steps are unpadded 1x1 stride-1 convs over all channels (:func:`_pointwise`).

    Building the spec and costing every order took about 0.1 ms a call on the build machine (1.5 GHz-class core),
    a quarter of a 64-channel 3x3 conv at batch 1; the answer depends only on shapes and geometry.
    """
    shapes = [shape[1:] for shape in factor_shapes]
    weight_shape = tuple(math.prod(d) for d in zip(*shapes))
    spec = KroneckerSpec(weight_shape, rank=factor_shapes[0][0], factor_shapes=shapes)
    geometry = ConvGeometry(in_hw, stride, dilation, pads)
    steps = tuple(spec.steps(geometry, order if order is not None else spec.cheaper_order(geometry)))
    padding = _conv_padding(pads)
    if is_plain(spec, steps):
        last = len(steps) - 1
        convs = tuple(  # the first pads (asymmetric pads: F.pad does them, the conv none); a middle one is grouped
            (tuple(step["stride"]), (padding or (0, 0)) if i == 0 else (0, 0), tuple(step["dilation"]),
             1 if i in (0, last) else spec.rank) for i, step in enumerate(steps))
        pointwise = tuple(
            groups == 1 and tuple(step["kernel"]) == (1, 1) and conv_stride == (1, 1) and conv_padding == (0, 0)
            for step, (conv_stride, conv_padding, _, groups) in zip(steps, convs))
        return Chain(spec, steps, "plain", pointwise, convs, pads)
    route = "inner first" if _inner_first_then_1x1(shapes, steps) else "general"
    return Chain(spec, steps, route, (), (), pads)


def is_plain(spec: KroneckerSpec, steps: Sequence[dict]) -> bool:
    """Whether every step of the chain is a plain conv: no other mode has more than one channel at that step.

    Then no channel is folded into the batch and nothing is permuted: e.g. the SVD-like split ``a (F,1,kh,kw)``,
    ``b (1,C,kh,kw)`` in order "ba" is a conv C -> R, then a conv R -> F; CP's chain adds depthwise convs.
    """
    sizes = [s[1] for s in spec.factor_shapes]
    for step in steps:
        m = step["factor"]
        if math.prod(size for j, size in enumerate(sizes) if j != m) != 1:
            return False
        sizes[m] = spec.factor_shapes[m][0]
    return True


def _inner_first_then_1x1(factor_shapes: Sequence[Sequence[int]], steps: Sequence[dict]) -> bool:
    """Two factors, B (the inner channel digit) first, and A a 1x1 kernel: the chain needs no permute at all.

    E.g. the square split ``a (F1,C1,1,1) ⊗ b (F2,C2,3,3)``. Folding A's channels into the batch is a view of the
    input (they are the outer digit), and after B's conv the maps sit as ``[N, C1, R, F2, pixels]``, so A's step is
    one 1x1 conv over the adjacent ``(C1, R)`` axes with ``(F2, pixels)`` as its length: its output is already
    ``[N, F1, F2, pixels]``, the layer's channel order. The general chain permutes the ``R * F2`` maps before A's
    step and the output after it.
    """
    return (len(factor_shapes) == 2 and [step["factor"] for step in steps] == [1, 0]
            and tuple(factor_shapes[0][-2:]) == (1, 1) and tuple(steps[1]["stride"]) == (1, 1))


def _inner_first_chain(x: torch.Tensor, kernels: Sequence[torch.Tensor], steps: Sequence[dict],
                       padding: tuple[int, int], spec: KroneckerSpec) -> torch.Tensor:
    """The chain of :func:`_inner_first_then_1x1` on ``x [N, C1*C2, H, W]`` (padded as far as needed)."""
    (f1, c1, _, _), (f2, c2, _, _) = spec.factor_shapes
    n = x.shape[0]
    y = F.conv2d(x.reshape(n * c1, c2, *x.shape[-2:]), kernels[0], stride=steps[0]["stride"], padding=padding,
                 dilation=steps[0]["dilation"])
    ho, wo = y.shape[-2:]
    # [N*C1, R*F2, Ho, Wo] is [N, C1*R, F2*Ho*Wo]; A as [F1, (C1, R), 1] sums over both in one conv.
    y = _pointwise(y.reshape(n, c1 * spec.rank, f2 * ho * wo), kernels[1])
    return y.reshape(n, f1 * f2, ho, wo)


def _pointwise(y: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None = None,
               channels_last: bool = False) -> torch.Tensor:
    """A 1x1, stride-1, unpadded conv of ``y [N, C, *pixels]`` with ``kernel [F, C, 1(, 1)]`` (plus ``bias``), as
    one batched matmul (one matmul at batch 1); ``channels_last``: the answer's layout when ``y`` is one
    channels_last image (else it is contiguous).

    The same sum as the conv, in the same MACs (fvcore counts bmm as N*F*C*pixels, as it counts the conv). On the
    2-core build machine (torch 2.14.1, oneDNN) a 1x1 conv on NCHW maps was up to 20x slower than the matmul:
    14 -> 64 channels at 32x32, batch 64, 10.0 ms against 0.78 ms; the square split's conv1d 22.9 ms against
    1.0 ms. At inference the matmul was as fast or faster on every shape timed; a training step (forward and
    backward) lost only in fp32 on small maps (58 -> 256 channels at 8x8: 4.6 against 3.2 ms), and search.train
    trains channels_last, where the conv is kept anyway. A channels_last batch keeps the conv (the matmul would
    need a copy), except one image, which is a ``[pixels, C]`` matrix as it lies; a traced or compiled graph keeps
    the conv too: the exported ONNX model keeps its Conv nodes, which onnxruntime runs as one gemm. On a GPU (not
    measured here) the conv stays too.
    """
    if y.device.type == "cpu" and not in_graph():
        n, c, f = y.shape[0], y.shape[1], kernel.shape[0]
        weight = kernel.reshape(f, c)
        column = None if bias is None else bias[:, None]  # broadcast over the pixels of an [F, pixels] answer
        if y.is_contiguous():
            if n == 1:
                return _times(weight, y.view(c, -1), column).view(n, f, *y.shape[2:])
            return _times(weight.expand(n, f, c), y.view(n, c, -1), column).view(n, f, *y.shape[2:])
        if n == 1 and y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last):
            pixels = y.permute(0, 2, 3, 1).reshape(-1, c)  # a view
            if channels_last:
                return _times(pixels, weight.t(), bias).view(1, *y.shape[2:], f).permute(0, 3, 1, 2)
            return _times(weight, pixels.t(), column).view(1, f, *y.shape[2:])
    return (F.conv2d if kernel.dim() == 4 else F.conv1d)(y, kernel, bias)


def _times(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ b`` (batched when 3-D), plus ``bias`` broadcast over it in the same op."""
    if a.dim() == 3:
        return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _plain_chain(x: torch.Tensor, kernels: Sequence[torch.Tensor], pointwise: Sequence[bool],
                 convs: Sequence[tuple], bias: torch.Tensor | None) -> torch.Tensor:
    """The chain of an all-plain factorization (see :func:`is_plain`) on ``x [N, C, H, W]`` as it is: no reshape
    of the activations, and the answer in ``x``'s layout (a channels_last input stays channels_last); ``bias`` goes
    into the last step. A packed kernel (:meth:`Chain.pack`) runs on oneDNN's own conv op."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    y, last = x, len(kernels) - 1
    for i, kernel in enumerate(kernels):
        step_bias = bias if i == last else None
        stride, padding, dilation, groups = convs[i]
        if pointwise[i]:
            y = _pointwise(y, kernel, step_bias, channels_last)  # e.g. the SVD-like split's R -> F, CP's first and last
        elif kernel.is_mkldnn:
            y = torch.ops.mkldnn._convolution_pointwise(y, kernel, step_bias, padding, stride, dilation, groups,
                                                        "none", [], None)
        else:
            y = F.conv2d(y, kernel, step_bias, stride, padding, dilation, groups)
    # oneDNN's op answers channels_last; the layer answers in its input's layout, as nn.Conv2d does.
    return y if channels_last or y.is_contiguous() else y.contiguous()


def materialized_conv2d(
    x: torch.Tensor,
    *factors: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> torch.Tensor:
    """Rebuild ``W = sum_r f1[r] ⊗ ... ⊗ fN[r]`` and run one dense conv (as fast as dense on CPUs)."""
    x, padding = _pad(x, pads)
    return F.conv2d(x, reconstruct(*factors), stride=stride, padding=padding, dilation=dilation)


def kronecker_conv2d(
    x: torch.Tensor,
    factors: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    path: Path = "factorized",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conv of ``x [N, C, H, W]`` with ``sum_r f1[r] ⊗ ... ⊗ fN[r]`` (cross-correlation, zero pads ``(top, bottom, left, right)``).

    ``weight``: that sum, when the caller keeps it already (a layer at inference); the materialized path uses it.
    """
    if path == "factorized":
        chain = plan(factors, (x.shape[-2], x.shape[-1]), stride, dilation, pads)
        return chain.run(x, chain.kernels(factors), bias)
    if path != "materialized":
        raise ValueError(f"unknown path {path!r}: allowed {PATHS}")
    x, padding = _pad(x, pads)
    # the bias goes into the conv, as in a dense layer
    return F.conv2d(x, reconstruct(*factors) if weight is None else weight, bias, stride=stride, padding=padding,
                    dilation=dilation)


def kronecker_linear(
    x: torch.Tensor, factors: Sequence[torch.Tensor], bias: torch.Tensor | None = None, *, path: Path = "factorized",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., C]`` times ``(sum_r f1[r] ⊗ ... ⊗ fN[r])^T`` with factors ``[R, F_n, C_n]`` -> ``[..., F]``.

    A linear layer is a 1x1 convolution, so it shares the conv paths (and their exact cost). ``weight``: the
    sum, when the caller keeps it already (the materialized path uses it).
    """
    if path == "materialized":
        return F.linear(x, reconstruct(*factors) if weight is None else weight, bias)
    lead, c = x.shape[:-1], x.shape[-1]
    y = kronecker_conv2d(x.reshape(-1, c, 1, 1), [f[..., None, None] for f in factors], path=path)
    y = y.reshape(*lead, -1)
    return y if bias is None else y + bias
