"""Layca for Keras 3 (TensorFlow backend): wrap any Keras optimizer and control layer rotation.

Layca (Carbonnelle & De Vleeschouwer, Algorithm 1) takes the step ``s`` the base
optimizer proposes for each layer's weights ``w`` and

1. projects ``s`` orthogonally to ``w``,
2. rescales it to ``||w||``,
3. applies it with the layer's rate: ``w <- w + rho_l(t) s``,
4. renormalises ``w`` to ``||w(0)||``,

so the angle between ``w(t-1)`` and ``w(t)`` is exactly ``arctan(rho_l(t))``.
``mode="lars"`` (Appendix A.4) does operations 2 and 3 only and caps the per-step
growth of ``||w||`` at ``1e-4 * ||w(0)||``. The math is the PyTorch Layca's
(``layca_torch``); the rate rules are shared (``layrot.core.rates``).

How it runs: the base optimizer does its own update (momentum, Adam moments,
weight decay, clipping...), Layca reads the step back as ``w_new - w_old`` (``w_old``
is a read snapshot taken before the update, so no copy buffer is kept) and
rewrites each layer as ``c (w_old + f s_perp)``; the per-layer coefficients come
from three reductions per layer and are computed for all layers at once, in
float64. Non-layer variables (biases, BatchNorm scales) keep the base update.

Rates live on the device. ``model.fit`` traces the optimizer into a graph, so
there is no Python code per step: the rule (Eq. 1 profile x multipliers, the
rho(t) schedule, an AdaptCopy table) is uploaded to device variables only when
it changes, and rho(t) is evaluated in the graph from the optimizer's step
counter (a handful of scalar ops). Control commands are handled at a step
boundary on the host: where the hooks call :meth:`Layca.step_boundary`
(``RotationCallback`` before every batch, ``tf.watch``'s ``.step()``), in eager
``apply`` calls, and otherwise (a bare ``model.fit``) by a host callback that
runs inside the graph only while a command is waiting (not under XLA; there
commands wait for a hook's step boundary).

Checkpoints: ``model.save`` / ``keras.models.load_model`` (import ``layrot.keras``
first so Keras finds ``layrot>Layca``), ``model.save_weights`` and
``tf.train.Checkpoint(model=..., optimizer=...)`` all carry the base optimizer's
state, the step counter, ||w(0)|| per layer and the rules.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import threading
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from layrot.agent.commands import CommandInbox, CommandListener
from layrot.core.layer_rule import LayerSelector, select_layers
from layrot.core.rates import DEFAULT_RHO0, LARS_GROWTH_CAP, MODES, RateRule, RhoSchedule
from layrot.hooks.keras_distances import variable_names
from layrot.hooks.layca_rule_view import CommandIntake, RuleView
from layrot.hooks.tf_distances import as_tf_variable

__all__ = ["Layca", "CommandListener"]

logger = logging.getLogger(__name__)

_STATE_FORMAT = 1
_KINDS = {"constant": 0.0, "step": 1.0, "cosine": 2.0}
# Slots of the schedule vector on the device.
_KIND, _RHO0, _FACTOR, _TOTAL, _RHO_MIN, _OFFSET, _TSTART, _TROWS, _MODE = range(9)


# ---------------------------------------------------------------- state (de)serialisation


def _jsonable(x: Any) -> Any:
    if isinstance(x, (bytes, bytearray)):
        return {"__b64__": base64.b64encode(bytes(x)).decode("ascii")}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _unjsonable(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__b64__"}:
            return base64.b64decode(x["__b64__"])
        return {k: _unjsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjsonable(v) for v in x]
    return x


class _PythonState(tf.train.experimental.PythonState):
    """Carries Layca's host state (rules, ||w(0)||) through ``tf.train.Checkpoint``."""

    def __init__(self, owner: Layca) -> None:
        self._owner = owner

    def serialize(self) -> str:
        return json.dumps(self._owner._state_dict())

    def deserialize(self, string_value: Any) -> None:
        if isinstance(string_value, bytes):
            string_value = string_value.decode("utf-8")
        self._owner._load_state_dict(json.loads(string_value))


