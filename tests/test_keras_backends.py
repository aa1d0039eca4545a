"""RotationCallback on Keras 3 backends other than TensorFlow.

The torch backend runs in a subprocess (``KERAS_BACKEND`` is read once, at ``import keras``)
with TensorFlow made unimportable, as in a torch-only install. The job saves every
trainable variable after every optimizer step; the figures the real collector stores are
checked here against float64 numpy from those weights. A backend the hooks do not serve
(jax) is refused when the callback is constructed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from reference import angle, cosine_distance, rel_err

from layrot.client.query import QueryClient

pytest.importorskip("torch")
pytest.importorskip("keras")

JOB = textwrap.dedent(
    """
    import sys

    sys.modules["tensorflow"] = None  # a torch-only install: any TensorFlow import fails
    import keras
    import numpy as np

    import layrot.keras

    assert keras.backend.backend() == "torch"
    address, out = sys.argv[1], sys.argv[2]
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 4))
    x = keras.layers.Conv1D(8, 3, padding="same", name="conv")(inp)
    x = keras.layers.LayerNormalization(name="ln")(x)
    att = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    x = keras.layers.Flatten()(x + att)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(x))
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def weights():
        return {v.path: keras.ops.convert_to_numpy(v.value).astype(np.float64) for v in model.trainable_variables}

    class Saver(keras.callbacks.Callback):  # synchronous batch ends: the step's final weights
        def on_train_batch_end(self, batch, logs=None):
            saved.append(weights())

    saved, w0 = [], weights()
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((48, 6, 4)).astype("float32")
    ys = (xs[:, 0, 0] > 0).astype("int64")
    cb = layrot.keras.RotationCallback(run="keras-torch", collector=address)
    model.fit(xs, ys, batch_size=8, epochs=2, verbose=0, callbacks=[cb, Saver()])  # steps 1..12
    model.optimizer.learning_rate = 1e-5  # tiny steps, angles ~1e-5 rad
    model.fit(xs, ys, batch_size=8, epochs=1, verbose=0, callbacks=[cb, Saver()])  # steps 13..18
    assert cb.flush(20.0), "collector did not acknowledge"
    cb.close()
    names = [v.path for v in model.trainable_variables]
    np.savez(
        out,
        names=np.array(names),
        layers=np.array(cb.layer_names),
        iterations=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        tf_loaded=sys.modules.get("tensorflow") is not None,
        **{f"w0/{n}": w0[n] for n in names},
        **{f"s{t}/{n}": s[n] for t, s in enumerate(saved, start=1) for n in names},
    )
    """
)


def test_torch_backend_fit_matches_float64_reference(collector, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = tmp_path / "weights.npz"
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(script), collector.grpc_address, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    assert not bool(got["tf_loaded"])
    # the model-name prefix is dropped from paths; biases, gamma/beta and MHA's 2-D biases are not layers
    layers = ["conv/kernel", "mha/query/kernel", "mha/key/kernel", "mha/value/kernel", "mha/attention_output/kernel"]
    layers.append("head/kernel")
    assert list(got["layers"]) == layers
    paths = {n: next(p for p in got["names"] if p == n or p.endswith("/" + n)) for n in layers}
    steps = int(got["iterations"])
    assert steps == 18
    hist = QueryClient(collector.grpc_address).history("keras-torch")
    assert list(hist.steps) == list(range(1, steps + 1))  # reported steps == optimizer steps
    assert hist.layer_names == layers
    runs = {r["run"]: r for r in QueryClient(collector.grpc_address).list_runs()}
    assert runs["keras-torch"]["framework"] == "keras"
    assert runs["keras-torch"]["meta"]["keras_backend"] == "torch"

    def w(t: int, layer: str) -> np.ndarray:
        return got[f"w0/{paths[layer]}" if t == 0 else f"s{t}/{paths[layer]}"]

    rot = np.array([[cosine_distance(w(0, n), w(t, n)) for n in layers] for t in range(1, steps + 1)])
    ang = np.array([[angle(w(t - 1, n), w(t, n)) for n in layers] for t in range(1, steps + 1)])
    nrm = np.array([[np.linalg.norm(w(t, n)) for n in layers] for t in range(1, steps + 1)])
    assert ang[12:].max() < 1e-3  # the tiny-step phase
    errors = {"rotation": rel_err(hist.rotation, rot).max(), "step_angle": rel_err(hist.step_angle, ang).max()}
    print("torch backend max relative errors:", errors)
    assert rel_err(hist.rotation, rot).max() <= 1e-6
    assert rel_err(hist.step_angle, ang).max() <= 1e-6
    assert rel_err(hist.weight_norm, nrm).max() <= 6e-8  # stored as float32
    assert np.isfinite(hist.loss).all()


def test_unserved_backend_is_refused_at_construction(monkeypatch):
    keras = pytest.importorskip("keras")
    import layrot.keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match=r"KERAS_BACKEND=jax, which is not served.*torch or tensorflow"):
        layrot.keras.RotationCallback(run="on-jax")
