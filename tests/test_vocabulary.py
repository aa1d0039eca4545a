"""One vocabulary across frameworks: the same names and argument order in the PyTorch and TensorFlow / Keras
hooks, one measurement contract, and the old names still working with a DeprecationWarning."""

from __future__ import annotations

import socket
import warnings

import numpy as np
import pytest

from layrot.agent.measurement import DEVICE_ROWS, LOSS_ROW, PACKED_ROWS, WIRE_ROWS, PackedMeasurement, wire_rows


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there: the hooks fail open


class _Strict:
    """Inside: a DeprecationWarning is an error (the current names never warn)."""

    def __enter__(self) -> None:
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", DeprecationWarning)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def reference_rows(w: np.ndarray, w0: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """The six wire rows in float64 straight from their definitions."""
    w, w0, prev = (np.asarray(a, dtype=np.float64).ravel() for a in (w, w0, prev))
    d0, ds = w - w0, w - prev
    return np.array(
        [np.linalg.norm(w), np.linalg.norm(d0), np.linalg.norm(ds), np.linalg.norm(prev), d0 @ w0, ds @ prev]
    )


# ---------------------------------------------------------------- the measurement contract


def test_contract_rows_and_host_derivation():
    assert DEVICE_ROWS == ("dist0_sq", "dot0", "dstep_sq", "dotstep_w")
    assert LOSS_ROW == 4 and PACKED_ROWS == 5
    assert WIRE_ROWS == ("norm", "dist0", "dstep", "norm_prev", "dot0", "dotstep")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(2, 50))
    prev = w0 + 0.1 * rng.normal(size=w0.shape)
    w = prev + 1e-3 * rng.normal(size=w0.shape)
    dev = np.array([[(a - b) @ (a - b), (a - b) @ b, (a - p) @ (a - p), (a - p) @ a] for a, b, p in zip(w, w0, prev)]).T
    packed = np.vstack([dev, [[1.5, np.nan]]])
    m = PackedMeasurement(lambda: packed, 2, np.linalg.norm(w0, axis=1))
    ref = np.stack([reference_rows(a, b, p) for a, b, p in zip(w, w0, prev)], axis=1)
    np.testing.assert_allclose(m.values(), ref, rtol=1e-12)
    assert m.loss() == 1.5
    rec = m.record(7, rho=None, command_version=3)
    assert rec.step == 7 and rec.command_version == 3 and rec.loss() == 1.5
    no_loss = PackedMeasurement(lambda: np.vstack([dev, [[np.nan, np.nan]]]), 2, np.linalg.norm(w0, axis=1))
    assert no_loss.loss() is None
    with pytest.raises(ValueError, match="rows"):
        PackedMeasurement(lambda: dev, 2, np.ones(2)).values()
    # First report: w(t-1) is the w(0) copy, ||w(t-1)|| = ||w(0)|| exactly.
    same = wire_rows(dev, np.linalg.norm(w0, axis=1), prev_is_w0=True)
    np.testing.assert_array_equal(same[3], np.linalg.norm(w0, axis=1))


def test_torch_and_tensorflow_measure_the_same_rows():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    from layrot.hooks.tf_distances import TFLayerDistances
    from layrot.hooks.torch_distances import LayerDistances

    rng = np.random.default_rng(1)
    shapes = [(64, 32), (16, 3, 3, 3), (300, 200)]
    w0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
    steps = [[1e-3 * rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(2)]
    init = np.array([np.linalg.norm(a.astype(np.float64)) for a in w0])

    tw = [torch.tensor(a) for a in w0]
    tdist = LayerDistances(tw, [t.clone() for t in tw], [t.clone() for t in tw])
    tv = [tf.Variable(a) for a in w0]
    tfdist = TFLayerDistances(tv)
    prev = [a.copy() for a in w0]
    for k, step in enumerate(steps):
        cur = [p + s for p, s in zip(prev, step)]
        for t, v, c in zip(tw, tv, cur):
            t.copy_(torch.tensor(c))
            v.assign(c)
        packed_tf = tfdist.measure(refresh_prev=True, loss=0.25).numpy()
        assert packed_tf.shape == (PACKED_ROWS, len(shapes))
        assert packed_tf[LOSS_ROW, 0] == 0.25 and np.isnan(packed_tf[LOSS_ROW, 1:]).all()
        got_torch = wire_rows(tdist.measure(refresh_prev=True).numpy(), init, prev_is_w0=k == 0)
        got_tf = wire_rows(packed_tf[:LOSS_ROW], init, prev_is_w0=k == 0)
        ref = np.stack([reference_rows(c, a, p) for c, a, p in zip(cur, w0, prev)], axis=1)
        for got in (got_torch, got_tf):
            np.testing.assert_allclose(got[:4], ref[:4], rtol=1e-6)
            # The dots' error is relative to ||dw|| ||w||, what the collector's radial split needs.
            scale = ref[[1, 2]] * ref[[0, 3]]
            assert (np.abs(got[4:] - ref[4:]) <= 1e-6 * scale).all()
        prev = cur


# ---------------------------------------------------------------- PyTorch


def _torch_model():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return torch, model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_torch_watch_positional_order():
    import layrot

    torch, model, opt = _torch_model()
    addr = free_address()
    with _Strict():
        h = layrot.watch(model, opt, "pos-run", every=2, collector=addr)
    assert (h.run, h.every) == ("pos-run", 2)
    h.close()
    with pytest.warns(DeprecationWarning, match="every, layers, collector by position"):
        h = layrot.watch(model, opt, "pos-run", 3, r"^2\.", addr)
    assert (h.every, h.layer_names) == (3, ["2.weight"])
    h.close()
    with pytest.raises(TypeError, match="multiple values"), pytest.warns(DeprecationWarning):
        layrot.watch(model, opt, "r", 3, every=4, collector=addr)
    with pytest.raises(TypeError, match="at most"):
        layrot.watch(model, opt, "r", 1, None, addr, "extra")


def test_torch_layca_layers_use_the_layer_rule_of_watch():
    import layrot

    torch, model, _ = _torch_model()
    with _Strict():
        opt = layrot.Layca(torch.optim.SGD(model.named_parameters(), lr=0.1), layers=lambda n, p: n.startswith("2."))
    assert opt.layer_names == ["2.weight"]
    h = layrot.watch(model, opt, "same-rule", layers=lambda n, p: n.startswith("2."), collector=free_address())
    assert h.layer_names == opt.layer_names
    h.close()
    assert opt.base_optimizer.defaults["lr"] == 0.1


# ---------------------------------------------------------------- TensorFlow / Keras


def _keras_model():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    inp = keras.Input((6,))
    out = keras.layers.Dense(2, name="head")(keras.layers.Dense(5, name="enc")(inp))
    return keras, keras.Model(inp, out, name="voc")


def test_tf_watch_positional_order():
    import layrot.tf

    keras, model = _keras_model()
    addr = free_address()
    opt = keras.optimizers.SGD(0.1)
    with _Strict():
        h = layrot.tf.watch(model, opt, "tf-pos", every=2, collector=addr)
        h2 = layrot.tf.watch(model, run="tf-kw", collector=addr)
    assert (h.run, h.every, h2.run) == ("tf-pos", 2, "tf-kw")
    h.close()
    h2.close()
    # The old order watch(model, run, every, layers, collector, token, control) still works.
    with pytest.warns(DeprecationWarning, match="run, every, layers, collector by position"):
        h = layrot.tf.watch(model, "tf-old", 3, r"head", addr)
    assert (h.run, h.every, h.layer_names) == ("tf-old", 3, ["head/kernel"])
    h.close()
    with pytest.warns(DeprecationWarning, match="run by position"):
        h = layrot.tf.watch(model, "tf-old-run")
    assert h.run == "tf-old-run"
    h.close()
    with pytest.warns(DeprecationWarning, match="every by position"):
        h = layrot.tf.watch(model, None, "tf-new", 4, collector=addr)
    assert (h.run, h.every) == ("tf-new", 4)
    h.close()


def test_tf_handle_state_dict_names_and_deprecated_ones():
    import layrot.tf

    keras, model = _keras_model()
    h = layrot.tf.watch(model, run="tf-state", collector=free_address())
    with _Strict():
        state = h.state_dict()
        h.load_state_dict(state)
    assert state["names"] == ["enc/kernel", "head/kernel"]
    with pytest.warns(DeprecationWarning, match="state_dict"):
        old = h.state()
    with pytest.warns(DeprecationWarning, match="load_state_dict"):
        h.load_state(old)
    h.close()


def test_rotation_callback_vocabulary():
    import layrot.keras

    keras, model = _keras_model()
    with _Strict():
        cb = layrot.keras.RotationCallback("cb-run", every=2, layers=r"head")
    assert (cb.run, cb.every, cb.layers) == ("cb-run", 2, r"head")
    with pytest.warns(DeprecationWarning, match="every, layers by position"):
        cb = layrot.keras.RotationCallback("cb-old", 3, r"enc")
    assert (cb.every, cb.layers) == (3, r"enc")
    with pytest.raises(RuntimeError, match="first fit"), pytest.warns(DeprecationWarning):
        cb.state()
    state = {"version": 1, "run": "cb-old", "step": 5, "names": [], "w0": [], "init_norms": []}
    with pytest.warns(DeprecationWarning, match="load_state_dict"):
        cb.load_state(state)  # kept for the next fit
    with _Strict():
        cb.load_state_dict(state)


def test_keras_layca_base_optimizer_and_layers_rule(tmp_path):
    import layrot.keras

    keras, model = _keras_model()
    base = keras.optimizers.SGD(0.05)
    opt = layrot.keras.Layca(base, rho=0.01, layers=lambda n, v: n.startswith("head"))
    with _Strict():
        assert opt.base_optimizer is base
        assert opt.inner_optimizer is base  # Keras' own name for a wrapped optimizer: kept, silently
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    model.fit(x, np.zeros((8, 2), "float32"), epochs=1, batch_size=8, verbose=0)
    assert opt.layer_names == ["head/kernel"]
    config = opt.get_config()
    assert config["layers"] == ["head/kernel"]  # a predicate is saved as the names it chose
    import tensorflow as tf

    # tf.train.Checkpoint names the dependency after the stored attribute: checkpoints stay loadable.
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ck"))
    assert any(n.startswith("optimizer/inner_optimizer/") for n, _ in tf.train.list_variables(path))
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    assert restored.optimizer.layer_names == ["head/kernel"]
    assert restored.optimizer.base_optimizer.get_config()["learning_rate"] == pytest.approx(0.05)