class _DeviceRule:
    """Device copies of the rule (not tracked: they are derived from the host rule)."""

    def __init__(self, num_layers: int, init_norms: np.ndarray) -> None:
        L = num_layers
        self.profile = tf.Variable(tf.zeros([L], tf.float64), trainable=False, name="layca_profile")
        self.sched = tf.Variable(tf.zeros([9], tf.float64), trainable=False, name="layca_schedule")
        self.milestones = tf.Variable(
            tf.constant([math.inf], tf.float64),
            trainable=False,
            shape=tf.TensorShape([None]),
            dtype=tf.float64,
            name="layca_milestones",
        )
        self.table = tf.Variable(
            tf.zeros([1, L], tf.float64), trainable=False, shape=tf.TensorShape([None, L]), name="layca_table"
        )
        self.w0n = tf.Variable(tf.constant(init_norms, tf.float64), trainable=False, name="layca_w0_norms")
        with tf.device("CPU:0"):
            # Set by submit_command from any thread; read by the graph to decide whether
            # to call back into Python (only while a command waits).
            self.pending = tf.Variable(0, dtype=tf.int32, trainable=False, name="layca_pending")


def _renamed(rule: RateRule, old: Sequence[str], new: Sequence[str]) -> RateRule:
    """The same rule with layer j called new[j] instead of old[j] (by-name multipliers follow)."""
    if tuple(rule.layer_names) != tuple(old):
        raise ValueError("inconsistent Layca state: layer names differ between entries")
    if tuple(old) == tuple(new):
        return rule
    d = rule.to_dict()
    mapping = dict(zip(old, new))
    d["layer_names"] = list(new)
    d["layer_multipliers"] = {mapping[k]: v for k, v in d["layer_multipliers"].items()}
    return RateRule.from_dict(d)


# ---------------------------------------------------------------- the optimizer

_HOST_ATTRS = frozenset(
    {
        "_rho_max",
        "_layers_arg",
        "_rule",
        "_base_rule",
        "_names",
        "_layer_vars",
        "_w0n",
        "_dev",
        "_restored",
        "_cmd_lock",
        "_inbox",
        "on_command_result",
        "_warned_xla",
    }
)


