"""SQLite history store (the default backend): one embedded file, WAL, one writer thread.

The writer thread, the batching of items into transactions, the per-item retry and
the commit callbacks that keep **acked => stored** are shared with the PostgreSQL
backend (server/store_base.py); the interface is server/store_api.py. What is
SQLite's own:

* No item can fail a shared transaction on a value: ``check_params`` keeps integers
  within SQLite's signed 64 bits, text and blobs bounded, types known. A locked or
  busy database fails every item alike (``_item_independent``): no retry per item,
  which would wait the full busy timeout again for each.
* Ingest accepts batches for a run only once that run's row has committed, so no
  row ever exists under a run id without its ``runs`` row; ``highest_run_id`` also
  counts ids found in any table, so a new run never reuses the id of orphan rows
  left by an older version.
* The schema carries a version (``schema_info``), checked at open: an older
  schema is migrated in place, a newer one is refused with an error naming
  the file.
* WAL + synchronous=NORMAL: a commit survives a process crash; only an OS
  crash / power loss can lose the last transactions (the job's resend buffer
  is bounded anyway). Readers use their own connections and never block the
  writer.
* Schema 3: one ``steps`` row per (run, rank, step) (time, loss, command
  version, the digest of its values) and one ``samples`` row per (run, step,
  digest) with columnar float32 BLOBs (layers in forward order): L*4 bytes
  per quantity per step, no per-layer rows; DDP ranks with identical values
  share one samples row. ``INSERT OR REPLACE`` on the steps key and
  ``INSERT OR IGNORE`` of samples make at-least-once delivery idempotent.
  New files use 16 kB pages (several samples rows per page).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any

from layrot.server import store_base as sb
from layrot.server.store_api import (
    INT64_MAX,
    INT64_MIN,
    MAX_BLOB,
    MAX_TEXT,
    SCHEMA_VERSION,
    HistoryStore,
    LayerRecord,
    RunRecord,
    StoreError,
    StoreValueError,
    check_params,
    hash_run_key,
    open_store,
)
from layrot.server.store_base import MAX_ROWS_PER_COMMIT, Item, QueuedStore

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_BLOB",
    "MAX_ROWS_PER_COMMIT",
    "MAX_TEXT",
    "SCHEMA_VERSION",
    "HistoryStore",
    "LayerRecord",
    "RunRecord",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreValueError",
    "check_params",
    "hash_run_key",
    "open_store",
]

log = logging.getLogger(__name__)

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
    digest          BLOB,        -- of the values: the samples row of this rank's step
    PRIMARY KEY (run_id, rank, step)
);
-- The per-layer values of a step, once for every rank that sent the same (DDP replicas).
CREATE TABLE IF NOT EXISTS samples (
    run_id      INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    digest      BLOB NOT NULL,
    rotation    BLOB,            -- float32 x L: cosine distance to w(0)
    step_angle  BLOB,            -- float32 x L: radians rotated in this step
    weight_norm BLOB,            -- float32 x L: ||w(t)||
    rho         BLOB,            -- float32 x L or NULL without Layca
    PRIMARY KEY (run_id, step, digest)
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
-- Which collector holds a run's sessions (several collectors on one PostgreSQL: server/cluster.py).
CREATE TABLE IF NOT EXISTS holders (
    run_id    INTEGER NOT NULL,
    collector TEXT NOT NULL,
    sessions  INTEGER NOT NULL,     -- open sessions of the run on that collector (0: released)
    heartbeat REAL NOT NULL,        -- unix seconds at which that collector last changed the row
    PRIMARY KEY (run_id, collector)
);
CREATE TABLE IF NOT EXISTS collectors (
    id        TEXT PRIMARY KEY,
    heartbeat REAL NOT NULL         -- unix seconds of the collector's newest pass: alive while recent
);
"""

# What a StepBatch item holds beside its rows (QueuedStore.submit_batch).
_BATCH_OPS = frozenset((sb.PROGRESS, sb.FIRST_REPORT))

# 16 kB pages hold several samples rows of a 200-layer run (4 kB pages held one each and wasted the
# rest); the WAL is checkpointed every WAL_CHECKPOINT_BYTES, whatever the page size.
PAGE_SIZE = 16384
WAL_CHECKPOINT_BYTES = 4 << 20

INSERT_STEP = "INSERT OR REPLACE INTO steps (" + ", ".join(sb.STEP_TABLE_COLUMNS) + ") VALUES (?,?,?,?,?,?,?)"
# Identical values of another rank (or a resend) are stored already: one samples row for them all.
INSERT_SAMPLE = "INSERT OR IGNORE INTO samples (" + ", ".join(sb.SAMPLE_COLUMNS) + ") VALUES (?,?,?,?,?,?,?)"

