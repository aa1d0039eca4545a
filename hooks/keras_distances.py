"""Per-layer norms and distances for Keras 3 on any backend it can run eagerly (``keras.ops``).

The TensorFlow backend has its own compiled measurement (:mod:`layrot.hooks.tf_distances`);
this module serves the others, written against ``keras.ops`` and ``keras.Variable`` only,
like Keras 3's own backend-agnostic wrappers (optimizers, metrics). It computes the four
sums of the measurement contract (:mod:`layrot.agent.measurement`), with
d0 = w(t) - w(0) and ds = w(t) - w(t-1),

    ||d0||^2,  d0 . w(0),  ||ds||^2,  ds . w(t)

plus the step's loss, packed into one (5, L) float64 backend tensor that the reporter's
background thread converts with ``keras.ops.convert_to_numpy``.

Precision: the weights are widened to float64 before any difference or product (float32
and bfloat16 values are exact in float64, so are their products), and the sums are
float64. That is what keeps the step angle of a mostly radial step exact: its tangential
part comes out of ||ds||^2 - (ds . w)^2 / ||w||^2, whose cancellation amplifies any
rounding of the dot by ||ds||^2 / ||ds_tangential||^2.

Which backends: :data:`SERVED_BACKENDS`. JAX keeps float64 off unless ``jax_enable_x64`` is
set (``keras.ops.cast(x, "float64")`` silently yields float32 there) and its arrays are
immutable, so it is refused with a message rather than measured at float32 precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Keras backends the watch hooks measure (``tensorflow`` through ``tf_distances``).
SERVED_BACKENDS = ("tensorflow", "torch")


def keras_backend() -> str:
    """The Keras 3 backend in use (``keras.backend.backend()``), "" without Keras."""
    try:
        import keras
    except Exception:  # pragma: no cover - keras absent (plain tf.Variables)
        return ""
    return str(keras.backend.backend())


def check_backend(what: str = "layrot's Keras hooks") -> str:
    """The backend, or ValueError naming the served ones when this one is not."""
    backend = keras_backend()
    if backend and backend not in SERVED_BACKENDS:
        raise ValueError(
            f"{what} support KERAS_BACKEND={' or '.join(SERVED_BACKENDS)}; this process runs "
            f"KERAS_BACKEND={backend}, which is not served (jax: no float64 without jax_enable_x64, "
            "so step angles would lose their precision). Set KERAS_BACKEND=torch or tensorflow."
        )
    return backend


def variable_name(v: Any) -> str:
    """Display name: Keras 3 ``path`` ("model/dense/kernel"), else the TF name without ":0"."""
    path = getattr(v, "path", None)
    if isinstance(path, str) and path:
        return path
    name = getattr(v, "name", "") or "variable"
    return name[:-2] if name.endswith(":0") else name


def variable_names(variables: Sequence[Any]) -> list[str]:
    """Names for all of a model's variables, stable across ``model.save`` / ``load_model``.

    Keras prefixes variable paths with the model's name when layers are built
    inside the model ("cnn/dense/kernel") but not when a loaded model rebuilds
    them ("dense/kernel"), so a leading component shared by every variable is
    dropped as long as each name keeps at least two components. Duplicates get
    "#index". The hooks and Layca name layers with this same rule, so their
    layer tables agree.
    """
    names = [variable_name(v) for v in variables]
    parts = [n.split("/") for n in names]
    if parts and all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1:
        names = ["/".join(p[1:]) for p in parts]
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            names[i] = f"{n}#{i}"
        seen.add(names[i])
    return names


class PackedTensor:
    """A packed measurement on the device; :meth:`numpy` (the reporter's thread) fetches it."""

    __slots__ = ("_tensor",)

    def __init__(self, tensor: Any) -> None:
        self._tensor = tensor

    def numpy(self) -> np.ndarray:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(self._tensor), dtype=np.float64)


