"""TensorFlow / Keras: RotationCallback, tf.watch and Layca on real small models.

Every figure the collector stores is checked against float64 numpy computed
from weights the test saves at every optimizer step (``reference.py``), and
every Layca step against the paper's angle law written out independently here.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from reference import angle, cosine_distance, eq1, rel_err  # noqa: E402

import layrot.keras  # noqa: E402
import layrot.tf  # noqa: E402
from layrot.client.query import QueryClient  # noqa: E402
from layrot.core.rates import RhoSchedule  # noqa: E402
from layrot.proto import layrot_pb2  # noqa: E402
from layrot.proto.commands import schedule_to_proto  # noqa: E402

pytestmark = pytest.mark.tf

TOL = 1e-4


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cnn(seed: int = 0, optimizer=None) -> keras.Model:
    """Conv2D + BatchNormalization + Dense: kernels conv, conv_1, dense, dense_1."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(6, 3, padding="same", name="conv_1"),
            keras.layers.BatchNormalization(name="bn_1"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="dense"),
            keras.layers.Dense(3, name="dense_1"),
        ],
        name="cnn",
    )
    if optimizer is not None:
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# Layer names drop the model-name prefix Keras puts on variable paths ("cnn/conv/kernel").
KERNELS = ["conv/kernel", "conv_1/kernel", "dense/kernel", "dense_1/kernel"]


def data(n: int = 64, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8, 8, 1)).astype("float32")
    teacher = rng.standard_normal((64, 3))
    return x, (x.reshape(n, -1) @ teacher).argmax(1)


def weights(model: keras.Model) -> dict[str, np.ndarray]:
    return {
        v.path.split("/", 1)[1] if v.path.startswith(model.name + "/") else v.path: v.numpy().astype(np.float64)
        for v in model.trainable_variables
    }


class Saver(keras.callbacks.Callback):
    """Saves every trainable variable after every optimizer step.

    ``sync=False`` saves a step's weights at the next batch start (like the
    RotationCallback), so Keras keeps dispatching batch ends asynchronously;
    ``sync=True`` saves them in ``on_train_batch_end`` and records the batch loss
    from Keras' running mean (Keras then runs batch ends synchronously).
    """

    def __init__(self, sync: bool = False, on_step=None) -> None:
        super().__init__()
        self.sync = sync
        self.w0: dict[str, np.ndarray] | None = None
        self.saved: list[dict[str, np.ndarray]] = []
        self.losses: list[float] = []
        self.on_step = on_step
        self._pending = False
        self._mean = 0.0
        if sync:
            self.on_train_batch_end = self._batch_end  # overriding makes Keras dispatch synchronously

    def on_train_begin(self, logs=None):
        if self.w0 is None:
            self.w0 = weights(self.model)
        self._pending = False

    def _save(self):
        if self._pending:
            self._pending = False
            self.saved.append(weights(self.model))
            if self.on_step is not None:
                self.on_step(len(self.saved))

    def on_train_batch_begin(self, batch, logs=None):
        if not self.sync:
            self._save()
        self._pending = not self.sync

    def _batch_end(self, batch, logs=None):
        self.saved.append(weights(self.model))
        mean = float(logs["loss"])
        # Keras reports the running mean of the epoch; equal batch sizes give the batch loss.
        self.losses.append(mean if batch == 0 else (batch + 1) * mean - batch * self._mean)
        self._mean = mean
        if self.on_step is not None:
            self.on_step(len(self.saved))

    def on_test_begin(self, logs=None):
        if not self.sync:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        if not self.sync:
            self._save()

    def on_train_end(self, logs=None):
        if not self.sync:
            self._save()


def reference(w0: dict, saved: list[dict], names: list[str], steps: list[int]):
    """(rotation, step_angle, norm) float64 arrays (len(steps), L) for 1-based steps."""
    rot, ang, nrm = [], [], []
    for t in steps:
        cur = saved[t - 1]
        prev = w0 if t == 1 else saved[t - 2]
        rot.append([cosine_distance(w0[n], cur[n]) for n in names])
        ang.append([angle(prev[n], cur[n]) for n in names])
        nrm.append([np.linalg.norm(cur[n]) for n in names])
    return np.array(rot), np.array(ang), np.array(nrm)


