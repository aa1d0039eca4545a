"""The alert hub: where every alert goes once a detector raised it.

Every alert carries an incident id (detectors set it; the hub gives run/kind/step to
those that do not). A publication whose incident is already kept is an UPDATE: it
replaces the kept version (``ListAlerts`` shows each incident once, in its first
position), goes to watchers and Alertmanager again, and is counted and stored only
when its severity is new for the incident (the store has one row per incident and
severity; after a restart rows of one incident are merged by run, kind and step).

Memory (``ListAlerts``, newest ``KEEP_PER_RUN`` incidents per run), the history store,
the ``layrot_alerts_total`` counters (read by the ``/metrics`` thread under a
lock), ``WatchAlerts`` subscribers (one asyncio queue each) and the
Alertmanager pushers (server/alertmanager.py, their own threads). Publishing
runs on the collector's loop thread and never waits on I/O.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from layrot.proto import layrot_pb2 as pb

if TYPE_CHECKING:
    from layrot.server.alertmanager import AlertmanagerPusher
    from layrot.server.store_api import HistoryStore

log = logging.getLogger(__name__)

NAN = float("nan")

# Per-run rate limit of stored alerts (token bucket): a run whose every layer
# jumps at every step would otherwise flood the store. Excess is counted.
ALERT_BURST = 100
ALERT_REFILL_PER_S = 1.0
# Alerts kept in memory per run for ListAlerts / WatchAlerts (all are in the store).
KEEP_PER_RUN = 1000
# A WatchAlerts subscriber this far behind is cut off.
WATCH_QUEUE = 10_000
# Kinds whose incidents get updates (the history store keeps one row per severity of an incident).
UPDATABLE_KINDS = ("abrupt_rotation", "not_learning")


class _Watcher:
    """One WatchAlerts stream: its run filter ('' = all) and queue (None ends it)."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.queue: asyncio.Queue[pb.Alert | None] = asyncio.Queue()
        self.overflowed = False


def _sql_num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pb_num(x: float | None) -> float:
    return NAN if x is None else float(x)


def _from_row(r: Sequence[Any]) -> pb.Alert:
    """A stored alert row (``HistoryStore.recent_alerts`` columns) as an Alert."""
    return pb.Alert(
        run=r[0],
        layer=r[1] or "",
        step=r[2] or 0,
        kind=r[3],
        severity=r[4],
        angle=_pb_num(r[5]),
        baseline=_pb_num(r[6]),
        time=r[7] or 0.0,
        message=r[8] or "",
        loss_before=_pb_num(r[9]),
        loss_after=_pb_num(r[10]),
        last_step=r[2] or 0,
        updated=r[7] or 0.0,
        layers=[r[1]] if r[1] else [],
    )


