"""Shared fixtures for the spaces tests: a CIFAR-style ResNet-18 (1x28x28) and its space, built once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torchvision
import pytest

from spaces import SearchSpace, build_space

INPUT_SHAPE = (1, 28, 28)


def cifar_resnet18(seed: int = 0) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 conv1 on one channel, no max-pool), eval mode."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


class TinyNet(nn.Module):
    """A 3x3 stem with bias, a strided 3x3 conv, a 1x1 conv, a grouped conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.point = nn.Conv2d(16, 12, 1)
        self.group = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.fc = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.group(torch.relu(self.point(torch.relu(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: SVDs and small convs on two threads crawl when another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def shape18() -> tuple[int, int, int]:
    """The ResNet-18's sample shape ``(C, H, W)``."""
    return INPUT_SHAPE


@pytest.fixture(scope="session")
def resnet18() -> nn.Module:
    return cifar_resnet18()


@pytest.fixture(scope="session")
def space18(resnet18: nn.Module) -> SearchSpace:
    """The default space of the ResNet-18 (the slow part of this suite: seconds, once)."""
    with one_thread():
        return build_space(resnet18, INPUT_SHAPE)


@pytest.fixture(scope="session")
def tiny() -> nn.Module:
    torch.manual_seed(1)
    return TinyNet().eval()
