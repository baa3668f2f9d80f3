"""Does the measured-sensitivity proxy predict fine-tuned accuracy better than the sum of relative errors?

    python bench/sensitivity.py --model resnet32 --teacher T.pt --budget-mparams 0.098746 [--steps 150]
    python bench/sensitivity.py --model resnet18 --teacher T.pt --budget-mflops 300

Plans spread over the budget: the knapsack allocation by measured sensitivity and by the error sum, each at
100, 90, 80, 70, 60 and 50% of the budget, the uniform seed, and ``--random`` random plans repaired to the
budget. Each plan runs as a search trial does (search.trial.run_trial: decomposition, data-aware factor fit,
batch-norm re-estimation, screen, ``--steps`` distillation steps, validation accuracy), with no early stopping.
Prints per plan the old proxy (sum of relative Frobenius errors), the new one (predicted KD loss), the
screen accuracy with and without the factor fit and the fine-tuned accuracy; then the Spearman and Kendall
rank correlations of each with the fine-tuned validation accuracy (proxies negated: higher is better).
Needs scipy (the ``compare`` extra).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search import trial  # noqa: E402
from search.config import SearchConfig  # noqa: E402
from search.data import load_data  # noqa: E402
from search.models import create_model, load_checkpoint  # noqa: E402
from search.train import evaluate  # noqa: E402
from spaces import build_space  # noqa: E402

FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--budget-mparams", type=float)
    p.add_argument("--budget-mflops", type=float)
    p.add_argument("--steps", type=int, default=SearchConfig.finetune_steps)
    p.add_argument("--batch-size", type=int, default=SearchConfig.batch_size)
    p.add_argument("--random", type=int, default=3, help="random plans repaired to the budget")
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench-sensitivity"))
    p.add_argument("--csv", type=Path, default=Path("bench-sensitivity.csv"))
    p.add_argument("--only", default="", help="comma-separated plan tags to run (default: all)")
    args = p.parse_args()
    try:
        from scipy.stats import kendalltau, spearmanr
    except ImportError:
        print("bench/sensitivity.py: error: needs scipy: pip install -e '.[compare]'", file=sys.stderr)
        sys.exit(2)
    config = SearchConfig(budget_mflops=args.budget_mflops, budget_mparams=args.budget_mparams, model=args.model,
                          dataset=args.dataset, teacher=args.teacher, finetune_steps=args.steps,
                          batch_size=args.batch_size, out=args.run_dir, device="cpu")
    data = load_data(config.dataset, data_dir=None, val_images=config.val_images, seed=config.seed,
                     max_eval_images=config.max_eval_images, download=False)
    teacher = create_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    load_checkpoint(teacher, config.teacher)
    teacher.eval()
    print(f"teacher: val {evaluate(teacher, data.val_x, data.val_y, device='cpu'):.2%}; budget {config.budget}; "
          f"{args.steps} fine-tune steps x batch {args.batch_size}, lr {trial.FINETUNE_LR}", flush=True)
    space = build_space(teacher, data.input_shape)
    ctx = trial.TrialContext(config, data, teacher, space, torch.device("cpu"))
    table = ctx.sensitivity
    assert table is not None
    print(f"sensitivity table: {table}, measured in {table.meta['seconds']:.0f} s", flush=True)

    plans: list[tuple[str, dict]] = []
    for fraction in FRACTIONS:
        budget = {k: v * fraction for k, v in config.budget.items()}
        plans.append((f"sens@{fraction:g}", space.allocate(**budget, scores=ctx.scores)))
        plans.append((f"error@{fraction:g}", space.allocate(**budget)))
    plans.append(("uniform", space.uniform_for_budget(**config.budget)))
    rng = random.Random(0)
    for i in range(args.random):
        proposed = space.plan_from_params({n: rng.choice(keys) for n, keys in space.choices().items()})
        plans.append((f"random{i}", space.repair(proposed, **config.budget)))
    only = {t for t in args.only.split(",") if t}
    rows = []
    for tag, plan in plans:
        if only and tag not in only:
            continue
        start = time.perf_counter()
        svd = trial.build_student(ctx, plan, fit_images=0)
        screen_svd = evaluate(svd, data.val_x[:trial.SCREEN_IMAGES], data.val_y[:trial.SCREEN_IMAGES], device="cpu")
        result = trial.run_trial(ctx, plan, label=tag, seed=config.seed)
        cost = space.cost(plan)
        row = {"plan": tag, "mflops": cost.mflops, "mparams": cost.mparams, "layers": len(plan),
               "error_sum": space.error(plan), "predicted_loss": table.predict(space, plan),
               "screen_svd": screen_svd, "screen": result.screen_accuracy, "val": result.val_accuracy,
               "test": result.test_accuracy, "seconds": round(time.perf_counter() - start)}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if len(rows) < 3:
        return
    val = [r["val"] for r in rows]
    print(f"\nrank correlation with fine-tuned validation accuracy over {len(rows)} plans "
          "(proxies negated: higher is better)")
    print("| predictor | Spearman | Kendall |\n|---|---|---|")
    for name, key, sign in (("sum of relative errors (old)", "error_sum", -1), ("predicted KD loss (new)", "predicted_loss", -1),
                            ("screen accuracy, SVD factors", "screen_svd", 1), ("screen accuracy, fitted factors", "screen", 1)):
        xs = [sign * r[key] for r in rows]
        print(f"| {name} | {spearmanr(xs, val).statistic:.3f} | {kendalltau(xs, val).statistic:.3f} |")


if __name__ == "__main__":
    main()
