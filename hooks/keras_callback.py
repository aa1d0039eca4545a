"""``layrot.keras.RotationCallback``: layer rotation monitoring for ``model.fit``.

::

    model.fit(x, y, callbacks=[layrot.keras.RotationCallback(run="cnn-sgd")])

The callback observes each optimizer step when Keras hands control back to
Python *before the next batch* (``on_train_batch_begin``), before validation
(``on_test_begin``) and at the end of each epoch and of training. At that point
the step's weights are final, while ``on_train_batch_end`` may run late on a
Keras worker thread (it is not overridden, so Keras keeps dispatching batch-end
callbacks asynchronously). The measurement itself is ``tf.watch``'s: one
compiled function on the device per reported step, handed to the background
reporter without waiting for it.

The step's loss comes from the model's loss tracker (the increment of its
running total), so reporting it costs no host sync either.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import keras

from layrot.agent.reporter import ReporterStats
from layrot.hooks.keras_distances import check_backend
from layrot.hooks.tf_watch import LayerSelector, TFWatchHandle
from layrot.hooks.watch_base import DeprecatedStateNames, legacy_positionals, watch_options

log = logging.getLogger(__name__)

#: The positional order after ``run`` of earlier releases (deprecated, still accepted).
_LEGACY_POSITIONALS = ("every", "layers", "collector", "control", "token")
_DEFAULTS: dict[str, Any] = {"every": 1, "layers": None, "collector": None, "control": False, "token": None}


def planned_steps(params: Mapping[str, Any] | None) -> int | None:
    """Optimizer steps this ``fit`` plans: ``epochs x steps`` of Keras' callback params (None when unknown).

    A fit from ``initial_epoch > 0`` runs fewer epochs than ``epochs``: the planned end is
    then later than the real one, so ``not_learning`` is judged later, never earlier.
    """
    if not params:
        return None
    epochs, steps = params.get("epochs"), params.get("steps")
    if not (isinstance(epochs, int) and isinstance(steps, int)) or epochs <= 0 or steps <= 0:
        return None
    return epochs * steps


def _iterations(optimizer: Any) -> int:
    """``optimizer.iterations`` on the host, on any backend."""
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def _may_skip_steps(optimizer: Any) -> bool:
    """Whether ``apply`` may leave the weights (and ``iterations``) untouched: a loss scaler."""
    scaler = getattr(keras.optimizers, "LossScaleOptimizer", None)
    return scaler is not None and isinstance(optimizer, scaler)


class RotationCallback(DeprecatedStateNames, keras.callbacks.Callback):
    """Streams per-layer rotation of the model being fitted to the layrot collector.

    ``run`` goes by position (``layrot.watch(model, optimizer, run)``,
    ``layrot.tf.watch(model, optimizer, run)``; Keras hands over the model and
    optimizer), the rest by keyword; the old positional order ``(run, every,
    layers, collector, control, token)`` still works, with a DeprecationWarning.

    Args:
        run: run id; default ``LAYROT_RUN`` or script+time+host.
        every: report every N optimizer steps.
        layers: the layer rule shared by every hook and Layca
            (:mod:`layrot.core.layer_rule`): None (trainable weights with ndim >= 2, not
            biases or gamma/beta whatever their shape, in ``model.trainable_variables``
            order: layer order for Sequential and functional models), a regex on variable paths or a predicate
            ``(name, variable) -> bool`` filtering those, or a list of exact paths.
        collector: ``host:port``; default ``LAYROT_COLLECTOR`` or ``localhost:50051``.
        control: accept remote rate commands for the model's ``layrot.keras.Layca``
            optimizer; they apply at the next batch boundary and are acknowledged.
        token: bearer token if the collector requires one (``LAYROT_TOKEN``).
        meta: free-form run metadata shown by the CLI.
        loss: report each step's training loss (from the model's loss tracker).
        tls_ca, tls_cert, tls_key: TLS to the collector, as in ``layrot.watch``.
        spool, spool_max_bytes: the on-disk spool, as in ``layrot.watch`` (on by default);
            ``collector="offline"`` records to it only.

    A run name the collector would refuse, a collector address that is not
    ``host:port`` or an unreadable TLS file raise ValueError here, before ``fit``.

    Steps continue from the optimizer's ``iterations`` at the first ``fit`` (so a
    resumed model keeps its step numbers) and across later ``fit`` calls. w(0) is
    the weights at the first ``fit``; :meth:`state_dict` / :meth:`load_state_dict` carry it
    across a restart.

    Step numbers are optimizer steps actually applied, read from ``optimizer.iterations``
    whenever a batch may not be one step:

    * a ``LossScaleOptimizer`` (``mixed_float16``) skips the steps whose gradients are not
      finite: its ``iterations`` does not move, the weights do not change, and the callback
      reports nothing for that batch, so reported steps == applied steps;
    * with ``steps_per_execution=k > 1`` Keras hands control back once per execution, so a
      report carries the step number ``iterations`` reached at the end of the execution
      (k, 2k, ...; a shorter last execution of an epoch ends earlier) and its **step angle
      spans the whole execution**: the angle between the weights at the previous
      observation and now, up to k optimizer steps, not one. With ``every=N`` a step is
      reported when an execution crosses a multiple of N, under the number it ends at.
      Use ``steps_per_execution=1`` for single-step angles (abrupt-rotation alerts are
      calibrated on those).

    In both cases reading ``iterations`` costs one scalar read per batch; otherwise a
    batch is one step and the callback reads nothing.
    """

    def __init__(
        self,
        run: str | None = None,
        *args: Any,
        every: int = 1,
        layers: LayerSelector = None,
        collector: str | None = None,
        control: bool = False,
        token: str | None = None,
        meta: Mapping[str, str] | None = None,
        loss: bool = True,
        reporter_options: Mapping[str, Any] | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        spool: bool | None = None,
        spool_max_bytes: int | None = None,
        log_to: Any = None,
    ) -> None:
        if args:
            values = {"every": every, "layers": layers, "collector": collector, "control": control, "token": token}
            given = legacy_positionals("RotationCallback", args, _LEGACY_POSITIONALS, values, _DEFAULTS)
            every, layers, collector = given["every"], given["layers"], given["collector"]
            control, token = given["control"], given["token"]
        super().__init__()
        # Refused here, not in fit: a backend the hooks cannot measure (jax) is a setup error.
        check_backend("layrot.keras.RotationCallback")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._watch_kwargs: dict[str, Any] = {
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "spool": spool,
            "spool_max_bytes": spool_max_bytes,
        }
        watch_options(run, collector, **self._watch_kwargs)  # raises here, before fit, for bad settings
        # W&B / MLflow targets of the handle's reports (agent/bridges.py), as layrot.watch(log_to=...).
        self._log_to = log_to
        self.run = run
        self.every = int(every)
        self.layers = layers
        self.collector = collector
        self.control = bool(control)
        self.token = token
        self.meta = dict(meta or {})
        self.report_loss = bool(loss)
        self.reporter_options = dict(reporter_options or {})
        self.handle: TFWatchHandle | None = None
        self._model_id: int | None = None
        self._state: Mapping[str, Any] | None = None
        self._inflight = False
        self._spe = 1
        self._by_iterations = False
        self._iter_mark = 0

    # ------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        """Monitored layers (known from the first ``fit``)."""
        return self.handle.layer_names if self.handle is not None else []

    @property
    def stats(self) -> ReporterStats:
        """Reporter counters (drops, acks, reconnects)."""
        return self.handle.stats if self.handle is not None else ReporterStats()

    @property
    def step_count(self) -> int:
        return self.handle.step_count if self.handle is not None else 0

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the collector acknowledged every reported step (or timeout)."""
        return self.handle.flush(timeout) if self.handle is not None else True

    def close(self, timeout: float = 5.0) -> None:
        """Stop reporting (also happens at interpreter exit)."""
        if self.handle is not None:
            self.handle.close(timeout)

    def state_dict(self) -> dict[str, Any]:
        """w(0), step count and layer names, for a checkpoint (numpy arrays and Python values)."""
        if self.handle is None:
            raise RuntimeError("nothing to save before the first fit")
        return self.handle.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (now, or at the start of the next ``fit``)."""
        if self.handle is not None:
            self.handle.load_state_dict(state)
        else:
            self._state = state

    # ------------------------------------------------------------ Keras hooks
    def _ensure_handle(self) -> TFWatchHandle:
        model = self.model
        if self.handle is not None and self._model_id == id(model):
            return self.handle
        if self.handle is not None:
            log.warning("layrot: RotationCallback reused with another model; starting a new report")
            self.handle.close()
        optimizer = getattr(model, "optimizer", None)
        start = 0
        if optimizer is not None:
            try:
                start = _iterations(optimizer)
            except Exception:
                start = 0
        tracker = None
        if self.report_loss:
            lt = getattr(model, "_loss_tracker", None)
            if lt is not None and hasattr(lt, "total") and hasattr(lt, "count"):
                tracker = (lt.total, lt.count)
        self.handle = TFWatchHandle(
            model,
            optimizer=optimizer,
            run=self.run,
            every=self.every,
            layers=self.layers,
            collector=self.collector,
            token=self.token,
            control=self.control,
            meta=self.meta,
            reporter_options=self.reporter_options,
            loss_tracker=tracker,
            start_step=start,
            log_to=self._log_to,
            **self._watch_kwargs,
        )
        self._model_id = id(model)
        if self._state is not None:
            state, self._state = self._state, None
            self.handle.load_state_dict(state)
        return self.handle

    def on_train_begin(self, logs: Any = None) -> None:
        handle = self._ensure_handle()
        planned = planned_steps(getattr(self, "params", None))
        if planned is not None:  # the collector judges not_learning at a share of the run's planned end
            handle.set_total_steps(handle.step_count + planned)
        self._inflight = False
        self._spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
        optimizer = getattr(self.model, "optimizer", None)
        # A batch is one applied step unless an execution holds several or a loss scaler may skip it.
        self._by_iterations = optimizer is not None and (self._spe > 1 or _may_skip_steps(optimizer))
        if self._by_iterations:
            self._iter_mark = _iterations(optimizer)
        if handle._layca is not None:
            handle._layca.step_boundary(handle.step_count + 1)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.handle is not None:
            self.handle.reset_loss()  # Keras just reset its loss tracker

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        handle = self.handle
        if handle is None:
            return
        if self._inflight:
            self._observe()
        elif handle._layca is not None:
            handle._layca.step_boundary(handle.step_count + 1)
        self._inflight = True

    def on_test_begin(self, logs: Any = None) -> None:
        self._observe()  # validation inside fit: the last step's weights and loss are final now

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._observe()

    def on_train_end(self, logs: Any = None) -> None:
        self._observe()

    def _observe(self) -> None:
        if not self._inflight or self.handle is None:
            return
        self._inflight = False
        if not self._by_iterations:
            n = 1
        else:
            now = _iterations(self.model.optimizer)
            n, self._iter_mark = now - self._iter_mark, now
        if n > 0:
            self.handle.step(n)
        else:
            self.handle.skipped()  # the loss scaler skipped this batch: no step, nothing to report
