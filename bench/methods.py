"""GKPD against other decompositions at the same size: the same teacher, budget and fine-tune for every method.

    python bench/methods.py --model resnet32 --teacher T.pt --budget-mparams 0.098746 \\
        [--methods allocate,allocate-error,uniform,svd,cp,tucker] [--plan runs/X/best/plan.json] \\
        [--steps 300] [--batch-size 128] [--lrs 0.01,0.04] [--csv out.csv]

Methods (each compressed to at most the budget, then batch norm re-estimated on 320 training images as in a
trial, then distilled from the teacher for ``--steps`` steps at each learning rate of ``--lrs``; validation
accuracy picks the rate, the test split is only reported):

- ``searched``: the plan in ``--plan`` (a search's ``best/plan.json``);
- ``allocate``: the knapsack allocation by measured sensitivity at the budget (the search's first seed);
- ``allocate-error``: the knapsack allocation by the sum of relative weight errors (the old seed);
- ``uniform``: the paper's rule, one rank ratio everywhere (the search's uniform seed);
- ``svd``: truncated SVD of every layer, ``a_shape = (F, 1, 1, 1)``, one rank ratio everywhere;
- ``cp`` / ``tucker``: TensorLy-Torch ``FactorizedConv.from_conv`` on every 3x3 conv, one rank ratio everywhere
  (needs the ``compare`` extra: ``pip install -e '.[compare]'``); parameter budgets only.

GKPD methods are screened with and without the data-aware factor fit (search/fit.py) and fine-tuned with it
(``--fit-images 0``: without). Prints one table and writes a CSV.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gkpd  # noqa: E402
from search import trial  # noqa: E402
from search.data import DataSplits, load_data  # noqa: E402
from search.fit import fit_factors  # noqa: E402
from search.models import create_model, load_checkpoint  # noqa: E402
from search.sensitivity import calibration_images, load_or_measure  # noqa: E402
from search.train import distill, evaluate, recalibrate_bn  # noqa: E402
from spaces import SearchSpace, build_space  # noqa: E402

GKPD_METHODS = ("searched", "allocate", "allocate-error", "uniform", "svd")
TENSORLY_METHODS = ("cp", "tucker")
METHODS = GKPD_METHODS + TENSORLY_METHODS
BN_IMAGES = trial.BN_BATCHES * 32  # as a trial re-estimates batch norm (10 batches of the default batch 32)


class MissingExtra(Exception):
    pass


def load_tltorch():
    try:
        import tltorch  # noqa: F401
    except ImportError:
        raise MissingExtra("methods cp and tucker need TensorLy-Torch: pip install -e '.[compare]'") from None
    return tltorch


def fits(cost: dict[str, float], budget: dict[str, float]) -> bool:
    return all(cost[k] <= v for k, v in budget.items())


def model_cost(model: nn.Module, input_shape: tuple[int, ...], *, macs: bool) -> dict[str, float]:
    cost = {"mparams": sum(p.numel() for p in model.parameters()) / 1e6}
    if macs:
        cost["mflops"] = gkpd.count_mflops(model, input_shape)
    return cost


def ratio_plan(space: SearchSpace, a_shape_of: Callable[[tuple[int, ...]], tuple[int, ...] | None],
               budget: dict[str, float]) -> gkpd.Plan:
    """One rank ratio for every layer (largest that fits, bisected), factor shapes by ``a_shape_of``."""

    def plan_at(ratio: float) -> gkpd.Plan:
        plan = {}
        for name, layer in space.layers.items():
            shape = layer.info.weight_shape
            a_shape = a_shape_of(shape)
            if a_shape is None:
                continue
            top = gkpd.KroneckerSpec(shape, a_shape, 1).max_rank
            spec = gkpd.KroneckerSpec(shape, a_shape, max(1, round(ratio * top)))
            dense = layer.dense
            cand_params = spec.num_params
            if cand_params < dense.params:
                plan[name] = spec
        return plan

    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        cost = space.cost(plan_at(mid))
        if fits({"mflops": cost.mflops, "mparams": cost.mparams}, budget):
            low = mid
        else:
            high = mid
    plan = plan_at(low)
    cost = space.cost(plan)
    if not fits({"mflops": cost.mflops, "mparams": cost.mparams}, budget):
        raise ValueError(f"no single rank ratio of this family fits the budget {budget}")
    return plan


def tensorly_model(teacher: nn.Module, factorization: str, budget: dict[str, float],
                   input_shape: tuple[int, ...]) -> nn.Module:
    """Every 3x3 conv replaced by TensorLy-Torch's factorized conv at one rank ratio (bisected to the budget)."""
    tltorch = load_tltorch()
    if "mflops" in budget:
        raise ValueError("cp/tucker: only --budget-mparams is supported (fvcore does not count tltorch's ops)")
    names = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    dense_params = {n: teacher.get_submodule(n).weight.numel() for n in names}
    others = sum(p.numel() for p in teacher.parameters()) - sum(dense_params.values())

    def build(ratio: float, *, decompose: bool) -> tuple[nn.Module, int]:
        model = copy.deepcopy(teacher) if decompose else None
        total = others
        for name in names:
            conv = teacher.get_submodule(name)
            layer = tltorch.FactorizedConv.from_conv(conv, rank=ratio, factorization=factorization,
                                                     decompose_weights=decompose, implementation="factorized")
            size = sum(p.numel() for n, p in layer.named_parameters() if "bias" not in n)
            if size >= dense_params[name]:  # no saving: keep the dense conv
                total += dense_params[name]
                continue
            total += size
            if model is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer)
        return model, total

    low, high = 0.0, 1.0
    for _ in range(14):
        mid = (low + high) / 2
        if build(mid, decompose=False)[1] <= budget["mparams"] * 1e6:
            low = mid
        else:
            high = mid
    torch.manual_seed(0)  # parafac's random parts
    model, total = build(low, decompose=True)
    assert total == sum(p.numel() for p in model.parameters())
    return model


