"""RotationCallback step numbers: steps reported are the optimizer steps actually applied.

A ``LossScaleOptimizer`` (``mixed_float16``) skips steps with non-finite gradients, and
``steps_per_execution > 1`` hands control back once per execution. A synchronous Keras
callback records ``optimizer.iterations`` and every trainable variable at every batch end;
the collector's history is checked against float64 numpy from those weights, keyed by
the optimizer's own step numbers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from reference import angle, cosine_distance, rel_err  # noqa: E402

import layrot.keras  # noqa: E402
from layrot.client.query import QueryClient  # noqa: E402

pytestmark = pytest.mark.tf

TOL = 1e-6


class ByIteration(keras.callbacks.Callback):
    """Weights after every batch, keyed by ``optimizer.iterations`` (synchronous batch ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_step: dict[int, dict[str, np.ndarray]] = {}
        self.iterations: list[int] = []

    def on_train_begin(self, logs=None):
        self.by_step.setdefault(int(self.model.optimizer.iterations.numpy()), self._weights())

    def on_train_batch_end(self, batch, logs=None):
        t = int(self.model.optimizer.iterations.numpy())
        self.iterations.append(t)
        self.by_step[t] = self._weights()

    def _weights(self):
        return {v.path: v.numpy().astype(np.float64) for v in self.model.trainable_variables}


def mlp(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(3, dtype="float32", name="out"),  # float32 logits under mixed precision
        ],
        name="mlp",
    )


def data(n: int = 80):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 8)).astype("float32")
    return x, (x[:, 0] + x[:, 1] > 0).astype("int64")


def check(hist, rec: ByIteration, steps: list[int], start: int = 0) -> None:
    """Rotation vs w(start) and step angle vs the previous reported step, float64, every step and layer."""
    paths = ["mlp/hidden/kernel", "mlp/out/kernel"]
    w0 = rec.by_step[start]
    prev_steps = [start, *steps[:-1]]
    rot = np.array([[cosine_distance(w0[p], rec.by_step[t][p]) for p in paths] for t in steps])
    ang = np.array([[angle(rec.by_step[s][p], rec.by_step[t][p]) for p in paths] for s, t in zip(prev_steps, steps)])
    assert rel_err(hist.rotation, rot).max() <= TOL
    assert rel_err(hist.step_angle, ang).max() <= TOL


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_loss_scale_skipped_steps_are_not_steps(collector, mixed_precision):
    model = mlp(0)
    # A huge initial scale overflows float16 gradients: the first batches are skipped
    # (the scale halves each time) until it fits.
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**24)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    cb = layrot.keras.RotationCallback(run="keras-mixed", collector=collector.grpc_address)
    rec = ByIteration()
    model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[cb, rec])  # 40 batches
    assert cb.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("keras-mixed")
    cb.close()
    applied = int(model.optimizer.iterations.numpy())
    skipped = len(rec.iterations) - applied
    assert skipped >= 3, "the test needs skipped steps"
    assert len(rec.iterations) == 40 and rec.iterations[:skipped] == [0] * skipped
    assert list(hist.steps) == list(range(1, applied + 1))  # reported steps == applied steps
    assert cb.step_count == applied
    check(hist, rec, list(range(1, applied + 1)))
    assert np.isfinite(hist.loss).all()


@pytest.mark.parametrize("every", [1, 2])
def test_steps_per_execution_reports_optimizer_step_numbers(collector, every):
    model = mlp(1)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=3,
    )
    x, y = data(40)  # 5 batches per epoch: executions of 3 and 2 steps
    run = f"keras-spe3-every{every}"
    cb = layrot.keras.RotationCallback(run=run, every=every, collector=collector.grpc_address)
    rec = ByIteration()  # batch ends come once per execution, at its last step
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[cb, rec])
    assert cb.flush(10.0)
    hist = QueryClient(collector.grpc_address).history(run)
    cb.close()
    assert rec.iterations == [3, 5, 8, 10, 13, 15]  # what the optimizer counted at each execution end
    # every=2: an execution is reported when it crosses a multiple of 2, under the step it ends at
    want = [t for s, t in zip([0, *rec.iterations[:-1]], rec.iterations) if t // every > s // every]
    assert list(hist.steps) == want
    assert cb.step_count == int(model.optimizer.iterations.numpy()) == 15
    # the step angle spans from the previous observation (the execution's start) to its end
    prev = {t: s for s, t in zip([0, *rec.iterations[:-1]], rec.iterations)}
    paths = ["mlp/hidden/kernel", "mlp/out/kernel"]
    ang = np.array([[angle(rec.by_step[prev[t]][p], rec.by_step[t][p]) for p in paths] for t in want])
    rot = np.array([[cosine_distance(rec.by_step[0][p], rec.by_step[t][p]) for p in paths] for t in want])
    assert rel_err(hist.step_angle, ang).max() <= TOL
    assert rel_err(hist.rotation, rot).max() <= TOL