def check_angle_law(w0, saved, names, expected_rates, rtol=TOL):
    """Every layer's single-step angle equals arctan(rho_l(t)); returns the worst relative error."""
    worst = 0.0
    for t in range(1, len(saved) + 1):
        prev = w0 if t == 1 else saved[t - 2]
        rho = expected_rates(t)
        for l, n in enumerate(names):
            got = angle(prev[n], saved[t - 1][n])
            want = math.atan(rho[l])
            err = abs(got - want) / want
            worst = max(worst, err)
            assert err <= rtol, f"step {t} {n}: angle {got!r} vs arctan(rho)={want!r} (rel {err:.2e})"
    return worst


def check_norms(w0, saved, names, rtol=1e-5):
    for n in names:
        n0 = np.linalg.norm(w0[n])
        for t, s in enumerate(saved, start=1):
            assert abs(np.linalg.norm(s[n]) - n0) <= rtol * n0, (t, n, np.linalg.norm(s[n]), n0)


def check_non_layers_train(w0, saved):
    for n, v in w0.items():
        if v.ndim < 2:
            assert not np.array_equal(v, saved[-1][n]), f"{n} did not train"


def rate_command(version: int, **kw) -> layrot_pb2.RateCommand:
    schedule = kw.pop("schedule", None)
    cmd = layrot_pb2.RateCommand(version=version, run=kw.pop("run", ""), **kw)
    if schedule is not None:
        cmd.schedule.CopyFrom(schedule_to_proto(schedule))
    return cmd


# ---------------------------------------------------------------- RotationCallback


def test_callback_matches_float64_reference_incl_tiny_angles(collector):
    base = keras.optimizers.SGD(0.05, momentum=0.9)
    model = cnn(0, base)
    x, y = data()
    cb = layrot.keras.RotationCallback(run="keras-exact", collector=collector.grpc_address)
    saver = Saver(sync=True)
    model.fit(x, y, batch_size=16, epochs=10, verbose=0, callbacks=[cb, saver])  # steps 1..40
    # A tiny learning rate: step angles around 1e-4 rad (momentum decays within a few steps).
    base.learning_rate = 1e-5
    model.fit(x, y, batch_size=16, epochs=10, verbose=0, callbacks=[cb, saver])  # steps 41..80
    assert cb.flush(10.0)
    assert cb.layer_names == KERNELS
    hist = QueryClient(collector.grpc_address).history("keras-exact")
    runs = {r["run"]: r for r in QueryClient(collector.grpc_address).list_runs()}
    cb.close()
    assert list(hist.steps) == list(range(1, 81))
    assert hist.layer_names == KERNELS
    rot, ang, nrm = reference(saver.w0, saver.saved, KERNELS, list(range(1, 81)))
    assert rel_err(hist.rotation, rot).max() <= TOL
    assert rel_err(hist.step_angle, ang).max() <= TOL
    tiny = ang[50:]
    assert tiny.max() < 1e-3 and tiny.min() > 1e-6, "the tiny-angle phase must reach ~1e-4 rad"
    assert rel_err(hist.step_angle[50:], tiny).max() <= TOL
    assert rel_err(hist.weight_norm, nrm).max() <= 1e-5
    # the loss of each step, from the loss tracker's increments, equals Keras' own figure
    assert rel_err(hist.loss, np.array(saver.losses)).max() <= 1e-4
    assert runs["keras-exact"]["framework"] == "tensorflow"
    assert runs["keras-exact"]["meta"]["keras"] == keras.__version__


def test_every_5_with_adam_validation_and_uneven_batches(collector):
    model = cnn(1, keras.optimizers.Adam(1e-2))
    x, y = data(60)
    cb = layrot.keras.RotationCallback(run="keras-every5", every=5, collector=collector.grpc_address)
    saver = Saver(sync=False)  # Keras keeps its asynchronous batch-end dispatch here
    # 60 samples in batches of 13: 5 steps per epoch, the last one of 8 samples.
    model.fit(x, y, batch_size=13, epochs=4, verbose=0, validation_data=(x[:20], y[:20]), callbacks=[cb, saver])
    assert cb.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("keras-every5")
    cb.close()
    assert len(saver.saved) == 20
    assert list(hist.steps) == [5, 10, 15, 20]
    rot, ang, _ = reference(saver.w0, saver.saved, KERNELS, [5, 10, 15, 20])
    assert rel_err(hist.rotation, rot).max() <= TOL
    assert rel_err(hist.step_angle, ang).max() <= TOL  # w(t-1) is the step just before
    assert np.isfinite(hist.loss).all()  # the last, smaller batch of each epoch included