def gkpd_plan(method: str, space: SearchSpace, budget: dict[str, float], *, plan_path: Path | None,
              scores) -> gkpd.Plan:
    if method == "searched":
        if plan_path is None:
            raise ValueError("method 'searched' needs --plan (a search's best/plan.json)")
        return gkpd.load_plan(plan_path)
    if method == "allocate":
        return space.allocate(**budget, scores=scores)
    if method == "allocate-error":
        return space.allocate(**budget)
    if method == "uniform":
        return space.uniform_for_budget(**budget)
    if method == "svd":
        return ratio_plan(space, lambda shape: (shape[0],) + (1,) * (len(shape) - 1), budget)
    raise ValueError(f"unknown GKPD method {method!r}")


def screen(model: nn.Module, data: DataSplits, device: str) -> tuple[float, float]:
    recalibrate_bn(model, data.train_x, batches=trial.BN_BATCHES, batch_size=32, device=device)
    return (evaluate(model, data.val_x, data.val_y, device=device),
            evaluate(model, data.test_x, data.test_y, device=device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's state_dict")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--budget-mparams", type=float)
    p.add_argument("--budget-mflops", type=float)
    p.add_argument("--methods", default="allocate,allocate-error,uniform,svd,cp,tucker")
    p.add_argument("--plan", type=Path, help="plan.json for method 'searched'")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lrs", default="0.01,0.04", help="fine-tune learning rates; validation picks one per method")
    p.add_argument("--fit-images", type=int, default=trial.FIT_IMAGES)
    p.add_argument("--max-eval-images", type=int, default=2000)
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench-methods"), help="where the sensitivity table is cached")
    p.add_argument("--csv", type=Path, default=Path("bench-methods.csv"))
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = {k: v for k, v in (("mflops", args.budget_mflops), ("mparams", args.budget_mparams)) if v is not None}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
        if not budget:
            raise ValueError("give --budget-mparams and/or --budget-mflops")
        if any(m in TENSORLY_METHODS for m in methods):
            load_tltorch()
    except (ValueError, MissingExtra) as err:
        print(f"bench/methods.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    lrs = [float(v) for v in args.lrs.split(",")]
    device = "cpu"
    data = load_data(args.dataset, data_dir=None, max_eval_images=args.max_eval_images, download=False)
    teacher = create_model(args.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    load_checkpoint(teacher, args.teacher)
    teacher.eval()
    t_val = evaluate(teacher, data.val_x, data.val_y, device=device)
    t_test = evaluate(teacher, data.test_x, data.test_y, device=device)
    print(f"teacher {args.model}: val {t_val:.2%} test {t_test:.2%}, {sum(p.numel() for p in teacher.parameters())/1e6:.4f} "
          f"Mparams; budget {budget}; fine-tune {args.steps} steps x batch {args.batch_size}, lr from {lrs}", flush=True)
    space = build_space(teacher, data.input_shape)
    scores = None
    if "allocate" in methods:
        scores = load_or_measure(teacher, space, data.train_x, args.run_dir, device=device).scores()
    rows = []
    for method in methods:
        start = time.perf_counter()
        row: dict[str, object] = {"method": method}
        if method in GKPD_METHODS:
            plan = gkpd_plan(method, space, budget, plan_path=args.plan, scores=scores)
            base = gkpd.kroneckerize(teacher, plan)
            row["layers_factorized"] = len(plan)
            row["screen_val_svd"], row["screen_test_svd"] = screen(copy.deepcopy(base), data, device)
            if args.fit_images:
                fit_factors(base, teacher, calibration_images(data.train_x, args.fit_images), device=device)
            student = base
        else:
            student = tensorly_model(teacher, method, budget, data.input_shape)
        cost = model_cost(student, data.input_shape, macs=method in GKPD_METHODS)
        row.update(cost)
        row["screen_val"], row["screen_test"] = screen(student, data, device)
        print(f"{method}: {cost} screen val {row['screen_val']:.2%} test {row['screen_test']:.2%}"
              + (f" (without fit: val {row['screen_val_svd']:.2%})" if "screen_val_svd" in row else ""), flush=True)
        best = None
        for lr in lrs:
            tuned = copy.deepcopy(student)
            distill(tuned, teacher, data, steps=args.steps, batch_size=args.batch_size, lr=lr, device=device, seed=0)
            val = evaluate(tuned, data.val_x, data.val_y, device=device)
            print(f"  {method} lr {lr:g}: val {val:.2%}", flush=True)
            if best is None or val > best[0]:
                best = (val, lr, tuned)
        assert best is not None
        row["lr"], row["ft_val"] = best[1], best[0]
        row["ft_test"] = evaluate(best[2], data.test_x, data.test_y, device=device)
        row["seconds"] = round(time.perf_counter() - start)
        print(f"  {method}: fine-tuned val {row['ft_val']:.2%} test {row['ft_test']:.2%} (lr {row['lr']:g})", flush=True)
        rows.append(row)
        write_csv(rows, args.csv)
    print_table(rows, t_val, t_test)


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict[str, object]], t_val: float, t_test: float) -> None:
    def pct(v: object) -> str:
        return f"{v:.2%}" if isinstance(v, float) and not math.isnan(v) else "-"

    print(f"\n| method | Mparams | MFLOPs | screen val (no fit) | screen val | screen test | lr | fine-tuned val | fine-tuned test |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mflops = f"{r['mflops']:.2f}" if "mflops" in r else "-"
        print(f"| {r['method']} | {r['mparams']:.4f} | {mflops} | {pct(r.get('screen_val_svd'))} | {pct(r['screen_val'])} "
              f"| {pct(r['screen_test'])} | {r['lr']:g} | {pct(r['ft_val'])} | {pct(r['ft_test'])} |")
    print(f"teacher: val {t_val:.2%}, test {t_test:.2%}")


if __name__ == "__main__":
    main()
