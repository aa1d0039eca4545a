"""What both history backends share: one writer thread, batched commits, per-item retry, commit callbacks.

The invariant this module keeps for ingest: **acked => in the history store**.
A queued item may carry an opaque ``token``; ``on_commit(tokens, new_rows)`` is called
only after the transaction holding those items has committed (so the rows are
durable and visible to every other connection), and an item whose statements
did not commit goes to ``on_failure(tokens, reason)`` instead, never to both,
never to neither. Ingest turns the first into ``Ack``s and the second into
``Nack``s (server/ingest.py), so a job is never told to drop a batch that is not
in the database.

Why this shape:

* All writes go through ONE dedicated thread fed by a queue, so the asyncio
  ingest loop never blocks on the database and the backend never sees
  concurrent writers from one collector. The thread drains whatever is queued
  into one transaction, so the commit rate adapts to the load: one commit per
  message when idle (lowest ack latency), large transactions under load
  (highest throughput).
* Isolation: every value is checked *before* it is queued (``check_params``),
  so no item can make a shared transaction fail. If one still fails for a
  reason tied to its items (not a locked database or a lost server, which would
  fail every item alike: ``_item_independent``), each item is retried in a
  transaction of its own, so a bad item costs only itself.
* An item is a unit: a StepBatch's rows and its run's progress update commit
  or fail together (``submit_batch``), and a new run's ``runs`` row with its
  layer table (``create_run``).

An item's statements are named (``_Op``: name, parameters, many), not SQL: each
backend turns a name into its own dialect (``_execute``). The reads are plain
SQL that both dialects accept, written with ``?`` placeholders; a backend's
``_fetchall`` translates them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layrot.core.stored import HISTORY_DTYPE
from layrot.server.store_api import (
    INT64_MAX,
    LayerRecord,
    RunRecord,
    StoreValueError,
    check_params,
)

log = logging.getLogger(__name__)

# Upper bounds of one transaction, so one commit never holds callbacks (acks) back
# for long under a flood: rows, and bytes of the rows' per-layer columns (20,000 rows
# of a 200-layer run would be 128 MB in one commit).
MAX_ROWS_PER_COMMIT = 20_000
MAX_BYTES_PER_COMMIT = 16 << 20

# Columns of a step row, in the order ``records.step_rows`` builds them.
STEP_COLUMNS = (
    "run_id",
    "rank",
    "step",
    "time",
    "loss",
    "command_version",
    "rotation",
    "step_angle",
    "weight_norm",
    "rho",
    "dist0",
    "dstep",
    "norm_prev",
    "dot0",
    "dotstep",
)

# Schema 3 stores a step in two tables (the input rows keep ``STEP_COLUMNS``; ``encode_steps`` splits them):
# ``steps``: one row per (run, rank, step), what each rank has of its own, and the digest of its values;
# ``samples``: the per-layer values, once per (run, step, digest), so DDP ranks replicating their
# parameters (byte-identical measurements) share one. Values are float32: the derived quantities
# are exact to float32's 6e-8 relative, far inside their 1e-6 use; float64 added bytes, not meaning.
# The raw inputs (dist0, dstep, norm_prev, dot0, dotstep) are not stored: the API never offered them
# and the derived values they gave are stored.
STEP_TABLE_COLUMNS = ("run_id", "rank", "step", "time", "loss", "command_version", "digest")
SAMPLE_COLUMNS = ("run_id", "step", "digest", "rotation", "step_angle", "weight_norm", "rho")
# The float64 columns of an input row that go into ``samples`` (rotation, step_angle, weight_norm, rho).
_VALUE_INDEX = (6, 7, 8, 9)
DIGEST_BYTES = 16


def encode_steps(rows: Sequence[Sequence[Any]]) -> tuple[list[tuple], list[tuple]]:
    """Input rows (``STEP_COLUMNS``) as (``steps`` rows, ``samples`` rows) of schema 3.

    One float32 conversion for all the rows (no per-layer Python); the digest (SHA-1 of a
    row's float32 values, 16 bytes: a content key, not a security boundary, since a job can
    only ever confuse its own run's rows) makes the samples of identical ranks one row.
    """
    if not rows:
        return [], []
    r0 = rows[0]
    n = len(r0[6])
    nq = 3 + (r0[9] is not None)
    uniform = all(
        all(r[c] is not None and len(r[c]) == n for c in _VALUE_INDEX[:nq]) and (nq == 4 or r[9] is None) for r in rows
    )
    if not uniform:  # never from one batch (one layer table, rho or not for all): one row at a time
        out = [encode_steps([r]) for r in rows[1:]]
        st, sa = _encode_uniform([r0], n, nq)
        return st + [x for o in out for x in o[0]], sa + [x for o in out for x in o[1]]
    return _encode_uniform(rows, n, nq)


def _encode_uniform(rows: Sequence[Sequence[Any]], n: int, nq: int) -> tuple[list[tuple], list[tuple]]:
    S = len(rows)
    with np.errstate(over="ignore"):  # a value beyond float32 (> 3.4e38) becomes inf, as non-finite input is
        block = np.empty((S, nq, n // 8), dtype=HISTORY_DTYPE)
        for q, c in enumerate(_VALUE_INDEX[:nq]):
            block[:, q, :] = np.frombuffer(b"".join([r[c] for r in rows]), dtype="<f8").reshape(S, -1)
    raw = block.tobytes()
    row_bytes = nq * (n // 2)
    m = n // 2
    steps, samples = [], []
    sha1 = hashlib.sha1
    for i, r in enumerate(rows):
        off = i * row_bytes
        cut = raw[off : off + row_bytes]
        d = sha1(cut).digest()[:DIGEST_BYTES] + bytes((nq,))  # nq: with rho or without, never alike
        steps.append((r[0], r[1], r[2], r[3], r[4], r[5], d))
        samples.append((r[0], r[2], d, cut[:m], cut[m : 2 * m], cut[2 * m : 3 * m], cut[3 * m :] if nq == 4 else None))
    return steps, samples


def _f64(blob: Any) -> bytes | None:
    """A stored float32 blob as the float64 blob the readers expect."""
    if blob is None:
        return None
    return np.frombuffer(blob, dtype=HISTORY_DTYPE).astype("<f8").tobytes()


def decode_values(row: Sequence[Any], start: int) -> tuple:
    """``row`` with its four value columns from ``start`` on as float64 blobs."""
    return (*row[:start], *(_f64(v) for v in row[start : start + 4]), *row[start + 4 :])


# The reads of a step with its values: ``steps`` joined to its ``samples`` row.
_SAMPLE_JOIN = "FROM steps s JOIN samples m ON m.run_id = s.run_id AND m.step = s.step AND m.digest = s.digest"


def migrate_v2_rows(v2_rows: Sequence[Sequence[Any]]) -> tuple[list[tuple], list[tuple]]:
    """Rows of a schema-2 ``steps`` table (``STEP_COLUMNS``) as schema-3 rows, samples deduplicated."""
    out_steps: list[tuple] = []
    out_samples: dict[tuple, tuple] = {}
    for r in v2_rows:  # one at a time: rows of different runs have different layer counts
        st, sa = encode_steps([tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)])
        out_steps += st
        out_samples.setdefault(sa[0][:3], sa[0])
    return out_steps, list(out_samples.values())


# Names of the statements an item may hold (each backend maps them to SQL; "steps" are step rows).
STEPS = "steps"
RUN = "run"
LAYER = "layer"
PROGRESS = "progress"  # (last_seen, nonfinite, run_id)
FIRST_REPORT = "first_report"  # (first_report, run_id)
WORLD_SIZE = "world_size"  # (world_size, run_id)
CONTROL_ACK = "control_ack"
COMMAND = "command"
AUDIT = "audit"
ALERT = "alert"
THRESHOLDS = "thresholds"  # (run, overrides, updated)
# Maintenance (retention, delete, compact: server/retention.py): (sql with ? placeholders, params, counted);
# the rows a counted statement deletes go to the item's ``new_rows``. SQL both dialects accept.
SQL = "sql"

# What deleting a run removes, table by table (``?``: the run id; alerts and thresholds are keyed by name).
DELETE_RUN_SQL = (
    ("DELETE FROM steps WHERE run_id = ?", True),
    ("DELETE FROM samples WHERE run_id = ?", False),
    ("DELETE FROM layers WHERE run_id = ?", False),
    ("DELETE FROM commands WHERE run_id = ?", False),
    ("DELETE FROM audit WHERE run_id = ?", False),
    ("DELETE FROM control_acks WHERE run_id = ?", False),
    ("DELETE FROM holders WHERE run_id = ?", False),
    ("DELETE FROM runs WHERE id = ?", False),
)


def _runs_filter(column: str, run_ids: Sequence[int] | None) -> tuple[str, list[int]]:
    """`` AND column IN (?, ...)`` for a read limited to ``run_ids`` (nothing for None; none for an empty list)."""
    if run_ids is None:
        return "", []
    ids = [int(r) for r in run_ids]
    if not ids:
        return " AND 1 = 0", []
    return f" AND {column} IN ({', '.join('?' * len(ids))})", ids


# The highest run id in any table (highest_run_id), orphans included.
HIGHEST_RUN_ID_SQL = tuple(
    f"SELECT MAX({col}) FROM {table}"
    for table, col in (
        ("runs", "id"),
        ("steps", "run_id"),
        ("layers", "run_id"),
        ("commands", "run_id"),
        ("audit", "run_id"),  # no index on run_id: small tables
        ("control_acks", "run_id"),
    )
)
# A collector's sessions of one run (QueuedStore.heartbeat): (run_id, collector, sessions, heartbeat).
HOLD_SQL = (
    "INSERT INTO holders (run_id, collector, sessions, heartbeat) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (run_id, collector) DO UPDATE SET sessions = excluded.sessions, heartbeat = excluded.heartbeat"
)
BEAT_SQL = (
    "INSERT INTO collectors (id, heartbeat) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat"
)

DELETE_RUN_BY_NAME_SQL = ("DELETE FROM alerts WHERE run = ?", "DELETE FROM alert_thresholds WHERE run = ?")


def check_step_rows(rows: Sequence[Sequence[Any]]) -> None:
    """``check_params`` for step rows, at a cost per row of a few comparisons.

    The ingest pipeline builds these rows from validated arrays (steps < 2**62,
    float64 BLOBs of one layer table); this is the backstop that keeps a row
    from failing a shared transaction if that ever changes.
    """
    if not rows:
        return
    check_params(rows[0])
    for r in rows:
        if not (
            type(r[0]) is int
            and type(r[1]) is int
            and type(r[2]) is int
            and 0 <= r[0] <= INT64_MAX
            and 0 <= r[1] <= INT64_MAX
            and 0 <= r[2] <= INT64_MAX
            and (r[5] is None or (type(r[5]) is int and 0 <= r[5] <= INT64_MAX))
        ):
            raise StoreValueError(f"step row out of range: run_id={r[0]!r} rank={r[1]!r} step={r[2]!r}")


def run_params(rec: RunRecord) -> tuple:
    """The ``runs`` row of a new run, in ``RUN`` column order."""
    return (
        rec.run_id,
        rec.run,
        rec.framework,
        rec.framework_version,
        rec.host,
        rec.world_size,
        rec.every,
        json.dumps(rec.capabilities),
        json.dumps(rec.meta, sort_keys=True),
        rec.created,
        rec.last_seen,
        rec.first_report,
        rec.nonfinite,
        rec.key_hash,
    )


def shape_json(shape: Sequence[int]) -> str:
    """``json.dumps(list(shape))`` for a shape of ints, a few times faster (a Hello pays it per layer)."""
    return "[" + ", ".join([str(int(d)) for d in shape]) + "]"


def layer_params(run_id: int, lay: LayerRecord) -> tuple:
    """One ``layers`` row, in ``LAYER`` column order."""
    return (
        run_id,
        lay.index,
        lay.name,
        shape_json(lay.shape),
        lay.init_norm,
        lay.numel,
        lay.module_type,
        int(lay.sharded),
    )


# What the fast lane puts into the writer's queue to wake it: the item itself waits in QueuedStore._urgent.
_WAKE = object()

# (statement name, parameters or rows, executemany?)
Op = tuple[str, Sequence[Any], bool]


@dataclass(slots=True)
class Item:
    """One unit of the writer: its statements commit together or not at all."""

    ops: list[Op]
    token: Any
    nrows: int
    done: threading.Event | None = None
    nbytes: int = 0  # bytes of the rows' blob columns (the per-layer values)
    new_rows: int = 0  # step rows this item added (not replaced) in its last commit attempt
    order: int = 0  # when it was queued (QueuedStore._put)


def _blob_bytes(rows: Sequence[Sequence[Any]]) -> int:
    """Bytes of the per-layer blob columns of step rows (every row of a batch has the same layers)."""
    if not rows:
        return 0
    per_row = sum(len(v) for v in rows[0] if isinstance(v, (bytes, bytearray, memoryview)))
    return per_row * len(rows)


class QueuedStore:
    """The writer thread and the reads both backends share; a backend supplies the database side.

    ``on_commit(tokens, new_rows)`` is called from the writer thread after each commit
    with the tokens of the items it contained, in submission order, and for
    each the number of step rows it added (rows of steps stored already are
    replaced, not counted);
    ``on_failure(tokens, reason)`` with the tokens of items whose statements
    were rolled back and are not in the database.

    A backend implements ``_open_writer`` / ``_close_writer`` (the writer
    thread's connection), ``_execute`` (one transaction of items, committed),
    ``_rollback``, ``_item_independent``, ``_fetchall`` (a read with ``?``
    placeholders) and ``_close_readers``; its ``__init__`` opens the schema and
    then calls ``_start_writer``.
    """

    # Rows (plus statements) and bytes of per-layer values the writer drains into one transaction at most.
    max_rows_per_commit = MAX_ROWS_PER_COMMIT
    max_bytes_per_commit = MAX_BYTES_PER_COMMIT

    def __init__(
        self,
        on_commit: Callable[[list[Any], list[int]], None] | None = None,
        on_failure: Callable[[list[Any], str], None] | None = None,
    ) -> None:
        self.on_commit = on_commit
        self.on_failure = on_failure
        self.errors = 0
        self.commits = 0
        self.failed_items = 0
        self.deleted_steps = 0  # steps rows removed by retention, downsampling and delete (per rank)
        self.deleted_runs = 0
        self._pending = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Item | object | None] = queue.SimpleQueue()
        # The fast lane (submit_batch(urgent=True)): taken into the next transaction before
        # anything waiting in _queue, so a light job's batch is not queued behind others' backlog.
        self._urgent: deque[Item] = deque()
        self._order = 0  # put order: a transaction runs its items in it, whatever their lane
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def description(self) -> str:
        """Where the history is, for logs."""
        raise NotImplementedError

    # ------------------------------------------------------------ backend side
    def _open_writer(self) -> Any:
        raise NotImplementedError

    def _close_writer(self, conn: Any) -> None:
        raise NotImplementedError

    def _execute(self, conn: Any, items: Sequence[Item]) -> None:
        """Run the items' statements in one transaction and commit it; set each item's ``new_rows``."""
        raise NotImplementedError

    def _rollback(self, conn: Any) -> None:
        raise NotImplementedError

    def _item_independent(self, exc: BaseException) -> bool:
        """True when a failed transaction would fail for any item alike: retrying items one by one is useless."""
        return False

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        raise NotImplementedError

    def _close_readers(self) -> None:
        raise NotImplementedError

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._writer, name="layrot-store-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ writes
    @property
    def pending_rows(self) -> int:
        """Rows (plus statements) queued but not yet committed."""
        return self._pending

    def _put(self, item: Item, urgent: bool = False) -> None:
        if self._closed:
            raise RuntimeError("store is closed")
        with self._lock:
            self._pending += item.nrows
            self._order += 1
            item.order = self._order
            if urgent:
                self._urgent.append(item)
        self._queue.put(_WAKE if urgent else item)

    def _submit(self, name: str, params: Sequence[Any], token: Any = None) -> None:
        check_params(params)
        self._put(Item([(name, params, False)], token, 1))

    def submit_rows(self, rows: Sequence[Sequence[Any]], token: Any = None) -> None:
        """Queue step rows (``STEP_COLUMNS`` order); StoreValueError if a value is out of bounds."""
        check_step_rows(rows)
        self._put(Item([(STEPS, rows, True)], token, len(rows), nbytes=_blob_bytes(rows)))

    def submit_batch(
        self,
        rows: Sequence[Sequence[Any]],
        run_id: int,
        last_seen: float | None,
        nonfinite: int,
        first_report: float | None = None,
        token: Any = None,
        urgent: bool = False,
    ) -> None:
        """Queue one StepBatch as one unit: its step rows and its run's progress commit together or not at all.

        ``urgent``: the fast lane, committed in the next transaction ahead of the queue's backlog.
        The caller uses it for a run with nothing else queued (so its rows and progress do not
        overtake its own earlier ones) and at most one item per session (so the lane stays short).
        """
        check_step_rows(rows)
        progress = (last_seen, nonfinite, run_id)
        check_params(progress)
        ops: list[Op] = [(STEPS, rows, True), (PROGRESS, progress, False)]
        if first_report is not None:
            check_params((first_report, run_id))
            ops.append((FIRST_REPORT, (first_report, run_id), False))
        self._put(Item(ops, token, len(rows) + len(ops) - 1, nbytes=_blob_bytes(rows)), urgent=urgent)

    # ------------------------------------------------------------ maintenance (server/retention.py)
    def _maintain(self, ops: list[Op]) -> int:
        """Run maintenance statements as one item through the writer, wait for them; rows the counted ones deleted."""
        return self._maintain_later(ops)()

    def _maintain_later(self, ops: list[Op]) -> Callable[[], int]:
        """Queue maintenance statements as one item now; the returned call waits for them (rows deleted)."""
        for _n, (_sql, params, _c), _m in ops:
            check_params(params)
        done = threading.Event()
        item = Item(ops, None, len(ops), done)
        self._put(item)

        def wait() -> int:
            done.wait()
            return item.new_rows

        return wait

    def delete_steps(self, run_id: int, lo: int, hi: int, every: int = 0) -> int:
        """Delete one run's steps lo <= step <= hi (all ranks) and their samples; with ``every`` > 1 only the
        steps that are not multiples of it (downsampling). One transaction; the steps rows deleted."""
        keep = " AND step % ? != 0" if every > 1 else ""
        params = (run_id, lo, hi, every) if every > 1 else (run_id, lo, hi)
        where = "WHERE run_id = ? AND step >= ? AND step <= ?" + keep
        n = self._maintain(
            [
                (SQL, ("DELETE FROM steps " + where, params, True), False),
                (SQL, ("DELETE FROM samples " + where, params, False), False),
            ]
        )
        self.deleted_steps += n
        return n

    def delete_run(self, run_id: int, run: str) -> int:
        """Delete a run and everything stored under it (steps, samples, layers, commands, audit, acks, alerts,
        thresholds). One transaction; the steps rows deleted."""
        return self.begin_delete_run(run_id, run)()

    def begin_delete_run(self, run_id: int, run: str) -> Callable[[], int]:
        """``delete_run`` queued now, in order with what is queued after it (a new run of the same name
        created next is not deleted); the returned call waits for it and gives the steps rows deleted."""
        ops: list[Op] = [(SQL, (sql, (run_id,), counted), False) for sql, counted in DELETE_RUN_SQL]
        ops += [(SQL, (sql, (run,), False), False) for sql in DELETE_RUN_BY_NAME_SQL]
        wait = self._maintain_later(ops)

        def deleted() -> int:
            n = wait()
            self.deleted_steps += n
            self.deleted_runs += 1
            return n

        return deleted

    def delete_orphan_samples(self, run_id: int) -> int:
        """Delete samples no steps row refers to any more (a resend that replaced a step with other values)."""
        return self._maintain(
            [
                (
                    SQL,
                    (
                        "DELETE FROM samples WHERE run_id = ? AND NOT EXISTS (SELECT 1 FROM steps s WHERE"
                        " s.run_id = samples.run_id AND s.step = samples.step AND s.digest = samples.digest)",
                        (run_id,),
                        True,
                    ),
                    False,
                )
            ]
        )

    def step_span_before(self, run_id: int, before: float) -> tuple[int, int] | None:
        """(lowest, highest) step of a run's rows reported before ``before`` (unix seconds), None when none."""
        rows = self._fetchall("SELECT MIN(step), MAX(step) FROM steps WHERE run_id = ? AND time < ?", (run_id, before))
        if not rows or rows[0][0] is None:
            return None
        return int(rows[0][0]), int(rows[0][1])

    def run_ages(self) -> list[tuple[int, str, float | None, float | None]]:
        """(run_id, run, last_seen, created) of every run."""
        return [tuple(r) for r in self._fetchall("SELECT id, run, last_seen, created FROM runs ORDER BY id")]

    def reclaim(self) -> None:
        """Give freed pages back to the file system / the database (SQLite VACUUM, PostgreSQL VACUUM)."""
        raise NotImplementedError

    def barrier(self, token: Any) -> None:
        """Queue nothing but a token: it is released after everything queued before it commits."""
        self._put(Item([], token, 0))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until everything queued so far is committed. Returns False on timeout."""
        if self._closed or self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._put(Item([], None, 0, done))
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the writer thread."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_readers()

    def _commit_items(self, conn: Any, items: list[Item]) -> list[tuple[Item, str | None]]:
        """Commit ``items`` in one transaction, else one by one; each item with None (stored) or the reason."""
        try:
            if len(items) > 1:
                self._execute_coalesced(conn, items)
            else:
                self._execute(conn, items)
            self.commits += 1
            return [(it, None) for it in items]
        except Exception as exc:  # disk full, locked db, lost server, bad row: never kill the writer
            self.errors += 1
            self._rollback(conn)
            reason = f"{type(exc).__name__}: {exc}"
            if len(items) == 1 or self._item_independent(exc):
                log.error("history store: transaction of %d items failed, rolled back: %s", len(items), reason)
                return [(it, reason) for it in items]
            log.warning(
                "history store: transaction of %d items failed (%s); retrying them one by one", len(items), reason
            )
        out: list[tuple[Item, str | None]] = []
        for it in items:
            if not it.ops:
                out.append((it, None))
                continue
            try:
                self._execute(conn, (it,))
                self.commits += 1
                out.append((it, None))
            except Exception as exc:
                self.errors += 1
                self._rollback(conn)
                out.append((it, f"{type(exc).__name__}: {exc}"))
        return out

    def _execute_coalesced(self, conn: Any, items: list[Item]) -> None:
        """``_execute`` of several items with one progress UPDATE per run: the last one queued.

        Every progress UPDATE sets the same columns of its run's row, so within one transaction
        only the last one queued for a run decides what is stored; the earlier ones were one
        statement per StepBatch for nothing (a run sending one-step batches paid one per step).
        The items keep their own ops for the one-by-one retry after a failed transaction.
        """
        last: dict[Any, tuple[int, int]] = {}
        for i, it in enumerate(items):
            for j, (name, params, _many) in enumerate(it.ops):
                if name == PROGRESS:
                    last[params[2]] = (i, j)
        keep = set(last.values())
        saved = [it.ops for it in items]
        try:
            for i, it in enumerate(items):
                if any(name == PROGRESS for name, _p, _m in it.ops):
                    it.ops = [op for j, op in enumerate(it.ops) if op[0] != PROGRESS or (i, j) in keep]
            self._execute(conn, items)
        finally:
            for it, ops in zip(items, saved):
                it.ops = ops

    def _writer(self) -> None:
        conn = self._open_writer()
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            items: list[Item] = []
            nrows = nbytes = 0
            with self._lock:
                while self._urgent:
                    it = self._urgent.popleft()
                    items.append(it)
                    nrows += it.nrows
                    nbytes += it.nbytes
            if isinstance(first, Item):
                items.append(first)
                nrows += first.nrows
                nbytes += first.nbytes
            # A transaction with fast-lane items takes nothing more from the backlog: it stays small,
            # so their acks wait for it and the one before, not for a full-size commit.
            fast = len(items) > (1 if isinstance(first, Item) else 0)
            while not fast and nrows < self.max_rows_per_commit and nbytes < self.max_bytes_per_commit:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if not isinstance(nxt, Item):
                    continue  # a fast-lane wake-up: its item is in this transaction already (or the next)
                items.append(nxt)
                nrows += nxt.nrows
                nbytes += nxt.nbytes
            if not items:
                continue
            items.sort(key=lambda it: it.order)  # one transaction runs its items in the order they were queued
            outcome = self._commit_items(conn, items)
            with self._lock:
                self._pending -= nrows
            done_items = [it for it, reason in outcome if reason is None and it.token is not None]
            stored = [it.token for it in done_items]
            new_rows = [it.new_rows for it in done_items]
            failed: dict[str, list[Any]] = {}
            for it, reason in outcome:
                if reason is not None:
                    self.failed_items += 1
                    if it.token is not None:
                        failed.setdefault(reason, []).append(it.token)
            self._callback(self.on_commit, stored, new_rows)
            for reason, tokens in failed.items():
                self._callback(self.on_failure, tokens, reason)
            for it in items:
                if it.done is not None:
                    it.done.set()
        self._close_writer(conn)

    @staticmethod
    def _callback(fn: Callable[..., None] | None, tokens: list[Any], *args: Any) -> None:
        if fn is None or not tokens:
            return
        try:
            fn(tokens, *args)
        except Exception:
            log.exception("store callback failed")

    # ------------------------------------------------------------ runs (ingest)
    def create_run(self, rec: RunRecord, token: Any = None) -> None:
        """Queue a new run and its layer table as one unit; ``token`` is released with its commit (or failure).

        A plain INSERT (no upsert): a run name or id that exists already fails
        this run's creation instead of hanging its layers on another run.
        StoreValueError when a value is out of bounds.
        """
        run = run_params(rec)
        layers = [layer_params(rec.run_id, lay) for lay in rec.layers]
        check_params(run)
        for params in layers:
            check_params(params)
        # The layer table as one executemany: one statement per layer cost the writer a call each.
        ops: list[Op] = [(RUN, run, False), (LAYER, layers, True)]
        self._put(Item(ops, token, 1 + len(layers)))

    def insert_run(self, rec: RunRecord) -> None:
        """Queue a new run and its layer table (no token; see ``create_run``)."""
        self.create_run(rec)

    def set_world_size(self, run_id: int, world_size: int) -> None:
        """Queue a run's larger world size (a later Hello announced more ranks)."""
        self._submit(WORLD_SIZE, (world_size, run_id))

    def set_first_report(self, run_id: int, t: float) -> None:
        """Queue the time of a run's first reported step."""
        self._submit(FIRST_REPORT, (t, run_id))

    def update_progress(self, run_id: int, last_seen: float | None, nonfinite: int, token: Any = None) -> None:
        """Queue a run's newest report time and non-finite count; ``token`` is released with its commit."""
        self._submit(PROGRESS, (last_seen, nonfinite, run_id), token=token)

    def insert_control_ack(self, params: Sequence[Any]) -> None:
        """Queue a ControlAck: (run_id, rank, session_id, version, applied, reason, step, time)."""
        self._submit(CONTROL_ACK, params)

    # ------------------------------------------------------------ control plane (server/control.py)
    def insert_command(self, params: Sequence[Any]) -> None:
        """Queue a RateCommand as sent: (run_id, version, time, issued_by, controller, serialized command)."""
        self._submit(COMMAND, params)

    def insert_audit(self, params: Sequence[Any]) -> None:
        """Queue an audit entry: (run_id, version, time, who, what, event, step, reason, rank)."""
        self._submit(AUDIT, params)

    # ------------------------------------------------------------ alerts (server/alert_hub.py, server/alerts.py)
    def insert_alert(self, params: Sequence[Any]) -> None:
        """Queue an alert.

        ``params``: (run, layer, step, kind, severity, angle, baseline, time, message, loss_before, loss_after).
        """
        self._submit(ALERT, params)

    def save_thresholds(self, run: str, overrides: str, updated: float) -> None:
        """Queue a run's threshold overrides (json)."""
        self._submit(THRESHOLDS, (run, overrides, updated))

    # ------------------------------------------------------------ reads
    def load_runs(
        self, after_id: int = 0, run_ids: Sequence[int] | None = None, names: Sequence[str] | None = None
    ) -> list[RunRecord]:
        """Stored runs with their layers and newest row (lowest rank), for restoring state.

        Every run by default; with ``after_id`` only runs of a higher id, with ``run_ids`` /
        ``names`` only those (the cluster's view of runs other collectors created or fed).
        """
        where: list[str] = ["id > ?"]
        params: list[Any] = [after_id]
        filters: tuple[tuple[str, Sequence[Any] | None], ...] = (("id", run_ids), ("run", names))
        for col, values in filters:
            if values is not None:
                if not values:
                    return []
                where.append(f"{col} IN ({', '.join('?' * len(values))})")
                params += list(values)
        out = []
        for r in self._fetchall(
            "SELECT id, run, framework, framework_version, host, world_size, every, capabilities, meta,"
            " created, last_seen, first_report, nonfinite, key_hash FROM runs WHERE "
            + " AND ".join(where)
            + " ORDER BY id",
            params,
        ):
            out.append(
                RunRecord(
                    run_id=r[0],
                    run=r[1],
                    framework=r[2] or "",
                    framework_version=r[3] or "",
                    host=r[4] or "",
                    world_size=r[5] or 1,
                    every=r[6] or 1,
                    capabilities=json.loads(r[7] or "{}"),
                    meta=json.loads(r[8] or "{}"),
                    created=r[9] or 0.0,
                    last_seen=r[10],
                    first_report=r[11],
                    nonfinite=r[12] or 0,
                    key_hash=r[13],
                )
            )
        for rec in out:
            rec.layers = [
                LayerRecord(
                    index=i,
                    name=n,
                    shape=json.loads(s or "[]"),
                    init_norm=x,
                    numel=k or 0,
                    module_type=m or "",
                    sharded=bool(sh),
                )
                for i, n, s, x, k, m, sh in self._fetchall(
                    "SELECT idx, name, shape, init_norm, numel, module_type, sharded FROM layers"
                    " WHERE run_id=? ORDER BY idx",
                    (rec.run_id,),
                )
            ]
            rec.stored_steps = {
                rk: st
                for rk, st in self._fetchall(
                    "SELECT rank, MAX(step) FROM steps WHERE run_id=? GROUP BY rank", (rec.run_id,)
                )
            }
            rank = min(rec.stored_steps) if rec.stored_steps else None
            if rank is not None:
                rec.last_rank = rank
                rows = self._fetchall(
                    "SELECT s.step, s.time, s.loss, m.rotation, m.step_angle, m.weight_norm, m.rho "
                    + _SAMPLE_JOIN
                    + " WHERE s.run_id=? AND s.rank=? ORDER BY s.step DESC LIMIT 1",
                    (rec.run_id, rank),
                )
                rec.last_row = decode_values(rows[0], 3) if rows else None
        return out

    def run_ids(self) -> list[int]:
        """Ids of every stored run."""
        return [int(r) for (r,) in self._fetchall("SELECT id FROM runs")]

    def runs_seen_since(self, since: float) -> list[int]:
        """Ids of the runs whose newest report time (``last_seen``) is at or after ``since``."""
        return [int(r) for (r,) in self._fetchall("SELECT id FROM runs WHERE last_seen >= ?", (since,))]

    def history_page(self, run_id: int, rank: int, after_step: int, until_step: int, limit: int) -> list[tuple]:
        """Rows (step, time, loss, rotation, step_angle, weight_norm, rho) with after_step < step <= until_step."""
        rows = self._fetchall(
            "SELECT s.step, s.time, s.loss, m.rotation, m.step_angle, m.weight_norm, m.rho "
            + _SAMPLE_JOIN
            + " WHERE s.run_id=? AND s.rank=? AND s.step>? AND s.step<=? ORDER BY s.step LIMIT ?",
            (run_id, rank, after_step, until_step, limit),
        )
        return [decode_values(r, 3) for r in rows]

    def ranks(self, run_id: int) -> list[int]:
        """Ranks with stored rows for a run."""
        return [r for (r,) in self._fetchall("SELECT DISTINCT rank FROM steps WHERE run_id=? ORDER BY rank", (run_id,))]

    def highest_run_id(self) -> int:
        """The highest run id any table uses (0 when none).

        Counts ids of rows without a ``runs`` row too (orphans written by
        layrot versions before the run-creation rule), so a new run never
        inherits them.
        """
        return max(int(v or 0) for ((v,),) in (self._fetchall(sql) for sql in HIGHEST_RUN_ID_SQL))

    # ------------------------------------------------------------ several collectors (server/cluster.py)
    def allocate_run_id(self) -> int | None:
        """A run id no other collector on this database hands out, or None: the caller's own counter
        (SQLite: one collector per file) is then the only source."""
        return None

    def heartbeat(self, collector: str, changed: Mapping[int, int], now: float, start: bool = False) -> None:
        """``collector`` is alive at ``now``; it holds ``changed[run_id]`` open sessions of those runs now (0:
        released). ``start``: every other run it had sessions of (before a restart) is released.

        Written at once on a connection of its own, not queued behind ingest's rows: a
        collector saturated with ingest still tells the others it is alive. One row per
        collector per pass, plus one per run whose count changed.
        """
        ops: list[tuple[str, list[tuple]]] = [(BEAT_SQL, [(collector, float(now))])]
        if start:
            release = "UPDATE holders SET sessions = 0, heartbeat = ? WHERE collector = ? AND sessions > 0"
            ops.append((release, [(now, collector)]))
        if changed:
            ops.append((HOLD_SQL, [(int(r), collector, int(n), float(now)) for r, n in changed.items()]))
        self._write_now(ops)

    def holders(self, since: float, alive_since: float) -> list[tuple[int, str, int, float, bool]]:
        """(run_id, collector, sessions, changed, alive) of the holder rows changed at or after ``since``, and of
        those with open sessions on a collector whose heartbeat is at or after ``alive_since`` (``alive``)."""
        return [
            (int(r), str(c), int(n), float(h), bool(a))
            for r, c, n, h, a in self._fetchall(
                "SELECT h.run_id, h.collector, h.sessions, h.heartbeat,"
                " CASE WHEN c.heartbeat >= ? THEN 1 ELSE 0 END"
                " FROM holders h LEFT JOIN collectors c ON c.id = h.collector"
                " WHERE h.heartbeat >= ? OR (h.sessions > 0 AND c.heartbeat >= ?)",
                (alive_since, since, alive_since),
            )
        ]

    def _write_now(self, ops: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Run each (sql with ``?`` placeholders, rows) for each of its rows, in one transaction of its own, now."""
        raise NotImplementedError

    def stored_steps(self, run_id: int, rank: int, steps: Sequence[int]) -> list[int]:
        """Which of ``steps`` of one rank are in the history (tests, consistency checks)."""
        return [
            s
            for s in steps
            if self._fetchall("SELECT 1 FROM steps WHERE run_id=? AND rank=? AND step=?", (run_id, rank, s))
        ]

    def current_commands(self, run_ids: Sequence[int] | None = None) -> list[tuple[int, int, bytes]]:
        """(run_id, version, serialized command) of the newest command of every run (or of ``run_ids``)."""
        where, params = _runs_filter("c.run_id", run_ids)
        return [
            (run_id, version, bytes(blob))
            for run_id, version, blob in self._fetchall(
                "SELECT run_id, version, command FROM commands c WHERE version ="
                " (SELECT MAX(version) FROM commands WHERE run_id = c.run_id)" + where,
                params,
            )
        ]

    def command_versions(self, run_ids: Sequence[int]) -> dict[int, int]:
        """run_id -> highest stored command version, for ``run_ids`` (runs without commands left out)."""
        where, params = _runs_filter("run_id", run_ids)
        return {
            int(r): int(v)
            for r, v in self._fetchall(
                "SELECT run_id, MAX(version) FROM commands WHERE 1 = 1" + where + " GROUP BY run_id", params
            )
        }

    def last_applied(self, run_ids: Sequence[int] | None = None) -> list[tuple]:
        """(run_id, rank, version, step, time, reason) of every rank's newest 'applied' audit entry."""
        where, params = _runs_filter("a.run_id", run_ids)
        return self._fetchall(
            "SELECT run_id, rank, version, step, time, reason FROM audit a WHERE event = 'applied' AND id ="
            " (SELECT MAX(id) FROM audit WHERE run_id = a.run_id AND rank = a.rank AND event = 'applied')" + where,
            params,
        )

    def last_rejected(self, run_ids: Sequence[int] | None = None) -> list[tuple]:
        """(run_id, rank, version, reason) of every rank's newest 'rejected' audit entry."""
        where, params = _runs_filter("a.run_id", run_ids)
        return self._fetchall(
            "SELECT run_id, rank, version, reason FROM audit a WHERE event = 'rejected' AND id ="
            " (SELECT MAX(id) FROM audit WHERE run_id = a.run_id AND rank = a.rank AND event = 'rejected')" + where,
            params,
        )

    def recent_audit(self, run_id: int, limit: int) -> list[tuple]:
        """The newest ``limit`` audit entries of a run, newest first.

        Rows are (version, time, who, what, event, step, reason).
        """
        return self._fetchall(
            "SELECT version, time, who, what, event, step, reason FROM audit WHERE run_id = ? ORDER BY id DESC LIMIT ?",
            (run_id, limit),
        )

    def recent_steps(self, run_id: int, rank: int, limit: int) -> list[tuple[int, float]]:
        """(step, time) of the newest ``limit`` stored steps of one rank, newest first."""
        return self._fetchall(
            "SELECT step, time FROM steps WHERE run_id=? AND rank=? ORDER BY step DESC LIMIT ?",
            (run_id, rank, limit),
        )

    def alert_counts(self) -> dict[tuple[str, str, str, str], int]:
        """Stored alerts counted by (run, layer, kind, severity)."""
        return {
            (run, layer, kind, severity): n
            for run, layer, kind, severity, n in self._fetchall(
                "SELECT run, COALESCE(layer, ''), kind, severity, COUNT(*) FROM alerts"
                " GROUP BY run, COALESCE(layer, ''), kind, severity"
            )
        }

    def alerts_after(self, after_id: int, limit: int) -> list[tuple]:
        """(id, then ``recent_alerts``' columns) of at most ``limit`` alerts stored after id ``after_id``, oldest
        first; with ``after_id`` < 0 only the newest alert's id (as the start of a reader that wants news)."""
        if after_id < 0:
            ((top,),) = self._fetchall("SELECT MAX(id) FROM alerts")
            return [(int(top or 0),)]
        return self._fetchall(
            "SELECT id, run, layer, step, kind, severity, angle, baseline, time, message, loss_before, loss_after"
            " FROM alerts WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )

    def alert_runs(self) -> list[str]:
        """Runs with stored alerts."""
        return [r for (r,) in self._fetchall("SELECT DISTINCT run FROM alerts")]

    def recent_alerts(self, run: str, limit: int) -> list[tuple]:
        """The newest ``limit`` stored alerts of a run, newest first, in ``insert_alert`` column order."""
        return self._fetchall(
            "SELECT run, layer, step, kind, severity, angle, baseline, time, message, loss_before, loss_after"
            " FROM alerts WHERE run=? ORDER BY id DESC LIMIT ?",
            (run, limit),
        )

    def load_thresholds(self) -> list[tuple[str, str]]:
        """(run, overrides json) of every run with stored overrides."""
        return self._fetchall("SELECT run, overrides FROM alert_thresholds")
