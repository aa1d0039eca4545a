"""In-memory state of the collector: runs, their layer tables, newest values, live sessions.

Mutated only on the asyncio loop thread (ingest, query). The metrics thread
reads it concurrently: structural changes (new runs) happen under ``lock``,
and a run's progress (newest ``Snapshot`` per rank, report times, non-finite
count) is one immutable ``RunView`` that the loop replaces in a single
assignment per batch, so a scrape that reads ``rs.view`` once sees one
consistent state of the run, never half an update and never a dict that
changes size under it.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from layrot.proto import layrot_pb2 as pb
from layrot.server.control import RunControl
from layrot.server.store import LayerRecord, RunRecord

if TYPE_CHECKING:  # alerts.py and control.py import this module for their own hints
    from layrot.server.alerts import AlertEngine
    from layrot.server.control import ControlPlane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """Newest reported values of one rank of a run (arrays are per layer, forward order)."""

    rank: int
    step: int
    time: float
    loss: float
    rotation: np.ndarray
    step_angle: np.ndarray
    weight_norm: np.ndarray
    rho: np.ndarray | None  # None without Layca


def _summary(snap: Snapshot | None) -> tuple[float, float]:
    if snap is None:
        return float("nan"), float("nan")
    rot = snap.rotation
    ok = rot[np.isfinite(rot)]
    if ok.size == 0:
        return float("nan"), float("nan")
    return float(ok.min()), float(ok.mean())


def snapshot_of(rec: RunRecord) -> Snapshot:
    """The stored newest row of a run (``rec.last_row``, not None) as a Snapshot."""
    assert rec.last_row is not None
    step, t, loss, rot, ang, wn, rho = rec.last_row
    return Snapshot(
        rank=rec.last_rank or 0,
        step=int(step),
        time=float(t or 0.0),
        loss=float("nan") if loss is None else float(loss),
        rotation=np.frombuffer(rot, dtype="<f8"),
        step_angle=np.frombuffer(ang, dtype="<f8"),
        weight_norm=np.frombuffer(wn, dtype="<f8"),
        rho=None if rho is None else np.frombuffer(rho, dtype="<f8"),
    )


class RunView(NamedTuple):
    """A run's progress as of its newest accepted batch; never changed, only replaced whole.

    A tuple, so publishing one per batch costs one small allocation.
    """

    last: Mapping[int, Snapshot]  # rank -> newest Snapshot (a fresh dict per view, never mutated)
    primary: Snapshot | None  # of the lowest reporting rank: per-run numbers use one rank
    first_report: float | None
    last_report: float | None  # newest measurement time over all ranks
    nonfinite: int

    def summary_stats(self) -> tuple[float, float]:
        """(min, mean) rotation over layers of the primary rank, ignoring NaN; NaN when unknown."""
        return _summary(self.primary)


# Marker objects in a session's outbox (see LiveSession).
ACK = object()
END = object()

#: The run meta key under which the collector keeps ``Hello.total_steps`` (persisted with the run, no schema change).
TOTAL_STEPS_META = "total_steps"


def hello_meta(hello: pb.Hello) -> dict[str, str]:
    """The meta a new run is stored with: the Hello's, plus its planned length when it announced one."""
    meta = dict(hello.meta)
    if hello.total_steps > 0:
        meta[TOTAL_STEPS_META] = str(hello.total_steps)
    return meta


def meta_total_steps(meta: Mapping[str, str]) -> int:
    """The planned last step kept in a run's meta (0 = unknown, also for a value that is not a positive integer)."""
    try:
        n = int(meta.get(TOTAL_STEPS_META, "0"))
    except ValueError:
        return 0
    return max(0, n)