def test_tf_watch_custom_loop_matches_reference(collector):
    model = cnn(2)
    model.build((None, 8, 8, 1))
    opt = keras.optimizers.SGD(0.05)
    x, y = data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    handle = layrot.tf.watch(model, run="tf-loop", collector=collector.grpc_address)
    assert handle.layer_names == KERNELS
    w0 = weights(model)
    saved, losses = [], []
    for i in range(60):
        if i == 30:
            opt.learning_rate = 5e-5
        loss = train_step(x[(i % 4) * 16 : (i % 4 + 1) * 16], y[(i % 4) * 16 : (i % 4 + 1) * 16])
        handle.observe_loss(loss)
        handle.step()
        saved.append(weights(model))
        losses.append(float(loss))
    assert handle.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("tf-loop")
    handle.close()
    assert list(hist.steps) == list(range(1, 61))
    rot, ang, _ = reference(w0, saved, KERNELS, list(range(1, 61)))
    assert rel_err(hist.rotation, rot).max() <= TOL
    assert rel_err(hist.step_angle, ang).max() <= TOL
    assert ang[30:].max() < 1e-3
    np.testing.assert_allclose(hist.loss, losses, rtol=1e-6)
    with pytest.raises(RuntimeError, match="outside tf.function"):
        tf.function(lambda: handle.step())()  # noqa: PLW0108


def test_steps_per_execution_and_nan_weights(collector):
    model = cnn(11)
    model.compile(
        keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=4
    )
    x, y = data()
    cb = layrot.keras.RotationCallback(run="keras-spe", collector=collector.grpc_address)
    w0 = weights(model)
    saved = {}

    class AtExecutionEnds(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):  # synchronous: batch is the execution's last step
            saved[len(saved) * 4 + 4] = weights(self.model)

    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb, AtExecutionEnds()])
    # A diverged layer is a fact to report, not a crash.
    kernel = next(v for v in model.trainable_variables if v.path.endswith("dense/kernel"))
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [float("nan")]))
    model.fit(x[:16], y[:16], batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    assert cb.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("keras-spe")
    cb.close()
    # observed once per execution: 4 steps, then 2 (an epoch of 2 batches ends an execution)
    assert list(hist.steps) == [4, 8, 12, 16, 18, 20]
    rot = np.array([[cosine_distance(w0[n], saved[t][n]) for n in KERNELS] for t in (4, 8, 12, 16)])
    assert rel_err(hist.rotation[:4], rot).max() <= TOL
    assert np.isnan(hist.rotation[4:, 2]).all()  # the diverged layer (NaN spreads upstream by backprop)


def test_collector_absent_fit_completes_and_drops_are_counted(caplog):
    model = cnn(3, keras.optimizers.SGD(0.05))
    x, y = data()
    addr = f"127.0.0.1:{free_port()}"  # nothing listens here
    cb = layrot.keras.RotationCallback(run="keras-nocollector", collector=addr)
    with caplog.at_level(logging.WARNING, logger="layrot"):
        hist = model.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[cb])
        t0 = time.monotonic()
        cb.close(timeout=5.0)
        closing = time.monotonic() - t0
    assert len(hist.history["loss"]) == 5 and cb.step_count == 20
    warnings = [r for r in caplog.records if "cannot reach the collector" in r.getMessage()]
    assert len(warnings) == 1, "exactly one warning while the collector is down"
    assert cb.stats.acked_steps == 0 and cb.stats.sent_steps == 0
    assert cb.stats.dropped == 0 and cb.stats.spool_pending_steps == 20  # kept in the spool (on by default)
    assert closing < 5.0 + 3.0  # close waits for a first connect, bounded by its timeout


