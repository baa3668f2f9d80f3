"""Candidates: exact cost (fvcore on the built layer), exact error (decompose), pruning, cap, presets, skip."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

from gkpd import KroneckerConv2d, KroneckerLinear, count_macs, count_params, decompose, reconstruct
from spaces import DENSE, PRESETS, Candidate, SearchSpace, build_space
from spaces.candidates import family, pareto, thin

TINY_INPUT = (3, 16, 16)


def _sample(space: SearchSpace, per_layer: int, seed: int = 0, max_rank: int = 10**9):
    """A few random factorized candidates per layer, of full rank <= ``max_rank`` (which bounds their SVD)."""
    rng = random.Random(seed)
    for name, layer in space.layers.items():
        pool = [c for c in layer.candidates[1:] if c.spec.max_rank <= max_rank]
        for candidate in rng.sample(pool, min(per_layer, len(pool))):
            yield name, layer, candidate


def test_candidate_cost_equals_fvcore_on_the_built_layer(resnet18: nn.Module, space18: SearchSpace) -> None:
    modules = dict(resnet18.named_modules())
    checked = 0
    for name, layer, candidate in _sample(space18, per_layer=2):
        module, spec = modules[name], candidate.spec
        if isinstance(module, nn.Conv2d):
            # Cost does not depend on the factor values: a fresh layer (no SVD) is enough.
            built = KroneckerConv2d(module.in_channels, module.out_channels, module.kernel_size,
                                    factor_shapes=spec.factor_shapes, rank=spec.rank, stride=module.stride, padding=module.padding,
                                    dilation=module.dilation, bias=module.bias is not None)
            sample = (module.in_channels, *layer.info.geometry.in_hw)
        else:
            built = KroneckerLinear(module.in_features, module.out_features, factor_shapes=spec.factor_shapes,
                                    rank=spec.rank,
                                    bias=module.bias is not None)
            sample = (module.in_features,)
        bias = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        assert count_macs(built, sample) == candidate.macs, (name, candidate)
        assert count_params(built) == candidate.params + (bias if module.bias is not None else 0), (name, candidate)
        checked += 1
    assert checked == 2 * len(space18.layers)


def test_dense_candidate_is_the_layer_itself(resnet18: nn.Module, space18: SearchSpace) -> None:
    modules = dict(resnet18.named_modules())
    for name, layer in space18.layers.items():
        dense = layer.candidates[0]
        assert dense.spec is None and dense.key == DENSE and dense.error == 0
        assert dense.params == modules[name].weight.numel()
        assert dense.macs == layer.info.dense_macs


def test_candidate_error_equals_measured_reconstruction_error(resnet18: nn.Module, space18: SearchSpace) -> None:
    modules = dict(resnet18.named_modules())
    for name, _, candidate in _sample(space18, per_layer=1, seed=1, max_rank=256):
        weight = modules[name].weight.detach().double()
        residual = weight - reconstruct(*decompose(weight, candidate.spec))
        measured = float(torch.linalg.norm(residual) / torch.linalg.norm(weight))
        assert candidate.error == pytest.approx(measured, abs=1e-8), (name, candidate)


def test_every_candidate_saves_macs_or_params(space18: SearchSpace) -> None:
    for layer in space18.layers.values():
        dense = layer.dense
        assert all(c.macs < dense.macs or c.params < dense.params for c in layer.candidates[1:]), layer.name


def test_only_the_uniform_family_may_be_dominated(space18: SearchSpace) -> None:
    family = {name: {c for c in row if c.spec is not None} for name, row in space18._uniform["paper"].items()}
    for name, layer in space18.layers.items():
        factorized = layer.candidates[1:]
        for c in factorized:
            if c in family[name]:
                continue
            dominated = [d for d in factorized if d is not c and d.macs <= c.macs and d.params <= c.params
                         and d.error <= c.error]
            assert not dominated, (name, c, dominated[0])


def test_uniform_family_survives_pruning(space18: SearchSpace) -> None:
    for name, layer in space18.layers.items():
        for candidate in space18._uniform["paper"][name]:
            assert layer.by_key(candidate.key) == candidate


def test_the_cap_keeps_the_cheapest_and_the_most_accurate(tiny: nn.Module) -> None:
    full = build_space(tiny, TINY_INPUT, max_candidates=10**6)
    capped = build_space(tiny, TINY_INPUT, max_candidates=4)
    for name, layer in full.layers.items():
        kept = set(capped.layers[name].candidates)
        family = {c for c in capped._uniform["paper"][name] if c.spec is not None}
        assert len(kept - family - {layer.dense}) <= 4 + 3  # the cap, plus the three ends
        factorized = layer.candidates[1:]
        ends = (min(factorized, key=lambda c: (c.macs, c.error)), min(factorized, key=lambda c: (c.params, c.error)),
                min(factorized, key=lambda c: c.error))
        for end in ends:
            assert end in kept, (name, end)
        assert len(layer.candidates) > len(capped.layers[name].candidates)


def test_choices_are_deterministic(tiny: nn.Module) -> None:
    assert build_space(tiny, TINY_INPUT).choices() == build_space(tiny, TINY_INPUT).choices()


def test_keys_are_a_shape_and_rank(space18: SearchSpace) -> None:
    layer = space18.layers["layer2.1.conv1"]
    for candidate in layer.candidates[1:]:
        shape, rank = candidate.key.split("/r")
        assert tuple(int(s) for s in shape.split("x")) == candidate.spec.a_shape
        assert int(rank) == candidate.spec.rank


def test_small_kernels_get_cp_candidates_with_their_fitted_error(tiny: nn.Module) -> None:
    space = build_space(tiny, TINY_INPUT)
    modules = dict(tiny.named_modules())
    found = 0
    for name, layer in space.layers.items():
        for candidate in layer.candidates[1:]:
            if family(candidate.spec) != "cp":
                continue
            found += 1
            f, c, kh, kw = candidate.spec.weight_shape
            shapes = "*".join("x".join(map(str, s)) for s in candidate.spec.factor_shapes)
            assert candidate.key == f"{shapes}/r{candidate.spec.rank}"
            assert space.plan_from_params({**{n: "dense" for n in space.choices()}, name: candidate.key}) == {
                name: candidate.spec}
            weight = modules[name].weight.detach().double()
            measured = float((reconstruct(*decompose(weight, candidate.spec)) - weight).norm() / weight.norm())
            assert candidate.error == pytest.approx(measured, abs=1e-8)
            assert candidate.params == candidate.spec.rank * (f + c + kh + kw) - candidate.spec.rank * (c == 1)
    assert found


def test_paper_preset_uses_separable_spatial_factors(tiny: nn.Module) -> None:
    space = build_space(tiny, TINY_INPUT, preset="paper")
    for layer in space.layers.values():
        for c in layer.candidates[1:]:
            if len(c.spec.weight_shape) == 4:
                kh, kw = c.spec.weight_shape[2:]
                assert c.spec.a_shape[2:] == (kh, 1) and c.spec.b_shape[2:] == (1, kw), c


def test_all_preset_reaches_at_least_as_low_as_default(tiny: nn.Module) -> None:
    every, default = build_space(tiny, TINY_INPUT, preset="all"), build_space(tiny, TINY_INPUT)
    assert every.min_cost().macs <= default.min_cost().macs
    assert every.min_cost().params <= default.min_cost().params
    shapes = {c.spec.a_shape for layer in every.layers.values() for c in layer.candidates[1:]}
    assert shapes - {c.spec.a_shape for layer in default.layers.values() for c in layer.candidates[1:]}


def test_explicit_rank_list(tiny: nn.Module) -> None:
    space = build_space(tiny, TINY_INPUT, ranks=[1, 2])
    family = {c for row in space._uniform["paper"].values() for c in row}
    assert all(c.spec.rank <= 2 for layer in space.layers.values() for c in layer.candidates[1:] if c not in family)


def test_unknown_preset_lists_the_known_ones(tiny: nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown preset 'fast'; known: " + ", ".join(PRESETS)):
        build_space(tiny, TINY_INPUT, preset="fast")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_cap_is_refused(tiny: nn.Module, bad: object) -> None:
    with pytest.raises(ValueError, match="max_candidates must be a positive int"):
        build_space(tiny, TINY_INPUT, max_candidates=bad)  # type: ignore[arg-type]


def test_skip_keeps_layers_dense(tiny: nn.Module) -> None:
    space = build_space(tiny, TINY_INPUT, skip=("stem", "fc"))
    assert set(space.choices()) == {"conv", "point"}
    assert space.dense_only["stem"] == "skipped"
    assert space.baseline_cost() == build_space(tiny, TINY_INPUT).baseline_cost()
    with pytest.raises(ValueError, match="keeps dense \\(skipped\\)"):
        space.cost({"stem": build_space(tiny, TINY_INPUT).layers["stem"].candidates[1].spec})


def test_unknown_skip_name_lists_the_layers(tiny: nn.Module) -> None:
    with pytest.raises(ValueError, match="skip names 'head'.*its layers: stem, conv, point, group, fc"):
        build_space(tiny, TINY_INPUT, skip=["head"])


def test_grouped_conv_stays_dense_with_its_reason(tiny: nn.Module) -> None:
    space = build_space(tiny, TINY_INPUT)
    assert "group" not in space.layers
    assert "groups=3" in space.dense_only["group"]


def test_space_input_shape_and_names(space18: SearchSpace, shape18: tuple[int, int, int]) -> None:
    assert space18.input_shape == shape18
    assert list(space18.layers)[0] == "conv1" and list(space18.layers)[-1] == "fc"
    assert len(space18.layers) == 21


def test_pareto_equals_brute_force() -> None:
    rng = random.Random(4)
    points = [Candidate(None, rng.randint(1, 30), rng.randint(1, 30), rng.randint(0, 30) / 30) for _ in range(400)]

    def dominated(c: Candidate) -> bool:
        return any(d.macs <= c.macs and d.params <= c.params and d.error <= c.error and
                   (d.macs, d.params, d.error) != (c.macs, c.params, c.error) for d in points)

    expected = {(c.macs, c.params, c.error) for c in points if not dominated(c)}
    kept = pareto(points)
    assert {(c.macs, c.params, c.error) for c in kept} == expected
    assert len(kept) == len(expected)  # equal triples kept once


def test_thin_keeps_the_ends_and_the_cap() -> None:
    rng = random.Random(5)
    front = pareto(Candidate(None, rng.randint(1, 10**6), rng.randint(1, 10**6), rng.random()) for _ in range(3000))
    kept = thin(front, [], 10)
    assert len(kept) == 10
    assert min(front, key=lambda c: c.macs) in kept and min(front, key=lambda c: c.params) in kept
    assert min(front, key=lambda c: c.error) in kept
    crowded = thin(front, front[:20], 10)  # more to keep than the cap: all of it, plus the three ends
    assert crowded[:20] == front[:20] and len(crowded) <= 23