class LiveSession:
    """One open Ingest.Session stream: the control plane's handle on a training process.

    ``outbox`` holds messages for the job (``CollectorMessage``) plus the
    ``ACK`` / ``END`` markers; the ingest handler drains it onto the stream.
    Use ``send`` from the loop thread or ``send_threadsafe`` from others.

    Acknowledgements (loop thread only) keep *acked => in the history store*:
    ``acked_seq`` is the highest seq such that every batch of this session
    with seq <= it is stored, so it never passes a batch still pending in the
    store or one that was refused or failed (a Nack). Batches stored above
    such a one are listed in ``Ack.stored`` instead, each once (an Ack lists
    what was stored since the previous Ack).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: str = "") -> None:
        self.loop = loop
        self.peer = peer
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.run: RunState | None = None
        self.rank = 0
        self.world_size = 1
        self.session_id = ""
        self.pid = 0
        self.host = ""
        self.capabilities: dict[str, bool] = {}
        self.applied_command_version = 0
        self.init_norm: np.ndarray | None = None
        self.num_layers = 0
        self.replay = False  # an upload of spooled batches (sync): not a live job
        # ack bookkeeping (loop thread only)
        self.last_seq = 0  # highest seq received; seqs must increase
        self.pending: collections.deque[int] = collections.deque()  # queued in the store, no answer yet
        self.held: list[int] = []  # stored, above a pending seq (sorted)
        self.first_nack: int | None = None  # lowest seq refused or failed: acked_seq stays below it
        self.acked_seq = 0
        self.sent_seq = 0
        self.new_stored: list[int] = []  # stored above a Nack, not yet listed in an Ack
        self.new_nacks: list[pb.Nack] = []
        self.ack_queued = False
        self.closing = False
        self.said_goodbye = False
        self.ended_by_collector = False
        self.drained = asyncio.Event()

    @property
    def inflight(self) -> int:
        """Batches queued in the store and not answered yet."""
        return len(self.pending)

    @property
    def committed_seq(self) -> int:
        """The cumulative ack (older name)."""
        return self.acked_seq

    def send(self, message: Any) -> None:
        """Queue a CollectorMessage (e.g. a RateCommand) for the job. Loop thread only."""
        self.outbox.put_nowait(message)

    def send_threadsafe(self, message: Any) -> None:
        """Queue a CollectorMessage from any thread."""
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, message)

    def queued(self, seq: int) -> None:
        """Batch ``seq`` went to the store; its answer comes through ``committed`` or ``failed``."""
        self.pending.append(seq)

    def committed(self, seq: int) -> None:
        """Called on the loop thread after a commit that contains this session's batch ``seq``."""
        self._resolve(seq)
        bisect.insort(self.held, seq)
        self._settle()

    def failed(self, nack: pb.Nack) -> None:
        """Batch ``nack.seq`` is not stored (store failure, or refused): tell the job, never ack it."""
        self._resolve(nack.seq)
        if self.first_nack is None or nack.seq < self.first_nack:
            self.first_nack = nack.seq
        self.new_nacks.append(nack)
        self._settle()

    def _resolve(self, seq: int) -> None:
        pending = self.pending
        if pending and pending[0] == seq:
            pending.popleft()
        else:
            try:
                pending.remove(seq)
            except ValueError:  # refused before it reached the store
                pass

    def _settle(self) -> None:
        limit = self.pending[0] if self.pending else None
        fn = self.first_nack
        if fn is not None and (limit is None or fn < limit):
            limit = fn
        held = self.held
        i = len(held) if limit is None else bisect.bisect_left(held, limit)
        if i:
            self.acked_seq = max(self.acked_seq, held[i - 1])
            del held[:i]
        if fn is not None and held:
            # Above a Nack: the cumulative ack never covers these, list them.
            j = bisect.bisect_right(held, fn)
            self.new_stored.extend(held[j:])
            del held[j:]
        if (self.acked_seq > self.sent_seq or self.new_stored or self.new_nacks) and not self.ack_queued:
            self.ack_queued = True
            self.outbox.put_nowait(ACK)
        if self.closing and not self.pending:
            self.drained.set()

    def take_ack(self) -> pb.Ack | None:
        """The Ack to send now (None when there is no news); the outbox's ACK marker calls it."""
        self.ack_queued = False
        if self.acked_seq <= self.sent_seq and not self.new_stored and not self.new_nacks:
            return None
        ack = pb.Ack(seq=self.acked_seq, stored=self.new_stored, failed=self.new_nacks)
        self.sent_seq = self.acked_seq
        self.new_stored = []
        self.new_nacks = []
        return ack


