"""Time every exact route of a Kronecker layer against the dense conv, on ResNet-18's 3x3 convs (CIFAR stem, 32x32).

Rows: the factor families the search uses, each at a MAC cut near 4x (and the SVD-like split also near 8x):
``svd`` a = (F,1,1,1) (a conv C -> R, then R -> F), ``sep`` a = (F1,C1,3,1) ⊗ (F2,C2,1,3) (separable kernel),
``square`` a = (F1,C1,1,1) ⊗ (F2,C2,3,3) with F1, C1 near sqrt. Columns: forward time at batch 64 and at batch 1,
as ratios to the dense conv's, side by side in one run (interleaved, median):

  fact    a layer on path="factorized": the chain in the cheaper order by MACs (a plain-conv chain where no channel
          is folded), its kernels kept at inference (a plain chain's convs packed for oneDNN at batch 1)
  mirror  gkpd.factorized_conv2d in the other order, kernels arranged each call (nan where it costs over twice the
          MACs: not a contender)
  mat     rebuild the dense weight on each call, then one conv (what training runs)
  cached  the dense weight a layer keeps at inference, one conv
  auto    what path="auto" picks (timed once per setting; factorized only when it beats dense-like by 5%)

    python bench/layers.py [--quick] [--threads 2] [--heap kept|default]
    python bench/layers.py --breakdown    # where each chain's time goes, step by step

``--breakdown`` times each row's chain piece by piece at batch 64 and 1: its steps (convolutions and batched
matmuls, each on an input already laid out for it; the first step also on its own) and its permutes (the copies
that move the intermediate maps between steps; only chains that fold channels into the batch have any), as ratios
to the dense conv. The steps alone bound what any schedule of this chain can reach with these kernels.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import gkpd.functional  # noqa: E402
from gkpd import ConvGeometry, KroneckerConv2d, KroneckerSpec, factorized_conv2d, materialized_conv2d  # noqa: E402


@dataclass(frozen=True)
class ConvShape:
    """One 3x3 conv of ResNet-18 (CIFAR stem, 32x32 input)."""

    name: str
    cin: int
    cout: int
    in_hw: int
    stride: int = 1

    def geometry(self) -> ConvGeometry:
        return ConvGeometry((self.in_hw, self.in_hw), (self.stride, self.stride), pads=(1, 1, 1, 1))


SHAPES = [
    ConvShape("64->64 @32", 64, 64, 32),
    ConvShape("64->128 s2 @32", 64, 128, 32, stride=2),
    ConvShape("128->128 @16", 128, 128, 16),
    ConvShape("256->256 @8", 256, 256, 8),
    ConvShape("512->512 @4", 512, 512, 4),
]
ROUTES = ("fact", "mirror", "mat", "cached", "auto")
MIRROR_LIMIT = 2.0  # the mirror order is timed only when it costs at most this many times the cheaper order's MACs


def _near_sqrt(n: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(math.log(d / math.sqrt(n))))


def family_spec(shape: ConvShape, family: str, target: float) -> KroneckerSpec:
    """The ``family`` split of ``shape``'s weight at the rank whose MAC cut is nearest ``target``."""
    weight_shape = (shape.cout, shape.cin, 3, 3)
    f1, c1 = _near_sqrt(shape.cout), _near_sqrt(shape.cin)
    a_shape = {"svd": (shape.cout, 1, 1, 1), "sep": (f1, c1, 3, 1), "square": (f1, c1, 1, 1)}[family]
    one = KroneckerSpec(weight_shape, a_shape, 1)
    geometry = shape.geometry()
    # MACs are linear in the rank, so the rank for the target follows from the rank-1 cost.
    rank = min(one.max_rank, max(1, round(one.dense_macs(geometry) / (target * one.macs(geometry)))))
    return one.with_rank(rank)


ROWS = [("svd", 4.0), ("svd", 8.0), ("sep", 4.0), ("square", 4.0)]


