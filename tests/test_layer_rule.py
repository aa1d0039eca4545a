"""The shared layer rule (layrot.core.layer_rule): the same answers for every framework."""

from __future__ import annotations

import re

import numpy as np
import pytest

from layrot.core.layer_rule import select_layers

NAMED = [
    ("enc/kernel", np.zeros((4, 3))),
    ("enc/bias", np.zeros(3)),
    ("ln/gamma", np.zeros(3)),
    ("head/kernel", np.zeros((3, 2))),
    ("head/bias", np.zeros(2)),
    ("emb", np.zeros((5, 2, 2))),
]


def names(layers):
    return [n for n, _ in select_layers(NAMED, np.ndim, layers)]


def test_default_is_every_weight_with_ndim_at_least_2():
    assert names(None) == ["enc/kernel", "head/kernel", "emb"]


def test_regex_and_predicate_filter_the_multiplicative_weights_only():
    assert names("head") == ["head/kernel"]
    assert names(re.compile(r"^(enc|emb)")) == ["enc/kernel", "emb"]
    assert names(lambda n, t: "bias" not in n) == ["enc/kernel", "head/kernel", "emb"]
    assert names(lambda n, t: True) == names(None)


def test_exact_names_pick_anything_in_their_order():
    assert names(["head/bias", "enc/kernel"]) == ["head/bias", "enc/kernel"]


@pytest.mark.parametrize(
    "layers, match",
    [
        (["nope"], "not found"),
        (["enc/kernel", "enc/kernel"], "twice"),
        ([], "empty"),
        ("bias", "no layers selected"),
        (lambda n, t: False, "no layers selected"),
    ],
)
def test_bad_selections_say_why(layers, match):
    with pytest.raises(ValueError, match=match):
        names(layers)
