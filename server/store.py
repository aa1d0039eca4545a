"""SQLite history store: one writer thread, batched commits, commit callbacks.

The invariant this module keeps for ingest: **acked => in the history store**.
A queued item may carry an opaque ``token``; ``on_commit(tokens, new_rows)`` is called
only after the transaction holding those items has committed (WAL, so the
rows are durable and visible to every other connection), and an item whose
statements did not commit goes to ``on_failure(tokens, reason)`` instead,
never to both, never to neither. Ingest turns the first into ``Ack``s and the
second into ``Nack``s (server/ingest.py), so a job is never told to drop a
batch that is not in the database.

Why this shape:

* All writes go through ONE dedicated thread fed by a queue, so the asyncio
  ingest loop never blocks on disk and SQLite never sees concurrent writers.
  The thread drains whatever is queued into one transaction, so the commit
  rate adapts to the load: one commit per message when idle (lowest ack
  latency), large transactions under load (highest throughput).
* Isolation: every value is checked *before* it is queued (``check_params``:
  integers within SQLite's signed 64 bits, bounded text and blobs, known
  types), so no item can make a shared transaction fail. If one still fails
  for a reason tied to its items (not a locked database, which would fail
  every item alike), each item is retried in a transaction of its own, so a
  bad item costs only itself and only its own batches are refused.
* An item is a unit: a StepBatch's rows and its run's progress update commit
  or fail together (``submit_batch``), and a new run's ``runs`` row with its
  layer table (``create_run``). Ingest accepts batches for a run only once
  that run's row has committed, so no row ever exists under a run id without
  its ``runs`` row; ``highest_run_id`` also counts ids found in any table, so
  a new run never reuses the id of orphan rows left by an older version.
* The schema carries a version (``schema_info``), checked at open: an older
  schema is migrated in place, a newer one is refused with an error naming
  the file.
* WAL + synchronous=NORMAL: a commit survives a process crash; only an OS
  crash / power loss can lose the last transactions (the job's resend buffer
  is bounded anyway). Readers use their own connections and never block the
  writer.
* One row per (run, rank, step) with columnar float64 BLOBs (layers in
  forward order): ~L*8 bytes per quantity per step, no per-layer rows, so a
  step of a 100-layer model is one small INSERT. ``INSERT OR REPLACE`` on
  that key makes at-least-once delivery idempotent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# 2: runs.key_hash (run ownership). Tables added later use CREATE TABLE IF NOT
# EXISTS; bump SCHEMA_VERSION for any change an older layrot must not open, and
# add its migration to _MIGRATIONS.
SCHEMA_VERSION = 2

# Bounds of every value that goes into SQL (check_params). SQLite integers are
# signed 64-bit: a Python int beyond them makes the whole executemany fail.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_TEXT = 1 << 20  # characters of one TEXT value
MAX_BLOB = 256 << 20  # bytes of one BLOB value
SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id                INTEGER PRIMARY KEY,
    run               TEXT NOT NULL UNIQUE,
    framework         TEXT,
    framework_version TEXT,
    host              TEXT,
    world_size        INTEGER,
    every             INTEGER,
    capabilities      TEXT,      -- json {"layca": bool, "control": bool, "loss": bool}
    meta              TEXT,      -- json of Hello.meta
    created           REAL,
    last_seen         REAL,      -- unix seconds of the newest reported step
    first_report      REAL,
    nonfinite         INTEGER NOT NULL DEFAULT 0,
    key_hash          TEXT       -- sha256 hex of the Hello.run_key that created the run; NULL: unbound
);
CREATE TABLE IF NOT EXISTS layers (
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    idx         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    shape       TEXT,            -- json list
    init_norm   REAL,
    numel       INTEGER,
    module_type TEXT,
    sharded     INTEGER,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS steps (
    run_id          INTEGER NOT NULL,
    rank            INTEGER NOT NULL,
    step            INTEGER NOT NULL,
    time            REAL,
    loss            REAL,        -- NULL when unknown / NaN
    command_version INTEGER,
    rotation        BLOB,        -- float64 x L: cosine distance to w(0)
    step_angle      BLOB,        -- float64 x L: radians rotated in this step
    weight_norm     BLOB,        -- float64 x L: ||w(t)|| (the raw "norm")
    rho             BLOB,        -- float64 x L or NULL without Layca
    dist0           BLOB,        -- raw inputs, kept so rotations can be recomputed
    dstep           BLOB,
    norm_prev       BLOB,
    dot0            BLOB,        -- (w(t) - w(0)).w(0), NULL when the job sends norms only
    dotstep         BLOB,        -- (w(t) - w(t-1)).w(t-1), idem
    PRIMARY KEY (run_id, rank, step)
);
-- Alert engine (server/alerts.py): every alert raised, and per-run threshold overrides.
CREATE TABLE IF NOT EXISTS alerts (
    id          INTEGER PRIMARY KEY,
    run         TEXT NOT NULL,
    layer       TEXT,            -- '' for run-level alerts
    step        INTEGER,
    kind        TEXT,            -- abrupt_rotation | divergence | stalled | rejections
    severity    TEXT,            -- warning | critical
    angle       REAL,            -- radians, NULL when not an angle alert
    baseline    REAL,
    time        REAL,            -- unix seconds at which the collector raised it
    message     TEXT,
    loss_before REAL,
    loss_after  REAL
);
CREATE INDEX IF NOT EXISTS alerts_run ON alerts (run, id);
CREATE TABLE IF NOT EXISTS alert_thresholds (
    run       TEXT PRIMARY KEY,
    overrides TEXT,              -- json of the fields SetThresholds set for this run
    updated   REAL
);
CREATE TABLE IF NOT EXISTS control_acks (
    run_id     INTEGER NOT NULL,
    rank       INTEGER,
    session_id TEXT,
    version    INTEGER,
    applied    INTEGER,
    reason     TEXT,
    step       INTEGER,
    time       REAL
);
-- Control plane (server/control.py): every RateCommand as sent, and the audit trail.
CREATE TABLE IF NOT EXISTS commands (
    run_id     INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    time       REAL,
    issued_by  TEXT,
    controller TEXT,
    command    BLOB,             -- serialized layrot.v1.RateCommand
    PRIMARY KEY (run_id, version)
);
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  INTEGER NOT NULL,
    version INTEGER,
    time    REAL,
    who     TEXT,
    what    TEXT,
    event   TEXT,                -- requested | sent | applied | rejected
    step    INTEGER,
    reason  TEXT,
    rank    INTEGER
);
CREATE INDEX IF NOT EXISTS audit_run ON audit (run_id, id);
"""

