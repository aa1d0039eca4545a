"""The ``run_lost`` alert: a job's session ended without ``Goodbye`` and the job did not come back.

A training process that closes its handle says ``Goodbye`` before its stream
ends. A stream that ends without one means the process was killed (SIGKILL,
OOM killer, a preempted node), its host went away, or the network between
them broke. A reporter whose link broke reconnects by itself within seconds,
so the alert waits ``grace`` seconds (``serve --lost-grace``, 60 by default):
if a live session of the same run and rank says Hello within the grace
period, nothing is raised. Otherwise one ``run_lost`` alert (warning) per run
names the lost ranks and their last stored step; it is held (firing in
Alertmanager) until every lost rank of the run is back, then resolved.

Sessions the collector ended itself (a refused Hello, a shutdown) and replay
sessions (``layrot-agent sync``) never count as lost. What is pending or
firing lives in memory only: after a collector restart every job reconnects
anyway, and one that does not is no longer known to have been connected.

Ingest (server/ingest.py) reports session ends and Hellos (``on_lost``,
``on_hello``); the engine's timer (server/alerts.py) calls ``check``. All of it
runs on the collector's asyncio loop thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from layrot.server.alert_hub import AlertHub, event_alert

log = logging.getLogger(__name__)

KIND = "run_lost"
DEFAULT_GRACE = 60.0


@dataclass
class _Lost:
    """A lost rank of a run: when its grace ends, and what the alert says about it."""

    due: float  # collector monotonic time
    step: int
    peer: str
    host: str
    pid: int


@dataclass
class _RunLost:
    """The lost ranks of one run; ``firing`` once the alert is raised (and until every rank is back)."""

    ranks: dict[int, _Lost] = field(default_factory=dict)
    firing: bool = False


class LostSessions:
    """Sessions that ended without Goodbye, raised as ``run_lost`` after ``grace`` seconds unless the job is back."""

    def __init__(
        self,
        hub: AlertHub,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        grace: float = DEFAULT_GRACE,
    ) -> None:
        if not (math.isfinite(grace) and grace >= 0.0):
            raise ValueError(f"lost grace must be finite seconds >= 0, got {grace!r}")
        self.hub = hub
        self.clock = clock
        self.monotonic = monotonic
        self.grace = float(grace)
        self.runs: dict[str, _RunLost] = {}
        self.raised = 0  # alerts raised (also in layrot_alerts_total{kind="run_lost"})

    # ------------------------------------------------------------ from ingest
    def on_lost(self, run: str, rank: int, step: int, peer: str = "", host: str = "", pid: int = 0) -> None:
        """A live session of (run, rank) ended without Goodbye: start its grace period."""
        rl = self.runs.setdefault(run, _RunLost())
        if rank not in rl.ranks:
            rl.ranks[rank] = _Lost(self.monotonic() + self.grace, step, peer, host, pid)

    def on_hello(self, run: str, rank: int) -> None:
        """A live session of (run, rank) said Hello: that rank is back; resolve once every lost rank is."""
        rl = self.runs.get(run)
        if rl is None or rank not in rl.ranks:
            return
        del rl.ranks[rank]
        if rl.ranks:
            return
        del self.runs[run]
        if rl.firing:
            log.info("run %s: every lost rank is back, run_lost resolved", run)
            self.hub.resolve(run, "", KIND)

    # ------------------------------------------------------------ timer
    def check(self, now_m: float | None = None) -> None:
        """Raise the alert of every run with a rank whose grace period is over (one alert per run and episode)."""
        if not self.runs:
            return
        now_m = self.monotonic() if now_m is None else now_m
        for run, rl in list(self.runs.items()):
            if rl.firing:
                continue
            due = [r for r, lost in rl.ranks.items() if lost.due <= now_m]
            if due:
                rl.firing = True
                self._raise(run, rl, sorted(due))

    def _raise(self, run: str, rl: _RunLost, ranks: list[int]) -> None:
        first = rl.ranks[ranks[0]]
        who = ", ".join(
            f"rank {r} (pid {rl.ranks[r].pid} on {rl.ranks[r].host or '?'}, last stored step {rl.ranks[r].step})"
            for r in ranks[:8]
        )
        more = f" and {len(ranks) - 8} more ranks" if len(ranks) > 8 else ""
        self.raised += 1
        self.hub.publish(
            event_alert(
                run=run,
                layer="",
                step=max(rl.ranks[r].step for r in ranks),
                kind=KIND,
                severity="warning",
                time=self.clock(),
                message=(
                    f"the job's session ended without Goodbye and it has not come back for {self.grace:.0f} s:"
                    f" {who}{more} (killed, host gone or network lost; last peer {first.peer or '?'})"
                ),
            ),
            hold=True,
        )
