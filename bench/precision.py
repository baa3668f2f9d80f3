"""Training speed in fp32 and in bf16 mixed precision, measured side by side in one run.

What ``--precision auto`` decides (search.train.resolve_precision): for the dense model and for the space's
least-error allocation at each MFLOPs budget, a distillation-like training step (forward under autocast, loss,
backward, SGD step; channels_last as in search.train) and an evaluation forward, each in fp32 and in bf16,
interleaved, median of ``--repeats``. Speed does not depend on the weights, so an untrained model is fine.

    python bench/precision.py [--model resnet18] [--budgets 300 150] [--batch 32] [--eval-batch 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import gkpd  # noqa: E402
from search.models import create_model  # noqa: E402
from search.train import _channels_last, _default_layout, autocast, resolve_precision  # noqa: E402
from spaces import build_space  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step() -> None:
        with autocast(precision, "cpu"):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _eval_forward(model: nn.Module, x: torch.Tensor, precision: str) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode(), autocast(precision, "cpu"):
            model(x)

    return forward


def _median_seconds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Each function's median time over ``repeats`` rounds, interleaved, after two warm-up calls each."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a model name of search.models (default resnet18)")
    parser.add_argument("--input", type=int, nargs=3, default=(1, 28, 28), metavar=("C", "H", "W"),
                        help="input shape (default 1 28 28: Fashion-MNIST)")
    parser.add_argument("--budgets", type=float, nargs="*", default=(300.0, 150.0), help="MFLOPs budgets")
    parser.add_argument("--batch", type=int, default=32, help="training batch (default 32, the search's)")
    parser.add_argument("--eval-batch", type=int, default=64, help="evaluation batch (default 64, the CPU's)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if min(args.threads, args.batch, args.eval_batch, args.repeats) < 1 or min(args.budgets, default=1) <= 0:
        parser.error("--threads, --batch, --eval-batch, --repeats and every budget must be positive")
    torch.set_num_threads(args.threads)
    shape = tuple(args.input)
    torch.manual_seed(0)
    dense = create_model(args.model, in_channels=shape[0], num_classes=10)
    space = build_space(dense, shape) if args.budgets else None
    models = [("dense", dense)]
    for budget in args.budgets:
        plan = space.allocate(mflops=budget)
        models.append((f"{space.cost(plan).mflops:.0f} MFLOPs", gkpd.kroneckerize(dense, plan)))
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    start, load = time.perf_counter(), os.getloadavg()
    print(f"{args.model} on {'x'.join(map(str, shape))}; torch {torch.__version__}, {args.threads} threads, CPU "
          f"capability {torch.backends.cpu.get_cpu_capability()}, AMX tiles {'yes' if amx else 'no'} (--precision "
          f"auto: {resolve_precision('auto', 'cpu')}); median of {args.repeats} interleaved")
    print(f"{'model':>12} | {f'train step b{args.batch} ms':>21} {'bf16 speedup':>12} | "
          f"{f'eval b{args.eval_batch} ms/image':>21} {'bf16 speedup':>12}")
    x = torch.randn(args.batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    xe = torch.randn(args.eval_batch, *shape).contiguous(memory_format=torch.channels_last)
    for name, model in models:
        model.train()
        _channels_last(model)
        train = _median_seconds({p: _train_step(model, x, y, p) for p in PRECISIONS}, args.repeats)
        _default_layout(model)
        model.eval()
        forward = _median_seconds({p: _eval_forward(model, xe, p) for p in PRECISIONS}, args.repeats)
        per_image = {p: 1e3 * s / args.eval_batch for p, s in forward.items()}
        print(f"{name:>12} | {1e3 * train['fp32']:>9.0f} / {1e3 * train['bf16']:<9.0f} "
              f"{train['fp32'] / train['bf16']:>12.2f}x | {per_image['fp32']:>9.2f} / {per_image['bf16']:<9.2f} "
              f"{forward['fp32'] / forward['bf16']:>12.2f}x", flush=True)
    print(f"(fp32 / bf16 in each pair) total {time.perf_counter() - start:.0f} s; load average at start {load[0]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
