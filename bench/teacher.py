"""The teacher's recipe, chosen on validation: learning rate and augmentation for the default teacher.

    python bench/teacher.py [--model resnet18] [--dataset fashion-mnist] [--steps 600] [--batch-size 32] \\
        [--lrs 0.025,0.05,0.1] [--augment off,on] [--csv teacher.csv]

Trains the teacher as ``search.py`` does with no ``--teacher`` (same split, seed, steps and batch) once per
(learning rate, augmentation), and prints accuracy on the whole validation split (5,000 images held out of
the training set), which picks the recipe. The test split is printed for the record and decides nothing.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.data import load_data  # noqa: E402
from search.models import create_model  # noqa: E402
from search.train import evaluate, train_teacher  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", default="0.025,0.05,0.1")
    parser.add_argument("--augment", default="off,on")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16 (mixed precision)")
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    lrs = [float(v) for v in args.lrs.split(",")]
    augments = [{"off": False, "on": True}[v] for v in args.augment.split(",")]
    precisions = args.precisions.split(",")
    for precision in precisions:
        if precision not in ("fp32", "bf16"):
            parser.error(f"--precisions: unknown {precision!r}: allowed fp32, bf16")

    data = load_data(args.dataset, data_dir=None, seed=args.seed)
    print(f"{args.model} on {args.dataset}: {args.steps} steps of {args.batch_size}, seed {args.seed}; "
          f"val {len(data.val_x)} images, test {len(data.test_x)}; torch threads {torch.get_num_threads()}")
    rows = []
    for augment, lr, precision in itertools.product(augments, lrs, precisions):
        torch.manual_seed(args.seed)
        model = create_model(args.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
        start = time.perf_counter()
        train_teacher(model, data, steps=args.steps, batch_size=args.batch_size, lr=lr,
                      device=torch.device("cpu"), seed=args.seed, augment=augment, precision=precision)
        seconds = time.perf_counter() - start
        val = evaluate(model, data.val_x, data.val_y, device=torch.device("cpu"))
        test = evaluate(model, data.test_x, data.test_y, device=torch.device("cpu"))
        rows.append({"lr": lr, "augment": augment, "precision": precision, "val": val, "test": test,
                     "seconds": round(seconds)})
        print(f"lr {lr:<6g} augment {'on ' if augment else 'off'}  {precision}  val {val:.2%}  test {test:.2%}  "
              f"({seconds:.0f} s)", flush=True)
    best = max(rows, key=lambda r: r["val"])
    print(f"best by validation: lr {best['lr']:g}, augment {'on' if best['augment'] else 'off'}, {best['precision']} "
          f"({best['val']:.2%} val, {best['test']:.2%} test)")
    if args.csv is not None:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