class KerasLayerDistances:
    """Measurement of fixed ``keras.Variable`` layers against w(0) and w(t-1), in ``keras.ops``.

    Same interface as :class:`~layrot.hooks.tf_distances.TFLayerDistances`.

    Args:
        variables: the layer variables (``keras.Variable``), layer order.
        loss_tracker: optional ``(total, count)`` variables of a Keras ``Mean`` loss tracker.
    """

    def __init__(self, variables: Sequence[Any], loss_tracker: tuple[Any, Any] | None = None) -> None:
        import keras

        check_backend()
        self._ops = keras.ops
        self.params = list(variables)
        if not self.params:
            raise ValueError("no layers to measure")
        self.num_layers = len(self.params)
        # Non-trainable copies in the weights' own dtype, on their device (the backend's default).
        self.w0 = [self._copy_of(p, f"layrot_w0_{i}") for i, p in enumerate(self.params)]
        self.prev = [self._copy_of(p, f"layrot_prev_{i}") for i, p in enumerate(self.params)]
        self._tracker = loss_tracker
        # (total, count) of the loss tracker at the previous step; zeroed when Keras resets it.
        self._tracker_prev = (0.0, 0.0)

    def _copy_of(self, p: Any, name: str) -> Any:
        import keras

        value = self._ops.copy(self._value(p))
        return keras.Variable(value, dtype=p.dtype, trainable=False, name=name)

    def _value(self, v: Any) -> Any:
        # stop_gradient: the torch backend's values are Parameters; no autograd graph for a probe.
        return self._ops.stop_gradient(v.value)

    def _f64(self, v: Any) -> Any:
        return self._ops.cast(self._value(v), "float64")

    def _dot(self, x: Any, y: Any) -> Any:
        return self._ops.sum(self._ops.multiply(x, y))

    def _step_loss(self, loss: Any, refresh: bool) -> float:
        if self._tracker is None:
            return math.nan if loss is None else float(self._ops.convert_to_numpy(loss))
        # The tracker's running total is a host scalar away (two 0-d reads): the eager
        # backends have no graph to keep it in, and it is one read per reported step.
        total, count = (float(self._ops.convert_to_numpy(v.value)) for v in self._tracker)
        dc = count - self._tracker_prev[1]
        value = (total - self._tracker_prev[0]) / dc if dc > 0 else math.nan
        if refresh:
            self._tracker_prev = (total, count)
        return value

    def measure(self, refresh_prev: bool, loss: Any = None) -> PackedTensor:
        """Packed (5, L) float64 measurement (:mod:`layrot.agent.measurement`'s contract).

        With ``refresh_prev`` the w(t-1) copy holds w(t) afterwards.
        """
        ops = self._ops
        rows: list[list[Any]] = [[], [], [], []]
        for p, a, b in zip(self.params, self.w0, self.prev):
            w = self._f64(p)
            x0 = self._f64(a)
            ds = ops.subtract(w, self._f64(b))
            d0 = ops.subtract(w, x0)
            for row, value in zip(rows, (self._dot(d0, d0), self._dot(d0, x0), self._dot(ds, ds), self._dot(ds, w))):
                row.append(value)
        packed = ops.stack([ops.stack(r) for r in rows])
        if refresh_prev:
            self.copy_prev(loss_too=False)
        step_loss = self._step_loss(loss, refresh_prev)
        loss_row = np.full((1, self.num_layers), math.nan)
        loss_row[0, 0] = step_loss
        return PackedTensor(ops.concatenate([packed, ops.convert_to_tensor(loss_row, "float64")], axis=0))

    def copy_prev(self, loss_too: bool = True) -> None:
        """w(t-1) := w(t) for every layer (and the loss tracker snapshot)."""
        for b, p in zip(self.prev, self.params):
            b.assign(self._ops.copy(self._value(p)))
        if loss_too and self._tracker is not None:
            total, count = (float(self._ops.convert_to_numpy(v.value)) for v in self._tracker)
            self._tracker_prev = (total, count)

    def reset_loss_tracker(self) -> None:
        """Keras reset its metrics (a new epoch): the previous totals are zero again."""
        self._tracker_prev = (0.0, 0.0)

    def w0_values(self) -> list[np.ndarray]:
        """w(0) per layer as numpy arrays (layer order); one host copy."""
        return [np.array(self._ops.convert_to_numpy(a.value), copy=True) for a in self.w0]

    def set_w0(self, values: Sequence[Any]) -> None:
        """Replace w(0) (resume from a checkpoint); values in layer order."""
        for a, v in zip(self.w0, values):
            a.assign(self._ops.cast(self._ops.convert_to_tensor(np.asarray(v)), a.dtype))
