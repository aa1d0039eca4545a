"""``layrot.tf.watch``: layer rotation monitoring for TensorFlow / Keras custom training loops.

Call ``handle.step()`` once after every optimizer step (after
``optimizer.apply_gradients``, outside any ``tf.function``)::

    handle = layrot.tf.watch(model, run="my-run")
    for x, y in data:
        loss = train_step(x, y)          # a tf.function that applies gradients
        handle.observe_loss(loss)        # optional, no host sync
        handle.step()

On a reported step one compiled ``tf.function`` measures every layer on the
device (``tf_distances``) and the resulting tensor goes to the background
reporter, which is the only place that waits for it. On the step before a
report the w(t-1) copy is refreshed; every other step costs a Python counter.

Layers are the trainable weights with ndim >= 2 (kernels, embeddings; by role,
so ``MultiHeadAttention``'s 2-D biases are not layers: :mod:`layrot.core.layer_rule`), in the
order of ``model.trainable_variables``: layer order for Sequential and functional
models (the order layers are called in), attribute-assignment order for
subclassed models. ``RotationCallback`` (``layrot.keras``) drives the same
handle from ``model.fit``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from layrot.agent.measurement import PackedMeasurement
from layrot.agent.reporter import LayerSpec, new_run_key
from layrot.core.layer_rule import LayerSelector, select_layers
from layrot.hooks.keras_distances import KerasLayerDistances, check_backend, keras_backend, variable_names
from layrot.hooks.watch_base import DeprecatedStateNames, WatchBase, legacy_positionals

log = logging.getLogger(__name__)


def _uses_tensorflow(variables: list[Any]) -> bool:
    """Whether these variables live in TensorFlow (the TF backend, or plain ``tf.Variable`` s).

    TensorFlow is imported only then, so the Keras callback runs on the torch backend
    in a process without TensorFlow.
    """
    backend = keras_backend()
    if backend == "tensorflow":
        return True
    if backend:
        # keras.Variable on another backend; anything else (a raw tf.Variable list) is TF's
        import keras

        return not all(isinstance(v, keras.Variable) for v in variables)
    return True


def _var_key(v: Any) -> int:
    """Identity of a variable shared by its Keras wrapper and the backend value behind it."""
    return id(getattr(v, "value", v)) if _is_keras_variable(v) else id(v)


def _is_keras_variable(v: Any) -> bool:
    try:
        import keras
    except Exception:  # pragma: no cover - keras absent
        return False
    return isinstance(v, keras.Variable)


def _owner_types(target: Any) -> dict[int, str]:
    """Variable identity (:func:`_var_key`) -> class name of the innermost Keras layer owning it."""
    owners: dict[int, str] = {}
    flatten = getattr(target, "_flatten_layers", None)
    if flatten is None:
        return owners
    try:
        layers = list(flatten(include_self=True, recursive=True))
    except Exception:
        return owners
    for layer in layers:  # parents come before children, so the innermost layer wins
        for v in getattr(layer, "_trainable_variables", []) or []:
            owners[_var_key(v)] = type(layer).__name__
    return owners


def candidate_variables(target: Any, layers: LayerSelector = None) -> list[tuple[str, Any, str]]:
    """(name, variable, owning layer type) of the selected layers, in the target's order.

    ``target`` is a Keras model / layer, a ``tf.Module`` or a sequence of variables.
    ``layers``: the shared rule of :mod:`layrot.core.layer_rule` (None, a regex or
    predicate ``(name, variable) -> bool`` on the default layers, or exact names).
    Names are Keras variable paths such as ``"dense/kernel"``, without the model-name
    prefix, see :func:`~layrot.hooks.keras_distances.variable_names`.
    """
    if isinstance(target, (list, tuple)):
        variables = list(target)
        owners: dict[int, str] = {}
    elif hasattr(target, "trainable_variables"):
        variables = list(target.trainable_variables)
        owners = _owner_types(target)
    else:
        raise TypeError(f"watch a Keras model, a tf.Module or a list of variables, got {type(target).__name__}")
    variables = [v for v in variables if getattr(v, "trainable", True)]
    named = list(zip(variable_names(variables), variables))
    try:
        chosen = select_layers(named, lambda v: len(v.shape), layers, "trainable variables")
    except ValueError as exc:
        if not named:
            raise ValueError(f"{exc} (is the model built? call it once or pass input shapes)") from None
        raise
    return [(n, v, owners.get(_var_key(v), "")) for n, v in chosen]


def _tf_eager() -> bool:
    import tensorflow as tf

    return bool(tf.executing_eagerly())


def _as_layca(optimizer: Any) -> Any:
    if optimizer is None or keras_backend() not in ("", "tensorflow"):
        return None  # layrot.keras.Layca runs on the TensorFlow backend only
    try:
        from layrot.hooks.layca_keras import Layca
    except Exception:  # pragma: no cover - keras absent
        return None
    return optimizer if isinstance(optimizer, Layca) else None


class TFWatchHandle(DeprecatedStateNames, WatchBase):
    """What ``layrot.tf.watch`` returns: owns the device measurement and the reporter.

    Attributes:
        run: the run id.
        step_count: optimizer steps counted so far (restored by :meth:`load_state_dict`).
    """

    def __init__(
        self,
        target: Any,
        optimizer: Any = None,
        *,
        run: str | None = None,
        every: int = 1,
        layers: LayerSelector = None,
        collector: str | None = None,
        token: str | None = None,
        control: bool = False,
        meta: Mapping[str, str] | None = None,
        reporter_options: Mapping[str, Any] | None = None,
        loss_tracker: tuple[Any, Any] | None = None,
        start_step: int = 0,
        jit_compile: bool | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        spool: bool | None = None,
        spool_max_bytes: int | None = None,
        log_to: Any = None,
    ) -> None:
        check_backend("layrot.tf.watch and layrot.keras.RotationCallback")
        self._configure(
            run,
            collector,
            every,
            token,
            meta,
            reporter_options,
            tls_ca,
            tls_cert,
            tls_key,
            spool,
            spool_max_bytes,
            log_to=log_to,  # W&B / MLflow / a SummaryWriter object (agent/bridges.py); no "tensorboard:DIR" here
        )
        self._run_key = new_run_key()  # LAYROT_RUN_KEY when a launcher sets one for every worker
        if optimizer is None:
            optimizer = getattr(target, "optimizer", None)
        self._set_control(_as_layca(optimizer), control, "layrot.keras.Layca")
        chosen = candidate_variables(target, layers)
        self._names = [n for n, _, _ in chosen]
        self._vars = [v for _, v, _ in chosen]
        self._types = [t for _, _, t in chosen]
        self._tf = _uses_tensorflow(self._vars)
        self._dist: Any
        if self._tf:
            from layrot.hooks.tf_distances import TFLayerDistances

            self._dist = TFLayerDistances(self._vars, loss_tracker=loss_tracker, jit_compile=jit_compile)
        else:
            self._dist = KerasLayerDistances(self._vars, loss_tracker=loss_tracker)
        self._init_norms = [float(np.linalg.norm(w.astype(np.float64).ravel())) for w in self._dist.w0_values()]
        self._prev_is_w0 = True  # until the first refresh of w(t-1), ||w(t-1)|| = ||w(0)|| exactly
        self._loss: Any = None
        self._rho_index: np.ndarray | None = None
        self._multi_warned = False
        self.step_count = int(start_step)

    # ------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        """Monitored layers, layer order (Keras variable paths without the model-name prefix)."""
        return list(self._names)

    def observe_loss(self, loss: Any) -> None:
        """Attach the current loss (a tensor or float) to the next reported step; no host sync."""
        self._loss = loss

    def step(self, n: int = 1) -> None:
        """Count ``n`` optimizer steps just taken (call after ``apply_gradients``; eager code only).

        ``n > 1`` (several steps inside one ``tf.function`` call) reports at this call
        only, and the step angle then spans those steps.
        """
        if self._tf and not _tf_eager():
            raise RuntimeError("handle.step() runs outside tf.function: call it after your compiled train step")
        if self._closed:
            return
        if self.reporter is None:
            self._open()
        n = int(n)
        if n < 1:
            return
        if n > 1 and not self._multi_warned:
            self._multi_warned = True
            log.warning(
                "layrot: %d optimizer steps between two observations (steps_per_execution > 1?); "
                "step angles span them; use steps_per_execution=1 for single-step angles",
                n,
            )
        t0 = self.step_count
        t = t0 + n
        self.step_count = t
        report = t // self.every > t0 // self.every
        # With multi-step calls the next observation may be the next report: keep w(t) then.
        refresh = (t + 1) % self.every == 0 or self._multi_warned
        if report:
            self._report(t, refresh)
        elif refresh:
            self._dist.copy_prev()
            self._prev_is_w0 = False
        self._loss = None
        if self._layca is not None:
            self._layca.step_boundary(t + 1)

    def skipped(self) -> None:
        """A batch ran but applied no step (a loss scaler skipped non-finite gradients).

        Nothing is counted or reported. When w(t-1) was just refreshed to w(t) (the next
        applied step may be reported), the loss snapshot moves past this batch too, so the
        reported step's loss is its own batch's; re-copying w(t-1) is harmless then, as the
        weights did not change.
        """
        if self._closed:
            return
        t = self.step_count
        if (t + 1) % self.every == 0 or self._multi_warned:
            self._dist.copy_prev()  # w(t-1) already held these weights: its flags stay true

    def reset_loss(self) -> None:
        """The loss tracker was reset (Keras does it at every epoch start)."""
        self._dist.reset_loss_tracker()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs so a resumed job continues its rotation curves (numpy only)."""
        return {
            **self._state_frame(self.step_count),
            "w0": self._dist.w0_values(),
            "init_norms": list(self._init_norms),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore w(0) and the step count saved by :meth:`state_dict` (before the next step)."""
        saved = list(state.get("names", ()))
        same_shapes = len(saved) == len(self._names) and all(
            tuple(np.shape(w)) == tuple(v.shape) for w, v in zip(state.get("w0", ()), self._vars)
        )
        index = self._state_index(state, same_by_position=same_shapes)
        if not set(self._names) <= set(saved):
            # Same layers under other names (e.g. paths rebuilt by keras.models.load_model).
            log.info("layrot: restoring w(0) by position: saved layers %s, now %s", state["names"], self._names)
        self._dist.set_w0([state["w0"][index[n]] for n in self._names])
        self.step_count = self._restore_common(state, index)
        self._dist.copy_prev()  # w(t-1) for the next step is what the model holds now
        self._prev_is_w0 = False

    # ------------------------------------------------------------ internals
    def _open(self) -> None:
        specs = [
            LayerSpec(
                name=n,
                index=i,
                shape=tuple(int(d) for d in v.shape),
                init_norm=nrm,
                numel=int(np.prod(v.shape)),
                module_type=t,
            )
            for i, (n, v, nrm, t) in enumerate(zip(self._names, self._vars, self._init_norms, self._types))
        ]
        meta = dict(self._meta)
        try:
            import keras

            meta.setdefault("keras", keras.__version__)
            meta.setdefault("keras_backend", keras.backend.backend())
        except Exception:  # pragma: no cover
            pass
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if self._tf:
            import tensorflow as tf

            framework, version = "tensorflow", tf.__version__
        else:
            framework, version = "keras", meta.get("keras", "")
        self._open_reporter(specs, framework, version, rank, world, meta)

    def _rates(self, t: int) -> np.ndarray | None:
        layca = self._layca
        if layca is None or not layca.built:
            return None
        if self._rho_index is None:
            where = {n: i for i, n in enumerate(layca.layer_names)}
            self._rho_index = np.array([where.get(n, -1) for n in self._names], dtype=np.int64)
        rates = layca.rates_at(t)
        out = np.full(len(self._names), np.nan)
        ok = self._rho_index >= 0
        out[ok] = rates[self._rho_index[ok]]
        return out

    def _report(self, t: int, refresh: bool) -> None:
        packed = self._dist.measure(refresh_prev=refresh, loss=self._loss)
        measured = PackedMeasurement(packed.numpy, len(self._names), np.asarray(self._init_norms), self._prev_is_w0)
        if refresh:
            self._prev_is_w0 = False
        rho = self._rates(t)
        version = self._layca.command_version if self._layca is not None else 0
        reporter = self.reporter
        assert reporter is not None  # step() opens the reporter before the first report
        reporter.submit(measured.record(t, rho=rho, command_version=version, time=time.time()))


#: The positional order after the model of earlier releases (deprecated, still accepted).
_LEGACY_POSITIONALS = ("run", "every", "layers", "collector", "token", "control")
_DEFAULTS: dict[str, Any] = {
    "run": None,
    "every": 1,
    "layers": None,
    "collector": None,
    "token": None,
    "control": False,
}


def watch(
    model_or_variables: Any,
    optimizer: Any = None,
    run: str | None = None,
    *args: Any,
    every: int = 1,
    layers: LayerSelector = None,
    collector: str | None = None,
    token: str | None = None,
    control: bool = False,
    meta: Mapping[str, str] | None = None,
    reporter_options: Mapping[str, Any] | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    spool: bool | None = None,
    spool_max_bytes: int | None = None,
    log_to: Any = None,
) -> TFWatchHandle:
    """Stream per-layer rotation of a TensorFlow / Keras model from a custom training loop.

    Positional arguments are the framework objects and ``run``, as in
    ``layrot.watch(model, optimizer, run, ...)``; the rest go by keyword. The
    old positional order ``watch(model, run, every, layers, collector, token,
    control)`` still works, with a DeprecationWarning (a string in the optimizer's
    place is taken for the old positional ``run``).

    Args:
        model_or_variables: a Keras model or layer, a ``tf.Module``, or a list of variables.
        run: run id shared by all ranks; default ``LAYROT_RUN`` or script+time+host.
        every: report every N optimizer steps (unreported steps cost a counter,
            the step before a report one on-device copy).
        layers: the layer rule shared by every hook and Layca
            (:mod:`layrot.core.layer_rule`): None (trainable weights with ndim >= 2,
            not biases or normalization parameters),
            a regex on variable paths or a predicate ``(name, variable) -> bool``
            filtering those, or a list of exact paths.
        collector: ``host:port``; default ``LAYROT_COLLECTOR`` or ``localhost:50051``.
        token: bearer token if the collector requires one (``LAYROT_TOKEN``).
        control: accept remote Layca rate commands; needs a ``layrot.keras.Layca``
            optimizer (``optimizer=`` or the model's compiled optimizer).
        optimizer: the optimizer in use (a ``layrot.keras.Layca`` makes rates and
            commands visible), when it is not ``model.optimizer``.
        meta: free-form run metadata shown by the CLI.
        tls_ca, tls_cert, tls_key: TLS to the collector, as in ``layrot.watch``.
        spool, spool_max_bytes: the on-disk spool, as in ``layrot.watch`` (on by default);
            ``collector="offline"`` records to it only.

    Raises:
        ValueError: before training starts, for a bad run name, collector address or TLS file.

    Returns:
        A :class:`TFWatchHandle`: call ``.step()`` after each optimizer step; it
        has ``observe_loss()``, ``flush()``, ``close()``, ``stats``, ``layer_names``,
        ``state_dict()`` / ``load_state_dict()``. An unreachable collector never slows or
        stops training: one warning, steps kept in the spool, reconnection with backoff.
    """
    options = {k: v for k, v in locals().items() if k not in ("model_or_variables", "optimizer", "args")}
    if isinstance(optimizer, str) or args:
        names: tuple[str, ...]
        if isinstance(optimizer, str):
            # The old watch(model, run, every, ...): a string in the optimizer's place is the run.
            old: tuple[Any, ...] = (optimizer, run, *args) if run is not None or args else (optimizer,)
            names, options["run"], optimizer = _LEGACY_POSITIONALS, None, None
        else:
            old, names = args, _LEGACY_POSITIONALS[1:]
        options = legacy_positionals("layrot.tf.watch", old, names, options, _DEFAULTS)
    return TFWatchHandle(model_or_variables, optimizer=optimizer, **options)