def _seconds(fn: Callable[[], object], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved so that drift hits all of them alike."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up: allocation, kernel selection, auto's timing
        calls[name] = max(1, min(50, int(0.02 / _seconds(fn))))  # sub-millisecond calls are timed in a loop
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_row(shape: ConvShape, spec: KroneckerSpec, batch: int, repeats: int) -> dict[str, float]:
    """Forward time of dense and of every route at ``batch``, as ratios to dense (and dense in ms)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(shape.cin, shape.cout, 3, stride=shape.stride, padding=1, bias=False).eval()
    cached = KroneckerConv2d.from_conv(conv, spec, path="materialized").eval()
    auto = KroneckerConv2d.from_conv(conv, spec, path="auto").eval()
    fact = KroneckerConv2d.from_conv(conv, spec, path="factorized").eval()
    factors = cached.factors
    geometry = shape.geometry()
    order = spec.cheaper_order(geometry)
    mirror = next(o for o in spec.orders() if o != order)
    x = torch.randn(batch, shape.cin, shape.in_hw, shape.in_hw)
    kw = dict(stride=conv.stride, pads=(1, 1, 1, 1))
    fns: dict[str, Callable[[], object]] = {
        "dense": lambda: conv(x),
        "fact": lambda: fact(x),
        "mirror": lambda: factorized_conv2d(x, *factors, order=mirror, **kw),
        "mat": lambda: materialized_conv2d(x, *factors, **kw),
        "cached": lambda: cached(x),
        "auto": lambda: auto(x),
    }
    if spec.order_macs(geometry, mirror) > MIRROR_LIMIT * spec.macs(geometry):
        del fns["mirror"]  # e.g. the SVD-like split with A first: 64x the MACs and a map of gigabytes
    with torch.inference_mode():
        times = median_times(fns, repeats)
    return {"dense_ms": 1e3 * times["dense"], **{r: times.get(r, math.nan) / times["dense"] for r in ROUTES}}


def chain_pieces(x: torch.Tensor, factors: tuple[torch.Tensor, ...], order, stride, pads
                 ) -> tuple[list[Callable[[], object]], list[Callable[[], object]]]:
    """The steps (convolutions and matmuls, in order) and the layout copies of one
    ``gkpd.factorized_conv2d`` call, each a function that replays it on its own saved input: the chain is run once
    with ``conv2d``, ``torch.bmm``, ``torch.mm`` and ``Tensor.permute`` recorded."""
    steps: list[Callable[[], object]] = []
    copies: list[Callable[[], object]] = []
    conv2d, bmm, mm, permute = torch.nn.functional.conv2d, torch.bmm, torch.mm, torch.Tensor.permute

    def recorded(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(inp: torch.Tensor, other: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            saved = inp.contiguous()  # laid out for the step, as the chain's reshape left it
            steps.append(lambda: op(saved, other, *args, **kwargs))
            return op(inp, other, *args, **kwargs)
        return run

    def recorded_permute(t: torch.Tensor, *dims: int) -> torch.Tensor:
        copies.append(lambda: permute(t, *dims).contiguous())  # what the chain's reshape after it copies
        return permute(t, *dims)

    functional = gkpd.functional.F
    gkpd.functional.F = types.SimpleNamespace(**{**vars(torch.nn.functional), "conv2d": recorded(conv2d)})
    torch.bmm, torch.mm, torch.Tensor.permute = recorded(bmm), recorded(mm), recorded_permute
    try:
        factorized_conv2d(x, *factors, order=order, stride=stride, pads=pads)
    finally:
        gkpd.functional.F, torch.bmm, torch.mm, torch.Tensor.permute = functional, bmm, mm, permute
    return steps, copies


def breakdown(repeats: int) -> None:
    """Print, per row, the chain and its pieces at batch 64 and 1 as ratios to the dense conv."""
    print(f"{'shape':<15} {'family':<7} {'A ⊗ B, rank':<24} {'MACs ÷':>6} | batch: chain = steps + copies "
          f"(each summed over the chain; ratios to dense) [the first step alone], dense ms")
    for shape in SHAPES:
        for family, target in ROWS:
            spec = family_spec(shape, family, target)
            geometry = shape.geometry()
            order = spec.cheaper_order(geometry)
            torch.manual_seed(0)
            conv = nn.Conv2d(shape.cin, shape.cout, 3, stride=shape.stride, padding=1, bias=False).eval()
            factors = tuple(f.detach() for f in KroneckerConv2d.from_conv(conv, spec, path="factorized").factors)
            line = (f"{shape.name:<15} {family:<7} {str(spec):<24} "
                    f"{spec.dense_macs(geometry) / spec.macs(geometry):>6.2f}")
            for batch in (64, 1):
                x = torch.randn(batch, shape.cin, shape.in_hw, shape.in_hw)
                with torch.inference_mode():
                    steps, copies = chain_pieces(x, factors, order, conv.stride, (1, 1, 1, 1))
                    fns = {"dense": lambda: conv(x),
                           "chain": lambda: factorized_conv2d(x, *factors, order=order, stride=conv.stride,
                                                              pads=(1, 1, 1, 1)),
                           **{f"step{i}": fn for i, fn in enumerate(steps)},
                           **{f"copy{i}": fn for i, fn in enumerate(copies)}}
                    t = median_times(fns, repeats)
                step_sum = sum(t[f"step{i}"] for i in range(len(steps))) / t["dense"]
                copy_sum = sum(t[f"copy{i}"] for i in range(len(copies))) / t["dense"]
                line += (f" | b{batch}: {t['chain'] / t['dense']:5.2f} = {step_sum:5.2f} + {copy_sum:5.2f} "
                         f"[{t['step0'] / t['dense']:4.2f}], {1e3 * t['dense']:6.2f}")
            print(line, flush=True)


# glibc malloc hands a buffer over 128 KiB out as fresh pages from mmap and gives it back on free (or trims the heap
# top), so a conv whose output is tens of MiB pays a page fault per 4 KiB on every call: the square split's first
# conv at batch 64 (a 25 MiB output) took 16 ms with 8,193 minor faults a call and 5.5 ms with none, on this
# machine. Whether a buffer comes fresh depends on what the process freed before, so the same call flipped between
# the two within one run. Keeping the heap (buffers up to 32 MiB from it, never trimmed) takes that out of every
# route alike. (The search's own models run channels_last and showed no faults at inference, batch 32.)
KEPT_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def _heap_kept() -> bool:
    return all(os.environ.get(k) == v for k, v in KEPT_HEAP.items())


def _keep_heap() -> None:
    """Restart this script with :data:`KEPT_HEAP` in its environment (glibc reads it at start), unless it has it."""
    if not _heap_kept():
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  {**os.environ, **KEPT_HEAP})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--heap", choices=("kept", "default"), default="kept",
                        help="kept (default): glibc serves buffers up to 32 MiB from a heap it never trims, so no "
                             "route pays page faults on fresh memory; default: glibc as configured")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time each row's chain piece by piece (steps, copies) instead")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.heap == "kept" and argv is None:  # run as a script (a caller's own process is left alone)
        _keep_heap()
    torch.set_num_threads(args.threads)
    heap = ("glibc heap kept (" + ", ".join(f"{k}={v}" for k, v in KEPT_HEAP.items()) + ")" if _heap_kept()
            else "glibc heap as configured")
    repeats = 3 if args.quick else 7
    if args.breakdown:
        start, load = time.perf_counter(), os.getloadavg()
        print(f"torch {torch.__version__}, {args.threads} threads, forward, median of {repeats} interleaved; {heap}")
        breakdown(repeats)
        print(f"total {time.perf_counter() - start:.0f} s; load average at start {load[0]:.1f}, "
              f"at end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")
        return
    batches = (64, 1)
    print(f"torch {torch.__version__}, {args.threads} threads, forward, median of {repeats} interleaved; {heap}; "
          f"times are ratios to the dense conv (below 1: faster). MACs as fvcore counts them.")
    header = f"{'shape':<15} {'family':<7} {'A ⊗ B, rank':<24} {'MACs ÷':>6}"
    for batch in batches:
        header += f" | b{batch}: " + " ".join(f"{r:>6}" for r in ROUTES) + "   best"
    header += " | dense ms b64 / b1"
    print(header)
    print("-" * len(header))
    start, load = time.perf_counter(), os.getloadavg()
    summary = {b: {"rows": 0, "auto_ok": 0, "cut4": 0, "best_06": 0} for b in batches}
    for shape in SHAPES:
        for family, target in ROWS:
            spec = family_spec(shape, family, target)
            geometry = shape.geometry()
            saving = spec.dense_macs(geometry) / spec.macs(geometry)
            line = f"{shape.name:<15} {family:<7} {str(spec):<24} {saving:>6.2f}"
            dense_ms = []
            for batch in batches:
                row = bench_row(shape, spec, batch, repeats)
                best = min((r for r in ROUTES if not math.isnan(row[r])), key=row.__getitem__)
                line += " | " + " " * len(f"b{batch}: ") + " ".join(f"{row[r]:6.2f}" for r in ROUTES)
                line += f" {best:>6}"
                dense_ms.append(row["dense_ms"])
                s = summary[batch]
                s["rows"] += 1
                s["auto_ok"] += row["auto"] <= 1.05
                if saving >= 4:
                    s["cut4"] += 1
                    s["best_06"] += row[best] <= 0.6
            line += f" | {dense_ms[0]:7.2f} / {dense_ms[1]:5.2f}"
            print(line, flush=True)
    for batch, s in summary.items():
        print(f"batch {batch}: auto within 1.05x of dense on {s['auto_ok']}/{s['rows']} rows; best route at most "
              f"0.6x dense on {s['best_06']}/{s['cut4']} rows with a MAC cut of 4x or more")
    # Other processes on the same cores skew every ratio; the load average says whether there were any.
    print(f"total {time.perf_counter() - start:.0f} s; load average at start {load[0]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