def test_offline_fit_then_sync_and_settings_checked_before_fit(collector, _spool_in_tmp, caplog):
    from click.testing import CliRunner

    from layrot.cli.sync import sync_command

    with pytest.raises(ValueError, match="at most 200"):
        layrot.keras.RotationCallback(run="k" * 201)
    with pytest.raises(ValueError, match="host:port|port"):
        layrot.keras.RotationCallback(run="ok", collector="localhost")
    model = cnn(5, keras.optimizers.SGD(0.05))
    x, y = data()
    cb = layrot.keras.RotationCallback(run="keras-offline", collector="offline")
    with caplog.at_level(logging.INFO, logger="layrot"):
        model.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[cb])
        cb.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert cb.stats.dropped == 0 and cb.stats.spool_pending_steps == 20
    assert isinstance(cb.state_dict()["run_key"], str) and len(cb.state_dict()["run_key"]) == 32
    res = CliRunner().invoke(sync_command, [str(_spool_in_tmp), "--collector", collector.grpc_address])
    assert res.exit_code == 0, res.output
    assert list(QueryClient(collector.grpc_address).history("keras-offline").steps) == list(range(1, 21))


def test_resume_from_state_continues_curves(collector, tmp_path):
    model = cnn(4, keras.optimizers.SGD(0.05, momentum=0.9))
    x, y = data()
    cb = layrot.keras.RotationCallback(run="keras-resume", collector=collector.grpc_address)
    saver = Saver()
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[cb, saver])
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "layrot.npz", **{f"w0_{i}": w for i, w in enumerate(cb.state_dict()["w0"])})
    state = cb.state_dict()
    assert cb.flush(10.0)
    cb.close()

    # A new process: load the model, a new callback, restore w(0) and the step.
    restored = keras.models.load_model(tmp_path / "m.keras")
    cb2 = layrot.keras.RotationCallback(run="keras-resume", collector=collector.grpc_address)
    npz = np.load(tmp_path / "layrot.npz")
    state["w0"] = [npz[f"w0_{i}"] for i in range(len(state["w0"]))]
    cb2.load_state_dict(state)
    saver2 = Saver()
    restored.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[cb2, saver2])
    assert cb2.step_count == 24
    assert cb2.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("keras-resume")
    cb2.close()
    assert list(hist.steps) == list(range(1, 25))
    rot, ang, _ = reference(saver.w0, saver.saved + saver2.saved, KERNELS, list(range(1, 25)))
    assert rel_err(hist.rotation, rot).max() <= TOL  # relative to the ORIGINAL w(0)
    assert rel_err(hist.step_angle, ang).max() <= TOL


def test_layer_selection_and_errors():
    inp = keras.Input((10,))
    h = keras.layers.Dense(8, name="enc")(inp)
    h = keras.layers.LayerNormalization(name="ln")(h)
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out, name="fn")
    addr = f"127.0.0.1:{free_port()}"
    h1 = layrot.tf.watch(model, collector=addr)
    assert h1.layer_names == ["enc/kernel", "head/kernel"]  # biases and norm scales are not layers
    # The layer rule of PyTorch: a regex filters the ndim >= 2 weights; exact names pick anything.
    h2 = layrot.tf.watch(model, layers=r"head", collector=addr)
    assert h2.layer_names == ["head/kernel"]
    h3 = layrot.tf.watch(model, layers=["enc/kernel", "head/bias"], collector=addr)
    assert h3.layer_names == ["enc/kernel", "head/bias"]
    h4 = layrot.tf.watch(model.trainable_variables, layers=lambda n, v: n.endswith("kernel"), collector=addr)
    assert h4.layer_names == ["enc/kernel", "head/kernel"]
    h5 = layrot.tf.watch(model, layers=lambda n, v: n.startswith("head"), collector=addr)
    assert h5.layer_names == ["head/kernel"]
    for h in (h1, h2, h3, h4, h5):
        h.close()
    with pytest.raises(ValueError, match="not found"):
        layrot.tf.watch(model, layers=["nope"], collector=addr)
    with pytest.raises(ValueError, match="every"):
        layrot.tf.watch(model, every=0, collector=addr)
    with pytest.raises(ValueError, match="Layca"):
        layrot.tf.watch(model, control=True, collector=addr)
    with pytest.raises(ValueError, match="every"):
        layrot.keras.RotationCallback(every=0)