@keras.saving.register_keras_serializable(package="layrot", name="Layca")
class Layca(keras.optimizers.Optimizer, RuleView, CommandIntake):
    """Layca around a Keras optimizer; itself a ``keras.optimizers.Optimizer``.

    Args:
        optimizer: the base optimizer (``SGD``, ``SGD(momentum=0.9)``, ``Adam``,
            ``RMSprop``..., or a name Keras knows, e.g. ``"sgd"``; afterwards
            :attr:`base_optimizer`, as on ``layrot.Layca``). It proposes the
            step direction and updates every non-layer variable; its learning rate,
            schedules, weight decay and clipping work unchanged.
        rho: initial global rate rho(0) (the paper's best: 3**-3). Ignored when
            ``schedule`` is given (then leave it at its default or equal to ``schedule.rho0``).
        alpha: Eq. 1 profile parameter in [-1, 1] (< 0 favours the first layers).
        schedule: a :class:`~layrot.core.rates.RhoSchedule` (default: constant ``rho``).
        mode: ``"layca"`` (Algorithm 1) or ``"lars"`` (Appendix A.4).
        rho_max: the largest rate any rule may produce; remote commands above it are
            refused (1.0 = 45 degrees per step).
        layers: which variables are layers, by the layer rule of
            :mod:`layrot.core.layer_rule` shared with the watch hooks: None for every
            trainable weight with ndim >= 2 (kernels, embeddings; not biases such as
            ``MultiHeadAttention``'s (heads, dim) ones, nor gamma/beta) in the order the
            optimizer is built with (``model.trainable_variables``: layer order for
            Sequential and functional models), a regex or a predicate
            ``(name, variable) -> bool`` filtering those, or a
            list of exact paths. A predicate is saved in the config as the names it chose.

    Steps are counted by the base optimizer's ``iterations`` (step 1 is the first).
    Memory: none beyond the base optimizer (the old weights are a read snapshot).
    """

    built: bool  # set by keras.optimizers.Optimizer (untyped here), then by build / apply

    def __init__(
        self,
        optimizer: Any,
        rho: float = DEFAULT_RHO0,
        alpha: float = 0.0,
        schedule: RhoSchedule | dict | None = None,
        mode: str = "layca",
        rho_max: float = 1.0,
        layers: LayerSelector = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(f"Layca does not take {sorted(kwargs)}; set them on the base optimizer")
        if isinstance(optimizer, (str, dict)):
            optimizer = keras.optimizers.get(optimizer)
        if isinstance(optimizer, Layca):
            raise TypeError("the optimizer is already wrapped by Layca")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"Layca wraps a keras.optimizers.Optimizer, got {type(optimizer).__name__}")
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError("layrot.keras.Layca needs the TensorFlow backend of Keras 3")
        if not (isinstance(rho_max, (int, float)) and math.isfinite(rho_max) and rho_max >= 0):
            raise ValueError(f"rho_max must be a finite number >= 0, got {rho_max!r}")
        if isinstance(schedule, dict):
            schedule = RhoSchedule.from_dict(schedule)
        if schedule is None:
            schedule = RhoSchedule(rho0=rho)
        elif rho != DEFAULT_RHO0 and rho != schedule.rho0:
            raise ValueError(f"rho={rho} conflicts with schedule.rho0={schedule.rho0}; set rho0 in the schedule")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if schedule.rho0 > rho_max:
            raise ValueError(f"rho0={schedule.rho0:g} is above rho_max={rho_max:g} (raise rho_max to allow it)")
        if layers is not None and not isinstance(layers, (str, re.Pattern)) and not callable(layers):
            layers = [str(n) for n in layers]
        super().__init__(learning_rate=0.0, name=name)
        # Stored (and tracked by tf.train.Checkpoint) as ``inner_optimizer``, Keras' name
        # for a wrapped optimizer: checkpoints name the dependency so, and Keras callbacks
        # (SwapEMAWeights, TensorBoard) look for it. ``base_optimizer`` is the public name.
        self.inner_optimizer = optimizer
        self._rho_max = float(rho_max)
        self._layers_arg = layers
        # Eq. 1 and the schedule are validated now, with no layers yet.
        self._rule = RateRule((), mode=mode, alpha=alpha, schedule=schedule)
        self._base_rule = self._rule
        self._names: tuple[str, ...] = ()
        self._layer_vars: list[tf.Variable] = []
        self._w0n: np.ndarray | None = None
        self._dev: _DeviceRule | None = None
        self._restored: dict | None = None
        # Guards the rules and their device copies (set_rule vs. a command decided in a host callback).
        self._cmd_lock = threading.Lock()
        self._inbox = CommandInbox()
        self._warned_xla = False
        # Tracked by tf.train.Checkpoint (a Trackable attribute); the rest is host state.
        self.layca_state = _PythonState(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOST_ATTRS:
            # Host-side state stays out of Keras' and TensorFlow's trackers: checkpoints
            # carry it through ``layca_state`` / ``save_own_variables`` instead.
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------ Keras optimizer surface
    @property
    def base_optimizer(self) -> keras.optimizers.Optimizer:
        """The wrapped optimizer (the name ``layrot.Layca`` uses too).

        ``inner_optimizer`` is the same object under Keras' own name for a wrapped
        optimizer (``LossScaleOptimizer``'s): it stays, silently, because Keras
        callbacks (``SwapEMAWeights``, ``TensorBoard``) look for it and
        ``tf.train.Checkpoint`` records the base optimizer's state under it
        (``optimizer/inner_optimizer/...``).
        """
        return self.inner_optimizer

    @property
    def variables(self) -> list:
        return self._variables[:] + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        """The base optimizer's learning rate (LR callbacks and schedules act on it)."""
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        self.inner_optimizer.learning_rate = value

    @property
    def iterations(self) -> Any:
        """The base optimizer's step counter (Layca steps are numbered from it)."""
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list: Any) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def build(self, var_list: Sequence[Any]) -> None:
        """Build the base optimizer, pick the layers and capture ||w(0)||."""
        var_list = list(var_list)
        self.inner_optimizer.build(var_list)
        chosen, names = self._select_layers(var_list)
        self._names = tuple(names)
        self._layer_vars = [as_tf_variable(v) for v in chosen]
        if not chosen:
            logger.warning("Layca: no layer variables (trainable, ndim >= 2); it runs the base optimizer only")
        with tf.init_scope():
            # Eager even when build is traced inside a tf.function (first apply_gradients).
            self._w0n = np.array(
                [np.linalg.norm(v.numpy().astype(np.float64).ravel()) for v in self._layer_vars], dtype=np.float64
            )
            self._dev = _DeviceRule(len(chosen), self._w0n)
        rule = RateRule(self._names, mode=self._rule.mode, alpha=self._rule.alpha, schedule=self._rule.schedule)
        self._base_rule = rule
        self._rule = rule
        super().build(var_list)
        with tf.init_scope():
            if self._restored is not None:
                restored, self._restored = self._restored, None
                self._load_state_dict(restored)
            else:
                self._upload_rule()
            # From now on the device flag mirrors whether commands wait (set now if some already do).
            self._inbox.set_on_pending(self._flag_pending)

    def _select_layers(self, var_list: list) -> tuple[list, list[str]]:
        trainable = [v for v in var_list if getattr(v, "trainable", True)]
        named = list(zip(variable_names(trainable), trainable))
        chosen = select_layers(named, lambda v: len(v.shape), self._layers_arg, "trainable variables (Layca)")
        return [v for _, v in chosen], [n for n, _ in chosen]

    # ------------------------------------------------------------ serialisation
    def get_config(self) -> dict[str, Any]:
        from keras.src.saving import serialization_lib

        base = self._base_rule
        return {
            "name": self.name,
            "optimizer": serialization_lib.serialize_keras_object(self.inner_optimizer),
            "rho": base.schedule.rho0,
            "alpha": base.alpha,
            "schedule": base.schedule.to_dict(),
            "mode": base.mode,
            "rho_max": self._rho_max,
            "layers": self._layers_config(),
        }

    def _layers_config(self) -> Any:
        layers = self._layers_arg
        if layers is None or isinstance(layers, str):
            return layers
        if isinstance(layers, re.Pattern):
            return layers.pattern
        if callable(layers):
            if self.built:
                return list(self._names)  # the predicate's choice, as exact names
            logger.warning("Layca: a layers= predicate cannot be saved before build; the config keeps the default")
            return None
        return list(layers)

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Layca:
        from keras.src.saving import serialization_lib

        config = dict(config)
        inner = serialization_lib.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        schedule = config.pop("schedule", None)
        if schedule is not None:
            schedule = RhoSchedule.from_dict(schedule)
            config.pop("rho", None)
        return cls(inner, schedule=schedule, **config)

    def save_own_variables(self, store: Any) -> None:
        """Keras ``.keras`` / ``.weights.h5`` saving: variables by index, plus the Layca state."""
        for i, variable in enumerate(self.variables):
            store[str(i)] = variable.numpy()
        store["layca_state"] = np.frombuffer(json.dumps(self._state_dict()).encode("utf-8"), dtype=np.uint8)

    def load_own_variables(self, store: Any) -> None:
        keys = [k for k in store.keys() if k != "layca_state"]
        if len(keys) != len(self.variables):
            logger.warning(
                "Layca: the saved optimizer has %d variables, this one %d (not built yet?); "
                "optimizer state not restored",
                len(keys),
                len(self.variables),
            )
            return
        for i, variable in enumerate(self.variables):
            variable.assign(store[str(i)])
        if "layca_state" in store.keys():
            raw = np.asarray(store["layca_state"], dtype=np.uint8).tobytes()
            self._load_state_dict(json.loads(raw.decode("utf-8")))
        else:
            logger.warning("Layca: the checkpoint has no Layca state; Layca settings are unchanged")

    def _state_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "format": _STATE_FORMAT,
                "built": bool(self.built),
                "layer_names": list(self._names),
                "layer_shapes": [[int(d) for d in v.shape] for v in self._layer_vars],
                "init_norms": None if self._w0n is None else [float(x) for x in self._w0n],
                "rule": self._rule.to_dict(),
                "base_rule": self._base_rule.to_dict(),
                **self._inbox.state_dict(),  # "last_result"
            }
        )

    def _load_state_dict(self, d: dict[str, Any]) -> None:
        d = _unjsonable(d)
        if int(d.get("format", 0)) != _STATE_FORMAT:
            raise ValueError(f"unsupported Layca state format {d.get('format')!r}")
        if not d.get("built"):
            return  # saved before the first step: nothing beyond the config
        if not self.built:
            self._restored = d  # applied by build(), once the layers are known
            return
        names = tuple(str(n) for n in d["layer_names"])
        shapes = [list(s) for s in d.get("layer_shapes", [])]
        mine = [[int(x) for x in v.shape] for v in self._layer_vars]
        if len(names) != len(self._names) or (shapes and shapes != mine):
            raise ValueError(
                f"the Layca checkpoint is for layers {list(names)} {shapes}, this optimizer has "
                f"{list(self._names)} {mine}"
            )
        rule = _renamed(RateRule.from_dict(d["rule"]), names, self._names)
        base_rule = _renamed(RateRule.from_dict(d["base_rule"]), names, self._names)
        if names != self._names:
            logger.info("Layca: checkpoint layer names %s restored onto %s by position", list(names), list(self._names))
        with self._cmd_lock:
            self._rule = rule
            self._base_rule = base_rule
            self._inbox.load_state_dict(d)
            if d["init_norms"] is not None:
                w0n = np.asarray(d["init_norms"], dtype=np.float64)
                if w0n.shape != (len(names),):
                    raise ValueError("inconsistent Layca state: init_norms length")
                self._w0n = w0n
                with tf.init_scope():
                    self._dev.w0n.assign(w0n)  # type: ignore[union-attr]
            with tf.init_scope():
                self._upload_rule()

    # ------------------------------------------------------------ layers and rates
    @property
    def layer_names(self) -> list[str]:
        """Layer variable paths in layer order (empty until the optimizer is built)."""
        return list(self._names)

    @property
    def num_layers(self) -> int:
        return len(self._names)

    @property
    def layers(self) -> list[tf.Variable]:
        """The layer variables, in layer order (after build)."""
        return list(self._layer_vars)

    @property
    def init_norms(self) -> np.ndarray | None:
        """||w(0)|| per layer (float64), or None before build."""
        return None if self._w0n is None else self._w0n.copy()

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (reads the device counter)."""
        return int(self.iterations.numpy())

    def current_rates(self, step: int | None = None) -> np.ndarray:
        """rho_l of the step just run (``step`` if given, else the optimizer's step count,
        which reads the device counter); before the first step, the rates step 1 will use."""
        if step is None:
            step = self.step_count if self.built else 0
        return self._rule.rates(max(int(step), 1))

    def set_rule(
        self,
        rule: RateRule | None = None,
        *,
        mode: str | None = None,
        alpha: float | None = None,
        rho: float | None = None,
        schedule: RhoSchedule | None = None,
        multipliers: Sequence[float] | None = None,
        layer_multipliers: dict[str, float] | None = None,
    ) -> RateRule:
        """Replace the job's own rule (between steps, from the training thread).

        Either a complete ``rule`` for these layers (after build) or changes to
        the current base rule (``rho`` sets a constant schedule). The result is both
        the base rule and the rule in force, version 0. Returns it.
        """
        if rule is None and not self.built and (multipliers is not None or layer_multipliers is not None):
            raise ValueError("per-layer multipliers need the layers: build the optimizer first")
        rule = self._resolved_rule(rule, mode, alpha, rho, schedule, multipliers, layer_multipliers)
        if not self.built and rule.schedule.rho0 > self._rho_max:
            raise ValueError(f"rho0={rule.schedule.rho0:g} is above rho_max={self._rho_max:g}")
        self._check_rho_max(rule)
        with self._cmd_lock:
            self._base_rule = rule
            self._rule = rule
            if self.built:
                with tf.init_scope():
                    self._upload_rule()
        return rule

    def _upload_rule(self) -> None:
        # Host -> device copies happen only here, when the rule changes.
        d, rule = self._dev, self._rule
        if d is None:
            return
        s = rule.schedule
        tm = rule.table_matrix
        L = len(self._names)
        sched = np.zeros(9, dtype=np.float64)
        sched[_KIND] = _KINDS[s.kind]
        sched[_RHO0] = s.rho0
        sched[_FACTOR] = s.factor
        sched[_TOTAL] = max(s.total_steps, 1)
        sched[_RHO_MIN] = s.rho_min
        sched[_OFFSET] = rule.step_offset
        sched[_MODE] = 1.0 if rule.mode == "lars" else 0.0
        if tm is not None and tm.shape[0] > 0:
            sched[_TSTART] = rule.table.start_step  # type: ignore[union-attr]
            sched[_TROWS] = tm.shape[0]
            d.table.assign(np.asarray(tm, dtype=np.float64))
        else:
            d.table.assign(np.zeros((1, L), dtype=np.float64))
        ms = np.asarray(s.milestone_steps, dtype=np.float64) if s.kind == "step" else np.zeros(0)
        d.milestones.assign(ms if ms.size else np.array([math.inf]))
        d.profile.assign(np.asarray(rule.profile_vector, dtype=np.float64))
        d.sched.assign(sched)

    def _device_rates(self, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(rates (L,) float64, is_lars scalar bool) for step ``t`` (float64), in the graph."""
        d = self._dev
        sc = d.sched.read_value()  # type: ignore[union-attr]
        s = tf.maximum(t - sc[_OFFSET], 1.0)
        k = tf.reduce_sum(tf.cast(s > d.milestones.read_value(), tf.float64))  # type: ignore[union-attr]
        rho_step = sc[_RHO0] * tf.pow(sc[_FACTOR], k)
        p = tf.minimum((s - 1.0) / sc[_TOTAL], 1.0)
        rho_cos = sc[_RHO_MIN] + (sc[_RHO0] - sc[_RHO_MIN]) * 0.5 * (1.0 + tf.cos(math.pi * p))
        rho_t = tf.where(sc[_KIND] == 0.0, sc[_RHO0], tf.where(sc[_KIND] == 1.0, rho_step, rho_cos))
        rates = d.profile.read_value() * rho_t  # type: ignore[union-attr]
        row = t - sc[_TSTART]
        in_table = (row >= 0.0) & (row < sc[_TROWS])
        idx = tf.cast(tf.clip_by_value(row, 0.0, tf.maximum(sc[_TROWS] - 1.0, 0.0)), tf.int32)
        table_rates = tf.gather(d.table.read_value(), idx)  # type: ignore[union-attr]
        return tf.where(in_table, table_rates, rates), sc[_MODE] == 1.0

    # ------------------------------------------------------------ control plane
    def step_boundary(self, next_step: int) -> None:
        """Handle waiting commands now; ``next_step`` is the step they will govern.

        Hooks call it between optimizer steps (the Keras callback before each
        batch, ``tf.watch`` in ``.step()``). Cheap when nothing waits.
        """
        if self._inbox.has_pending and self.built:
            self._process_commands(int(next_step))

    def _flag_pending(self, waiting: bool) -> None:
        # Called under the inbox's lock; the traced step calls back into Python only while set.
        if self._dev is not None:
            self._dev.pending.assign(1 if waiting else 0)

    def _process_commands(self, step: int) -> None:
        # Commands whose apply_at_step is ahead stay queued (the graph keeps
        # calling back while they do; only multi-rank jobs get such commands).
        self._inbox.decide(step, self._names, self._rho_max, self._base_rule, install=self._install_command_rule)

    def _install_command_rule(self, rule: RateRule) -> None:
        with self._cmd_lock:
            self._rule = rule
            with tf.init_scope():
                self._upload_rule()

    def _py_boundary(self, step: tf.Tensor) -> tf.Tensor:
        try:
            self._process_commands(int(step.numpy()))
        except Exception:  # never fail the training step from here
            logger.exception("Layca: handling a control command failed")
        return tf.constant(0, tf.int32)

    def _graph_boundary(self, t: tf.Tensor) -> tf.Tensor | None:
        """In a traced step: call back into Python only while a command waits."""
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util

        if control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()):
            if not self._warned_xla:
                self._warned_xla = True
                logger.info(
                    "Layca: under XLA, control commands are applied at the hooks' step "
                    "boundaries (RotationCallback / tf.watch) only"
                )
            return None
        if tf.distribute.has_strategy():
            return None  # a host callback per replica is not worth it; hooks handle commands
        dev = self._dev
        return tf.cond(
            dev.pending.read_value() > 0,  # type: ignore[union-attr]
            lambda: tf.py_function(self._py_boundary, [t], Tout=tf.int32),
            lambda: tf.constant(0, tf.int32),
        )

    # ------------------------------------------------------------ the step
    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """Run the base optimizer's update, then Layca's per-layer operations."""
        if not self.built:
            if trainable_variables is None:
                raise TypeError("Layca.apply: the first call needs trainable_variables (the optimizer is not built)")
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        tvs = list(trainable_variables) if trainable_variables is not None else list(self._trainable_variables)
        grads = list(grads)
        if not self._layer_vars:
            self.inner_optimizer.apply(grads, tvs)
            return
        it = self.inner_optimizer.iterations
        if tf.executing_eagerly():
            if self._inbox.has_pending:
                self._process_commands(int(it.numpy()) + 1)
            barrier = None
        else:
            barrier = self._graph_boundary(tf.cast(it, tf.int64) + 1)
        with tf.control_dependencies([barrier] if barrier is not None else []):
            t = tf.cast(it, tf.float64) + 1.0
            rates, is_lars = self._device_rates(t)
        present = {self._var_key(v) for v, g in zip(tvs, grads) if g is not None}
        idx = [j for j, v in enumerate(self._layer_vars) if self._var_key(v) in present]
        olds = [self._layer_vars[j].read_value() for j in idx]  # snapshots taken before the update
        self.inner_optimizer.apply(grads, tvs)
        if idx:
            self._layca_update(idx, olds, rates, is_lars)

    def apply_gradients(self, grads_and_vars: Any) -> Any:
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self.iterations

    def _layca_update(self, idx: list[int], olds: list[tf.Tensor], rates_all: tf.Tensor, is_lars: tf.Tensor) -> None:
        """Operations 1-4 for the layers ``idx`` (per-layer scalars vectorised over layers).

        Reductions run in the weights' dtype: TensorFlow sums pairwise, so they keep
        ~1e-7 relative accuracy at millions of elements, and float64 copies of every
        layer would double the memory traffic (measured 1.6x slower step). The
        projected step is formed explicitly, as in ``layca_torch``, so ||s_perp|| has
        no cancellation when the base step is mostly radial (weight decay).
        """
        f64 = tf.float64
        sel = tf.constant(idx, tf.int32)
        r = tf.gather(rates_all, sel)
        w0n = tf.gather(self._dev.w0n.read_value(), sel)  # type: ignore[union-attr]
        layca = tf.logical_not(is_lars)
        steps, nb2, dot = [], [], []
        for j, o in zip(idx, olds):
            s = self._layer_vars[j].read_value() - o  # s = w_new - w_old, in the weights' dtype
            steps.append(s)
            nb2.append(tf.cast(tf.reduce_sum(o * o), f64))
            dot.append(tf.cast(tf.reduce_sum(s * o), f64))
        nb2, dot = tf.stack(nb2), tf.stack(dot)
        one = tf.ones_like(nb2)
        zero = tf.zeros_like(nb2)
        nb = tf.sqrt(nb2)
        active = (nb > 0) & (w0n > 0)  # a zero vector cannot be rotated
        # 1: s := s - k w with k = (s.w)/(w.w) (k = 0 in LARS mode: no projection).
        k = tf.where(active & layca, dot / tf.where(active, nb2, one), zero)
        perp, ss = [], []
        for i, (o, s) in enumerate(zip(olds, steps)):
            p = s - tf.cast(k[i], s.dtype) * o
            perp.append(p)
            ss.append(tf.cast(tf.reduce_sum(p * p), f64))
        ns = tf.sqrt(tf.stack(ss))
        # rho = 0 is a zero step too, so frozen layers stay bitwise unchanged.
        moving = active & (ns > 0) & (r > 0)
        # 2-3: w := w_old + rho ||w_old|| s/||s||; a zero step stays zero (f = 0); a layer
        # that cannot be rotated keeps the base update (f = 1).
        f = tf.where(moving, r * nb / tf.where(moving, ns, one), tf.where(active, zero, one))
        # 4 (Layca): c = ||w(0)|| / ||w_old + f s||; s is orthogonal to w_old, so
        # ||w_old + f s|| = ||w_old|| sqrt(1 + rho^2) with no further pass.
        c_layca = tf.where(moving, w0n / (tf.where(moving, nb, one) * tf.sqrt(1.0 + r * r)), one)
        # LARS (Appendix A.4): cap the norm growth at 1e-4 ||w(0)|| with a radial rescale;
        # ||w_old + f s||^2 = nb^2 + 2 f (s.w) + f^2 ||s||^2 (s is not projected here).
        nw = tf.sqrt(tf.maximum(nb2 + 2.0 * f * dot + f * f * ns * ns, 0.0))
        cap = LARS_GROWTH_CAP * w0n
        c_lars = tf.where(moving & (nw - nb > cap), (nb + cap) / tf.where(nw > 0, nw, one), one)
        c = tf.where(layca, c_layca, c_lars)
        b = c * f
        for i, j in enumerate(idx):
            o, p = olds[i], perp[i]
            self._layer_vars[j].assign(tf.cast(c[i], o.dtype) * o + tf.cast(b[i], o.dtype) * p)

    # ------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return f"Layca({self._rule.describe()}, layers={len(self._names)}, base={type(self.inner_optimizer).__name__})"
