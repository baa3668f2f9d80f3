"""Drop-in Kronecker layers: ``KroneckerConv2d`` and ``KroneckerLinear``, with the attribute names of nn.Conv2d/Linear."""

from __future__ import annotations

import contextlib
import math
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from gkpd.decompose import decompose, reconstruct
from gkpd.functional import (PATHS, Chain, Path, _conv_padding, in_graph, kronecker_conv2d, kronecker_linear, packs,
                             plan)
from gkpd.spec import ConvGeometry, KroneckerSpec

__all__ = ["KroneckerConv2d", "KroneckerLinear", "LayerPath", "set_path", "use_path", "conv_pads", "FACTOR_NAMES"]

LayerPath = Literal["auto", "factorized", "materialized"]
_LAYER_PATHS: tuple[LayerPath, ...] = ("auto", *PATHS)

# (device, dtype, spec, geometry, batch, memory format, grad) -> the faster path, measured once per process.
_AUTO_CHOICE: dict[tuple, Path] = {}
# (chain, memory format, threads) -> whether the chain ran faster on its kernels packed for oneDNN, measured once.
_PACK_CHOICE: dict[tuple, bool] = {}
# The packed kernels must beat the plain ones by this fraction: a near tie is noise, and plain tensors are the
# simpler thing to keep (packed ones are opaque: no storage, no copy).
PACK_MARGIN = 0.05
PACK_REPEATS = 5  # timed rounds of each form: a 10% gap at batch 1 flipped between runs with 3 on the build machine


def conv_pads(padding: str | int | tuple[int, ...], kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """nn.Conv2d's ``padding`` as explicit zero pads ``(top, bottom, left, right)``."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        # As torch does for "same": the odd extra pixel goes after (bottom/right).
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return (totals[0] // 2, totals[0] - totals[0] // 2, totals[1] // 2, totals[1] - totals[1] // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding {padding!r} is not supported: allowed an int, a pair, 'same' or 'valid'")
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return (ph, ph, pw, pw)


def _check_path(path: str) -> None:
    if path not in _LAYER_PATHS:
        raise ValueError(f"unknown path {path!r}: allowed {_LAYER_PATHS}")


def _needs_grad(factors: Sequence[torch.Tensor]) -> bool:
    """Whether a forward on ``factors`` builds an autograd graph (training): any factor trains, grad mode is on."""
    return torch.is_grad_enabled() and any(f.requires_grad for f in factors)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


PROBE_ROWS = 16  # images in the first, cheap timing round of path="auto"
# "factorized" must beat the dense-like "materialized" by this fraction to be chosen: a near tie is noise, and the
# dense conv is the one whose speed does not depend on the factor shapes (so auto is never much slower than dense).
DENSE_MARGIN = 0.05
TIMED_SECONDS, MAX_CALLS = 2e-3, 16  # a timed round of a path runs it for about this long, in at most this many calls


def _least_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each function's least disturbed seconds a call (other load only ever adds time), timed interleaved so that
    drift hits all alike: a warm-up call each (allocations, kernel selection, kept values), a first timed call,
    then ``repeats`` rounds. The first call sizes a function's rounds: one well under a millisecond (batch 1) runs
    for about ``TIMED_SECONDS`` a round (at most ``MAX_CALLS`` calls), or one scheduler hiccup decides."""
    def per_call(fn: Callable[[], object], calls: int) -> float:
        def loop() -> None:
            for _ in range(calls):
                fn()
        return _seconds(loop) / calls

    for fn in fns.values():
        fn()
    best = {name: per_call(fn, 1) for name, fn in fns.items()}
    calls = {name: max(1, min(MAX_CALLS, int(TIMED_SECONDS / max(t, 1e-7)))) for name, t in best.items()}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], per_call(fn, calls[name]))
    return best


