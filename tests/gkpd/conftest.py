"""Shared fixtures for the gkpd tests: a small CIFAR-style ResNet and random plans over its layers."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn as nn

from gkpd import KroneckerSpec, LayerInfo, Plan

INPUT_SHAPE = (3, 16, 16)


class Block(nn.Module):
    """Two 3x3 conv+BN with a residual; a strided 1x1 conv+BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, a stride-1 block, a stride-2 block with projection, pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_resnet(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyResNet:
    """A TinyResNet in eval mode with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TinyResNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_plan(layers: list[LayerInfo], rng: random.Random, *, full_rank: bool = False) -> Plan:
    """A plan over a random non-empty subset of ``layers`` with random factor shapes and ranks."""
    chosen = [info for info in layers if rng.random() < 0.7] or [rng.choice(layers)]
    plan: Plan = {}
    for info in chosen:
        a_shape = tuple(rng.choice(divisors(w)) for w in info.weight_shape)
        spec = KroneckerSpec(info.weight_shape, a_shape, 1)
        plan[info.name] = spec.with_rank(spec.max_rank if full_rank else rng.randint(1, spec.max_rank))
    return plan


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run on one thread: tiny convs on two threads crawl when another process shares the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def resnet() -> Callable[..., TinyResNet]:
    """Factory for a fresh TinyResNet: ``resnet(seed=0, dtype=torch.float32)``."""
    return make_resnet


@pytest.fixture
def make_plan() -> Callable[..., Plan]:
    """``make_plan(layers, rng, full_rank=False)``: a random plan over ``layers``."""
    return random_plan


@pytest.fixture
def input_shape() -> tuple[int, int, int]:
    """The TinyResNet's sample shape ``(C, H, W)``."""
    return INPUT_SHAPE
