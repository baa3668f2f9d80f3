"""KroneckerSpec validation and derived values; ConvGeometry against real nn.Conv2d output sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from gkpd import ConvGeometry, KroneckerSpec


@pytest.mark.parametrize(
    ("weight_shape", "a_shape", "rank", "message"),
    [
        ((8, 6, 3, 3), (3, 2, 3, 1), 1, r"does not divide .* in dim 0 \(8 % 3 != 0\)"),
        ((8, 6, 3, 3), (2, 2, 3, 2), 1, r"does not divide .* in dim 3 \(3 % 2 != 0\)"),
        ((8, 6, 3, 3), (2, 2, 3, 1), 0, r"rank 0 is out of range .* allowed 1\.\.12"),
        ((8, 6, 3, 3), (2, 2, 3, 1), 13, r"rank 13 is out of range .* allowed 1\.\.12"),
        ((8, 6, 3, 3), (2, 2, 1, 1), -1, r"rank -1 is out of range .* allowed 1\.\.4"),
        ((8, 6, 3, 3), (2, 2, 3, 1), 1.5, r"rank must be an int, got 1\.5"),
        ((8, 6, 3, 3), (2, 2, 3, 1), True, r"rank must be an int, got True"),
        ((8, 6, 3, 3), (2, 2, 3, 1), None, r"rank must be an int, got None"),
        ((8, 6, 3, 3), (2, 2, 3, 1), "2", r"rank must be an int, got '2'"),
        ((8, 6, 3, 3), (2.5, 2, 3, 1), 1, r"a_shape must be a sequence of ints, got \(2\.5, 2, 3, 1\)"),
        ((8, 6, 3, 3), (2, "x", 3, 1), 1, r"a_shape must be a sequence of ints, got \(2, 'x', 3, 1\)"),
        ((8, 6, 3), (2, 2, 3), 1, r"weight_shape must be 4-D .* or 2-D .*got \(8, 6, 3\)"),
        ((8,), (2,), 1, r"weight_shape must be 4-D .* or 2-D .*got \(8,\)"),
        ((8, 6, 3, 3), (2, 2), 1, r"a_shape \(2, 2\) must have as many dims as weight_shape \(8, 6, 3, 3\)"),
        ((8, 6), (2, 2, 1, 1), 1, r"a_shape \(2, 2, 1, 1\) must have as many dims as weight_shape \(8, 6\)"),
        ((8, 0, 3, 3), (2, 1, 1, 1), 1, r"weight_shape must have positive sizes, got \(8, 0, 3, 3\)"),
        ((8, 6, 3, 3), (2, -2, 1, 1), 1, r"a_shape must have positive sizes, got \(2, -2, 1, 1\)"),
        (8, (2,), 1, r"weight_shape must be a sequence of ints, got 8"),
    ],
)
def test_bad_spec_raises_value_error_naming_the_value(weight_shape, a_shape, rank, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KroneckerSpec(weight_shape, a_shape, rank)


def test_conv_spec_derived_values() -> None:
    spec = KroneckerSpec([64, 32, 3, 3], [8, 4, 3, 1], 5)
    assert spec.weight_shape == (64, 32, 3, 3) and spec.a_shape == (8, 4, 3, 1)  # lists become tuples
    assert spec.b_shape == (8, 8, 1, 3)
    assert spec.max_rank == min(8 * 4 * 3, 8 * 8 * 3) == 96
    assert spec.num_params == 5 * (96 + 192) == 1440
    assert spec.dense_params == 64 * 32 * 9
    assert spec.with_rank(96) == KroneckerSpec((64, 32, 3, 3), (8, 4, 3, 1), 96)
    assert str(spec) == "8x4x3x1⊗8x8x1x3 r5"


def test_linear_spec_derived_values() -> None:
    spec = KroneckerSpec((10, 64), (2, 8), 3)
    assert spec.b_shape == (5, 8)
    assert spec.max_rank == min(16, 40) == 16
    assert spec.num_params == 3 * (16 + 40) == 168
    with pytest.raises(ValueError, match=r"rank 17 is out of range .* allowed 1\.\.16"):
        spec.with_rank(17)


def test_trivial_factors_have_rank_one() -> None:
    spec = KroneckerSpec((4, 4, 3, 3), (1, 1, 1, 1), 1)
    assert spec.b_shape == (4, 4, 3, 3) and spec.max_rank == 1 and spec.num_params == 1 + 144


def test_spec_is_frozen_and_hashable() -> None:
    spec = KroneckerSpec((4, 4, 3, 3), (2, 2, 3, 1), 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 3  # type: ignore[misc]
    assert {spec: 1}[KroneckerSpec((4, 4, 3, 3), (2, 2, 3, 1), 2)] == 1


def test_macs_hand_counts_pick_the_cheaper_order() -> None:
    # W [8,4,3,3] = A [4,1,1,1] ⊗ B [2,4,3,3] on 8x8, pad 1. "ba": B 3x3 (4 -> 2 ch) on the 10x10 map,
    # then A 1x1 (1 -> 4 ch) on 8x8. "ab": A 1x1 (1 -> 4 ch) on 4 maps of 10x10, then B 3x3 on 8x8.
    spec = KroneckerSpec((8, 4, 3, 3), (4, 1, 1, 1), 1)
    geometry = ConvGeometry((8, 8), pads=(1, 1, 1, 1))
    assert spec.order_macs(geometry, "ba") == 1 * 1 * 2 * 4 * 9 * 64 + 2 * 1 * 4 * 1 * 1 * 64 == 5120
    assert spec.order_macs(geometry, "ab") == 4 * 1 * 4 * 1 * 1 * 100 + 4 * 1 * 2 * 4 * 9 * 64 == 20032
    assert spec.cheaper_order(geometry) == "ba" and spec.macs(geometry) == 5120
    assert spec.dense_macs(geometry) == 8 * 4 * 9 * 64


def test_linear_macs_hand_counts() -> None:
    spec = KroneckerSpec((10, 64), (2, 8), 3)  # b [5, 8]
    geometry = ConvGeometry((1, 1))
    assert spec.order_macs(geometry, "ba") == 8 * 3 * 5 * 8 + 5 * 3 * 2 * 8 == 1200
    assert spec.order_macs(geometry, "ab") == 8 * 3 * 2 * 8 + 2 * 3 * 5 * 8 == 624
    assert spec.macs(geometry) == 624 and spec.dense_macs(geometry) == 640
    assert spec.macs(ConvGeometry((7, 1))) == 7 * 624  # [N, T, C] input: T rows


def test_strided_steps_put_the_stride_where_nothing_is_wasted() -> None:
    spec = KroneckerSpec((8, 8, 3, 3), (2, 2, 3, 3), 1)  # b [4,4,1,1]
    geometry = ConvGeometry((8, 8), stride=(2, 2), pads=(1, 1, 1, 1))
    first, second = spec.steps(geometry, "ba")  # B [4,4,1,1] first, then A 3x3 at dilation 1
    assert first["stride"] == (1, 1) and second["stride"] == (2, 2)
    assert first["out_hw"] == (10, 10) and second["out_hw"] == (4, 4) == geometry.out_hw((3, 3))
    first, second = spec.steps(geometry, "ab")  # A 3x3 first; B is 1x1, so A already strides
    assert first["stride"] == (2, 2) and second["stride"] == (1, 1)
    assert first["out_hw"] == second["out_hw"] == (4, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(in_hw=(0, 4)), r"in_hw must be two positive ints, got \(0, 4\)"),
        (dict(in_hw=(4, 4), stride=(1,)), r"stride must be two positive ints, got \(1,\)"),
        (dict(in_hw=(4, 4), dilation=(1, 0)), r"dilation must be two positive ints, got \(1, 0\)"),
        (dict(in_hw=(4, 4), pads=(1, 1, -1, 0)), r"pads must be four non-negative ints, got \(1, 1, -1, 0\)"),
    ],
)
def test_bad_geometry_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConvGeometry(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 12), w=st.integers(1, 12), kh=st.integers(1, 4), kw=st.integers(1, 4),
    sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 3), dw=st.integers(1, 3),
    ph=st.integers(0, 3), pw=st.integers(0, 3),
)
def test_out_hw_matches_nn_conv2d(h, w, kh, kw, sh, sw, dh, dw, ph, pw) -> None:
    geometry = ConvGeometry((h, w), (sh, sw), (dh, dw), (ph, ph, pw, pw))
    expected = geometry.out_hw((kh, kw))
    conv = nn.Conv2d(1, 1, (kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
    if min(expected) < 1:
        with pytest.raises(RuntimeError):
            conv(torch.zeros(1, 1, h, w))
    else:
        assert tuple(conv(torch.zeros(1, 1, h, w)).shape[-2:]) == expected
