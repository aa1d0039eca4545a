"""Real Keras model code through ``model.fit`` with RotationCallback and a real collector.

``keras.applications.MobileNetV2`` (random init, alpha 0.35, 32x32 inputs: depthwise and
pointwise kernels, BatchNormalization everywhere) and a transformer block
(Embedding, MultiHeadAttention, LayerNormalization, a Dense FFN). At every optimizer step
and for every layer the collector's rotation and step angle are checked against float64
numpy from weights saved after each step; the layer set is derived here from the model's
layers in call order (kernels and embeddings only: no biases, no (heads, dim) attention
biases, no gamma/beta), and the steps reported are the optimizer's steps.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from metrics_text import scrape  # noqa: E402
from reference import angle, cosine_distance, rel_err  # noqa: E402

import layrot.keras  # noqa: E402
from layrot.client.query import QueryClient  # noqa: E402

pytestmark = pytest.mark.tf

TOL = 1e-6


class EveryStep(keras.callbacks.Callback):
    """w(0) and every trainable variable after every step (synchronous batch ends), by layer path."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[dict[str, np.ndarray]] = []

    def on_train_begin(self, logs=None):
        self.w0 = self._weights()

    def on_train_batch_end(self, batch, logs=None):
        self.saved.append(self._weights())

    def _weights(self):
        return {_short(self.model, v): v.numpy().astype(np.float64) for v in self.model.trainable_variables}


def _short(model: keras.Model, v) -> str:
    prefix = model.name + "/"
    return v.path[len(prefix) :] if v.path.startswith(prefix) else v.path


def forward_kernels(model: keras.Model) -> list[str]:
    """The multiplicative weights in call order, from the layers themselves (not from layrot)."""
    out = []
    for layer in model.layers:  # a functional model's layers are in call (topological) order
        if isinstance(layer, keras.layers.MultiHeadAttention):
            # query, key, value projections, then the output projection
            out += [f"{layer.name}/{p}/kernel" for p in ("query", "key", "value", "attention_output")]
        elif isinstance(layer, keras.layers.Embedding):
            out.append(f"{layer.name}/embeddings")
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            out.append(f"{layer.name}/kernel")
    return out


def fit_and_check(
    collector, model, x, y, run: str, epochs: int, batch_size: int, no_critical_alerts: bool = False
) -> dict[str, float]:
    cb = layrot.keras.RotationCallback(run=run, collector=collector.grpc_address)
    rec = EveryStep()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[cb, rec])
    assert cb.flush(20.0)
    client = QueryClient(collector.grpc_address)
    hist = client.history(run)
    cb.close()
    steps = int(model.optimizer.iterations.numpy())
    assert steps == len(rec.saved) == epochs * math.ceil(len(x) / batch_size)
    assert list(hist.steps) == list(range(1, steps + 1))  # reported steps == optimizer steps
    layers = forward_kernels(model)
    assert cb.layer_names == layers
    assert hist.layer_names == layers
    seq = [rec.w0, *rec.saved]
    rot = np.array([[cosine_distance(rec.w0[n], seq[t][n]) for n in layers] for t in range(1, steps + 1)])
    ang = np.array([[angle(seq[t - 1][n], seq[t][n]) for n in layers] for t in range(1, steps + 1)])
    nrm = np.array([[np.linalg.norm(seq[t][n]) for n in layers] for t in range(1, steps + 1)])
    errors = {
        "rotation": float(rel_err(hist.rotation, rot).max()),
        "step_angle": float(rel_err(hist.step_angle, ang).max()),
        "weight_norm": float(rel_err(hist.weight_norm, nrm).max()),
    }
    assert errors["rotation"] <= TOL, errors
    assert errors["step_angle"] <= TOL, errors
    assert errors["weight_norm"] <= 6e-8, errors  # stored as float32
    assert np.isfinite(hist.loss).all()
    # Nothing NaN reaches /metrics (the (heads, dim) attention biases, zero at init, did).
    nonfinite = {lab["run"]: v for lab, v in scrape(collector).get("layrot_run_nonfinite_samples", [])}
    assert nonfinite.get(run, 0.0) == 0.0
    if no_critical_alerts:  # ... and they raised critical alerts at step 2
        assert not [a for a in client.list_alerts(run) if a.get("severity") == "critical"]
    return errors


@pytest.mark.slow  # tracing MobileNetV2's train step takes ~40 s on a shared CPU
def test_mobilenet_v2_through_fit(collector):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5, classifier_activation=None
    )
    # Not XLA: compiling a whole application with XLA on CPU takes minutes.
    model.compile(
        keras.optimizers.SGD(0.02, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 5, 24)
    errors = fit_and_check(collector, model, x, y, "keras-mobilenetv2", epochs=2, batch_size=8)  # 6 steps
    assert len(forward_kernels(model)) == 53  # 17 depthwise + 35 pointwise/stem convs + the classifier
    print("MobileNetV2 max relative errors:", errors)


def transformer_block(vocab: int = 50, seq: int = 12, dim: int = 16) -> keras.Model:
    tokens = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim, name="embed")(tokens)
    att = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(h, h)
    h = keras.layers.LayerNormalization(name="ln1")(h + att)
    ffn = keras.layers.Dense(32, activation="gelu", name="ffn_in")(h)
    h = keras.layers.LayerNormalization(name="ln2")(h + keras.layers.Dense(dim, name="ffn_out")(ffn))
    pooled = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(pooled), name="block")


def test_transformer_block_through_fit(collector):
    keras.utils.set_random_seed(1)
    model = transformer_block()
    model.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False
    )
    assert any(len(v.shape) == 2 and v.path.endswith("query/bias") for v in model.trainable_variables)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 50, (40, 12)).astype("int32")
    y = (x[:, 0] % 3).astype("int64")
    errors = fit_and_check(collector, model, x, y, "keras-transformer", epochs=3, batch_size=8, no_critical_alerts=True)
    assert forward_kernels(model) == [
        "embed/embeddings",
        "mha/query/kernel",
        "mha/key/kernel",
        "mha/value/kernel",
        "mha/attention_output/kernel",
        "ffn_in/kernel",
        "ffn_out/kernel",
        "head/kernel",
    ]
    print("transformer block max relative errors:", errors)