class AlertHub:
    """Where alerts go: memory (ListAlerts), the store, counters (/metrics), watchers, Alertmanager pushers."""

    def __init__(self, store: HistoryStore | None = None, pushers: Sequence[AlertmanagerPusher] = ()) -> None:
        self.store = store
        self.pushers = list(pushers)
        self.recent: dict[str, collections.deque[pb.Alert]] = {}
        self.watchers: set[_Watcher] = set()
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self.engine_errors = 0
        # incident id -> its newest version and the severities counted for it (per run, pruned with ``recent``)
        self._incidents: dict[str, pb.Alert] = {}
        self._counted: dict[str, set[str]] = {}

    # ------------------------------------------------------------ restore
    def restore(self) -> None:
        """Load the newest alerts of every run and the counters from the store."""
        if self.store is None:
            return
        with self._lock:
            self._counts.update(self.store.alert_counts())
        runs = self.store.alert_runs()
        for run in runs:
            self._keep_rows(run, reversed(self.store.recent_alerts(run, KEEP_PER_RUN)))
        if runs:
            log.info("restored alerts of %d runs", len(runs))

    def _keep_rows(self, run: str, rows: Iterable[tuple]) -> list[pb.Alert]:
        """Keep stored alert rows (``recent_alerts``' columns) of a run, oldest first; returns them as Alerts."""
        dq = self.recent.setdefault(run, collections.deque(maxlen=KEEP_PER_RUN))
        out = [_from_row(r) for r in rows]
        for alert in out:
            self._keep(dq, alert, restored=True)
        return out

    def take_stored(self, run: str, rows: Iterable[tuple]) -> None:
        """Alerts another collector raised for a run it holds (server/cluster.py), oldest first: kept for ``list``,
        sent to this collector's watchers; not counted, stored or pushed again (the collector that raised them did)."""
        for alert in self._keep_rows(run, rows):
            self._notify(alert)

    # ------------------------------------------------------------ publish
    def _incident_id(self, alert: pb.Alert) -> str:
        """A new incident id for an alert that has none: run/kind/step, made unique."""
        base = f"{alert.run}/{alert.kind}/{alert.step}"
        ident, n = base, 1
        while ident in self._incidents:
            n += 1
            ident = f"{base}#{n}"
        return ident

    def _keep(self, dq: collections.deque[pb.Alert], alert: pb.Alert, restored: bool = False) -> bool:
        """Keep ``alert`` in memory: a new incident is appended, an update replaces its incident's entry.

        Returns whether it is an update. Restored rows of updatable kinds with the same run, kind
        and step are versions of one incident (the store has no incident column).
        """
        if restored and alert.kind in UPDATABLE_KINDS:
            alert.incident = f"{alert.run}/{alert.kind}/{alert.step}"
        elif not alert.incident:
            alert.incident = self._incident_id(alert)
        if not alert.updated:
            alert.updated = alert.time
        if not alert.last_step:
            alert.last_step = alert.step
        old = self._incidents.get(alert.incident)
        if old is not None:
            for i, a in enumerate(dq):
                if a.incident == alert.incident:
                    dq[i] = alert
                    self._incidents[alert.incident] = alert
                    return True
        if len(dq) == dq.maxlen:
            gone = dq[0].incident
            self._incidents.pop(gone, None)
            self._counted.pop(gone, None)
        dq.append(alert)
        self._incidents[alert.incident] = alert
        return False

    # ------------------------------------------------------------ publish
    def publish(self, alert: pb.Alert, hold: bool = False) -> None:
        """Record an alert everywhere it goes. Loop thread. ``hold``: stays firing in Alertmanager until resolved.

        An alert whose ``incident`` is already kept is an update of that incident: it
        replaces it in ``list``, goes to watchers and Alertmanager again, and is counted
        and stored only when its severity was not counted for the incident yet.
        """
        msg = pb.Alert()
        msg.CopyFrom(alert)  # detectors keep changing their incident's message; what was published stays
        alert = msg
        dq = self.recent.setdefault(alert.run, collections.deque(maxlen=KEEP_PER_RUN))
        update = self._keep(dq, alert)
        counted = self._counted.setdefault(alert.incident, set())
        new_severity = alert.severity not in counted
        counted.add(alert.severity)
        if new_severity:
            key = (alert.run, alert.layer, alert.kind, alert.severity)
            with self._lock:
                self._counts[key] = self._counts.get(key, 0) + 1
        if self.store is not None and new_severity:
            try:
                self.store.insert_alert(
                    (
                        alert.run,
                        alert.layer,
                        alert.step,
                        alert.kind,
                        alert.severity,
                        _sql_num(alert.angle),
                        _sql_num(alert.baseline),
                        alert.time,
                        alert.message,
                        _sql_num(alert.loss_before),
                        _sql_num(alert.loss_after),
                    ),
                )
            except RuntimeError:  # store closed during shutdown
                pass
        self._notify(alert)
        for p in self.pushers:
            p.fire(alert, hold=hold)
        log.warning(
            "alert %s%s/%s run=%s layer=%s step=%d: %s",
            "update of " if update else "",
            alert.kind,
            alert.severity,
            alert.run,
            alert.layer or "-",
            alert.step,
            alert.message,
        )

    def _notify(self, alert: pb.Alert) -> None:
        """Send an alert to the WatchAlerts streams that follow its run."""
        for w in list(self.watchers):
            if w.run and w.run != alert.run:
                continue
            if w.queue.qsize() >= WATCH_QUEUE:  # a stuck client must not hold memory forever
                w.overflowed = True
                self.watchers.discard(w)
                w.queue.put_nowait(None)
            else:
                w.queue.put_nowait(alert)

    def resolve(self, run: str, layer: str, kind: str) -> None:
        """End a held alert in Alertmanager (e.g. a stalled run reports again)."""
        for p in self.pushers:
            p.resolve(run, layer, kind)

    def suppressed(self, run: str, n: int = 1) -> None:
        """Count ``n`` alerts of ``run`` the rate limit kept from being recorded."""
        with self._lock:
            self._suppressed[run] += n

    # ------------------------------------------------------------ read
    def list(self, run: str = "", limit: int = 0, since: float = 0.0) -> list[pb.Alert]:
        """Kept alerts, oldest first: of ``run`` (or all), time >= ``since``, the newest ``limit`` (0 = all)."""
        if run:
            source: Iterable[pb.Alert] = self.recent.get(run, ())
            items = [a for a in source if a.time >= since]
        else:
            items = [a for dq in self.recent.values() for a in dq if a.time >= since]
            items.sort(key=lambda a: a.time)
        if limit:
            items = items[-limit:]
        return items

    async def watch(self, run: str = "", limit: int = 0, since: float = 0.0) -> AsyncIterator[pb.Alert]:
        """The newest ``limit`` kept alerts with time >= ``since`` (none when limit is 0), then every new one."""
        w = _Watcher(run)
        # Subscribe and snapshot with no await in between (one loop thread): no gap, no duplicate.
        self.watchers.add(w)
        backlog = self.list(run, limit, since) if limit else []
        try:
            for a in backlog:
                yield a
            while True:
                new = await w.queue.get()
                if new is None:
                    raise OverflowError(
                        f"this WatchAlerts stream fell more than {WATCH_QUEUE} alerts behind and was closed"
                    )
                yield new
        finally:
            self.watchers.discard(w)

    # ------------------------------------------------------------ metrics
    def metric_families(self, runs: Iterable[str] | None = None) -> Iterator[Metric]:
        """``layrot_alerts_total{run,layer,kind,severity}`` and the engine's own counters."""
        keep = None if runs is None else set(runs)
        with self._lock:
            counts = sorted(self._counts.items())
            suppressed = sorted(self._suppressed.items())
        fam = CounterMetricFamily(
            "layrot_alerts",
            "Alerts raised by the collector's alert engine",
            labels=["run", "layer", "kind", "severity"],
        )
        for (run, layer, kind, severity), n in counts:
            if keep is None or run in keep:
                fam.add_metric([run, layer, kind, severity], n)
        yield fam
        sup = CounterMetricFamily(
            "layrot_alerts_suppressed",
            f"Abrupt-rotation alerts not recorded: over the per-run rate limit"
            f" ({ALERT_BURST} burst, {ALERT_REFILL_PER_S:g}/s)",
            labels=["run"],
        )
        for run, n in suppressed:
            if keep is None or run in keep:
                sup.add_metric([run], n)
        yield sup
        yield CounterMetricFamily(
            "layrot_alert_engine_errors",
            "Batches the alert engine failed on (logged; ingest went on)",
            value=self.engine_errors,
        )
        if self.pushers:
            sent = CounterMetricFamily(
                "layrot_alertmanager_posts", "Successful POSTs to Alertmanager", labels=["alertmanager"]
            )
            errors = CounterMetricFamily(
                "layrot_alertmanager_post_errors",
                "Failed POSTs to Alertmanager (retried with backoff)",
                labels=["alertmanager"],
            )
            dropped = CounterMetricFamily(
                "layrot_alertmanager_dropped",
                "Alert updates dropped: pusher queue full or Alertmanager refused them",
                labels=["alertmanager"],
            )
            active = GaugeMetricFamily(
                "layrot_alertmanager_active", "Alerts the pusher keeps firing", labels=["alertmanager"]
            )
            for p in self.pushers:
                s = p.stats()
                sent.add_metric([p.url], s["posts"])
                errors.add_metric([p.url], s["errors"])
                dropped.add_metric([p.url], s["dropped"])
                active.add_metric([p.url], s["active"])
            yield from (sent, errors, dropped, active)


def event_alert(**fields: Any) -> pb.Alert:
    """An alert about an event rather than one angle: angle, baseline and losses are NaN unless given."""
    for name in ("angle", "baseline", "loss_before", "loss_after"):
        fields.setdefault(name, math.nan)
    return pb.Alert(**fields)