# A step row whose (run, rank, step) is stored already (a resend, a sync of a spool the collector has seen,
# a resumed job re-reporting steps): the IGNORE pass counts only new rows (``changes()``), then REPLACE
# writes the newest values of the others, so at-least-once delivery stays idempotent and the
# ingest counter equals the rows in the history.
INSERT_STEP_NEW = INSERT_STEP.replace("INSERT OR REPLACE", "INSERT OR IGNORE", 1)

# The SQL of every named statement an item may hold (server/store_base.py), but the step rows.
STATEMENTS = {
    sb.RUN: "INSERT INTO runs (id, run, framework, framework_version, host, world_size, every, capabilities,"
    " meta, created, last_seen, first_report, nonfinite, key_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    sb.LAYER: "INSERT OR REPLACE INTO layers (run_id, idx, name, shape, init_norm, numel, module_type, sharded)"
    " VALUES (?,?,?,?,?,?,?,?)",
    sb.PROGRESS: "UPDATE runs SET last_seen=?, nonfinite=? WHERE id=?",
    sb.FIRST_REPORT: "UPDATE runs SET first_report=? WHERE id=?",
    sb.WORLD_SIZE: "UPDATE runs SET world_size=? WHERE id=?",
    sb.CONTROL_ACK: "INSERT INTO control_acks (run_id, rank, session_id, version, applied, reason, step, time)"
    " VALUES (?,?,?,?,?,?,?,?)",
    sb.COMMAND: "INSERT OR REPLACE INTO commands (run_id, version, time, issued_by, controller, command)"
    " VALUES (?,?,?,?,?,?)",
    sb.AUDIT: "INSERT INTO audit (run_id, version, time, who, what, event, step, reason, rank)"
    " VALUES (?,?,?,?,?,?,?,?,?)",
    sb.ALERT: "INSERT INTO alerts (run, layer, step, kind, severity, angle, baseline, time, message, loss_before,"
    " loss_after) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
    sb.THRESHOLDS: "INSERT OR REPLACE INTO alert_thresholds (run, overrides, updated) VALUES (?,?,?)",
}


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


def _v2_steps_aside(conn: sqlite3.Connection) -> bool:
    """Version 3, before the schema is created: a version-2 ``steps`` (float64 columns) becomes ``steps_v2``."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(steps)")}
    if "rotation" not in cols:
        return False
    conn.execute("ALTER TABLE steps RENAME TO steps_v2")
    return True


def _split_steps(conn: sqlite3.Connection) -> bool:
    """Version 3: the rows of ``steps_v2`` re-encoded into ``steps`` + ``samples``, in batches; then dropped."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='steps_v2'").fetchone():
        return False
    cur = conn.execute("SELECT " + ", ".join(sb.STEP_COLUMNS) + " FROM steps_v2")
    while batch := cur.fetchmany(1000):
        steps, samples = sb.migrate_v2_rows(batch)
        conn.executemany(INSERT_SAMPLE, samples)
        conn.executemany(INSERT_STEP, steps)
    conn.execute("DROP TABLE steps_v2")
    return True


# Idempotent steps that bring an older schema to SCHEMA_VERSION (each True when it changed something),
# in order: those of _BEFORE_SCHEMA run before the CREATE statements, the others after.
_BEFORE_SCHEMA = (_v2_steps_aside,)
_MIGRATIONS = (_add_key_hash, _split_steps)