def _measure_path(x: torch.Tensor, factors: tuple[torch.Tensor, ...], run, *, repeats: int = 3,
                  margin: float = DENSE_MARGIN) -> Path:
    """Time both exact paths on this very input (forward, plus backward when training) and keep the faster,
    "factorized" only when it is faster than "materialized" by more than ``margin``.

    First a probe round on the first ``PROBE_ROWS`` rows of ``x``: a path 3x slower than the other there is
    out without ever running on the whole input (on CPUs the factorized path of an odd factor shape can be 30x
    slower than dense, and timing it on a batch of 512 once cost more than screening the plan). When both
    paths survive, each is timed on the whole input, interleaved, keeping its least disturbed time (other load
    only ever adds time) of ``repeats`` (:func:`_least_seconds`).
    """
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    training = _needs_grad(factors)
    factors_ = tuple(f.detach().requires_grad_(training) for f in factors)

    def call(path: Path, rows: torch.Tensor):
        def go() -> None:
            y = run(rows, factors_, path)
            if training:
                torch.autograd.grad(y.sum(), factors_)
            sync()
        return go

    def timed(paths: tuple[Path, ...], rows: torch.Tensor, times: int) -> dict[Path, float]:
        return _least_seconds({path: call(path, rows) for path in paths}, times)

    def pick(seconds: dict[Path, float]) -> Path:
        if "factorized" in seconds and "materialized" in seconds:
            return "factorized" if seconds["factorized"] < (1 - margin) * seconds["materialized"] else "materialized"
        return next(iter(seconds))

    with torch.set_grad_enabled(training):
        x_ = x.detach()
        paths: tuple[Path, ...] = ("materialized", "factorized")  # the dense-like path first
        if len(x_) > PROBE_ROWS:
            probe = timed(paths, x_[:PROBE_ROWS], 1)
            paths = tuple(path for path in paths if probe[path] <= 3 * min(probe.values()))
            if len(paths) == 1:
                return paths[0]
        return pick(timed(paths, x_, repeats))


FACTOR_NAMES = "abcdefgh"  # parameter names of the factors, in order: a, b for two factors, then c, d, ...
# Per number of factors, the getter of their parameters in order (C-level: the forward asks for them on every call).
_FACTOR_GETTERS = {n: operator.itemgetter(*FACTOR_NAMES[:n]) for n in range(2, len(FACTOR_NAMES) + 1)}
_version, _address = operator.attrgetter("_version"), operator.methodcaller("data_ptr")


