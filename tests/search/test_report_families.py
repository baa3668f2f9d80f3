"""The report names each trial's factorization families, read back from the plan stored with the trial."""

from __future__ import annotations

import gkpd
from gkpd import KroneckerSpec
from search.report import families_of


def test_families_count_the_layers_of_each_kind() -> None:
    cp = KroneckerSpec((8, 8, 3, 3), rank=2, factor_shapes=[(8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3)])
    plan = {
        "a": cp, "b": cp,
        "c": KroneckerSpec((8, 8, 3, 3), (8, 1, 1, 1), 2),  # output channels alone: a low-rank matrix
        "d": KroneckerSpec((8, 8, 3, 3), (2, 2, 3, 1), 2),
        "e": KroneckerSpec((8, 8, 3, 3), rank=2, factor_shapes=[(2, 1, 3, 1), (2, 4, 1, 1), (2, 2, 1, 3)]),
    }
    assert families_of(gkpd.plan_to_dict(plan)["layers"]) == "cp:2 kron2:1 kron3:1 svd:1"
    v1 = {"d": {"weight_shape": [8, 8, 3, 3], "a_shape": [2, 2, 3, 1], "rank": 2}}  # studies written before v2
    assert families_of(v1) == "kron2:1"
    assert families_of({}) == "" and families_of({"x": {"rank": 1}}) == "?"
