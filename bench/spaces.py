"""Build time and size of search spaces, and allocate versus uniform at a budget.

    python bench/spaces.py [--threads N] [--preset default] [--budget-mflops 300]

Prints, for a CIFAR-style ResNet-18 (1x28x28 and 3x32x32) and ResNet-56 (3x32x32) with random weights: seconds to
build the space (one float64 SVD per layer and factor shape dominates), candidates surviving per layer, and for
ResNet-18 on 1x28x28 the total approximation error of ``allocate`` and ``uniform_for_budget`` at the budget.
Errors of random weights are high everywhere (their spectra are flat); trained weights compress far better.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spaces import SearchSpace, build_space  # noqa: E402


def resnet18(in_channels: int) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3x3 stride-1 conv1, no max-pool."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def resnet56() -> nn.Module:
    """CIFAR ResNet-56: 16/32/64 channels, 9 blocks per stage, 1x1 projections."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(9):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers).eval()


def timed_build(model: nn.Module, input_shape: tuple[int, ...], preset: str) -> tuple[SearchSpace, float, float]:
    """The space, wall seconds and CPU seconds of this process (with one thread, about the wall time of a quiet
    machine: other processes sharing the cores inflate wall time, not CPU time)."""
    start, cpu = time.perf_counter(), time.process_time()
    space = build_space(model, input_shape, preset=preset)
    return space, time.perf_counter() - start, time.process_time() - cpu


def per_layer(space: SearchSpace) -> str:
    counts = [len(layer.candidates) for layer in space.layers.values()]
    return f"{len(counts)} layers, {sum(counts)} choices; per layer (incl. dense): {' '.join(map(str, counts))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--budget-mflops", type=float, default=300.0, help="millions of MACs (fvcore's 'flops')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average {load:.1f}, "
          f"preset {args.preset!r}")

    torch.manual_seed(0)
    cases = [("resnet18", resnet18(1), (1, 28, 28)), ("resnet18", resnet18(3), (3, 32, 32)),
             ("resnet56", resnet56(), (3, 32, 32))]
    spaces = {}
    for name, model, shape in cases:
        space, seconds, cpu = timed_build(model, shape, args.preset)
        spaces[(name, shape)] = space
        print(f"\n{name} {'x'.join(map(str, shape))}: built in {seconds:.1f} s wall, {cpu:.1f} s CPU; "
              f"dense {space.baseline_cost()}; min {space.min_cost()}")
        print("  " + per_layer(space))

    space = spaces[("resnet18", (1, 28, 28))]
    budget = args.budget_mflops
    start = time.perf_counter()
    allocated = space.allocate(mflops=budget)
    allocate_s = time.perf_counter() - start
    uniform = space.uniform_for_budget(mflops=budget)
    print(f"\nresnet18 1x28x28 at {budget:g} MFLOPs (MACs; torch's FlopCounterMode would say {2 * budget:g}):")
    for label, plan in (("allocate", allocated), ("uniform_for_budget", uniform)):
        print(f"  {label:18s} total error {space.error(plan):7.3f} over {len(space.layers)} layers; "
              f"{len(plan)} layers factorized; {space.cost(plan)}")
    print(f"  error ratio uniform / allocate: {space.error(uniform) / space.error(allocated):.2f}x; "
          f"allocate took {allocate_s:.2f} s")


if __name__ == "__main__":
    main()