INSERT_STEP = (
    "INSERT OR REPLACE INTO steps (run_id, rank, step, time, loss, command_version, rotation, step_angle,"
    " weight_norm, rho, dist0, dstep, norm_prev, dot0, dotstep) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)

# A step row whose (run, rank, step) is stored already (a resend, a sync of a spool the collector has seen,
# a resumed job re-reporting steps): the IGNORE pass counts only new rows (``changes()``), then REPLACE
# writes the newest values of the others, so at-least-once delivery stays idempotent and the
# ingest counter equals the rows in the history.
INSERT_STEP_NEW = INSERT_STEP.replace("INSERT OR REPLACE", "INSERT OR IGNORE", 1)

UPDATE_PROGRESS = "UPDATE runs SET last_seen=?, nonfinite=? WHERE id=?"

INSERT_CONTROL_ACK = (
    "INSERT INTO control_acks (run_id, rank, session_id, version, applied, reason, step, time) VALUES (?,?,?,?,?,?,?,?)"
)
INSERT_COMMAND = (
    "INSERT OR REPLACE INTO commands (run_id, version, time, issued_by, controller, command) VALUES (?,?,?,?,?,?)"
)
INSERT_AUDIT = (
    "INSERT INTO audit (run_id, version, time, who, what, event, step, reason, rank) VALUES (?,?,?,?,?,?,?,?,?)"
)
INSERT_ALERT = (
    "INSERT INTO alerts (run, layer, step, kind, severity, angle, baseline, time, message, loss_before,"
    " loss_after) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)


def _statements(script: str) -> list[str]:
    """The SQL statements of ``script``, one by one."""
    out, cur = [], ""
    for line in script.splitlines(keepends=True):
        cur += line
        if sqlite3.complete_statement(cur):
            out.append(cur.strip())
            cur = ""
    return out


def _add_key_hash(conn: sqlite3.Connection) -> bool:
    """Version 2: runs.key_hash (run ownership). True when the column was added."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    if "key_hash" in cols:
        return False
    conn.execute("ALTER TABLE runs ADD COLUMN key_hash TEXT")
    return True


# Idempotent steps that bring an older schema to SCHEMA_VERSION (each True when it changed something).
_MIGRATIONS = (_add_key_hash,)

# Upper bound of rows per transaction, so one commit never holds callbacks
# (acks) back for long under a flood.
MAX_ROWS_PER_COMMIT = 20_000


@dataclass
class LayerRecord:
    """One row of the ``layers`` table."""

    index: int
    name: str
    shape: list[int]
    init_norm: float
    numel: int
    module_type: str
    sharded: bool = False


@dataclass
class RunRecord:
    """A run as stored, with its layer table and newest row (lowest rank)."""

    run_id: int
    run: str
    framework: str
    framework_version: str
    host: str
    world_size: int
    every: int
    capabilities: dict[str, bool]
    meta: dict[str, str]
    created: float
    last_seen: float | None
    first_report: float | None
    nonfinite: int
    layers: list[LayerRecord] = field(default_factory=list)
    last_rank: int | None = None
    last_row: tuple | None = None  # (step, time, loss, rotation, step_angle, weight_norm, rho)
    key_hash: str | None = None  # hash_run_key of the run's owner; None: not bound (older clients)
    stored_steps: dict[int, int] = field(default_factory=dict)  # rank -> highest stored step


def hash_run_key(key: str) -> str | None:
    """What the store keeps of a ``Hello.run_key`` (sha256 hex); None for an empty key.

    The key is a random secret of the job, not a password: a plain hash is
    enough to keep it out of the database file and its backups.
    """
    return hashlib.sha256(key.encode()).hexdigest() if key else None


class StoreValueError(ValueError):
    """A value that SQLite would refuse (or that is absurdly large): refused before it is queued."""


def check_params(params: Sequence[Any]) -> None:
    """Raise StoreValueError unless every value binds to SQLite and is within the store's bounds.

    Integers must fit SQLite's signed 64 bits; text and blobs are bounded;
    only None, int, float, str and bytes are accepted (a numpy scalar or
    an object would fail the whole transaction at bind time).
    """
    for v in params:
        if v is None or isinstance(v, float):
            continue
        if isinstance(v, int):
            if not INT64_MIN <= v <= INT64_MAX:
                raise StoreValueError(f"integer {v} does not fit SQLite's signed 64 bits")
        elif isinstance(v, str):
            if len(v) > MAX_TEXT:
                raise StoreValueError(f"text of {len(v)} characters (at most {MAX_TEXT})")
        elif isinstance(v, (bytes, bytearray, memoryview)):
            if len(v) > MAX_BLOB:
                raise StoreValueError(f"blob of {len(v)} bytes (at most {MAX_BLOB})")
        else:
            raise StoreValueError(f"cannot store a {type(v).__name__}")


def _check_step_rows(rows: Sequence[Sequence[Any]]) -> None:
    """``check_params`` for ``INSERT_STEP`` rows, at a cost per row of a few comparisons.

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


# (sql, parameters or rows, executemany?)
_Op = tuple[str, Sequence[Any], bool]


@dataclass(slots=True)
class _Item:
    """One unit of the writer: its statements commit together or not at all."""

    ops: list[_Op]
    token: Any
    nrows: int
    done: threading.Event | None = None
    new_rows: int = 0  # step rows this item added (not replaced) in its last commit attempt


class StoreError(RuntimeError):
    """The history database cannot be opened (e.g. a schema newer than this layrot)."""


def _item_independent(exc: BaseException) -> bool:
    """True when a failed transaction would fail for any item alike: retrying items one by one is useless.

    A locked or busy database makes every retry wait the full busy timeout
    again; everything else (a constraint, a bad value, a full disk that may
    have room for a small item) is worth a retry per item.
    """
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return "locked" in text or "busy" in text
    return False


class Store:
    """The history database. Thread-safe ``submit*`` calls; reads on per-thread connections.

    ``on_commit(tokens, new_rows)`` is called from the writer thread after each commit
    with the tokens of the items it contained, in submission order, and for
    each the number of step rows it added (rows of steps stored already are
    replaced, not counted);
    ``on_failure(tokens, reason)`` with the tokens of items whose statements
    were rolled back and are not in the database. ``busy_timeout`` is how
    long a write waits for a lock held by another connection before it fails.
    """

    def __init__(
        self,
        path: str,
        on_commit: Callable[[list[Any], list[int]], None] | None = None,
        on_failure: Callable[[list[Any], str], None] | None = None,
        busy_timeout: float = 30.0,
    ) -> None:
        self.path = str(path)
        self.on_commit = on_commit
        self.on_failure = on_failure
        self.busy_timeout = float(busy_timeout)
        self.errors = 0
        self.commits = 0
        self.failed_items = 0
        self._pending = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._closed = False
        init = self._connect()
        try:
            self._open_schema(init)
        finally:
            init.close()
        self._thread = threading.Thread(target=self._writer, name="layrot-store-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ schema
    def _open_schema(self, conn: sqlite3.Connection) -> None:
        """Create the schema, or check and migrate an existing one; refuse a newer one."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            has_info = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_info'").fetchone()
            version = None
            if has_info:
                row = conn.execute("SELECT value FROM schema_info WHERE key='version'").fetchone()
                version = int(row[0]) if row and str(row[0]).isdigit() else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: the history database has schema version {version}, newer than this layrot"
                    f" supports ({SCHEMA_VERSION}); upgrade layrot or use another --db"
                )
            # One statement at a time: executescript would COMMIT our transaction.
            for stmt in _statements(SCHEMA):
                conn.execute(stmt)
            # Tables that existed before keep their old columns: add the new ones.
            for migrate in _MIGRATIONS:
                if migrate(conn):
                    log.info("history store %s: schema migrated to version %d", self.path, SCHEMA_VERSION)
            conn.execute(
                "INSERT OR REPLACE INTO schema_info (key, value) VALUES ('version', ?)", (str(SCHEMA_VERSION),)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        return conn

    def reader(self) -> sqlite3.Connection:
        """A connection for the calling thread (reads only)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    # ------------------------------------------------------------ writes
    @property
    def pending_rows(self) -> int:
        """Rows (plus statements) queued but not yet committed."""
        return self._pending

    def _put(self, item: _Item) -> None:
        if self._closed:
            raise RuntimeError("store is closed")
        with self._lock:
            self._pending += item.nrows
        self._queue.put(item)

    def submit_rows(self, rows: Sequence[Sequence[Any]], token: Any = None, sql: str = INSERT_STEP) -> None:
        """Queue an ``executemany(sql, rows)`` (default: step rows); StoreValueError if a value is out of bounds."""
        if sql is INSERT_STEP:
            _check_step_rows(rows)
        else:
            for r in rows:
                check_params(r)
        self._put(_Item([(sql, rows, True)], token, len(rows)))

    def submit(self, sql: str, params: Sequence[Any] = (), token: Any = None) -> None:
        """Queue one statement; StoreValueError if a value is out of bounds."""
        check_params(params)
        self._put(_Item([(sql, params, False)], token, 1))

    def submit_batch(
        self,
        rows: Sequence[Sequence[Any]],
        run_id: int,
        last_seen: float | None,
        nonfinite: int,
        first_report: float | None = None,
        token: Any = None,
    ) -> None:
        """Queue one StepBatch as one unit: its step rows and its run's progress commit together or not at all."""
        _check_step_rows(rows)
        progress = (last_seen, nonfinite, run_id)
        check_params(progress)
        ops: list[_Op] = [(INSERT_STEP, rows, True), (UPDATE_PROGRESS, progress, False)]
        if first_report is not None:
            check_params((first_report, run_id))
            ops.append(("UPDATE runs SET first_report=? WHERE id=?", (first_report, run_id), False))
        self._put(_Item(ops, token, len(rows) + len(ops) - 1))

    def barrier(self, token: Any) -> None:
        """Queue nothing but a token: it is released after everything queued before it commits."""
        self._put(_Item([], token, 0))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until everything queued so far is committed. Returns False on timeout."""
        if self._closed or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._put(_Item([], None, 0, done))
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the writer thread."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @staticmethod
    def _execute(conn: sqlite3.Connection, items: Sequence[_Item]) -> None:
        conn.execute("BEGIN")
        for it in items:
            it.new_rows = 0
            for sql, params, many in it.ops:
                if sql is INSERT_STEP:
                    new = conn.executemany(INSERT_STEP_NEW, params).rowcount
                    if new < len(params):  # some steps were stored already: write their newest values
                        conn.executemany(INSERT_STEP, params)
                    it.new_rows += new
                elif many:
                    conn.executemany(sql, params)
                else:
                    conn.execute(sql, params)
        conn.execute("COMMIT")

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:  # SQLite already rolled back (e.g. SQLITE_FULL) or never began
            pass

    def _commit_items(self, conn: sqlite3.Connection, items: list[_Item]) -> list[tuple[_Item, str | None]]:
        """Commit ``items`` in one transaction, else one by one; each item with None (stored) or the reason."""
        try:
            self._execute(conn, items)
            self.commits += 1
            return [(it, None) for it in items]
        except Exception as exc:  # disk full, locked db, bad row: never kill the writer
            self.errors += 1
            self._rollback(conn)
            reason = f"{type(exc).__name__}: {exc}"
            if len(items) == 1 or _item_independent(exc):
                log.error("history store: transaction of %d items failed, rolled back: %s", len(items), reason)
                return [(it, reason) for it in items]
            log.warning(
                "history store: transaction of %d items failed (%s); retrying them one by one", len(items), reason
            )
        out: list[tuple[_Item, str | None]] = []
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

    def _writer(self) -> None:
        conn = self._connect()
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            items = [first]
            nrows = first.nrows
            while nrows < MAX_ROWS_PER_COMMIT:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
                nrows += nxt.nrows
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
        conn.close()

    @staticmethod
    def _callback(fn: Callable[..., None] | None, tokens: list[Any], *args: Any) -> None:
        if fn is None or not tokens:
            return
        try:
            fn(tokens, *args)
        except Exception:
            log.exception("store callback failed")

    # ------------------------------------------------------------ reads
    def load_runs(self) -> list[RunRecord]:
        """Every stored run with its layers and newest row (lowest rank), for restoring state."""
        conn = self.reader()
        out = []
        for r in conn.execute(
            "SELECT id, run, framework, framework_version, host, world_size, every, capabilities, meta,"
            " created, last_seen, first_report, nonfinite, key_hash FROM runs ORDER BY id"
        ):
            rec = RunRecord(
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
            out.append(rec)
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
                for i, n, s, x, k, m, sh in conn.execute(
                    "SELECT idx, name, shape, init_norm, numel, module_type, sharded FROM layers"
                    " WHERE run_id=? ORDER BY idx",
                    (rec.run_id,),
                )
            ]
            rec.stored_steps = {
                rk: st
                for rk, st in conn.execute(
                    "SELECT rank, MAX(step) FROM steps WHERE run_id=? GROUP BY rank", (rec.run_id,)
                )
            }
            rank = min(rec.stored_steps) if rec.stored_steps else None
            if rank is not None:
                rec.last_rank = rank
                rec.last_row = conn.execute(
                    "SELECT step, time, loss, rotation, step_angle, weight_norm, rho FROM steps"
                    " WHERE run_id=? AND rank=? ORDER BY step DESC LIMIT 1",
                    (rec.run_id, rank),
                ).fetchone()
        return out

    def history_page(self, run_id: int, rank: int, after_step: int, until_step: int, limit: int) -> list[tuple]:
        """Rows (step, time, loss, rotation, step_angle, weight_norm, rho) with after_step < step <= until_step."""
        return (
            self.reader()
            .execute(
                "SELECT step, time, loss, rotation, step_angle, weight_norm, rho FROM steps"
                " WHERE run_id=? AND rank=? AND step>? AND step<=? ORDER BY step LIMIT ?",
                (run_id, rank, after_step, until_step, limit),
            )
            .fetchall()
        )

    def ranks(self, run_id: int) -> list[int]:
        """Ranks with stored rows for a run."""
        return [
            r
            for (r,) in self.reader().execute("SELECT DISTINCT rank FROM steps WHERE run_id=? ORDER BY rank", (run_id,))
        ]

    def highest_run_id(self) -> int:
        """The highest run id any table uses (0 when none).

        Counts ids of rows without a ``runs`` row too (orphans written by
        layrot versions before the run-creation rule), so a new run never
        inherits them.
        """
        conn = self.reader()
        top = 0
        for table, col in (("runs", "id"), ("steps", "run_id"), ("layers", "run_id"), ("commands", "run_id")):
            (v,) = conn.execute(f"SELECT MAX({col}) FROM {table}").fetchone()
            top = max(top, v or 0)
        for table in ("audit", "control_acks"):  # no index on run_id: small tables
            (v,) = conn.execute(f"SELECT MAX(run_id) FROM {table}").fetchone()
            top = max(top, v or 0)
        return top

    def stored_steps(self, run_id: int, rank: int, steps: Sequence[int]) -> list[int]:
        """Which of ``steps`` of one rank are in the history (tests, consistency checks)."""
        conn = self.reader()
        return [
            s
            for s in steps
            if conn.execute("SELECT 1 FROM steps WHERE run_id=? AND rank=? AND step=?", (run_id, rank, s)).fetchone()
        ]

    # ------------------------------------------------------------ runs (ingest)
    def create_run(self, rec: RunRecord, token: Any = None) -> None:
        """Queue a new run and its layer table as one unit; ``token`` is released with its commit (or failure).

        A plain INSERT, not INSERT OR IGNORE: a run name or id that exists
        already fails this run's creation instead of hanging its layers on
        another run. StoreValueError when a value is out of bounds.
        """
        ops: list[_Op] = []
        for sql, params in insert_run_sql(rec):
            check_params(params)
            ops.append((sql, params, False))
        self._put(_Item(ops, token, len(ops)))

    def insert_run(self, rec: RunRecord) -> None:
        """Queue a new run and its layer table (no token; see ``create_run``)."""
        self.create_run(rec)

    def set_world_size(self, run_id: int, world_size: int) -> None:
        """Queue a run's larger world size (a later Hello announced more ranks)."""
        self.submit("UPDATE runs SET world_size=? WHERE id=?", (world_size, run_id))

    def set_first_report(self, run_id: int, t: float) -> None:
        """Queue the time of a run's first reported step."""
        self.submit("UPDATE runs SET first_report=? WHERE id=?", (t, run_id))

    def update_progress(self, run_id: int, last_seen: float | None, nonfinite: int, token: Any = None) -> None:
        """Queue a run's newest report time and non-finite count; ``token`` is released with its commit."""
        self.submit(UPDATE_PROGRESS, (last_seen, nonfinite, run_id), token=token)

    def insert_control_ack(self, params: Sequence[Any]) -> None:
        """Queue a ControlAck: (run_id, rank, session_id, version, applied, reason, step, time)."""
        self.submit(INSERT_CONTROL_ACK, params)

    # ------------------------------------------------------------ control plane (server/control.py)
    def insert_command(self, params: Sequence[Any]) -> None:
        """Queue a RateCommand as sent: (run_id, version, time, issued_by, controller, serialized command)."""
        self.submit(INSERT_COMMAND, params)

    def insert_audit(self, params: Sequence[Any]) -> None:
        """Queue an audit entry: (run_id, version, time, who, what, event, step, reason, rank)."""
        self.submit(INSERT_AUDIT, params)

    def current_commands(self) -> list[tuple[int, int, bytes]]:
        """(run_id, version, serialized command) of the newest command of every run."""
        return (
            self.reader()
            .execute(
                "SELECT run_id, version, command FROM commands c WHERE version ="
                " (SELECT MAX(version) FROM commands WHERE run_id = c.run_id)"
            )
            .fetchall()
        )

    def last_applied(self) -> list[tuple]:
        """(run_id, rank, version, step, time, reason) of every rank's newest 'applied' audit entry."""
        return (
            self.reader()
            .execute(
                "SELECT run_id, rank, version, step, time, reason FROM audit a WHERE event = 'applied' AND id ="
                " (SELECT MAX(id) FROM audit WHERE run_id = a.run_id AND rank = a.rank AND event = 'applied')"
            )
            .fetchall()
        )

    def last_rejected(self) -> list[tuple]:
        """(run_id, rank, version, reason) of every rank's newest 'rejected' audit entry."""
        return (
            self.reader()
            .execute(
                "SELECT run_id, rank, version, reason FROM audit a WHERE event = 'rejected' AND id ="
                " (SELECT MAX(id) FROM audit WHERE run_id = a.run_id AND rank = a.rank AND event = 'rejected')"
            )
            .fetchall()
        )

    def recent_audit(self, run_id: int, limit: int) -> list[tuple]:
        """The newest ``limit`` audit entries of a run, newest first.

        Rows are (version, time, who, what, event, step, reason).
        """
        return (
            self.reader()
            .execute(
                "SELECT version, time, who, what, event, step, reason FROM audit WHERE run_id = ?"
                " ORDER BY id DESC LIMIT ?",
                (run_id, limit),
            )
            .fetchall()
        )

    def recent_steps(self, run_id: int, rank: int, limit: int) -> list[tuple[int, float]]:
        """(step, time) of the newest ``limit`` stored steps of one rank, newest first."""
        return (
            self.reader()
            .execute(
                "SELECT step, time FROM steps WHERE run_id=? AND rank=? ORDER BY step DESC LIMIT ?",
                (run_id, rank, limit),
            )
            .fetchall()
        )

    # ------------------------------------------------------------ alerts (server/alert_hub.py, server/alerts.py)
    def insert_alert(self, params: Sequence[Any]) -> None:
        """Queue an alert.

        ``params``: (run, layer, step, kind, severity, angle, baseline, time, message, loss_before, loss_after).
        """
        self.submit(INSERT_ALERT, params)

    def alert_counts(self) -> dict[tuple[str, str, str, str], int]:
        """Stored alerts counted by (run, layer, kind, severity)."""
        return {
            (run, layer, kind, severity): n
            for run, layer, kind, severity, n in self.reader().execute(
                "SELECT run, COALESCE(layer, ''), kind, severity, COUNT(*) FROM alerts"
                " GROUP BY run, layer, kind, severity"
            )
        }

    def alert_runs(self) -> list[str]:
        """Runs with stored alerts."""
        return [r for (r,) in self.reader().execute("SELECT DISTINCT run FROM alerts")]

    def recent_alerts(self, run: str, limit: int) -> list[tuple]:
        """The newest ``limit`` stored alerts of a run, newest first, in ``insert_alert`` column order."""
        return (
            self.reader()
            .execute(
                "SELECT run, layer, step, kind, severity, angle, baseline, time, message, loss_before, loss_after"
                " FROM alerts WHERE run=? ORDER BY id DESC LIMIT ?",
                (run, limit),
            )
            .fetchall()
        )

    def save_thresholds(self, run: str, overrides: str, updated: float) -> None:
        """Queue a run's threshold overrides (json)."""
        sql = "INSERT OR REPLACE INTO alert_thresholds (run, overrides, updated) VALUES (?,?,?)"
        self.submit(sql, (run, overrides, updated))

    def load_thresholds(self) -> list[tuple[str, str]]:
        """(run, overrides json) of every run with stored overrides."""
        return self.reader().execute("SELECT run, overrides FROM alert_thresholds").fetchall()


def insert_run_sql(rec: RunRecord) -> Iterable[tuple[str, tuple]]:
    """Statements that persist a new run and its layer table."""
    yield (
        "INSERT INTO runs (id, run, framework, framework_version, host, world_size, every, capabilities,"
        " meta, created, last_seen, first_report, nonfinite, key_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
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
        ),
    )
    for lay in rec.layers:
        yield (
            "INSERT OR REPLACE INTO layers (run_id, idx, name, shape, init_norm, numel, module_type, sharded)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (
                rec.run_id,
                lay.index,
                lay.name,
                json.dumps(list(lay.shape)),
                lay.init_norm,
                lay.numel,
                lay.module_type,
                int(lay.sharded),
            ),
        )
