"""The collector's alert engine: abrupt single-step rotations, divergence, stalled runs, rejection bursts.

Why these alerts (Carbonnelle & De Vleeschouwer, Section 5.1, 5.3 and Figure 10):
a layer that rotates a large angle within ONE optimizer step, without the loss
improving, marks unstable training, the situation learning-rate warmups exist
to avoid. The engine flags, per layer and reported step, a step angle that is

* above an absolute limit ``abs_angle`` (default 0.3 rad, 17 deg), armed from
  the first step because the paper's abrupt rotations happen at the very
  beginning of training, or
* far above the layer's own robust recent baseline, once the run is past its
  warm-up (``warmup`` reported steps): ``angle > median + k * spread`` over the
  last ``window`` reported steps of that layer, where ``spread`` is the MAD
  scale ``1.4826 * MAD`` but never less than half the median. The floor matters
  for Layca, whose angles are constant (``arctan(rho_l)``, MAD = 0): there a
  layer must jump to ``1 + k/2`` times its usual angle (6x by default). Step
  decays only lower angles and never fire; SGD's large, fast-decaying first
  steps are covered by the warm-up.

and never below ``min_angle`` (0.01 rad: a step that small moves the cosine
distance by < 5e-5).

Why 0.3 rad: the paper's best Layca setting, rho(0) = 3^-3, turns every layer
by arctan(1/27) = 0.037 rad per step, and its training curves reach a cosine
distance near 1 (90 deg) over the whole run; 0.3 rad is 8x that rate, a
cosine distance of 0.045 in one step. On the digits MLP/CNN used in the tests,
normal SGD (lr 0.05..0.1, with or without momentum), Adam and Layca runs never
exceed 0.11 rad in a step, while plain SGD at lr 0.5 shows the paper's Figure
10 event: the output layer turns 0.52 rad in one step and the loss jumps from
0.89 to 2.34. The baseline rule's k = 10 was chosen on the same runs: their
largest angle/limit ratio after the warm-up is 0.6 (Layca 0.17). A rotation the job asked for is not abrupt: with Layca
the step angle is by construction ``arctan(rho_l)``, so an angle within 25 %
of that never fires (a controller raising the rate is not an instability).

Severity: "critical" when the loss did not improve across the jump, else
"warning". The loss a job reports with step t (``handle.observe_loss``) is
the loss of the forward pass that produced step t's gradient, i.e. measured at
w(t-1), before the jump. So the engine compares the median of the last 5
reported losses up to step t (``loss_before``) with the loss reported at the
next reported step (``loss_after``, the first one measured after the jump). It
waits for that step up to ``loss_wait`` seconds (0.5 s), then raises the alert
anyway ("warning", loss_after unknown). Runs that send no loss get "warning".

Cost: the hot path is a few vectorised numpy passes over each batch's
(steps x layers) angle array: a max over the steps, a per-layer comparison
with the cached limits, one ring write; the full (steps x layers) mask only
when some layer is over its limit, and over the per-run rate limit only its
count. The baseline (median and MAD per layer) is exact over a per-run ring
buffer (layers x window, float32) and recomputed with two row sorts every
``max(1, window // 10)`` reported steps: once per batch under load, at most ~5
steps stale for a slow job, which a 50-step median does not notice; a batch is
judged against the baseline as of its first step. Measured: ~0.1 ms per batch
of 100 steps x 200 layers (4 ns per layer-sample), 2.8 % of the collector's
CPU in benchmarks/ingest.py. Alternatives considered: a streaming quantile
estimate (cheaper but biased for the first hundred steps, which is when SGD's
angles move most) and exact per-step rolling medians (``window`` times dearer).
Non-finite angles (a diverged layer) enter the ring as the layer's median, so
they do not poison its baseline.

Abrupt rotations are evaluated on the run's lowest reporting rank only (data
parallel ranks hold the same weights); divergence on every rank. After a
collector restart each run re-warms its baseline.

Other kinds: "divergence" (critical) when a rank reports non-finite weights
(once per episode: re-armed after a fully finite batch); "stalled" (warning)
when a connected run reports nothing for ``max(stall_seconds, 5 x its usual
report interval)``, resolved when it reports again or disconnects; "rejections"
when the collector rejected >= 10 of the run's messages within 60 s (critical
if none of its batches was accepted in that window), re-armed after a quiet
minute.

Everything here runs on the collector's asyncio loop thread; the metrics thread
reads counters under a lock; Alertmanager pushes go through a queue to the
pusher's own thread (server/alertmanager.py), so nothing here waits on I/O.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from layrot.proto import layrot_pb2 as pb

log = logging.getLogger(__name__)

NAN = float("nan")

KINDS = ("abrupt_rotation", "divergence", "stalled", "rejections")
SEVERITIES = ("warning", "critical")

# The spread of a layer's baseline is at least this fraction of its median
# (Layca's constant angles have MAD = 0).
SPREAD_FLOOR = 0.5
# Normal-distribution consistency factor of the MAD.
MAD_SCALE = 1.4826
# An angle within this factor of the commanded Layca angle arctan(rho) is what the job asked for.
COMMANDED_TOLERANCE = 1.25
# Losses (per run) that make up loss_before.
LOSS_HISTORY = 5
# Rejection bursts: this many rejected messages of one run within REJECT_WINDOW seconds.
REJECT_BURST = 10
REJECT_WINDOW = 60.0
# A stalled run: silent for max(stall_seconds, STALL_INTERVALS x its usual report interval).
STALL_INTERVALS = 5.0
# Per-run rate limit of stored alerts (token bucket): a run whose every layer
# jumps at every step would otherwise flood the store. Excess is counted.
ALERT_BURST = 100
ALERT_REFILL_PER_S = 1.0
# Alerts kept in memory per run for ListAlerts / WatchAlerts (all are in the store).
KEEP_PER_RUN = 1000
# Baseline state of runs that left (disconnected and silent this long) is freed.
IDLE_FREE_SECONDS = 600.0
# A WatchAlerts subscriber this far behind is cut off.
WATCH_QUEUE = 10_000


# ---------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Thresholds:
    """Alert thresholds; the defaults are the collector's unless ``serve`` flags change them.

    abs_angle: radians; a step angle above it fires whatever the baseline
        (0.3 rad = 17 deg: 8x the per-step angle of the paper's best Layca
        setting, rho(0) = 3^-3 -> 0.037 rad; see module docstring).
    k: fire above median + k * spread of the layer's recent angles.
    window: reported steps in the per-layer baseline (rolling median / MAD).
    warmup: reported steps before the baseline rule arms.
    stall_seconds: a connected run silent this long is stalled (same as the
        15 min of the Prometheus rule LayrotRunStalled).
    min_angle: radians; the baseline rule never fires below this.
    ``math.inf`` disables abs_angle, k or stall_seconds.
    """

    abs_angle: float = 0.3
    k: float = 10.0
    window: int = 50
    warmup: int = 20
    stall_seconds: float = 900.0
    min_angle: float = 0.01

    def __post_init__(self) -> None:
        for name in ("abs_angle", "k", "stall_seconds"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not math.isnan(v) and v > 0):
                raise ValueError(f"{name} must be > 0 (inf disables it), got {v!r}")
        if not (isinstance(self.min_angle, (int, float)) and math.isfinite(self.min_angle) and self.min_angle >= 0):
            raise ValueError(f"min_angle must be a finite number >= 0, got {self.min_angle!r}")
        if not (isinstance(self.window, int) and 3 <= self.window <= 10_000):
            raise ValueError(f"window must be an integer in 3..10000, got {self.window!r}")
        if not (isinstance(self.warmup, int) and 1 <= self.warmup <= 10_000_000):
            raise ValueError(f"warmup must be an integer >= 1, got {self.warmup!r}")

    def to_pb(self) -> pb.Thresholds:
        """As the wire message."""
        return pb.Thresholds(**asdict(self))

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


_INT_FIELDS = {"window", "warmup"}
FIELDS = tuple(f.name for f in fields(Thresholds))


def apply_update(current: dict[str, Any], update: pb.Thresholds) -> dict[str, Any]:
    """Overrides after a SetThresholds request.

    Per field: 0 keeps the current value, a negative value (double fields)
    removes the override (back to the default), anything else sets it. Values
    are validated by building a ``Thresholds`` from them.
    """
    out = dict(current)
    for name in FIELDS:
        v = getattr(update, name)
        if isinstance(v, float) and math.isnan(v):
            raise ValueError(f"{name} must not be NaN")
        if v == 0:
            continue
        if v < 0:
            out.pop(name, None)
        else:
            out[name] = int(v) if name in _INT_FIELDS else float(v)
    return out


# ---------------------------------------------------------------- per-run state
class _Baseline:
    """Ring buffer of one rank's recent step angles (layers x window, float32) and its cached limits.

    Layers x window so that the sorts of ``refresh`` run along contiguous rows.
    """

    def __init__(self, rank: int, num_layers: int, window: int) -> None:
        self.rank = rank
        self.L = num_layers
        self.ring = np.zeros((num_layers, window), dtype=np.float32)
        self.pos = 0  # next column to write
        self.count = 0  # columns filled (<= window)
        self.reported = 0  # steps observed (warm-up counter)
        self.last_step = 0  # highest step observed (resent batches are not evaluated twice)
        self.stale = 0  # steps written since the limits were computed
        self.armed = False  # baseline rule armed when the limits were computed
        self.median = np.full(num_layers, np.nan)
        self.limit = np.full(num_layers, np.inf)  # fire when angle > limit (before the Layca exemption)
        self.valid = False
        self.losses: collections.deque[float] = collections.deque(maxlen=LOSS_HISTORY)

    @property
    def window(self) -> int:
        return self.ring.shape[1]

    def resize(self, window: int) -> None:
        """New window length: keep the newest columns."""
        if window == self.window:
            return
        cols = self.columns()
        keep = cols[:, -window:] if cols.shape[1] else cols
        self.ring = np.zeros((self.L, window), dtype=np.float32)
        n = keep.shape[1]
        self.ring[:, :n] = keep
        self.count = n
        self.pos = n % window
        self.valid = False

    def columns(self) -> np.ndarray:
        """Filled columns, oldest first."""
        if self.count < self.window:
            return self.ring[:, : self.count]
        return np.concatenate([self.ring[:, self.pos :], self.ring[:, : self.pos]], axis=1)

    def push(self, angles: np.ndarray) -> None:
        """Append (S, L) angles (non-finite already replaced)."""
        W = self.window
        S = angles.shape[0]
        if S >= W:
            self.ring[:] = angles[-W:].T
            self.pos = 0
            self.count = W
        else:
            end = self.pos + S
            if end <= W:
                self.ring[:, self.pos : end] = angles.T
            else:
                k = W - self.pos
                self.ring[:, self.pos :] = angles[:k].T
                self.ring[:, : S - k] = angles[k:].T
            self.pos = end % W
            self.count = min(W, self.count + S)
        self.stale += S

    def refresh(self, th: Thresholds) -> None:
        """Recompute median, spread and the per-layer limit from the ring (two row sorts, float32)."""
        n = self.count
        self.armed = self.reported >= th.warmup and n >= min(th.warmup, th.window, 3)
        lo, hi = (n - 1) // 2, n // 2
        if n:
            r = self.ring[:, :n]
            srt = np.sort(r, axis=1)
            med = 0.5 * (srt[:, lo].astype(np.float64) + srt[:, hi])
            self.median = med
        if self.armed and math.isfinite(th.k):
            dev = np.sort(np.abs(r - med.astype(np.float32)[:, None]), axis=1)
            mad = 0.5 * (dev[:, lo].astype(np.float64) + dev[:, hi])
            spread = np.maximum(MAD_SCALE * mad, SPREAD_FLOOR * med)
            limit = np.maximum(med + th.k * spread, th.min_angle)
            np.minimum(limit, th.abs_angle, out=limit)
            self.limit = limit
        else:
            self.limit = np.full(self.L, th.abs_angle)
        self.stale = 0
        self.valid = True


class _RunAlerts:
    """Everything the engine keeps for one run."""

    def __init__(self) -> None:
        self.baseline: _Baseline | None = None
        self.overrides: dict[str, Any] = {}
        self.thresholds: Thresholds | None = None  # cache of defaults + overrides
        self.pending: list[tuple[pb.Alert, float, float]] = []  # (alert, loss_before, deadline)
        self.diverged_ranks: set[int] = set()
        self.tokens = float(ALERT_BURST)
        self.tokens_at: float | None = None
        self.last_batch: float | None = None  # collector monotonic time of the newest batch
        self.connected_since: float | None = None  # first tick that saw it connected without batches
        self.interval = 0.0  # smoothed seconds between batches
        self.stalled = False
        self.reject_total = 0
        self.reject_reasons: collections.Counter[str] = collections.Counter()
        self.reject_events: collections.deque[tuple[float, int]] = collections.deque()
        self.rejecting = False
        self.last_step = 0

    def refill(self, now: float) -> float:
        """Tokens of the rate limit available now."""
        if self.tokens_at is not None:
            self.tokens = min(ALERT_BURST, self.tokens + max(0.0, now - self.tokens_at) * ALERT_REFILL_PER_S)
        self.tokens_at = now
        return self.tokens

    def take_tokens(self, now: float, n: int) -> int:
        """How many of ``n`` alerts the rate limit lets through now (they are taken)."""
        k = min(n, int(self.refill(now)))
        self.tokens -= k
        return k


# ---------------------------------------------------------------- the hub: records, counters, subscribers
class _Watcher:
    def __init__(self, run: str) -> None:
        self.run = run
        self.queue: asyncio.Queue[pb.Alert | None] = asyncio.Queue()
        self.overflowed = False


def _sql_num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pb_num(x: float | None) -> float:
    return NAN if x is None else float(x)


INSERT_ALERT = (
    "INSERT INTO alerts (run, layer, step, kind, severity, angle, baseline, time, message, loss_before,"
    " loss_after) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)


class AlertHub:
    """Where alerts go: memory (ListAlerts), the store, counters (/metrics), watchers, Alertmanager pushers."""

    def __init__(self, store: Any = None, pushers: Sequence[Any] = ()) -> None:
        self.store = store
        self.pushers = list(pushers)
        self.recent: dict[str, collections.deque[pb.Alert]] = {}
        self.watchers: set[_Watcher] = set()
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self.engine_errors = 0

    # ------------------------------------------------------------ restore
    def restore(self) -> None:
        """Load the newest alerts of every run and the counters from the store."""
        if self.store is None:
            return
        conn = self.store.reader()
        with self._lock:
            for run, layer, kind, severity, n in conn.execute(
                "SELECT run, COALESCE(layer, ''), kind, severity, COUNT(*) FROM alerts"
                " GROUP BY run, layer, kind, severity"
            ):
                self._counts[(run, layer, kind, severity)] = n
        runs = [r for (r,) in conn.execute("SELECT DISTINCT run FROM alerts")]
        for run in runs:
            rows = conn.execute(
                "SELECT run, layer, step, kind, severity, angle, baseline, time, message, loss_before, loss_after"
                " FROM alerts WHERE run=? ORDER BY id DESC LIMIT ?",
                (run, KEEP_PER_RUN),
            ).fetchall()
            dq = self.recent.setdefault(run, collections.deque(maxlen=KEEP_PER_RUN))
            for r in reversed(rows):
                dq.append(
                    pb.Alert(
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
                    )
                )
        if runs:
            log.info("restored alerts of %d runs", len(runs))

    # ------------------------------------------------------------ publish
    def publish(self, alert: pb.Alert, hold: bool = False) -> None:
        """Record an alert everywhere it goes. Loop thread. ``hold``: stays firing in Alertmanager until resolved."""
        self.recent.setdefault(alert.run, collections.deque(maxlen=KEEP_PER_RUN)).append(alert)
        key = (alert.run, alert.layer, alert.kind, alert.severity)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        if self.store is not None:
            try:
                self.store.submit(
                    INSERT_ALERT,
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
        for w in list(self.watchers):
            if w.run and w.run != alert.run:
                continue
            if w.queue.qsize() >= WATCH_QUEUE:  # a stuck client must not hold memory forever
                w.overflowed = True
                self.watchers.discard(w)
                w.queue.put_nowait(None)
            else:
                w.queue.put_nowait(alert)
        for p in self.pushers:
            p.fire(alert, hold=hold)
        log.warning(
            "alert %s/%s run=%s layer=%s step=%d: %s",
            alert.kind,
            alert.severity,
            alert.run,
            alert.layer or "-",
            alert.step,
            alert.message,
        )

    def resolve(self, run: str, layer: str, kind: str) -> None:
        """End a held alert in Alertmanager (e.g. a stalled run reports again)."""
        for p in self.pushers:
            p.resolve(run, layer, kind)

    def suppressed(self, run: str, n: int = 1) -> None:
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
                a = await w.queue.get()
                if a is None:
                    raise OverflowError(
                        f"this WatchAlerts stream fell more than {WATCH_QUEUE} alerts behind and was closed"
                    )
                yield a
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


# ---------------------------------------------------------------- the engine
def _deg(x: float) -> str:
    return f"{math.degrees(x):.3g} deg" if math.isfinite(x) else "unknown"


class AlertEngine:
    """Evaluates batches (``observe``) and time (``tick``) into alerts on a hub.

    ``enabled=False`` (``serve --no-alerts``) keeps the hub (stored alerts stay
    listable) but ingest does not call ``observe``.
    """

    def __init__(
        self,
        hub: AlertHub,
        defaults: Thresholds | None = None,
        enabled: bool = True,
        loss_wait: float = 0.5,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self.defaults = defaults or Thresholds()
        self.initial_defaults = self.defaults
        self.enabled = enabled
        self.loss_wait = loss_wait
        self.clock = clock
        self.monotonic = monotonic
        self.runs: dict[str, _RunAlerts] = {}
        self._pending_runs: set[str] = set()
        self._last_slow_tick = 0.0

    # ------------------------------------------------------------ thresholds
    def _run(self, name: str) -> _RunAlerts:
        ra = self.runs.get(name)
        if ra is None:
            ra = self.runs[name] = _RunAlerts()
        return ra

    def thresholds(self, run: str = "") -> Thresholds:
        """Effective thresholds of ``run`` (the defaults for "")."""
        if not run:
            return self.defaults
        ra = self.runs.get(run)
        if ra is None:
            return self.defaults
        if ra.thresholds is None:
            ra.thresholds = replace(self.defaults, **ra.overrides) if ra.overrides else self.defaults
        return ra.thresholds

    def set_thresholds(self, run: str, update: pb.Thresholds) -> Thresholds:
        """Apply a SetThresholds request (see ``apply_update``); returns the effective thresholds.

        ``run`` "" changes the collector defaults (until restart; negative
        fields go back to the ``serve`` flags). Raises ValueError on bad values.
        """
        if not run:
            base = {k: v for k, v in asdict(self.defaults).items() if v != getattr(self.initial_defaults, k)}
            new = apply_update(base, update)
            self.defaults = replace(self.initial_defaults, **new)
            for ra in self.runs.values():
                ra.thresholds = None
                if ra.baseline is not None:
                    ra.baseline.valid = False
            return self.defaults
        ra = self._run(run)
        new = apply_update(ra.overrides, update)
        # A value equal to the default is no override: the run follows later default changes.
        new = {k: v for k, v in new.items() if v != getattr(self.defaults, k)}
        Thresholds(**{**asdict(self.defaults), **new})  # validate before keeping anything
        ra.overrides = new
        ra.thresholds = None
        if ra.baseline is not None:
            ra.baseline.valid = False
        if self.hub.store is not None:
            self.hub.store.submit(
                "INSERT OR REPLACE INTO alert_thresholds (run, overrides, updated) VALUES (?,?,?)",
                (run, json.dumps(new, sort_keys=True), self.clock()),
            )
        return self.thresholds(run)

    def restore_thresholds(self) -> None:
        """Per-run overrides saved by SetThresholds (after a restart)."""
        if self.hub.store is None:
            return
        for run, text in self.hub.store.reader().execute("SELECT run, overrides FROM alert_thresholds"):
            try:
                overrides = {k: v for k, v in json.loads(text or "{}").items() if k in FIELDS}
                Thresholds(**{**asdict(self.defaults), **overrides})
            except (ValueError, TypeError) as exc:
                log.warning("ignoring stored thresholds of run %s: %s", run, exc)
                continue
            self._run(run).overrides = overrides

    # ------------------------------------------------------------ batches (hot path)
    def observe(
        self,
        rs: Any,
        rank: int,
        steps: np.ndarray,
        angle: np.ndarray,
        bad: np.ndarray,
        rho: np.ndarray | None,
        loss: Sequence[float],
    ) -> None:
        """One accepted StepBatch of ``rs`` (a RunState): steps (S,), angles and non-finite mask (S, L).

        Never raises: a failure is logged and counted, ingest goes on.
        """
        try:
            self._observe(rs, rank, steps, angle, bad, rho, loss)
        except Exception:
            self.hub.engine_errors += 1
            log.exception("alert engine failed on a batch of run %s (ingest unaffected)", getattr(rs, "run", "?"))

    def _observe(
        self,
        rs: Any,
        rank: int,
        steps: np.ndarray,
        angle: np.ndarray,
        bad: np.ndarray,
        rho: np.ndarray | None,
        loss: Sequence[float],
    ) -> None:
        run = rs.run
        ra = self._run(run)
        now_m = self.monotonic()
        if ra.last_batch is not None:
            dt = now_m - ra.last_batch
            ra.interval = dt if ra.interval == 0.0 else 0.8 * ra.interval + 0.2 * dt
        ra.last_batch = now_m
        if ra.stalled:
            ra.stalled = False
            self.hub.resolve(run, "", "stalled")

        any_bad = bool(bad.any())
        if any_bad:
            self._divergence(rs, ra, rank, steps, bad)
        elif rank in ra.diverged_ranks:
            ra.diverged_ranks.discard(rank)

        b = ra.baseline
        if b is not None and rank > b.rank:
            return  # abrupt rotations: lowest rank only
        th = self.thresholds(run)
        L = angle.shape[1]
        if b is None or rank < b.rank or b.L != L:
            b = ra.baseline = _Baseline(rank, L, th.window)
        elif b.window != th.window:
            b.resize(th.window)
        top = int(steps[-1]) if steps.shape[0] == 1 else int(steps.max())
        if top <= b.last_step:
            return  # a resent batch
        if int(steps.min()) <= b.last_step:
            keep = steps > b.last_step
            steps, angle, bad = steps[keep], angle[keep], bad[keep]
            rho = rho[keep] if rho is not None else None
            loss = [x for x, k in zip(loss, keep.tolist())] if len(loss) else loss
        b.last_step = top
        ra.last_step = max(ra.last_step, top)
        losses = np.asarray(loss, dtype=np.float64) if len(loss) else None

        if ra.pending:
            self._settle_pending(ra, losses)
        if not b.valid or b.stale >= max(1, th.window // 10) or (not b.armed and b.reported >= th.warmup):
            b.refresh(th)

        if any_bad:  # a diverged layer's NaN/Inf must not poison its baseline
            a = np.where(bad | np.isnan(angle), np.where(np.isfinite(b.median), b.median, 0.0), angle)
        else:
            a = angle
        # One reduction over the steps, then per-layer compares; the (steps x layers)
        # mask only when some layer is over its limit. NaN (a zero-norm layer) never is.
        peak = a[0] if a.shape[0] == 1 else a.max(axis=0)
        if (peak > b.limit).any():
            self._abrupt(rs, ra, b, th, steps, a, a > b.limit, rho, losses)
        b.push(a)
        b.reported += a.shape[0]
        if losses is not None:
            fin = losses[np.isfinite(losses)]
            if fin.size:
                b.losses.extend(fin[-LOSS_HISTORY:].tolist())

    # ------------------------------------------------------------ abrupt rotations (rare path)
    def _abrupt(
        self,
        rs: Any,
        ra: _RunAlerts,
        b: _Baseline,
        th: Thresholds,
        steps: np.ndarray,
        a: np.ndarray,
        hit: np.ndarray,
        rho: np.ndarray | None,
        losses: np.ndarray | None,
    ) -> None:
        if rho is None and ra.refill(self.monotonic()) < 1.0:
            # Over the rate limit: count, nothing else (a storm costs one count_nonzero).
            self.hub.suppressed(rs.run, int(np.count_nonzero(hit)))
            return
        rows, cols = np.nonzero(hit)
        if rho is not None:
            commanded = np.arctan(rho[rows, cols]) * COMMANDED_TOLERANCE
            keep = ~(a[rows, cols] <= commanded)  # NaN rho (layer outside Layca): not commanded
            rows, cols = rows[keep], cols[keep]
        now = self.clock()
        now_m = self.monotonic()
        # Rate limit before any per-alert work: a run whose every layer jumps at every
        # step costs one vectorised pass, not one Python iteration per layer.
        allowed = ra.take_tokens(now_m, int(rows.size))
        if allowed < rows.size:
            self.hub.suppressed(rs.run, int(rows.size) - allowed)
            rows, cols = rows[:allowed], cols[:allowed]
        S = a.shape[0]
        history = list(b.losses)
        for i, j in zip(rows.tolist(), cols.tolist()):
            angle = float(a[i, j])
            base = float(b.median[j]) if b.count else NAN
            by_abs = angle > th.abs_angle
            rule = (
                f"above the absolute limit {_deg(th.abs_angle)}"
                if by_abs
                else f"above its baseline limit {_deg(float(b.limit[j]))} (median {_deg(base)} over the last "
                f"{b.count} reported steps, k={th.k:g})"
            )
            alert = pb.Alert(
                run=rs.run,
                layer=rs.names[j] if j < len(rs.names) else f"#{j}",
                step=int(steps[i]),
                kind="abrupt_rotation",
                angle=angle,
                baseline=base,
                time=now,
                message=f"rotated {_deg(angle)} in one step, {rule}",
                loss_before=NAN,
                loss_after=NAN,
            )
            before = NAN
            if losses is not None:
                seen = history + [x for x in losses[: i + 1].tolist() if math.isfinite(x)]
                if seen:
                    before = float(np.median(seen[-LOSS_HISTORY:]))
            if not math.isfinite(before):
                self._emit_abrupt(alert, NAN, NAN)
            elif i + 1 < S:
                self._emit_abrupt(alert, before, float(losses[i + 1]))  # type: ignore[index]
            else:
                ra.pending.append((alert, before, now_m + self.loss_wait))
                self._pending_runs.add(rs.run)

    def _settle_pending(self, ra: _RunAlerts, losses: np.ndarray | None) -> None:
        after = float(losses[0]) if losses is not None and losses.size else NAN
        for alert, before, _ in ra.pending:
            self._emit_abrupt(alert, before, after)
        ra.pending.clear()

    def _emit_abrupt(self, alert: pb.Alert, before: float, after: float) -> None:
        alert.loss_before = before
        alert.loss_after = after
        if math.isfinite(before) and math.isfinite(after):
            worse = after >= before
            alert.severity = "critical" if worse else "warning"
            alert.message += f"; loss {before:.4g} -> {after:.4g} ({'no improvement' if worse else 'improved'})"
        else:
            alert.severity = "warning"
            alert.message += (
                "; loss unknown (call handle.observe_loss to grade severity)"
                if not math.isfinite(before)
                else "; loss after the step not reported in time"
            )
        self.hub.publish(alert)

    # ------------------------------------------------------------ divergence (rare path)
    def _divergence(self, rs: Any, ra: _RunAlerts, rank: int, steps: np.ndarray, bad: np.ndarray) -> None:
        if rank in ra.diverged_ranks:
            return
        already = bool(ra.diverged_ranks)
        ra.diverged_ranks.add(rank)
        if already:
            return  # another rank of this run already raised it
        row = int(np.argmax(bad.any(axis=1)))
        cols = np.nonzero(bad[row])[0]
        first = rs.names[int(cols[0])] if int(cols[0]) < len(rs.names) else f"#{int(cols[0])}"
        self.hub.publish(
            pb.Alert(
                run=rs.run,
                layer=first,
                step=int(steps[row]),
                kind="divergence",
                severity="critical",
                angle=NAN,
                baseline=NAN,
                time=self.clock(),
                loss_before=NAN,
                loss_after=NAN,
                message=(
                    f"non-finite weights (NaN/Inf) in {cols.size} of {bad.shape[1]} layers at step "
                    f"{int(steps[row])} (rank {rank}), first {first}: the run diverged"
                ),
            )
        )

    # ------------------------------------------------------------ time
    def tick(self, state: Any) -> None:
        """Timer work (loop thread, ~every 0.2 s): late losses, stalled runs, rejection bursts, idle state."""
        try:
            self._tick(state)
        except Exception:
            self.hub.engine_errors += 1
            log.exception("alert engine timer failed")

    def _tick(self, state: Any) -> None:
        now_m = self.monotonic()
        if self._pending_runs:
            for run in list(self._pending_runs):
                ra = self.runs.get(run)
                if ra is None or not ra.pending:
                    self._pending_runs.discard(run)
                    continue
                if ra.pending[0][2] <= now_m:
                    self._settle_pending(ra, None)
                    self._pending_runs.discard(run)
        if not self.enabled or now_m - self._last_slow_tick < 1.0:
            return
        self._last_slow_tick = now_m
        for rs in state.snapshot_runs():
            self._check_stalled(rs, now_m)
            self._check_rejections(rs, now_m)

    def _check_stalled(self, rs: Any, now_m: float) -> None:
        ra = self.runs.get(rs.run)
        if not rs.connected:
            if ra is not None:
                ra.connected_since = None
                if ra.stalled:
                    ra.stalled = False
                    self.hub.resolve(rs.run, "", "stalled")
                if ra.baseline is not None and ra.last_batch is not None and now_m - ra.last_batch > IDLE_FREE_SECONDS:
                    ra.baseline = None  # free the ring; a returning run re-warms
            return
        ra = self._run(rs.run)
        if ra.last_batch is None and ra.connected_since is None:
            ra.connected_since = now_m
        ref = ra.last_batch if ra.last_batch is not None else ra.connected_since
        th = self.thresholds(rs.run)
        limit = max(th.stall_seconds, STALL_INTERVALS * ra.interval)
        silent = now_m - ref  # type: ignore[operator]
        if silent > limit and not ra.stalled:
            ra.stalled = True
            snap = rs.primary()
            step = snap.step if snap is not None else 0
            self.hub.publish(
                pb.Alert(
                    run=rs.run,
                    layer="",
                    step=step,
                    kind="stalled",
                    severity="warning",
                    angle=NAN,
                    baseline=NAN,
                    time=self.clock(),
                    loss_before=NAN,
                    loss_after=NAN,
                    message=(f"connected but no report for {silent:.0f} s (limit {limit:.0f} s); last step {step}"),
                ),
                hold=True,
            )

    def _check_rejections(self, rs: Any, now_m: float) -> None:
        total = sum(rs.rejected.values())
        ra = self.runs.get(rs.run)
        if ra is None:
            if total == 0:
                return
            ra = self._run(rs.run)
        if total > ra.reject_total:
            ra.reject_events.append((now_m, total - ra.reject_total))
        ra.reject_total = total
        while ra.reject_events and ra.reject_events[0][0] < now_m - REJECT_WINDOW:
            ra.reject_events.popleft()
        recent = sum(n for _, n in ra.reject_events)
        if recent == 0:
            ra.rejecting = False
            ra.reject_reasons = collections.Counter(rs.rejected)
            return
        if ra.rejecting or recent < REJECT_BURST:
            return
        ra.rejecting = True
        reasons = collections.Counter(rs.rejected)
        reasons.subtract(ra.reject_reasons)
        ra.reject_reasons = collections.Counter(rs.rejected)
        text = ", ".join(f"{k}: {v}" for k, v in reasons.most_common() if v > 0) or "unknown"
        accepted = ra.last_batch is not None and ra.last_batch >= now_m - REJECT_WINDOW
        self.hub.publish(
            pb.Alert(
                run=rs.run,
                layer="",
                step=ra.last_step,
                kind="rejections",
                severity="warning" if accepted else "critical",
                angle=NAN,
                baseline=NAN,
                time=self.clock(),
                loss_before=NAN,
                loss_after=NAN,
                message=(
                    f"{recent} messages rejected in the last {REJECT_WINDOW:.0f} s ({text})"
                    + ("" if accepted else "; no batch accepted in that time")
                ),
            )
        )

    async def run_timer(self, state: Any, period: float = 0.2) -> None:
        """Call ``tick`` every ``period`` seconds until cancelled."""
        while True:
            await asyncio.sleep(period)
            self.tick(state)
