"""Time Kronecker layers against the dense conv on the 3x3 conv shapes of a CIFAR ResNet-18 (32x32 input).

For each shape and a factorization at about 2x, 4x and 8x fewer MACs than dense, prints the time of the
factorized, materialized and auto-chosen paths as a ratio to the dense conv (below 1: faster), for the
forward at batch 1 and 64 and forward+backward at batch 64, all measured side by side in one run.

    python bench/layers.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import gkpd.layers  # noqa: E402  (for the auto path's recorded choice)
from gkpd import ConvGeometry, KroneckerConv2d, KroneckerSpec  # noqa: E402


@dataclass(frozen=True)
class ConvShape:
    """One 3x3 conv of ResNet-18 (CIFAR stem, 32x32 input)."""

    name: str
    cin: int
    cout: int
    in_hw: int
    stride: int = 1

    def conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.cin, self.cout, 3, stride=self.stride, padding=1, bias=False)

    def geometry(self) -> ConvGeometry:
        return ConvGeometry((self.in_hw, self.in_hw), (self.stride, self.stride), pads=(1, 1, 1, 1))


SHAPES = [
    ConvShape("64->64 @32", 64, 64, 32),
    ConvShape("64->128 s2 @32", 64, 128, 32, stride=2),
    ConvShape("128->128 @16", 128, 128, 16),
    ConvShape("256->256 @8", 256, 256, 8),
    ConvShape("512->512 @4", 512, 512, 4),
]
TARGETS = (2.0, 4.0, 8.0)  # dense MACs / factorized MACs


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _moved(spec: KroneckerSpec, geometry: ConvGeometry) -> int:
    """Elements per sample that the steps of the cheapest order write (each but the last keeps the rank axis)."""
    steps = spec.steps(geometry, spec.cheaper_order(geometry))
    sizes = [s[1] for s in spec.factor_shapes]
    moved = 0
    for i, step in enumerate(steps):
        sizes[step["factor"]] = spec.factor_shapes[step["factor"]][0]
        rank = 1 if i == len(steps) - 1 else spec.rank
        moved += rank * math.prod(sizes) * math.prod(step["out_hw"])
    return moved


def pick_spec(shape: ConvShape, target: float) -> KroneckerSpec:
    """The factorization whose MAC saving is closest to ``target``; among near ties, the one whose steps write least.

    That is the factorized path's best case at that saving: at equal MACs, the time goes into writing the
    intermediate maps, and the second step writes R times the layer's output before summing over R.
    """
    weight_shape = (shape.cout, shape.cin, 3, 3)
    geometry = shape.geometry()
    candidates = []
    for f1 in _divisors(shape.cout):
        for c1 in _divisors(shape.cin):
            for kh1 in (1, 3):
                for kw1 in (1, 3):
                    one = KroneckerSpec(weight_shape, (f1, c1, kh1, kw1), 1)
                    if min(f1, c1, *one.b_shape[:2]) < 2:  # a factor that mixes no channels copies filters
                        continue
                    # MACs are linear in the rank, so the rank for the target follows from the rank-1 cost.
                    rank = min(one.max_rank, max(1, round(one.dense_macs(geometry) / (target * one.macs(geometry)))))
                    spec = one.with_rank(rank)
                    miss = abs(math.log(spec.dense_macs(geometry) / spec.macs(geometry) / target))
                    candidates.append((round(miss, 2), _moved(spec, geometry), -spec.num_params, spec.a_shape, spec))
    return min(candidates)[-1]


def _seconds(fn: Callable[[], None], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _median_times(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved so that drift hits all of them alike."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up: allocation, kernel selection
        calls[name] = max(1, min(50, int(0.02 / _seconds(fn))))  # sub-millisecond calls are timed in a loop
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def _forward(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            layer(x)
    return run


def _train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(grad)
    return run


def _auto_choice(layer: KroneckerConv2d, run: Callable[[], None]) -> str:
    """Run ``layer`` on "auto" once and return the path it settled on for that setting."""
    before = dict(gkpd.layers._AUTO_CHOICE)
    run()
    new = [path for key, path in gkpd.layers._AUTO_CHOICE.items() if key not in before]
    return (new[-1] if new else "?")[0].upper()  # F(actorized) or M(aterialized)


def bench_row(shape: ConvShape, spec: KroneckerSpec, repeats: int) -> dict:
    """Times of every path in every setting, as ratios to dense."""
    torch.manual_seed(0)
    conv = shape.conv()
    layers: dict[str, nn.Module] = {"dense": conv}
    for path in ("factorized", "materialized", "auto"):
        layers[path] = KroneckerConv2d.from_conv(conv, spec, path=path)
    row: dict = {"dense_ms": {}, "ratio": {}, "auto": {}}
    for setting, batch in (("fwd b1", 1), ("fwd b64", 64), ("f+b b64", 64)):
        x = torch.randn(batch, shape.cin, shape.in_hw, shape.in_hw)
        if setting.startswith("f+b"):
            x.requires_grad_(True)  # a hidden layer also passes the gradient on to its input
            grad = torch.randn_like(conv(x)).detach()
            fns = {name: _train_step(layer, x, grad) for name, layer in layers.items()}
        else:
            fns = {name: _forward(layer, x) for name, layer in layers.items()}
        row["auto"][setting] = _auto_choice(layers["auto"], fns["auto"])
        times = _median_times(fns, repeats)
        row["dense_ms"][setting] = 1e3 * times["dense"]
        row["ratio"][setting] = {p: times[p] / times["dense"] for p in ("factorized", "materialized", "auto")}
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    settings = ("fwd b1", "fwd b64", "f+b b64")
    print(f"torch {torch.__version__}, {args.threads} threads, median of {repeats}; times are ratios to dense "
          f"(below 1: faster); auto's pick in brackets (F factorized, M materialized). MACs as fvcore counts them.")
    header = f"{'shape':<15} {'A ⊗ B, rank':<22} {'MACs ÷':>6}"
    for setting in settings:
        header += f" | {setting + ': fact  mat   auto':<26}"
    header += " | dense ms: b1 / b64 / f+b64"
    print(header)
    print("-" * len(header))
    start, load = time.perf_counter(), os.getloadavg()
    for shape in SHAPES:
        for target in TARGETS:
            spec = pick_spec(shape, target)
            geometry = shape.geometry()
            saving = spec.dense_macs(geometry) / spec.macs(geometry)
            row = bench_row(shape, spec, repeats)
            line = f"{shape.name:<15} {str(spec):<22} {saving:>6.2f}"
            for setting in settings:
                r = row["ratio"][setting]
                line += (f" | {'':<7}{r['factorized']:5.2f} {r['materialized']:5.2f} "
                         f"{r['auto']:5.2f}[{row['auto'][setting]}]")
            dense = row["dense_ms"]
            line += f" | {dense['fwd b1']:6.2f} / {dense['fwd b64']:6.1f} / {dense['f+b b64']:6.1f}"
            print(line, flush=True)
    # Other processes on the same cores skew every ratio; the load average says whether there were any.
    print(f"total {time.perf_counter() - start:.0f} s; load average at start {load[0]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
