"""SQLite history store: one writer thread, batched commits, commit callbacks.

Why this shape:

* All writes go through ONE dedicated thread fed by a queue, so the asyncio
  ingest loop never blocks on disk and SQLite never sees concurrent writers.
  The thread drains whatever is queued into one transaction (executemany),
  so the commit rate adapts to the load: one commit per message when idle
  (lowest ack latency), large transactions under load (highest throughput).
* Each queued item may carry an opaque ``token``; after the transaction that
  holds the item commits, the store hands the tokens to ``on_commit``. The
  ingest side turns them into ``Ack`` messages, so an ack always means
  "durably in the database": a collector crash or restart loses nothing the
  job has not been told it may drop.
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

import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Later tasks add tables (commands, audit, alerts, thresholds) with their own
# CREATE TABLE IF NOT EXISTS; bump SCHEMA_VERSION only for incompatible changes.
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
    nonfinite         INTEGER NOT NULL DEFAULT 0
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


@dataclass
class _Item:
    sql: str | None
    rows: Sequence[Sequence[Any]]
    token: Any
    many: bool
    nrows: int
    done: threading.Event | None = None


class Store:
    """The history database. Thread-safe ``submit*`` calls; reads on per-thread connections.

    ``on_commit(tokens)`` is called from the writer thread after each commit
    with the tokens of the items it contained, in submission order;
    ``on_failure(tokens)`` after a transaction that failed and was rolled back.
    """

    def __init__(
        self,
        path: str,
        on_commit: Callable[[list[Any]], None] | None = None,
        on_failure: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.path = str(path)
        self.on_commit = on_commit
        self.on_failure = on_failure
        self.errors = 0
        self.commits = 0
        self._pending = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._closed = False
        init = self._connect()
        with init:
            init.executescript(SCHEMA)
            init.execute("INSERT OR IGNORE INTO schema_info (key, value) VALUES ('version', ?)", (str(SCHEMA_VERSION),))
        init.close()
        self._thread = threading.Thread(target=self._writer, name="layrot-store-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
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
        """Queue an ``executemany(sql, rows)`` (default: step rows)."""
        self._put(_Item(sql, rows, token, True, len(rows)))

    def submit(self, sql: str, params: Sequence[Any] = (), token: Any = None) -> None:
        """Queue one statement."""
        self._put(_Item(sql, params, token, False, 1))

    def barrier(self, token: Any) -> None:
        """Queue nothing but a token: it is released after everything queued before it commits."""
        self._put(_Item(None, (), token, False, 0))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until everything queued so far is committed. Returns False on timeout."""
        if self._closed or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._put(_Item(None, (), None, False, 0, done))
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
            ok = True
            try:
                conn.execute("BEGIN")
                for it in items:
                    if it.sql is None:
                        continue
                    if it.many:
                        conn.executemany(it.sql, it.rows)
                    else:
                        conn.execute(it.sql, it.rows)
                conn.execute("COMMIT")
                self.commits += 1
            except Exception:  # disk full, locked db, bad row: never kill the writer
                ok = False
                self.errors += 1
                log.exception("history store: transaction of %d items failed, rolled back", len(items))
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            with self._lock:
                self._pending -= nrows
            callback = self.on_commit if ok else self.on_failure
            if callback is not None:
                tokens = [it.token for it in items if it.token is not None]
                if tokens:
                    try:
                        callback(tokens)
                    except Exception:
                        log.exception("store callback failed")
            for it in items:
                if it.done is not None:
                    it.done.set()
        conn.close()

    # ------------------------------------------------------------ reads
    def load_runs(self) -> list[RunRecord]:
        """Every stored run with its layers and newest row (lowest rank), for restoring state."""
        conn = self.reader()
        out = []
        for r in conn.execute(
            "SELECT id, run, framework, framework_version, host, world_size, every, capabilities, meta,"
            " created, last_seen, first_report, nonfinite FROM runs ORDER BY id"
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
            rank = conn.execute("SELECT MIN(rank) FROM steps WHERE run_id=?", (rec.run_id,)).fetchone()[0]
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

    # ------------------------------------------------------------ runs (ingest)
    def insert_run(self, rec: RunRecord) -> None:
        """Queue a new run and its layer table."""
        for sql, params in insert_run_sql(rec):
            self.submit(sql, params)

    def set_world_size(self, run_id: int, world_size: int) -> None:
        """Queue a run's larger world size (a later Hello announced more ranks)."""
        self.submit("UPDATE runs SET world_size=? WHERE id=?", (world_size, run_id))

    def set_first_report(self, run_id: int, t: float) -> None:
        """Queue the time of a run's first reported step."""
        self.submit("UPDATE runs SET first_report=? WHERE id=?", (t, run_id))

    def update_progress(self, run_id: int, last_seen: float | None, nonfinite: int, token: Any = None) -> None:
        """Queue a run's newest report time and non-finite count; ``token`` is released with its commit."""
        self.submit("UPDATE runs SET last_seen=?, nonfinite=? WHERE id=?", (last_seen, nonfinite, run_id), token=token)

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
        "INSERT OR IGNORE INTO runs (id, run, framework, framework_version, host, world_size, every, capabilities,"
        " meta, created, last_seen, first_report, nonfinite) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
