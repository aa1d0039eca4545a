"""History retention: delete old history, downsample older steps, reclaim space (``serve --retention``).

One pass (``Retention.run_once``), run by its own thread every ``interval`` seconds
and by ``compact``:

* ``retention`` seconds: a run whose newest report (``runs.last_seen``, else its
  creation) is older goes entirely (``delete_run``); of the others, every step
  reported before now - retention is deleted, for all ranks.
* ``downsample_after`` seconds and ``downsample_every`` k: of the steps reported
  before now - downsample_after, only multiples of k are kept (the newest
  steps stay whole; alerts keep their own table, so an alert's step is still
  named there even when its row is downsampled away).

Every delete is one bounded transaction (``batch_steps`` steps of a run) queued
through the store's writer like ingest's items, and the pass waits for each
before the next: ingest's items interleave, nothing holds the writer for long.
The pass never runs on the event loop. ``deleted_steps`` / ``deleted_runs``
count what it removed (layrot_history_deleted_steps_total, ..._runs_total).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DAY = 86400.0


def parse_age(text: str) -> float:
    """'90d', '12h', '30m', '45s' or plain seconds, as seconds; ValueError otherwise."""
    t = text.strip().lower()
    units = {"d": DAY, "h": 3600.0, "m": 60.0, "s": 1.0}
    mult = units.get(t[-1:], None)
    value = float(t[:-1] if mult is not None else t)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"an age must be a positive number of seconds or e.g. 90d, 12h: {text!r}")
    return value * (mult or 1.0)


@dataclass
class RetentionPolicy:
    """What to keep. None / 0: that part is off."""

    retention: float | None = None  # seconds
    downsample_after: float | None = None  # seconds
    downsample_every: int = 0

    @property
    def active(self) -> bool:
        """True when a pass would delete anything at all."""
        return bool(self.retention) or bool(self.downsample_after and self.downsample_every > 1)


class Retention:
    """Runs the policy against a store: ``run_once`` now, or ``start`` a thread every ``interval`` seconds.

    ``on_run_deleted(run_id, run)`` is called after a whole run was deleted (the collector
    forgets it in memory).
    """

    def __init__(
        self,
        store: Any,
        policy: RetentionPolicy,
        interval: float = 3600.0,
        batch_steps: int = 1000,
        clock: Callable[[], float] = time.time,
        on_run_deleted: Callable[[int, str], None] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.interval = float(interval)
        self.batch_steps = max(1, int(batch_steps))
        self.clock = clock
        self.on_run_deleted = on_run_deleted
        self.deleted_steps = 0
        self.deleted_runs = 0
        self.passes = 0
        self._downsampled: dict[int, int] = {}  # run id -> highest step downsampled already (this process)
        self._lock = threading.Lock()  # one pass at a time (the thread's and compact's)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ one pass
    def run_once(self, now: float | None = None) -> dict[str, int]:
        """One pass of the policy; what it deleted: {"steps": n, "runs": n}."""
        with self._lock:
            now = self.clock() if now is None else now
            steps = runs = 0
            p = self.policy
            for run_id, run, last_seen, created in self.store.run_ages():
                if self._stop.is_set():
                    break
                newest = last_seen if last_seen is not None else created
                if p.retention and newest is not None and newest < now - p.retention:
                    n = self.store.delete_run(run_id, run)
                    steps += n
                    runs += 1
                    self._downsampled.pop(run_id, None)
                    log.info("retention: run %s deleted (last report %.0f s ago, %d steps)", run, now - newest, n)
                    if self.on_run_deleted is not None:
                        self.on_run_deleted(run_id, run)
                    continue
                if p.retention:
                    steps += self._delete_span(run_id, now - p.retention, 0)
                if p.downsample_after and p.downsample_every > 1:
                    steps += self._delete_span(run_id, now - p.downsample_after, p.downsample_every)
            self.deleted_steps += steps
            self.deleted_runs += runs
            self.passes += 1
            return {"steps": steps, "runs": runs}

    def _delete_span(self, run_id: int, before: float, every: int) -> int:
        span = self.store.step_span_before(run_id, before)
        if span is None:
            return 0
        lo, hi = span
        if every:
            lo = max(lo, self._downsampled.get(run_id, lo - 1) + 1)
        n = 0
        while lo <= hi and not self._stop.is_set():
            top = min(hi, lo + self.batch_steps - 1)
            n += self.store.delete_steps(run_id, lo, top, every)
            lo = top + 1
            if every:
                self._downsampled[run_id] = top
        return n

    def compact(self) -> dict[str, int]:
        """A pass now, orphan samples removed, then the space reclaimed (SQLite VACUUM, PostgreSQL VACUUM)."""
        out = self.run_once() if self.policy.active else {"steps": 0, "runs": 0}
        with self._lock:
            orphans = sum(self.store.delete_orphan_samples(run_id) for run_id, *_ in self.store.run_ages())
            self.store.reclaim()
        out["orphan_samples"] = orphans
        return out

    # ------------------------------------------------------------ the thread
    def start(self) -> None:
        """Run a pass every ``interval`` seconds on a thread of its own (the first one now)."""
        if self._thread is not None or not self.policy.active:
            return
        self._thread = threading.Thread(target=self._loop, name="layrot-retention", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a failed pass (a lost database): the next one retries
                log.exception("retention pass failed")
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (a pass in progress stops after its current batch)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
