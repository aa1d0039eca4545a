"""The shared layer rule (layrot.core.layer_rule): the same answers for every framework."""

from __future__ import annotations

import re

import numpy as np
import pytest

from layrot.core.layer_rule import is_layer, select_layers, variable_role

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


# ---------------------------------------------------------------- roles, not ndim alone


@pytest.mark.parametrize(
    "name, role",
    [
        ("dense/kernel", "weight"),
        ("embedding/embeddings", "weight"),
        ("conv/depthwise_kernel", "weight"),
        ("lstm/lstm_cell/recurrent_kernel", "weight"),
        ("encoder.0.self_attn.in_proj_weight", "weight"),
        ("fc.weight", "weight"),
        ("param3", "weight"),  # no role in the name: ndim decides
        ("multi_head_attention/query/bias", "bias"),
        ("mha/key/bias#7", "bias"),  # variable_names() marks duplicates with #index
        ("encoder.0.self_attn.in_proj_bias", "bias"),
        ("attn.bias_k", "bias"),
        ("dense/bias:0", "bias"),
        ("layer_normalization/gamma", "normalization"),
        ("bn/beta", "normalization"),
        ("bn/moving_variance", "normalization"),
        ("bn.running_mean", "normalization"),
        ("unbiased_weight", "weight"),  # "bias" must be a word of the last component
    ],
)
def test_variable_role(name, role):
    assert variable_role(name) == role


def test_matrix_biases_are_not_layers_but_can_be_named():
    named = [
        ("mha/query/kernel", np.zeros((8, 2, 4))),
        ("mha/query/bias", np.zeros((2, 4))),  # Keras MultiHeadAttention: (heads, head_dim)
        ("attn.bias_k", np.zeros((1, 1, 8))),  # nn.MultiheadAttention(add_bias_kv=True)
        ("norm/gamma", np.zeros((1, 8))),
        ("head/kernel", np.zeros((8, 3))),
    ]
    assert [n for n, _ in select_layers(named, np.ndim)] == ["mha/query/kernel", "head/kernel"]
    assert [n for n, _ in select_layers(named, np.ndim, "mha")] == ["mha/query/kernel"]
    assert [n for n, _ in select_layers(named, np.ndim, ["mha/query/bias"])] == ["mha/query/bias"]
    assert is_layer("mha/query/kernel", 3) and not is_layer("mha/query/bias", 2) and not is_layer("w", 1)


def test_torch_models_keep_their_layers():
    torch = pytest.importorskip("torch")
    from layrot.hooks.torch_layers import candidate_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 8),
        torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
        torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 3),
    )
    got = [n for n, _, _ in candidate_layers(model)]
    # the old ndim >= 2 answer, computed independently: unchanged for ordinary models
    assert got == [n for n, p in model.named_parameters() if p.ndim >= 2]
    mha = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)
    assert [n for n, _, _ in candidate_layers(mha)] == ["in_proj_weight", "out_proj.weight"]  # not bias_k / bias_v


def test_torch_layca_follows_the_same_rule():
    torch = pytest.importorskip("torch")
    from layrot.hooks.layca_torch import Layca

    mha = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)
    named = list(mha.named_parameters())
    base = torch.optim.SGD([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], lr=0.1)
    assert Layca(base).layer_names == ["in_proj_weight", "out_proj.weight"]


def test_keras_attention_biases_are_not_layers():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from layrot.hooks.layca_keras import Layca
    from layrot.hooks.tf_watch import candidate_variables

    inp = keras.Input((5, 8))
    att = keras.layers.MultiHeadAttention(2, 4, name="mha")(inp, inp)
    out = keras.layers.Dense(3, name="head")(keras.layers.LayerNormalization(name="ln")(att + inp))
    model = keras.Model(inp, out)
    assert any(len(v.shape) == 2 and v.path.endswith("query/bias") for v in model.trainable_variables)
    want = ["mha/query/kernel", "mha/key/kernel", "mha/value/kernel", "mha/attention_output/kernel", "head/kernel"]
    assert [n for n, _, _ in candidate_variables(model)] == want
    layca = Layca(keras.optimizers.SGD(0.1))
    layca.build(model.trainable_variables)
    assert list(layca.layer_names) == want
