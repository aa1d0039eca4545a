"""Bridges: the job's per-layer numbers forwarded into W&B, MLflow or TensorBoard (``watch(..., log_to=...)``).

Built on the ``on_report`` mechanism (agent/local_view.py): every bridge is a callable
taking a :class:`LayerReport` on the reporter's exporter thread, never the training
thread, and logs it from a thread of its own (a slow target never holds back the reports
to the collector), with the numbers the collector stores (the same wire rows, the same
math, the same float32 rounding). One report is one logging call per target, at ``step`` = the optimizer step:

* ``layrot/rotation/<layer>``, ``layrot/step_angle/<layer>`` per layer;
* ``layrot/indicator/layers_at_target`` (share of layers with rotation >= the default
  target 0.9, ``core.indicator``) and ``layrot/indicator/min_rotation``.

Names keep only the characters MLflow allows (letters, digits, ``_ - . / : `` and space);
any other character becomes ``_`` (for every target, so the names agree everywhere).
NaN values (a diverged layer, no finite rotation) are left out of that step.

Precision: the values are the history's (float32-rounded, ``core.stored``), which W&B,
MLflow and TensorBoard's float32 scalars all keep exactly: every target shows ``export``'s numbers.

A target that fails (package missing, run finished, disk full) is logged once, counted
in :attr:`Bridge.failures` and never raises into training; the imports of wandb and
mlflow happen only when such a target is used.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from layrot.agent.local_view import LayerReport
from layrot.core.indicator import indicator

log = logging.getLogger(__name__)

__all__ = ["Bridge", "bridges_for", "chain", "close_bridges", "metric_name", "report_metrics"]

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-./: ]")


def metric_name(*parts: str) -> str:
    """``layrot/<parts...>`` with characters MLflow would refuse replaced by ``_``."""
    return _NOT_ALLOWED.sub("_", "/".join(("layrot", *parts)))


def report_metrics(report: LayerReport) -> dict[str, float]:
    """The finite metrics of one report, by bridge name (float64 values)."""
    out: dict[str, float] = {}
    for key, values in (("rotation", report.rotation), ("step_angle", report.step_angle)):
        for name, v in zip(report.layer_names, values):
            if math.isfinite(float(v)):
                out[metric_name(key, name)] = float(v)
    ind = indicator(report.rotation, report.step)
    for key, v in (("layers_at_target", ind.at_target_ratio), ("min_rotation", ind.min_rotation)):
        if math.isfinite(v):
            out[metric_name("indicator", key)] = float(v)
    return out


class Bridge:
    """One target, fed from a thread of its own through a bounded queue.

    A metrics service can be slow (MLflow's first write creates its store, W&B's service may
    lag): called on the reporter's exporter thread, it would hold back the job's reports to
    the collector. So a report is only queued there (``__call__`` never waits) and
    ``send(step, metrics)`` runs on the bridge's thread; a full queue drops the report,
    counted in :attr:`dropped`. A failing ``send`` is logged once, counted in :attr:`failures`
    and swallowed. :meth:`close` waits for what is queued.
    """

    #: reports waiting for a slow target before newer ones are dropped (counted)
    MAX_QUEUED = 1024

    def __init__(self, target: str, send: Callable[[int, dict[str, float]], None]) -> None:
        self.target = target
        self._send = send
        self.failures = 0
        self.sent = 0
        self.dropped = 0
        self._queue: queue.Queue[LayerReport | None] = queue.Queue(self.MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __call__(self, report: LayerReport) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=f"layrot-bridge-{self.target}", daemon=True)
                    self._thread.start()
        try:
            self._queue.put_nowait(report)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("layrot: %s is not keeping up; reports for it are dropped (counted)", self.target)

    def _loop(self) -> None:
        while True:
            report = self._queue.get()
            if report is None:
                return
            self.send_now(report)

    def send_now(self, report: LayerReport) -> None:
        """Log one report to the target on this thread (guarded)."""
        try:
            metrics = report_metrics(report)
            if metrics:
                self._send(report.step, metrics)
                self.sent += 1
        except Exception as exc:  # a metrics service never reaches training
            self.failures += 1
            if self.failures == 1:
                log.warning(
                    "layrot: logging to %s failed (%s: %s); training continues, later failures are counted",
                    self.target,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
            else:
                log.debug("layrot: logging to %s failed again: %r", self.target, exc)

    def close(self, timeout: float = 30.0) -> None:
        """Wait (up to ``timeout`` seconds) until every queued report is logged, then stop the thread."""
        thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        thread.join(timeout)
        if thread.is_alive():
            log.warning("layrot: %s still had reports to log after %.0f s; they are not logged", self.target, timeout)


def _wandb(run: Any) -> Bridge:
    def send(step: int, metrics: dict[str, float]) -> None:
        target = run
        if target is None:  # the active run at the time of the report (wandb.init may come after watch)
            import wandb

            target = wandb.run
            if target is None:
                raise RuntimeError("log_to='wandb' but no wandb run is active (call wandb.init)")
        target.log(metrics, step=step)

    return Bridge("wandb", send)


def _mlflow(client: Any = None, run_id: str | None = None) -> Bridge:
    if client is None:
        # MLflow's active run is per thread: take it now, on the thread calling watch(),
        # since the reports are logged from the reporter's thread.
        import mlflow

        active = mlflow.active_run()
        if active is None:
            raise ValueError("log_to='mlflow' needs an active MLflow run at watch() (call mlflow.start_run first)")
        client, run_id = mlflow.MlflowClient(), active.info.run_id

    def send(step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(key=k, value=v, timestamp=ts, step=step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit of metrics per log_batch
            client.log_batch(run_id, metrics=batch[i : i + 1000])

    return Bridge("mlflow", send)


def _tensorboard(writer: Any, owned: bool) -> Bridge:
    def send(step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            writer.add_scalar(k, v, global_step=step)
        writer.flush()  # a report is every few steps at most: readers see it at once

    bridge = Bridge("tensorboard", send)
    bridge.writer = writer  # type: ignore[attr-defined]  # kept for close() of an owned writer
    bridge.owned = owned  # type: ignore[attr-defined]
    return bridge


def _one(target: Any, make_writer: Callable[[str], Any] | None) -> Bridge:
    if isinstance(target, str):
        if target == "wandb":
            return _wandb(None)
        if target == "mlflow":
            return _mlflow()
        if target.startswith("tensorboard:") and len(target) > len("tensorboard:"):
            if make_writer is None:
                raise ValueError("log_to='tensorboard:DIR' needs a writer factory here; pass a SummaryWriter")
            return _tensorboard(make_writer(target[len("tensorboard:") :]), owned=True)
        raise ValueError(f"log_to: unknown target {target!r} (wandb, mlflow, tensorboard:DIR or an object)")
    if isinstance(target, tuple) and len(target) == 2 and hasattr(target[0], "log_batch"):
        return _mlflow(target[0], str(target[1]))  # (MlflowClient, run_id)
    if hasattr(target, "add_scalar"):
        return _tensorboard(target, owned=False)  # a SummaryWriter (torch or tensorboardX)
    if hasattr(target, "log") and hasattr(target, "id"):
        return _wandb(target)  # a wandb Run
    raise TypeError(f"log_to: cannot log to a {type(target).__name__}")


def bridges_for(log_to: Any, make_writer: Callable[[str], Any] | None = None) -> list[Bridge]:
    """The bridges of a ``log_to`` value (one target or a list of them); ValueError/TypeError before training.

    ``make_writer(dir)``: the framework's SummaryWriter for ``"tensorboard:DIR"`` (the hooks pass
    torch's or TF's; this module imports no framework).
    """
    if log_to is None:
        return []
    targets: Sequence[Any] = log_to if isinstance(log_to, list) else [log_to]
    return [_one(t, make_writer) for t in targets]


def chain(callbacks: Sequence[Callable[[LayerReport], object]]) -> Callable[[LayerReport], object] | None:
    """One ``on_report`` calling each of ``callbacks`` in turn (bridges never raise; a user's callback may)."""
    cbs = list(callbacks)
    if not cbs:
        return None
    if len(cbs) == 1:
        return cbs[0]

    def call_all(report: LayerReport) -> None:
        error: Exception | None = None
        for cb in cbs:
            try:
                cb(report)
            except Exception as exc:  # the others still get the report; LocalView counts it
                error = exc
        if error is not None:
            raise error

    return call_all


def close_bridges(bridges: Sequence[Bridge]) -> None:
    """Log what the bridges still hold, then close the writers they opened themselves (``tensorboard:DIR``)."""
    for b in bridges:
        b.close()
        if getattr(b, "owned", False):
            try:
                b.writer.close()  # type: ignore[attr-defined]
            except Exception as exc:  # closing never raises into the job's shutdown
                log.debug("layrot: closing the %s writer failed: %r", b.target, exc)