# ---------------------------------------------------------------- Layca

BASES = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-3),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
}


@pytest.mark.parametrize("base", list(BASES))
def test_layca_single_step_angle_is_arctan_rho(base):
    opt = layrot.keras.Layca(BASES[base](), rho=0.05, alpha=0.5)
    model = cnn(5, opt)
    x, y = data()
    saver = Saver()
    model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[saver])
    assert opt.layer_names == KERNELS
    rho = 0.05 * eq1(0.5, 4)
    worst = check_angle_law(saver.w0, saver.saved, KERNELS, lambda t: rho)
    check_norms(saver.w0, saver.saved, KERNELS)
    check_non_layers_train(saver.w0, saver.saved)  # biases, BN gamma/beta get the base update
    np.testing.assert_allclose(opt.current_rates(), rho, rtol=1e-12)
    assert int(opt.iterations.numpy()) == 16 and worst <= TOL


def test_layca_step_schedule_frozen_layer_and_lars():
    sched = RhoSchedule(rho0=0.1, kind="step", milestones=(6,), factor=0.2)
    opt = layrot.keras.Layca(keras.optimizers.SGD(0.1, momentum=0.9), schedule=sched, alpha=-0.3)
    model = cnn(6, opt)
    x, y = data()
    saver = Saver()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[saver])  # builds the optimizer
    opt.set_rule(schedule=sched, alpha=-0.3, layer_multipliers={"dense/kernel": 0.0})
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[saver])
    prof = eq1(-0.3, 4)

    def expected(t):
        return prof * (0.1 if t <= 6 else 0.02)

    moving = [n for n in KERNELS if n != "dense/kernel"]
    check_angle_law(saver.w0, saver.saved, moving, lambda t: expected(t)[[0, 1, 3]])
    for t in range(5, len(saver.saved) + 1):  # rate 0: frozen bitwise from step 5 on
        assert np.array_equal(saver.saved[t - 1]["dense/kernel"], saver.saved[3]["dense/kernel"])

    opt.set_rule(mode="lars", rho=0.05, alpha=0.0, layer_multipliers={})
    before = len(saver.saved)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[saver])
    for t in range(before + 1, len(saver.saved) + 1):
        for n in KERNELS:
            a, b = saver.saved[t - 2][n], saver.saved[t - 1][n]
            n0 = np.linalg.norm(saver.w0[n])
            # Appendix A.4 cap, up to float32 rounding of the norms (~1e-7 of ||w||)
            assert np.linalg.norm(b) - np.linalg.norm(a) <= 1e-4 * n0 + 1e-6 * n0
            assert angle(a, b) <= math.asin(0.05) * (1 + 1e-5)
            assert angle(a, b) > 0


def test_layca_commands_from_another_thread_during_fit():
    """A bare model.fit (no layrot callback): commands go through the in-graph host callback."""
    opt = layrot.keras.Layca(keras.optimizers.Adam(1e-3), rho=0.04)
    model = cnn(7, opt)
    x, y = data()
    results = []
    opt.add_command_listener(lambda *r: results.append(r))

    def submit_from_thread(cmd):
        th = threading.Thread(target=opt.submit_command, args=(cmd,))
        th.start()
        th.join()

    good = rate_command(3, alpha=0.5, schedule=RhoSchedule(rho0=0.08))
    bad = rate_command(4, alpha=2.0, schedule=RhoSchedule(rho0=0.02))  # |alpha| > 1: must be refused
    too_fast = rate_command(5, schedule=RhoSchedule(rho0=2.0))  # above rho_max=1

    def on_step(t):
        if t == 5:
            submit_from_thread(good)
        elif t == 9:
            submit_from_thread(bad)
        elif t == 12:
            submit_from_thread(too_fast)

    saver = Saver(on_step=on_step)
    model.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[saver])
    assert [r[:2] for r in results] == [(3, True), (4, False), (5, False)]
    assert "alpha" in results[1][2] and "rho_max" in results[2][2]
    s_good = results[0][3]
    assert s_good == 6  # the step after the one during which it was submitted
    new = 0.08 * eq1(0.5, 4)
    check_angle_law(saver.w0, saver.saved, KERNELS, lambda t: np.full(4, 0.04) if t < s_good else new)
    assert opt.command_version == 3
    np.testing.assert_allclose(opt.current_rates(), new, rtol=1e-12)


