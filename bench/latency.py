"""Whole-model latency: the dense model against its compressed plans, measured side by side in one run.

For each MFLOPs budget, the space's least-error allocation (``space.allocate``; the search's first seed minus the
measured sensitivity, which needs a teacher and data) is built on the model's weights, and timed next to the dense
model exactly as a trial is (search.latency): torch at batch 1 and at ``--batch`` (Kronecker layers on their auto
path), and onnxruntime on the CPU at batch 1 of the fast form (each layer factorized or folded into a dense conv,
whichever runs faster there). Latency does not depend on the weights, so an untrained model is fine.

    python bench/latency.py [--model resnet18] [--budgets 300 200 120] [--batch 32] [--threads 2]
    python bench/latency.py --plan runs/resnet18-fashion-mnist-300mflops/best/plan.json   # a search's plan
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import gkpd  # noqa: E402
from search import latency  # noqa: E402
from search.models import create_model  # noqa: E402
from spaces import build_space  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a model name of search.models (default resnet18)")
    parser.add_argument("--input", type=int, nargs=3, default=(1, 28, 28), metavar=("C", "H", "W"),
                        help="input shape (default 1 28 28: Fashion-MNIST)")
    parser.add_argument("--budgets", type=float, nargs="+", default=(300.0, 200.0, 120.0), help="MFLOPs budgets")
    parser.add_argument("--batch", type=int, default=32, help="the second torch batch size (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    parser.add_argument("--plan", type=Path, action="append", default=[],
                        help="time this plan file (gkpd.load_plan; repeatable) instead of the budgets' allocations")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.batch < 1 or min(args.budgets) <= 0:
        parser.error("--threads, --batch and every budget must be positive")
    torch.set_num_threads(args.threads)
    shape = tuple(args.input)
    torch.manual_seed(0)
    dense = create_model(args.model, in_channels=shape[0], num_classes=10).eval()
    base = gkpd.count_mflops(dense, shape)
    start, load = time.perf_counter(), os.getloadavg()
    print(f"{args.model} on {'x'.join(map(str, shape))}, {base:.1f} MFLOPs dense; torch {torch.__version__} and "
          f"onnxruntime, {args.threads} threads, median of {latency.REPEATS} interleaved; speedup = dense ms / model ms")
    print(f"{'budget':>7} {'MFLOPs':>7} {'MACs ÷':>6} {'layers':>6} | {'torch b1 ms':>11} {'speedup':>7} | "
          f"{f'torch b{args.batch} ms':>12} {'speedup':>7} | {'ort b1 ms':>9} {'speedup':>7} {'folded':>6} | dense ms: "
          f"b1 / b{args.batch} / ort b1")
    dense_session = latency.ort_session(dense, shape)
    if args.plan:
        try:
            plans = [("plan*", gkpd.load_plan(path)) for path in args.plan]
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--plan: {err}")
    else:
        space = build_space(dense, shape)  # SVDs of every layer: only the budgets' allocations need it
        plans = [(f"{b:g}", space.allocate(mflops=b)) for b in args.budgets]
    for budget, plan in plans:
        model = gkpd.kroneckerize(dense, plan).eval()
        mflops = gkpd.count_mflops(model, shape)
        m = latency.measure_latency(model, dense, shape, batch=args.batch, device=torch.device("cpu"),
                                    dense_session=dense_session)
        folded = sum(form == "dense" for form in latency.fast_forms(model, shape).values())
        print(f"{budget:>7} {mflops:>7.1f} {base / mflops:>6.2f} {len(plan):>6} | {m['ms_b1']:>11.2f} "
              f"{m['speedup_b1']:>7.2f} | {m['ms_batch']:>12.1f} {m['speedup_batch']:>7.2f} | {m['ort_ms_b1']:>9.2f} "
              f"{m['ort_speedup_b1']:>7.2f} {folded:>6} | {m['dense_ms_b1']:.2f} / {m['dense_ms_batch']:.1f} / "
              f"{m['ort_dense_ms_b1']:.2f}", flush=True)
    if args.plan:
        print("* a --plan file, timed at its own cost (no budget)")
    print(f"total {time.perf_counter() - start:.0f} s; load average at start {load[0]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
