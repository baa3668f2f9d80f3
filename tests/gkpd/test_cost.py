"""Cost: fvcore counts equal hand counts, and the analytic per-layer cost equals fvcore on built models."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

from gkpd import (
    ConvGeometry, KroneckerConv2d, KroneckerLinear, KroneckerSpec, compressible_layers, count_macs, count_mflops,
    count_params, factorized_conv2d, kroneckerize, layer_cost,
)
from gkpd.spec import Order


def test_counts_of_a_tiny_net_equal_hand_counts() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 8x8 out: 4*3*9*64
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),  # 4x4 out: 6*4*9*16
        nn.Conv2d(6, 5, (3, 1), padding=(1, 0), dilation=(2, 1)),  # (4+2-4-1)+1 = 2 rows x 4 cols: 5*6*3*8
        nn.Flatten(),
        nn.Linear(40, 10),  # 40*10
    )
    macs = 4 * 3 * 9 * 64 + 6 * 4 * 9 * 16 + 5 * 6 * 3 * 8 + 40 * 10
    assert macs == 11488
    assert count_macs(net, (3, 8, 8)) == macs
    assert count_mflops(net, (3, 8, 8)) == pytest.approx(macs / 1e6, abs=0)
    assert count_params(net) == (4 * 27 + 4) + 6 * 36 + (5 * 18 + 5) + (400 + 10)


def test_linear_on_a_sequence_counts_every_row() -> None:
    net = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    assert count_macs(net, (5, 12)) == 5 * (12 * 6 + 6 * 4)


class _Ordered(nn.Module):
    """The factorized conv in a fixed contraction order, so fvcore can count that order."""

    def __init__(self, spec: KroneckerSpec, geometry: ConvGeometry, order: Order) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(spec.rank, *spec.a_shape))
        self.b = nn.Parameter(torch.randn(spec.rank, *spec.b_shape))
        self.geometry, self.order = geometry, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return factorized_conv2d(x, self.a, self.b, stride=g.stride, dilation=g.dilation, pads=g.pads, order=self.order)


CASES = [  # weight_shape, a_shape, rank, geometry
    ((8, 4, 3, 3), (4, 1, 1, 1), 1, ConvGeometry((8, 8), pads=(1, 1, 1, 1))),
    ((8, 8, 3, 3), (2, 2, 3, 1), 3, ConvGeometry((9, 9), stride=(2, 2), pads=(1, 1, 1, 1))),
    ((6, 4, 3, 3), (3, 2, 3, 3), 2, ConvGeometry((10, 10), dilation=(2, 2), pads=(2, 2, 2, 2))),
    ((4, 6, 5, 3), (2, 3, 5, 1), 2, ConvGeometry((11, 9), stride=(2, 1), dilation=(1, 2), pads=(0, 1, 2, 0))),
    ((8, 8, 2, 2), (2, 2, 2, 2), 4, ConvGeometry((7, 7), stride=(2, 2))),
    ((8, 8, 3, 3), (1, 8, 1, 3), 3, ConvGeometry((9, 8), stride=(2, 3), pads=(1, 1, 1, 1))),
    ((16, 8, 1, 1), (4, 2, 1, 1), 3, ConvGeometry((8, 8), stride=(2, 2))),
]


@pytest.mark.parametrize(("weight_shape", "a_shape", "rank", "geometry"), CASES)
def test_fvcore_counts_each_order_as_the_spec_does(weight_shape, a_shape, rank, geometry: ConvGeometry) -> None:
    spec = KroneckerSpec(weight_shape, a_shape, rank)
    input_shape = (weight_shape[1], *geometry.in_hw)
    for order in ("ba", "ab"):
        assert count_macs(_Ordered(spec, geometry, order), input_shape) == spec.order_macs(geometry, order), order
    if weight_shape == (8, 4, 3, 3):  # the hand-counted case of test_spec
        assert [count_macs(_Ordered(spec, geometry, o), input_shape) for o in ("ba", "ab")] == [5120, 20032]


@pytest.mark.parametrize(("weight_shape", "a_shape", "rank", "geometry"), [c for c in CASES if c[3].pads[::2] == c[3].pads[1::2]])
def test_fvcore_counts_a_layer_as_spec_macs_whatever_its_path(weight_shape, a_shape, rank, geometry) -> None:
    spec = KroneckerSpec(weight_shape, a_shape, rank)
    conv = nn.Conv2d(weight_shape[1], weight_shape[0], weight_shape[2:], stride=geometry.stride,
                     padding=geometry.pads[::2], dilation=geometry.dilation)
    layer = KroneckerConv2d.from_conv(conv, spec, path="materialized")  # the count is of the factorized path
    assert layer.geometry(geometry.in_hw) == geometry
    assert count_macs(layer, (weight_shape[1], *geometry.in_hw)) == spec.macs(geometry)
    assert count_macs(conv, (weight_shape[1], *geometry.in_hw)) == spec.dense_macs(geometry)
    assert layer.path == "materialized"  # restored


def test_fvcore_counts_a_kronecker_linear_as_spec_macs() -> None:
    spec = KroneckerSpec((10, 64), (2, 8), 3)
    layer = KroneckerLinear.from_linear(nn.Linear(64, 10), spec)
    assert count_macs(layer, (64,)) == spec.macs(ConvGeometry((1, 1))) == 624
    assert count_macs(layer, (7, 64)) == spec.macs(ConvGeometry((7, 1))) == 7 * 624


@pytest.mark.parametrize("seed", range(5))
def test_fvcore_on_a_kroneckerized_resnet_equals_the_analytic_sum(resnet, input_shape, make_plan, seed: int) -> None:
    model = resnet(seed)
    layers = compressible_layers(model, input_shape)
    plan = make_plan(layers, random.Random(seed))
    compressed = kroneckerize(model, plan)
    replaced = [info for info in layers if info.name in plan]
    dense_macs, dense_params = count_macs(model, input_shape), count_params(model)
    expected_macs = dense_macs - sum(i.dense_macs for i in replaced) + sum(plan[i.name].macs(i.geometry) for i in replaced)
    expected_params = dense_params - sum(i.dense_params for i in replaced) + sum(plan[i.name].num_params for i in replaced)
    assert count_macs(compressed, input_shape) == expected_macs
    assert count_params(compressed) == expected_params
    # The same total from the per-layer table: what is not a conv/linear (BatchNorm, pooling) is unchanged.
    other = dense_macs - sum(i.dense_macs for i in layers)
    assert other > 0
    assert other + sum(layer_cost(i, plan.get(i.name))[0] for i in layers) == expected_macs


def test_layer_cost(resnet, input_shape) -> None:
    info = {i.name: i for i in compressible_layers(resnet(), input_shape)}["layer2.conv1"]
    assert layer_cost(info, None) == (16 * 8 * 9 * 64, 16 * 8 * 9)
    spec = KroneckerSpec((16, 8, 3, 3), (4, 2, 3, 1), 2)  # b [4, 4, 1, 3]; 16x16 in, stride 2, pad 1
    # "ba": B (1x3) on 18x18 at stride (1, 2) -> 18x8, then A (3x1) at stride (2, 1) -> 8x8.
    ba = 2 * 2 * 4 * 4 * 3 * 18 * 8 + 4 * 2 * 4 * 2 * 3 * 8 * 8
    # "ab": A (3x1, dilation (1, 3)) on 18x18 at stride (2, 1) -> 8x18, then B (1x3) at stride (1, 2) -> 8x8.
    ab = 4 * 2 * 4 * 2 * 3 * 8 * 18 + 4 * 2 * 4 * 4 * 3 * 8 * 8
    assert (spec.order_macs(info.geometry, "ba"), spec.order_macs(info.geometry, "ab")) == (ba, ab)
    assert (ba, ab) == (39936, 52224)
    assert layer_cost(info, spec) == (ba, 2 * (24 + 48))
    with pytest.raises(ValueError, match=r"does not match layer 'layer2.conv1' \(16, 8, 3, 3\)"):
        layer_cost(info, KroneckerSpec((8, 8, 3, 3), (2, 2, 1, 1), 1))
