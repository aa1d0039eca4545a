"""Per-layer norms and distances on the device, for the TensorFlow / Keras hooks.

One compiled ``tf.function`` per report computes, for every layer, the four
sums of the measurement contract (:mod:`layrot.agent.measurement`, the same as
the PyTorch hook's), with d0 = w(t) - w(0) and ds = w(t) - w(t-1),

    ||d0||^2,  d0 . w(0),  ||ds||^2,  ds . w(t)

plus the step's loss, and optionally refreshes the w(t-1) copy to w(t) in the
same call. It returns one packed (5, L) float64 tensor (``DEVICE_ROWS``, then the
loss in column 0 of ``LOSS_ROW``) that stays on the device until the reporter's
background thread calls ``.numpy()``: the training thread never waits for it.
The host derives ||w(t)|| and ||w(t-1)|| from ||w(0)|| (``wire_rows``).

Cost model: in TensorFlow a small model's measurement is dominated by op
dispatch (an elementwise op on a 100 k-element tensor costs as much as the
arithmetic of ten), so the graph uses few full-size ops per layer: two
differences and four product sums. Measured and rejected as slower on CPU:
a packed all-layers buffer with segment sums, MatMul dots, ``L2Loss`` and XLA.

Precision: every weight is widened to float64 before any difference or product,
as the PyTorch hook's fused kernel does. float32, bfloat16 and float16 values are
exact in float64, so are their differences and products, and the sums carry
~1e-16 relative error. The widening costs time (it was once rejected as slower)
but float32 sums are not enough: on a mostly radial step (weight decay dominating)
the angle lives in the tangential part ||ds||^2 - (ds . w)^2 / ||w||^2, whose
cancellation amplifies the sums' rounding by ||ds||^2 / ||ds_tangential||^2; with
float32 pairwise sums a depthwise kernel under MirroredStrategy reached 6e-5
relative error in its step angle and 3e-4 in its rotation
(``tests/test_keras_precision.py``), with float64 1e-6 is far inside the margin.

The loss of the reported step comes from either an explicit tensor argument
(``tf.watch``'s ``observe_loss``) or a Keras ``Mean`` loss tracker
(``model._loss_tracker``: ``total`` and ``count`` accumulate loss x batch size
over the epoch, so the step's loss is the increment since the previous step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

# Re-exported: the names are backend-neutral and live with the keras.ops measurement.
from layrot.hooks.keras_distances import variable_name, variable_names  # noqa: F401


def as_tf_variable(v: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras 3 ``keras.Variable`` (or ``v`` itself)."""
    try:
        import keras

        if isinstance(v, keras.Variable):
            return v.value
    except Exception:  # pragma: no cover - keras absent
        pass
    if isinstance(v, tf.Variable):
        return v
    raise TypeError(f"expected a tf.Variable or keras.Variable, got {type(v).__name__}")


