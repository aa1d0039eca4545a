"""The collector's alert engine: batches and time in, alerts out.

``AlertEngine`` owns the per-run state (``RunTable`` of ``RunAlerts``) and the
thresholds (server/alert_thresholds.py: defaults plus per-run overrides), and
feeds each accepted batch (``observe``, called by ingest) and each timer tick
(``tick``) to the detectors of server/alert_detectors.py (abrupt rotations,
divergence, not learning, stalled runs, rejection bursts; why and how they decide is in
that module). Detectors publish on the ``AlertHub`` (server/alert_hub.py):
memory, store, counters, watchers, Alertmanager.

Everything here runs on the collector's asyncio loop thread; the metrics thread
reads counters under a lock; Alertmanager pushes go through a queue to the
pusher's own thread (server/alertmanager.py), so nothing here waits on I/O.

The names that used to live here (``Thresholds``, ``AlertHub``, the constants)
are re-exported, so ``from layrot.server.alerts import AlertEngine, AlertHub,
Thresholds`` keeps working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

import numpy as np

from layrot.proto import layrot_pb2 as pb
from layrot.server.alert_detectors import (
    COMMANDED_TOLERANCE,
    IDLE_FREE_SECONDS,
    KINDS,
    LOSS_HISTORY,
    MAD_SCALE,
    REJECT_BURST,
    REJECT_WINDOW,
    SEVERITIES,
    SPREAD_FLOOR,
    STALL_INTERVALS,
    AbruptRotations,
    Baseline,
    Divergence,
    NotLearning,
    RejectionBursts,
    RunAlerts,
    RunTable,
    Stalls,
)
from layrot.server.alert_hub import ALERT_BURST, ALERT_REFILL_PER_S, KEEP_PER_RUN, WATCH_QUEUE, AlertHub
from layrot.server.alert_lost import DEFAULT_GRACE, LostSessions
from layrot.server.alert_thresholds import FIELDS, Thresholds, apply_update

if TYPE_CHECKING:
    from layrot.server.state import CollectorState, RunState

log = logging.getLogger(__name__)

# Old private names, kept importable.
_Baseline = Baseline
_RunAlerts = RunAlerts


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
        lost_grace: float = DEFAULT_GRACE,
    ) -> None:
        self.hub = hub
        self.defaults = defaults or Thresholds()
        self.initial_defaults = self.defaults
        self.enabled = enabled
        self.clock = clock
        self.monotonic = monotonic
        self.runs = RunTable()
        self.abrupt = AbruptRotations(hub, clock, monotonic, loss_wait)
        self.divergence = Divergence(hub, clock)
        self.not_learning = NotLearning(hub, clock)
        self.stalls = Stalls(hub, clock, self.runs, self.thresholds)
        self.rejections = RejectionBursts(hub, clock, self.runs)
        self.lost = LostSessions(hub, clock, monotonic, lost_grace)  # run_lost (server/alert_lost.py)
        self._last_slow_tick = 0.0

    @property
    def loss_wait(self) -> float:
        """Seconds an abrupt-rotation alert waits for the loss after its step."""
        return self.abrupt.loss_wait

    # ------------------------------------------------------------ thresholds
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
        ra = self.runs.get_or_add(run)
        new = apply_update(ra.overrides, update)
        # A value equal to the default is no override: the run follows later default changes.
        new = {k: v for k, v in new.items() if v != getattr(self.defaults, k)}
        Thresholds(**{**asdict(self.defaults), **new})  # validate before keeping anything
        ra.overrides = new
        ra.thresholds = None
        if ra.baseline is not None:
            ra.baseline.valid = False
        if self.hub.store is not None:
            self.hub.store.save_thresholds(run, json.dumps(new, sort_keys=True), self.clock())
        return self.thresholds(run)

    def restore_thresholds(self) -> None:
        """Per-run overrides saved by SetThresholds (after a restart)."""
        if self.hub.store is None:
            return
        for run, text in self.hub.store.load_thresholds():
            try:
                overrides = {k: v for k, v in json.loads(text or "{}").items() if k in FIELDS}
                Thresholds(**{**asdict(self.defaults), **overrides})
            except (ValueError, TypeError) as exc:
                log.warning("ignoring stored thresholds of run %s: %s", run, exc)
                continue
            self.runs.get_or_add(run).overrides = overrides

    # ------------------------------------------------------------ batches (hot path)
    def observe(
        self,
        rs: RunState,
        rank: int,
        steps: np.ndarray,
        angle: np.ndarray,
        bad: np.ndarray,
        rho: np.ndarray | None,
        loss: Sequence[float],
        rotation: np.ndarray | None = None,
    ) -> None:
        """One accepted StepBatch of ``rs``: steps (S,), angles, non-finite mask and cosine distances to w(0) (S, L).

        Never raises: a failure is logged and counted, ingest goes on.
        """
        try:
            run = rs.run
            ra = self.runs.get_or_add(run)
            self.stalls.on_batch(run, ra, self.monotonic())
            any_bad = bool(bad.any())
            self.divergence.observe(rs, ra, rank, steps, bad, any_bad)
            th = self.thresholds(run)
            self.abrupt.observe(rs, ra, th, rank, steps, angle, bad, any_bad, rho, loss)
            if len(loss):
                self.not_learning.observe(rs, ra, th, rank, steps, loss, angle, rotation)
        except Exception:
            self.hub.engine_errors += 1
            log.exception("alert engine failed on a batch of run %s (ingest unaffected)", getattr(rs, "run", "?"))

    # ------------------------------------------------------------ time
    def tick(self, state: CollectorState) -> None:
        """Timer work (loop thread, ~every 0.2 s): late losses, stalled runs, rejection bursts, idle state."""
        try:
            self._tick(state)
        except Exception:
            self.hub.engine_errors += 1
            log.exception("alert engine timer failed")

    def _tick(self, state: CollectorState) -> None:
        now_m = self.monotonic()
        if self.abrupt.pending_runs:
            self.abrupt.settle_due(self.runs, now_m)
        if not self.enabled or now_m - self._last_slow_tick < 1.0:
            return
        self._last_slow_tick = now_m
        self.lost.check(now_m)
        for rs in state.snapshot_runs():
            self.stalls.check(rs, now_m)
            self.rejections.check(rs, now_m)

    async def run_timer(self, state: CollectorState, period: float = 0.2) -> None:
        """Call ``tick`` every ``period`` seconds until cancelled."""
        while True:
            await asyncio.sleep(period)
            self.tick(state)


__all__ = [
    "ALERT_BURST",
    "ALERT_REFILL_PER_S",
    "COMMANDED_TOLERANCE",
    "FIELDS",
    "IDLE_FREE_SECONDS",
    "KEEP_PER_RUN",
    "KINDS",
    "LOSS_HISTORY",
    "MAD_SCALE",
    "REJECT_BURST",
    "REJECT_WINDOW",
    "SEVERITIES",
    "SPREAD_FLOOR",
    "STALL_INTERVALS",
    "WATCH_QUEUE",
    "AlertEngine",
    "AlertHub",
    "RunAlerts",
    "Thresholds",
    "apply_update",
]