class RunState:
    """One run: identity, layer table, newest values per rank, live sessions, counters."""

    def __init__(self, rec: RunRecord) -> None:
        self.run_id = rec.run_id
        self.run = rec.run
        self.framework = rec.framework
        self.framework_version = rec.framework_version
        self.host = rec.host
        self.world_size = rec.world_size
        self.every = rec.every
        self.capabilities = dict(rec.capabilities)
        self.meta = dict(rec.meta)
        # The planned last step (0 = unknown): from the stored meta after a restart, else the newest Hello's.
        self.total_steps = meta_total_steps(self.meta)
        self.created = rec.created
        self.view = RunView({}, None, rec.first_report, rec.last_seen, rec.nonfinite)
        self.layers: list[LayerRecord] = list(rec.layers)
        self.names = [lay.name for lay in self.layers]
        self.init_norm = np.array([lay.init_norm for lay in self.layers], dtype=np.float64)
        self.sessions: set[LiveSession] = set()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.control_acks: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        # Ownership: hash of the run key of the Hello that created the run (None: unbound).
        self.key_hash = rec.key_hash
        # Highest step in the history per rank (Welcome.stored_step); updated on commit.
        self.stored_step: dict[int, int] = dict(rec.stored_steps)
        # Control plane: current command, per-rank answers, audit (server/control.py).
        self.control = RunControl()
        # Several collectors on one database (server/cluster.py): open sessions of the run on the others,
        # and whether another collector is the one that exports the run (then this one does not).
        self.remote_sessions = 0
        self.held_elsewhere = False

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def connected(self) -> bool:
        """True while at least one session of the run is open (here, or on another collector of the database)."""
        return bool(self.sessions) or self.remote_sessions > 0

    def refresh(self, rec: RunRecord) -> None:
        """Take a run's progress from the store (another collector fed it): newest row, report times, ranks."""
        self.world_size = max(self.world_size, rec.world_size)
        self.stored_step = {**self.stored_step, **{int(k): int(v) for k, v in rec.stored_steps.items()}}
        v = self.view
        last = v.last
        if rec.last_row is not None and rec.layers:
            snap = snapshot_of(rec)
            last = self._with(last, snap)
        primary = last[min(last)] if last else None
        last_report = rec.last_seen if rec.last_seen is not None else v.last_report
        self.view = RunView(
            last, primary, rec.first_report or v.first_report, last_report, max(v.nonfinite, rec.nonfinite)
        )

    @property
    def last(self) -> Mapping[int, Snapshot]:
        """Newest Snapshot per rank (read-only; replaced with each batch)."""
        return self.view.last

    @property
    def first_report(self) -> float | None:
        """Measurement time of the run's first reported step."""
        return self.view.first_report

    @property
    def last_report(self) -> float | None:
        """Measurement time of the newest reported step (any rank)."""
        return self.view.last_report

    @property
    def nonfinite(self) -> int:
        """Layer samples with NaN/Inf inputs so far."""
        return self.view.nonfinite

    def primary(self) -> Snapshot | None:
        """Newest values of the lowest reporting rank (rank 0 in practice).

        Per-run numbers use one rank; combining sharded ranks is future work.
        """
        return self.view.primary

    def update(self, snap: Snapshot) -> None:
        """Keep the newest step per rank (a resent older batch does not move it back); report times unchanged."""
        v = self.view
        last = self._with(v.last, snap)
        if last is not v.last:
            self.view = v._replace(last=last, primary=last[min(last)])

    @staticmethod
    def _with(last: Mapping[int, Snapshot], snap: Snapshot) -> Mapping[int, Snapshot]:
        cur = last.get(snap.rank)
        if cur is None or snap.step >= cur.step:
            return {**last, snap.rank: snap}
        return last

    def record_batch(self, snap: Snapshot, nonfinite: int) -> bool:
        """Publish the run's progress after an accepted batch; True when it was the run's first report.

        One new ``RunView`` by one assignment: readers on other threads see
        the state before or after the batch, nothing in between.
        """
        v = self.view
        last = self._with(v.last, snap)
        if last is v.last:
            primary = v.primary
        else:
            primary = last[min(last)] if len(last) > 1 else snap
        first = v.first_report is None
        last_report = v.last_report
        if last_report is None or snap.time >= last_report:
            last_report = snap.time
        self.view = RunView(last, primary, snap.time if first else v.first_report, last_report, v.nonfinite + nonfinite)
        return first

    def summary_stats(self) -> tuple[float, float]:
        """(min, mean) rotation over layers of the primary rank, ignoring NaN; NaN when unknown."""
        return _summary(self.view.primary)


@dataclass
class CollectorState:
    """All runs plus collector-wide counters."""

    runs: dict[str, RunState] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    samples_ingested: int = 0
    steps_ingested: int = 0
    sessions_opened: int = 0
    sessions_active: int = 0
    sessions_lost: int = 0
    # StepBatch pipeline passes and the batches they took (server/ingest.py): batches per pass under load.
    pipeline_passes: int = 0
    pipeline_batches: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    next_run_id: int = 1
    # The collector's ControlPlane (server/control.py), set by the composition root (server/app.py).
    control: ControlPlane | None = None
    # The collector's AlertEngine (server/alerts.py), set by the composition root; None in bare states.
    alerts: AlertEngine | None = None

    def restore(self, records: list[RunRecord], held_elsewhere: bool = False) -> list[RunState]:
        """Load runs from the history store (after a restart; ``held_elsewhere``: runs another collector made)."""
        out = []
        with self.lock:
            for rec in records:
                rs = RunState(rec)
                rs.held_elsewhere = held_elsewhere
                if rec.last_row is not None and rec.layers:
                    rs.update(snapshot_of(rec))
                self.runs[rec.run] = rs
                self.next_run_id = max(self.next_run_id, rec.run_id + 1)
                out.append(rs)
        if not held_elsewhere:
            log.info("restored %d runs from the history store", len(records))
        return out

    def add_run(self, rec: RunRecord) -> RunState:
        """Register a new run (loop thread)."""
        rs = RunState(rec)
        with self.lock:
            self.runs[rec.run] = rs
            self.next_run_id = max(self.next_run_id, rec.run_id + 1)
        return rs

    def reject(self, reason: str, run: RunState | None = None) -> None:
        """Count a rejected message (by reason, and per run when known)."""
        self.rejected[reason] += 1
        if run is not None:
            run.rejected[reason] += 1

    def snapshot_runs(self) -> list[RunState]:
        """A stable list of runs for readers on other threads."""
        with self.lock:
            return list(self.runs.values())