class TFLayerDistances:
    """Device-side measurement of fixed weight variables against w(0) and w(t-1).

    Args:
        variables: the layer variables (``tf.Variable`` or ``keras.Variable``), layer order.
        loss_tracker: optional ``(total, count)`` variables of a Keras ``Mean`` loss tracker.
        jit_compile: compile the measurement with XLA (default off: on CPU XLA's
            per-call cost exceeded the whole measurement for small models).

    ``w0`` and ``prev`` (non-trainable variables on each layer's device) start as
    the current weights.
    """

    def __init__(
        self, variables: Sequence[Any], loss_tracker: tuple[Any, Any] | None = None, jit_compile: bool | None = None
    ) -> None:
        self.params = [as_tf_variable(v) for v in variables]
        if not self.params:
            raise ValueError("no layers to measure")
        self.num_layers = len(self.params)
        with tf.init_scope():
            self.w0: list[tf.Variable] = []
            self.prev: list[tf.Variable] = []
            for i, p in enumerate(self.params):
                with tf.device(p.device):
                    value = tf.identity(p.read_value())
                    self.w0.append(tf.Variable(value, trainable=False, name=f"layrot_w0_{i}"))
                    self.prev.append(tf.Variable(value, trainable=False, name=f"layrot_prev_{i}"))
            self._tracker = None
            if loss_tracker is not None:
                self._tracker = tuple(as_tf_variable(v) for v in loss_tracker)
                # (total, count) at the previous step; zeroed when Keras resets its metrics.
                self._tracker_prev = tf.Variable(tf.zeros([2], tf.float64), trainable=False, name="layrot_loss_prev")
            self._nan = tf.constant(math.nan, dtype=tf.float64)
        self.jit_compile = bool(jit_compile)
        # Python-static variants: calls without arguments are the cheapest to dispatch.
        self._measure_fns = {
            (refresh, with_loss): tf.function(
                functools.partial(self._measure, refresh=refresh)
                if with_loss
                else functools.partial(self._measure, None, refresh=refresh),
                jit_compile=self.jit_compile,
                autograph=False,
            )
            for refresh in (False, True)
            for with_loss in (False, True)
        }
        self._concrete_fns: dict[bool, Any] = {}
        self._copy_fn = tf.function(self._copy_prev, autograph=False)
        self._copy_concrete: Any = None

    # ------------------------------------------------------------ graph bodies
    @staticmethod
    def _read(v: tf.Variable) -> tf.Tensor:
        x = v.read_value()
        return x if x.dtype == tf.float64 else tf.cast(x, tf.float64)

    @staticmethod
    def _dot(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        # reduce_sum sums pairwise (unlike MatMul's blocked accumulation, also slower here).
        return tf.reduce_sum(x * y)

    def _loss(self, loss: tf.Tensor | None, refresh: bool) -> tf.Tensor:
        if self._tracker is None:
            return self._nan if loss is None else tf.reshape(tf.cast(loss, tf.float64), [])
        total, count = (tf.cast(v.read_value(), tf.float64) for v in self._tracker)
        prev = self._tracker_prev.read_value()
        dc = count - prev[1]
        step_loss = tf.where(dc > 0, (total - prev[0]) / tf.where(dc > 0, dc, 1.0), self._nan)
        if refresh:
            self._tracker_prev.assign(tf.stack([total, count]))
        return step_loss

    def _measure(self, loss: tf.Tensor | None, refresh: bool) -> tf.Tensor:
        d02, p0, ds2, pw, current = [], [], [], [], []
        for p, a, b in zip(self.params, self.w0, self.prev):
            raw = p.read_value()
            w = raw if raw.dtype == tf.float64 else tf.cast(raw, tf.float64)
            x0 = self._read(a)
            ds = w - self._read(b)
            d0 = w - x0
            d02.append(self._dot(d0, d0))
            p0.append(self._dot(d0, x0))
            ds2.append(self._dot(ds, ds))
            pw.append(self._dot(ds, w))
            current.append(raw)
        rows = tf.stack([tf.stack(d02), tf.stack(p0), tf.stack(ds2), tf.stack(pw)])  # DEVICE_ROWS order
        if refresh:
            # Auto control dependencies order these writes after the reads above; the
            # weights' own values, so w(t-1) is an exact copy.
            for b, w in zip(self.prev, current):
                b.assign(w)
        step_loss = self._loss(loss, refresh)
        loss_row = tf.concat([tf.reshape(step_loss, [1]), tf.fill([self.num_layers - 1], self._nan)], axis=0)
        return tf.concat([rows, loss_row[None, :]], axis=0)  # (PACKED_ROWS, L)

    def _copy_prev(self) -> None:
        for b, p in zip(self.prev, self.params):
            b.assign(p.read_value())
        if self._tracker is not None:
            total, count = (tf.cast(v.read_value(), tf.float64) for v in self._tracker)
            self._tracker_prev.assign(tf.stack([total, count]))

    # ------------------------------------------------------------ host API
    def measure(self, refresh_prev: bool, loss: Any = None) -> tf.Tensor:
        """Packed (5, L) float64 tensor on the device (:mod:`layrot.agent.measurement`'s contract).

        With ``refresh_prev`` the w(t-1) copy holds w(t) afterwards. No host sync.
        """
        if loss is None or self._tracker is not None:
            return self._concrete(bool(refresh_prev))()
        if not isinstance(loss, tf.Tensor):
            loss = tf.constant(float(loss), tf.float64)
        return self._measure_fns[(bool(refresh_prev), True)](loss)

    def _concrete(self, refresh: bool) -> Any:
        # Calling the traced graph directly skips tf.function's signature binding
        # and cache lookup (~50 us per call on a small CPU).
        fn = self._concrete_fns.get(refresh)
        if fn is None:
            fn = self._concrete_fns[refresh] = self._measure_fns[(refresh, False)].get_concrete_function()
        return fn

    def copy_prev(self) -> None:
        """w(t-1) := w(t) for every layer (and the loss tracker snapshot). No host sync."""
        if self._copy_concrete is None:
            self._copy_concrete = self._copy_fn.get_concrete_function()
        self._copy_concrete()

    def reset_loss_tracker(self) -> None:
        """Keras reset its metrics (a new epoch): the previous totals are zero again."""
        if self._tracker is not None:
            self._tracker_prev.assign(tf.zeros([2], tf.float64))

    def w0_values(self) -> list[np.ndarray]:
        """w(0) per layer as numpy arrays (layer order); one host copy."""
        return [a.numpy().copy() for a in self.w0]

    def set_w0(self, values: Sequence[Any]) -> None:
        """Replace w(0) (resume from a checkpoint); values in layer order."""
        for a, v in zip(self.w0, values):
            a.assign(tf.cast(v, a.dtype))