class _KroneckerBase(nn.Module):
    """Factors ``a [R, *shape_1]``, ``b [R, *shape_2]`` (``c``, ``d``, ... for more), optional bias, the path."""

    spec: KroneckerSpec

    def _init_factors(self, spec: KroneckerSpec, bias: bool, path: LayerPath, device, dtype) -> None:
        _check_path(path)
        self.spec = spec
        self.path: LayerPath = path
        for name, shape in zip(FACTOR_NAMES, spec.factor_shapes):
            setattr(self, name, nn.Parameter(torch.empty(spec.rank, *shape, device=device, dtype=dtype)))
        self.bias = nn.Parameter(torch.empty(spec.weight_shape[0], device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Match the dense layer's kaiming-uniform weight variance: Var(W) = R * prod_n Var(factor_n).
        fan_in = math.prod(self.spec.weight_shape[1:])
        std = (1.0 / (3 * fan_in)) ** 0.5  # Var of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        factor_std = (std / self.spec.rank**0.5) ** (1 / self.spec.num_factors)
        for factor in self.factors:
            nn.init.normal_(factor, std=factor_std)
        if self.bias is not None:
            bound = 1 / fan_in**0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def factors(self) -> tuple[torch.Tensor, ...]:
        """The factor parameters, in order: ``[R, *shape_n]`` each."""
        # not getattr: nn.Module.__getattr__ is slow on every forward
        return _FACTOR_GETTERS[self.spec.num_factors](self._parameters)

    def _load_factors(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            for factor, value in zip(self.factors, decompose(weight, self.spec)):
                factor.copy_(value)
            if bias is not None:
                self.bias.copy_(bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight the factors stand for (rebuilt on each access)."""
        return reconstruct(*self.factors)

    def _dense_weight(self, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``reconstruct(*factors)``; at inference kept until a factor changes (:meth:`_kept`)."""
        return self._kept("dense", factors, lambda fs: reconstruct(*fs))

    def _kernels(self, chain: Chain, factors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``chain``'s kernels; at inference kept until a factor changes, each laid out contiguously once."""
        return self._kept(chain, factors, lambda fs: tuple(k.contiguous() for k in chain.kernels(fs)))

    def _inference_kernels(self, chain: Chain, factors: tuple[torch.Tensor, ...], x: torch.Tensor,
                           bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """``chain``'s kept kernels for ``x``: packed for oneDNN (:meth:`Chain.pack`) where :func:`packs` allows it
        and the packed ones ran the chain faster on an input like ``x`` (timed once per chain, layout and thread
        count, :func:`_least_seconds`), else as they are.

        Neither wins everywhere. One image on the 2-core build machine, the layer packed against plain: the SVD-like
        split 64 -> 14 -> 64 at 32x32 0.48x against 0.55x the dense conv, 512 -> 115 -> 512 at 4x4 0.41x against
        0.52x; a rank-1 separable split 256 -> 1 -> 256 at 7x7 99 us against 57 us (oneDNN's op copies an NCHW input
        to channels_last first and answers channels_last).
        """
        if chain.route != "plain" or not packs(x):
            return self._kernels(chain, factors)
        choice = (chain, not x.is_contiguous(), torch.get_num_threads())
        wins = _PACK_CHOICE.get(choice)
        if wins is False:
            return self._kernels(chain, factors)
        packed = self._kept((chain, "packed"), factors, lambda fs: chain.pack(chain.kernels(fs)))
        if wins is None:
            kernels = self._kernels(chain, factors)
            seconds = _least_seconds({"packed": lambda: chain.run(x, packed, bias),
                                      "plain": lambda: chain.run(x, kernels, bias)}, repeats=PACK_REPEATS)
            _PACK_CHOICE[choice] = seconds["packed"] < (1 - PACK_MARGIN) * seconds["plain"]
            # keep one form only (both are exact; the loser is memory)
            self._inference_cache.pop(chain if _PACK_CHOICE[choice] else (chain, "packed"))
            if not _PACK_CHOICE[choice]:
                return kernels
        return packed

    def __getstate__(self) -> dict:
        # Values kept for inference are rebuilt on demand; packed kernels (opaque oneDNN tensors) cannot be copied.
        state = super().__getstate__()
        for name in ("_inference_cache", "_chains", "_auto_memo", "_fast_call"):
            state.pop(name, None)
        return state

    def _kept(self, slot: object, factors: tuple[torch.Tensor, ...], build):
        """``build(factors)``: without autograd (inference) kept in ``slot`` until a factor changes.

        The key is each factor's storage and version counter: an optimizer step, ``load_state_dict`` or any other
        in-place change bumps the version, ``.to()`` gives new storage, so a stale value is never used. A forward
        that needs gradients (training) drops every kept value and builds it each time, as it must.
        """
        if _needs_grad(factors):
            self._inference_cache = {}
            return build(factors)
        # New storage (another device, dtype or shape) has another address; an in-place change bumps the version.
        key = tuple((f.data_ptr(), f._version) for f in factors)
        cache = self.__dict__.setdefault("_inference_cache", {})
        kept = cache.get(slot)
        if kept is None or kept[0] != key:
            with torch.no_grad():
                kept = cache[slot] = (key, build(factors))
        return kept[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.factors
        if not _needs_grad(factors) and not in_graph():
            return self._at_inference(x, factors)
        self.__dict__.pop("_fast_call", None)  # training or tracing: let go of what inference kept
        return self._run(x, factors, self._path(x))

    def _path(self, x: torch.Tensor) -> Path:
        """The path a forward on ``x`` takes: the layer's own, or ``auto``'s choice for inputs like ``x``."""
        raise NotImplementedError

    def _run(self, x: torch.Tensor, factors: tuple[torch.Tensor, ...], path: Path) -> torch.Tensor:
        raise NotImplementedError

    def _inference_call(self, x: torch.Tensor,
                        factors: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward at inference on inputs like ``x``, with everything it needs settled (path, kept values)."""
        raise NotImplementedError

    def _at_inference(self, x: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The forward at inference (no autograd, not in a traced or compiled graph).

        A call settles the path (``auto``'s choice), the kept weight or kernels and the packing, then keeps the
        resulting call for the next input of the same shape, strides, dtype and device, until a factor or the bias
        changes (storage or version, as :meth:`_kept`), the path is set, the thread count changes or a shared
        choice table is replaced. At batch 1 the layer's bookkeeping is then one key built and compared: a
        ResNet-32 compressed 5x (31 Kronecker layers, all on their dense-like path at batch 1) ran 0.83-0.89x the
        dense model's speed with the bookkeeping of every call before, 0.90-0.93x after (medians of 5 runs; the
        same model with plain convs in their place 0.99x), in torch on the 2-core build machine.
        """
        bias = self._parameters.get("bias")
        held = factors if bias is None else (*factors, bias)
        key = (self.path, x.shape, x.stride(), x.dtype, x.device, torch.get_num_threads(), id(_AUTO_CHOICE),
               id(_PACK_CHOICE), *map(_address, held), *map(_version, held))
        fast = self.__dict__.get("_fast_call")
        if fast is None or fast[0] != key:
            fast = self._fast_call = (key, self._inference_call(x, factors))
        return fast[1](x)

    def _choose(self, x: torch.Tensor, key: tuple, run) -> Path:
        if self.path != "auto":
            return self.path
        # The TorchScript-based ONNX exporter traces; torch.export and torch.compile report compiling.
        if in_graph():
            return "factorized"  # exported graphs carry the computation whose cost we report
        grad = _needs_grad(self.factors)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        # This layer's earlier answers first: at batch 1 a forward is well under a millisecond, and building the
        # shared key (it hashes the spec) every call cost a visible share of it.
        memo = self.__dict__.get("_auto_memo")
        if memo is None or memo[0] is not _AUTO_CHOICE:  # none yet, or the shared table was replaced
            memo = self._auto_memo = (_AUTO_CHOICE, {})
        local_key = (x.shape, x.dtype, x.device, channels_last, grad)
        path = memo[1].get(local_key)
        if path is None:
            # Batch sizes share a timing per power of two: a last, partial batch must not trigger a new measurement.
            batch = 1 << max(0, x.shape[0] - 1).bit_length()
            full_key = (x.device, x.dtype, self.spec, key, batch, channels_last, grad)
            if full_key not in _AUTO_CHOICE:
                _AUTO_CHOICE[full_key] = _measure_path(x, self.factors, run)
            path = memo[1][local_key] = _AUTO_CHOICE[full_key]
        return path


class KroneckerConv2d(_KroneckerBase):
    """Conv2d whose weight is ``sum_r a[r] ⊗ b[r]`` (or N factors); exact for any factorization, stride, padding and dilation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        a_shape: tuple[int, int, int, int] | None = None,
        rank: int,
        factor_shapes: Sequence[tuple[int, int, int, int]] | None = None,
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        path: LayerPath = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise NotImplementedError(f"KroneckerConv2d does not support groups > 1 (got groups={groups})")
        if padding_mode != "zeros":
            raise NotImplementedError(f"KroneckerConv2d supports only padding_mode='zeros' (got {padding_mode!r})")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.groups, self.padding_mode = 1, "zeros"
        if isinstance(padding, str) and padding == "same" and self.stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
        self.pads = conv_pads(self.padding, self.kernel_size, self.dilation)
        spec = KroneckerSpec((out_channels, in_channels, *self.kernel_size), a_shape, rank, factor_shapes)
        self._init_factors(spec, bias, path, device, dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, spec: KroneckerSpec, *, path: LayerPath = "auto") -> KroneckerConv2d:
        """Replace ``conv`` by its best rank-R Kronecker approximation (factors by SVD, bias copied)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects nn.Conv2d, got {type(conv).__name__}")
        if tuple(conv.weight.shape) != spec.weight_shape:
            raise ValueError(f"spec weight_shape {spec.weight_shape} does not match conv weight {tuple(conv.weight.shape)}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank=spec.rank, factor_shapes=spec.factor_shapes,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, path=path,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        layer._load_factors(conv.weight, conv.bias)
        return layer

    def geometry(self, in_hw: tuple[int, int]) -> ConvGeometry:
        return ConvGeometry(in_hw, self.stride, self.dilation, self.pads)

    def _run(self, x: torch.Tensor, factors: tuple[torch.Tensor, ...], path: Path) -> torch.Tensor:
        if path == "materialized":
            return kronecker_conv2d(x, factors, self.bias, stride=self.stride, dilation=self.dilation,
                                    pads=self.pads, path=path, weight=self._dense_weight(factors))
        chain = self._chain(x, factors)
        bias = self._parameters.get("bias")  # not getattr: slow
        # A traced or compiled graph (ONNX export, fvcore) arranges the factors in it, so that it holds them.
        if in_graph():
            kernels = chain.kernels(factors)
        elif _needs_grad(factors):
            kernels = self._kernels(chain, factors)  # built with the graph each call
        else:
            kernels = self._inference_kernels(chain, factors, x, bias)
        return chain.run(x, kernels, bias)

    def _chain(self, x: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> Chain:
        """The chain of ``x``'s map size, planned once per layer (building the plan's key cost ~2 us a call)."""
        chains = self.__dict__.setdefault("_chains", {})
        chain = chains.get(x.shape[-2:])
        if chain is None:
            chain = chains[x.shape[-2:]] = plan(factors, x.shape[-2:], self.stride, self.dilation, self.pads)
        return chain

    def _path(self, x: torch.Tensor) -> Path:
        # The geometry, not just the input size: stride, dilation and pads change what each path costs.
        return self.path if self.path != "auto" else self._choose(
            x, (tuple(x.shape[-2:]), self.stride, self.dilation, self.pads), self._run)

    def _inference_call(self, x: torch.Tensor,
                        factors: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        bias = self._parameters.get("bias")
        if self._path(x) == "materialized":
            weight, stride, dilation, pads = self._dense_weight(factors), self.stride, self.dilation, self.pads
            padding = _conv_padding(pads)
            if padding is None:  # asymmetric pads: F.pad first
                return lambda x: kronecker_conv2d(x, factors, bias, stride=stride, dilation=dilation, pads=pads,
                                                  path="materialized", weight=weight)
            return lambda x: F.conv2d(x, weight, bias, stride, padding, dilation)
        chain = self._chain(x, factors)
        kernels = self._inference_kernels(chain, factors, x, bias)
        return lambda x: chain.run(x, kernels, bias)

    def to_dense(self) -> nn.Conv2d:
        """An nn.Conv2d with the reconstructed weight (and the same bias)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                         device=self.a.device, dtype=self.a.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + f", kron={self.spec}, bias={self.bias is not None}, path={self.path}"


class KroneckerLinear(_KroneckerBase):
    """Linear whose weight ``[F, C]`` is ``sum_r a[r] ⊗ b[r]`` with ``a [R, F1, C1]``, ``b [R, F2, C2]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        a_shape: tuple[int, int] | None = None,
        rank: int,
        factor_shapes: Sequence[tuple[int, int]] | None = None,
        bias: bool = True,
        path: LayerPath = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        spec = KroneckerSpec((out_features, in_features), a_shape, rank, factor_shapes)
        self._init_factors(spec, bias, path, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: KroneckerSpec, *, path: LayerPath = "auto") -> KroneckerLinear:
        """Replace ``linear`` by its best rank-R Kronecker approximation (factors by SVD, bias copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        if tuple(linear.weight.shape) != spec.weight_shape:
            raise ValueError(
                f"spec weight_shape {spec.weight_shape} does not match linear weight {tuple(linear.weight.shape)}"
            )
        layer = cls(linear.in_features, linear.out_features, rank=spec.rank, factor_shapes=spec.factor_shapes,
                    bias=linear.bias is not None, path=path, device=linear.weight.device, dtype=linear.weight.dtype)
        layer._load_factors(linear.weight, linear.bias)
        return layer

    def geometry(self, rows: int = 1) -> ConvGeometry:
        return ConvGeometry((rows, 1))

    def _run(self, x: torch.Tensor, factors: tuple[torch.Tensor, ...], path: Path) -> torch.Tensor:
        weight = self._dense_weight(factors) if path == "materialized" else None
        return kronecker_linear(x, factors, self.bias, path=path, weight=weight)

    def _path(self, x: torch.Tensor) -> Path:
        return self._choose(x, tuple(x.shape[1:-1]), self._run)

    def _inference_call(self, x: torch.Tensor,
                        factors: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        bias = self._parameters.get("bias")
        if self._path(x) == "materialized":
            weight = self._dense_weight(factors)
            return lambda x: F.linear(x, weight, bias)
        return lambda x: kronecker_linear(x, factors, bias, path="factorized")

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with the reconstructed weight (and the same bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.a.device, dtype=self.a.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kron={self.spec}, "
                f"bias={self.bias is not None}, path={self.path}")


def set_path(model: nn.Module, path: LayerPath) -> None:
    """Set the execution path of every Kronecker layer in ``model``."""
    _check_path(path)
    for module in model.modules():
        if isinstance(module, _KroneckerBase):
            module.path = path


@contextlib.contextmanager
def use_path(model: nn.Module, path: LayerPath) -> Iterator[None]:
    """Temporarily run every Kronecker layer of ``model`` on ``path`` (e.g. "factorized" to count its cost)."""
    _check_path(path)
    layers = [m for m in model.modules() if isinstance(m, _KroneckerBase)]
    saved = [m.path for m in layers]
    try:
        for m in layers:
            m.path = path
        yield
    finally:
        for m, p in zip(layers, saved):
            m.path = p