def test_remote_control_set_during_fit(collector):
    """control=True: a RateCommand sent through the collector's Query.SetControl mid-fit is
    acknowledged with the step it governs from, and takes effect exactly at that step."""
    opt = layrot.keras.Layca(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.03)
    model = cnn(8, opt)
    x, y = data()
    cb = layrot.keras.RotationCallback(run="keras-control", collector=collector.grpc_address, control=True)
    query = QueryClient(collector.grpc_address)
    sent = {}

    def on_step(t):
        if t == 6:
            cmd = rate_command(0, alpha=-0.5, schedule=RhoSchedule(rho0=0.06), reason="test")
            try:
                sent["status"] = query.set_control("keras-control", cmd)
            except Exception as exc:  # reported below as the test's failure
                sent["error"] = exc
                return
            deadline = time.monotonic() + 10
            while not opt.has_pending_commands and time.monotonic() < deadline:
                time.sleep(0.01)  # the command travels over the job's session to Layca

    saver = Saver(on_step=on_step)
    model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[cb, saver])
    if "error" in sent:
        cb.close()
        pytest.fail(f"control set during fit failed: {sent['error']}")
    assert cb.flush(10.0)
    version = sent["status"]["requested_version"]
    deadline = time.monotonic() + 10
    status = query.get_control("keras-control")
    while status["applied_version"] != version and time.monotonic() < deadline:
        time.sleep(0.05)
        status = query.get_control("keras-control")
    hist = query.history("keras-control")
    summary = query.get_run("keras-control")
    cb.close()
    assert version >= 1 and status["applied_version"] == version and not status["rejected_reason"]
    # It arrived during batch 6; Keras may already be running batch 7 when the command
    # reaches Layca, so it governs from step 7 or 8, and the acknowledgement says which.
    # What must hold exactly: the rates and the angles switch at the acknowledged step.
    s_ack = status["applied_step"]
    assert s_ack in (7, 8) and opt.command_version == version
    assert summary["layca"] and summary["control"]
    new = 0.06 * eq1(-0.5, 4)
    expected_rho = np.array([np.full(4, 0.03) if t < s_ack else new for t in range(1, 17)])
    np.testing.assert_allclose(hist.rho, expected_rho, rtol=6e-8)  # reported rates, per step (stored as float32)
    check_angle_law(saver.w0, saver.saved, KERNELS, lambda t: expected_rho[t - 1])  # what the weights did


def test_control_rejected_command_is_acknowledged_and_changes_nothing(collector):
    opt = layrot.keras.Layca(keras.optimizers.Adam(1e-3), rho=0.03, rho_max=0.1)
    model = cnn(12, opt)
    x, y = data()
    cb = layrot.keras.RotationCallback(run="keras-reject", collector=collector.grpc_address, control=True)
    bad = rate_command(9, run="keras-reject", schedule=RhoSchedule(rho0=0.5))  # above this job's rho_max

    def on_step(t):
        if t == 3:
            # The reporter's connection thread hands every RateCommand to Layca this way.
            th = threading.Thread(target=cb.handle.reporter.on_command, args=(bad,))
            th.start()
            th.join()

    saver = Saver(on_step=on_step)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb, saver])
    assert cb.flush(10.0)
    deadline = time.monotonic() + 5
    acks: list = []
    while time.monotonic() < deadline and not acks:
        acks = list(collector.state.runs["keras-reject"].control_acks)
        time.sleep(0.05)
    cb.close()
    assert [(a["version"], a["applied"], a["step"]) for a in acks] == [(9, False, 4)]
    assert "rho_max" in acks[0]["reason"]
    assert opt.command_version == 0
    check_angle_law(saver.w0, saver.saved, KERNELS, lambda t: np.full(4, 0.03))