class Store(QueuedStore):
    """The SQLite history database. Thread-safe ``submit*`` calls; reads on per-thread connections.

    See ``QueuedStore`` for the callbacks. ``busy_timeout`` is how long a
    write waits for a lock held by another connection before it fails.
    """

    def __init__(
        self,
        path: str,
        on_commit: Callable[[list[Any], list[int]], None] | None = None,
        on_failure: Callable[[list[Any], str], None] | None = None,
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(on_commit, on_failure)
        self.path = str(path)
        self.busy_timeout = float(busy_timeout)
        self._local = threading.local()
        init = self._connect()
        try:
            self._open_schema(init)
        finally:
            init.close()
        self._start_writer()

    @property
    def description(self) -> str:
        """The database file."""
        return self.path

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
            changed = any([migrate(conn) for migrate in _BEFORE_SCHEMA])
            # One statement at a time: executescript would COMMIT our transaction.
            for stmt in _statements(SCHEMA):
                conn.execute(stmt)
            # Tables that existed before keep their old columns: add the new ones.
            for migrate in _MIGRATIONS:
                changed = migrate(conn) or changed
            if changed:
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
        # The page size applies to a new file only (a no-op on an existing one).
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        # SQLite's default checkpoints the WAL every 1000 pages: 16 MB of 16 kB pages. On a disk
        # that fills, a WAL that large can take the last free bytes and stay there (only a commit
        # checkpoints it, and every commit then fails): bounded in bytes, as with 4 kB pages.
        conn.execute(f"PRAGMA wal_autocheckpoint={max(1, WAL_CHECKPOINT_BYTES // PAGE_SIZE)}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_BYTES}")
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

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.reader().execute(sql, params).fetchall()

    def _write_now(self, ops: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in ops:
                    conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()

    def _close_readers(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _open_writer(self) -> sqlite3.Connection:
        return self._connect()

    def _close_writer(self, conn: sqlite3.Connection) -> None:
        conn.close()

    # ------------------------------------------------------------ writes
    def _execute(self, conn: sqlite3.Connection, items: Sequence[Item]) -> None:
        conn.execute("BEGIN")
        group: list[Item] = []
        for it in items:
            it.new_rows = 0
            if it.ops and it.ops[0][0] == sb.STEPS and all(op[0] in _BATCH_OPS for op in it.ops[1:]):
                group.append(it)
                continue
            self._insert_batches(conn, group)
            group = []
            self._execute_item(conn, it)
        self._insert_batches(conn, group)
        conn.execute("COMMIT")

    def _execute_item(self, conn: sqlite3.Connection, it: Item) -> None:
        for name, params, many in it.ops:
            if name == sb.STEPS:
                steps, samples = sb.encode_steps(params)
                conn.executemany(INSERT_SAMPLE, samples)
                new = conn.executemany(INSERT_STEP_NEW, steps).rowcount
                if new < len(steps):  # some steps were stored already: write their newest values
                    conn.executemany(INSERT_STEP, steps)
                it.new_rows += new
            elif name == sb.SQL:
                sql, args, counted = params
                n = conn.execute(sql, args).rowcount
                if counted:
                    it.new_rows += max(n, 0)
            elif many:
                conn.executemany(STATEMENTS[name], params)
            else:
                conn.execute(STATEMENTS[name], params)

    def _insert_batches(self, conn: sqlite3.Connection, group: list[Item]) -> None:
        """StepBatch items (rows, progress) in a few statements for them all, not three or four per item.

        One-step batches paid the Python of each statement, and a GIL hand-off around it
        behind the busy ingest loop, per item. When some step is stored already (a resend),
        the items go one by one instead, which writes the newest values and counts new rows.
        """
        if len(group) < 2:
            for it in group:
                self._execute_item(conn, it)
            return
        rows = [r for it in group for r in it.ops[0][1]]
        steps, samples = sb.encode_steps(rows)
        conn.execute("SAVEPOINT batches")
        conn.executemany(INSERT_SAMPLE, samples)
        if conn.executemany(INSERT_STEP_NEW, steps).rowcount < len(steps):
            conn.execute("ROLLBACK TO batches")
            conn.execute("RELEASE batches")
            for it in group:
                self._execute_item(conn, it)
            return
        conn.execute("RELEASE batches")
        by_name: dict[str, list[Any]] = {}
        for it in group:
            it.new_rows = len(it.ops[0][1])
            for name, params, _many in it.ops[1:]:
                by_name.setdefault(name, []).append(params)
        for name, params in by_name.items():  # each run's progress at most once here (_execute_coalesced)
            conn.executemany(STATEMENTS[name], params)

    def reclaim(self) -> None:
        """VACUUM on a connection of its own after a WAL checkpoint: the file shrinks to what it holds.

        VACUUM rewrites the file and holds the write lock meanwhile: the writer's commits wait
        (``busy_timeout``) and ingest backs off, so run it from ``compact``, not on every pass.
        """
        self.flush()
        conn = self._connect()
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    def history_bytes(self) -> int:
        """Bytes the history takes on disk: the database file and its WAL."""
        return sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:  # SQLite already rolled back (e.g. SQLITE_FULL) or never began
            pass

    def _item_independent(self, exc: BaseException) -> bool:
        """A locked or busy database fails every item alike; everything else is worth a retry per item.

        A constraint, a bad value, a full disk that may have room for a small
        item: each item alone may still commit.
        """
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc).lower()
            return "locked" in text or "busy" in text
        return False


# The name the SQLite backend is known by beside PostgresStore.
SQLiteStore = Store
