"""Several collectors on one PostgreSQL history: who holds which run, and what the others made and changed.

Jobs reach one of several collectors (nginx hashing on ``x-layrot-run``, or
``LAYROT_COLLECTOR=a:50051,b:50051``); the collectors share nothing but the
database. Each runs a ``Cluster`` on its loop that, every ``interval`` seconds:

1. writes its **heartbeat** (``collectors``: its id, now), and a ``holders``
   row (run, this collector, open sessions, now) for every run whose count of
   sessions here changed since the previous pass (0 when the last one closed);
2. reads the holder rows and decides, per run, which collector **exports** it:
   the lowest collector id among those holding sessions of it with a fresh
   heartbeat, else the collector that held it last. Only that one puts the
   run in ``/metrics`` (``RunState.held_elsewhere`` on the others), so a
   Prometheus scraping every collector sees each run once;
3. learns the runs other collectors **created** (the ``runs`` ids it does not
   know) and forgets those another collector deleted, so ``runs`` / ``show`` /
   ``history`` on any collector see every run of the database;
4. refreshes the newest values of runs **fed elsewhere** (their
   ``last_seen`` moved since the previous pass);
5. picks up **commands** stored by another collector (``control set`` sent
   there) for the runs it holds and pushes them to their jobs, as if set here;
6. takes the **alerts** the others raised for the runs they hold into its own
   list and alert streams (``alerts``, the web view); only the collector that
   raised an alert counts, stores and pushes it to Alertmanager.

Run ids come from a database sequence (``HistoryStore.allocate_run_id``), and
a run created by two collectors at once is created once (the ``runs.run``
unique key): the loser joins the stored run (server/ingest.py).

All database calls run on the executor, never on the loop; the loop applies
their results. A database that does not answer costs a pass (logged, counted),
not the ingest loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from layrot.server.alert_hub import KEEP_PER_RUN
from layrot.server.control import ControlPlane, StoredControl
from layrot.server.state import CollectorState, RunState
from layrot.server.store_api import HistoryStore, RunRecord, StoreError

log = logging.getLogger(__name__)

# Seconds between passes; a holder whose heartbeat is older than STALE_BEATS passes (plus a second) is gone.
DEFAULT_INTERVAL = 2.0
STALE_BEATS = 3


def default_collector_id(grpc_port: int) -> str:
    """``LAYROT_COLLECTOR_ID``, else ``hostname:port`` (a pod's name under Kubernetes): unique per collector."""
    return os.environ.get("LAYROT_COLLECTOR_ID") or f"{socket.gethostname()}:{grpc_port}"


@dataclass
class _Read:
    """What one pass read from the database (on the executor)."""

    known: set[int]  # run ids in this collector's state when the pass began
    ids: set[int]
    holders: list[tuple[int, str, int, float, bool]]
    new_runs: list[RunRecord]
    fed: list[RunRecord]
    versions: dict[int, int]
    commands: list[tuple[int, int, bytes]] = field(default_factory=list)
    control: StoredControl | None = None  # of ``new_runs``
    alerts: dict[str, list[tuple]] = field(default_factory=dict)  # run -> its alerts stored since, oldest first


class Cluster:
    """This collector's part in a set of collectors on one database (see the module docstring)."""

    def __init__(
        self,
        state: CollectorState,
        store: HistoryStore,
        control: ControlPlane,
        collector_id: str,
        interval: float = DEFAULT_INTERVAL,
        run_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.store = store
        self.control = control
        self.collector_id = collector_id
        self.interval = float(interval)
        self.stale = STALE_BEATS * self.interval + 1.0
        self.run_ttl = run_ttl
        self.clock = clock
        self.passes = 0
        self.errors = 0
        self._held: dict[int, int] = {}  # run_id -> sessions told in the previous heartbeat
        self._seen_since = 0.0  # last_seen of runs fed elsewhere: read those at or after it
        self._alert_id: int | None = None  # newest alert id read (None: not yet: take the newest as the start)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------ lifecycle (loop thread)
    def start(self) -> None:
        """Start the passes on the running loop (the first one at once)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="layrot-cluster")

    async def stop(self) -> None:
        """Stop the passes; the last heartbeat tells the others this collector let its runs go."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        released = dict.fromkeys(self._held, 0)
        if released:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, self.store.heartbeat, self.collector_id, released, self.clock()
                )
            except (StoreError, OSError):
                log.warning("cluster: could not release %d runs at shutdown; they go stale instead", len(released))

    def poke(self) -> None:
        """Run the next pass now (a session opened or closed: tell the others soon)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a lost database, a bug: this pass is lost, the collector goes on
                self.errors += 1
                log.warning("cluster: pass failed (%d so far)", self.errors, exc_info=True)
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    # ------------------------------------------------------------ one pass
    async def sync(self) -> None:
        """One pass: heartbeat, holders, runs made / fed / deleted elsewhere, commands set elsewhere."""
        loop = asyncio.get_running_loop()
        now = self.clock()
        runs = self.state.snapshot_runs()
        held = {rs.run_id: len(rs.sessions) for rs in runs if rs.sessions}
        start = self.passes == 0  # a restart: sessions this collector had before it are gone
        beat = {r: n for r, n in held.items() if start or self._held.get(r) != n}
        for run_id in self._held:
            if run_id not in held:
                beat[run_id] = 0  # released since the previous pass: said once
        known = {rs.run_id for rs in runs}
        local = {rs.run for rs in runs if rs.sessions}  # their alerts are raised here
        # The version each held run runs now: a higher stored one was set through another collector.
        have = {rs.run_id: rs.control.current.version if rs.control.current else 0 for rs in runs if rs.sessions}
        read = await loop.run_in_executor(None, self._read, beat, now, known, have, local, start)
        self._held = held
        self._apply(read, now)
        self.passes += 1

    def _read(
        self,
        beat: dict[int, int],
        now: float,
        known: set[int],
        have: dict[int, int],
        local: set[str],
        start: bool,
    ) -> _Read:
        """The database side of a pass (executor thread)."""
        store = self.store
        store.heartbeat(self.collector_id, beat, now, start=start)
        holders = store.holders(now - max(self.run_ttl, self.stale), now - self.stale)
        ids = set(store.run_ids())
        new = sorted(ids - known)
        new_runs = store.load_runs(run_ids=new) if new else []
        control = self.control.read_stored(new, new) if new else None
        since = self._seen_since
        fed_ids = [r for r in store.runs_seen_since(since) if r in known and r not in have]
        fed = store.load_runs(run_ids=fed_ids) if fed_ids else []
        versions = store.command_versions(sorted(have)) if have else {}
        out = _Read(known, ids, holders, new_runs, fed, versions, control=control)
        wanted = [r for r, v in versions.items() if v > have.get(r, 0)]
        if wanted:
            out.commands = store.current_commands(wanted)
        if self.state.alerts is not None:
            # Restored at start: only alerts stored after the first pass are news, read once each.
            if self._alert_id is None:
                ((self._alert_id,),) = store.alerts_after(-1, 0)
            else:
                for row in store.alerts_after(self._alert_id, KEEP_PER_RUN):
                    self._alert_id = int(row[0])
                    if row[1] not in local:
                        out.alerts.setdefault(row[1], []).append(row[1:])
        # Reports are stamped by the jobs' clocks: a margin, so a skewed or late one is still read next time.
        self._seen_since = now - max(self.stale, 10.0)
        return out

    def _apply(self, read: _Read, now: float) -> None:
        """The loop side of a pass: state, export decisions, commands."""
        state = self.state
        if read.new_runs:
            fresh = [rec for rec in read.new_runs if rec.run not in state.runs]
            if fresh:
                added = state.restore(fresh, held_elsewhere=True)
                if read.control is not None:
                    self.control.apply_stored(added, read.control)
                log.info("cluster: %d runs created on other collectors", len(fresh))
        by_id = {rs.run_id: rs for rs in state.snapshot_runs()}
        for rec in read.fed:
            rs = by_id.get(rec.run_id)
            if rs is not None and not rs.sessions:
                rs.refresh(rec)
        self._decide(by_id, read.holders, now)
        # Only runs known before the read: one added meanwhile (a run just created or joined) is not gone.
        gone = [
            rs for run_id, rs in by_id.items() if run_id in read.known and run_id not in read.ids and not rs.sessions
        ]
        if gone:
            with state.lock:
                for rs in gone:
                    if state.runs.get(rs.run) is rs:
                        del state.runs[rs.run]
            log.info("cluster: %d runs deleted on other collectors", len(gone))
        engine = state.alerts
        if engine is not None:
            for run, rows in read.alerts.items():
                engine.hub.take_stored(run, rows)
        for run_id, version, blob in read.commands:
            rs = by_id.get(run_id)
            if rs is not None and rs.sessions:
                self.control.adopt(rs, blob, int(version))

    def _decide(self, by_id: dict[int, RunState], holders: list[tuple[int, str, int, float, bool]], now: float) -> None:
        """Which collector exports each run, and how many sessions the others hold of it."""
        me = self.collector_id
        rows: dict[int, list[tuple[str, int, float, bool]]] = {}
        for run_id, collector, n, changed, alive in holders:
            rows.setdefault(run_id, []).append((collector, n, changed, alive))
        for run_id, rs in by_id.items():
            mine = rows.get(run_id)
            if not mine:
                # Nobody said anything of it lately: its own sessions make a run exported here.
                if rs.sessions:
                    rs.held_elsewhere = False
                rs.remote_sessions = 0
                continue
            live = [(c, n) for c, n, _, alive in mine if n > 0 and alive]
            rs.remote_sessions = sum(n for c, n in live if c != me)
            if live:
                exporter = min(c for c, _ in live)
            elif rs.sessions:
                exporter = me
            else:
                exporter = max(mine, key=lambda r: r[2])[0]  # the last to change its row: the last holder
            rs.held_elsewhere = exporter != me


__all__ = ["DEFAULT_INTERVAL", "Cluster", "default_collector_id"]