def test_layca_checkpoint_round_trip(tmp_path):
    opt = layrot.keras.Layca(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.05, alpha=0.3)
    model = cnn(9, opt)
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    opt.submit_command(rate_command(2, alpha=-0.2, schedule=RhoSchedule(rho0=0.02)))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert opt.command_version == 2
    model.save(tmp_path / "layca.keras")
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    path = ckpt.save(tmp_path / "ckpt" / "c")
    snapshot = weights(model)

    def continue_training(m):
        m.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        return weights(m)

    expected = continue_training(model)

    # 1. Keras format: model.save / keras.models.load_model.
    loaded = keras.models.load_model(tmp_path / "layca.keras")
    lopt = loaded.optimizer
    assert isinstance(lopt, layrot.keras.Layca)
    assert int(lopt.iterations.numpy()) == 12 and lopt.command_version == 2
    assert lopt.base_rule.alpha == 0.3 and lopt.rule.alpha == -0.2
    np.testing.assert_allclose(lopt.init_norms, opt.init_norms, rtol=0)
    got = continue_training(loaded)
    for n in expected:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-7)

    # 2. tf.train.Checkpoint into a fresh model and optimizer (different initialisation).
    opt2 = layrot.keras.Layca(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.05, alpha=0.3)
    model2 = cnn(99, opt2)
    model2.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)  # builds everything
    tf.train.Checkpoint(model=model2, optimizer=opt2).restore(path).assert_existing_objects_matched()
    assert int(opt2.iterations.numpy()) == 12 and opt2.command_version == 2
    np.testing.assert_allclose(opt2.init_norms, opt.init_norms, rtol=0)
    for n, v in snapshot.items():
        np.testing.assert_array_equal(weights(model2)[n], v)
    got2 = continue_training(model2)
    for n in expected:
        np.testing.assert_allclose(got2[n], expected[n], rtol=1e-5, atol=1e-7)


def test_layca_validation():
    with pytest.raises(ValueError, match="rho_max"):
        layrot.keras.Layca(keras.optimizers.SGD(), rho=2.0)
    with pytest.raises(ValueError, match="alpha"):
        layrot.keras.Layca(keras.optimizers.SGD(), alpha=1.5)
    with pytest.raises(ValueError, match="mode"):
        layrot.keras.Layca(keras.optimizers.SGD(), mode="fast")
    with pytest.raises(TypeError, match="already wrapped"):
        layrot.keras.Layca(layrot.keras.Layca(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="does not take"):
        layrot.keras.Layca(keras.optimizers.SGD(), weight_decay=1e-4)
    opt = layrot.keras.Layca("sgd", rho=0.01)
    assert isinstance(opt.base_optimizer, keras.optimizers.SGD)
    assert opt.inner_optimizer is opt.base_optimizer  # Keras' name for a wrapped optimizer stays, silently
    config = opt.get_config()
    again = layrot.keras.Layca.from_config(config)
    assert again.get_config() == config


# ---------------------------------------------------------------- both frameworks in one collector


def test_tensorflow_and_pytorch_runs_side_by_side(collector):
    torch = pytest.importorskip("torch")
    import layrot as lr

    torch.manual_seed(0)
    tmodel = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1)
    th = lr.watch(tmodel, topt, run="side-torch", collector=collector.grpc_address)
    xt, yt = torch.randn(16, 6), torch.randint(0, 2, (16,))
    for _ in range(5):
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tmodel(xt), yt).backward()
        topt.step()

    kmodel = cnn(10, keras.optimizers.SGD(0.05))
    x, y = data()
    cb = layrot.keras.RotationCallback(run="side-keras", collector=collector.grpc_address)
    kmodel.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert th.flush(10.0) and cb.flush(10.0)
    runs = {r["run"]: r for r in QueryClient(collector.grpc_address).list_runs()}
    th.close()
    cb.close()
    assert runs["side-torch"]["framework"] == "pytorch" and runs["side-torch"]["step"] == 5
    assert runs["side-keras"]["framework"] == "tensorflow" and runs["side-keras"]["step"] == 4
    assert runs["side-keras"]["num_layers"] == 4 and runs["side-torch"]["num_layers"] == 2
