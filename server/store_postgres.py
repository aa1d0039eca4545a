"""PostgreSQL history store: ``serve --db postgresql://user@host/db`` (psycopg 3, psycopg_pool).

The same store as SQLite's (server/store.py) for everything above the database: the one
writer thread, items batched into one transaction, the per-item retry, the commit callbacks
that keep **acked => stored** (server/store_base.py), the same tables and the same schema
version. What is PostgreSQL's own:

* Step rows go in with one binary ``COPY`` per transaction. When none of their steps is stored
  yet (one range query per transaction tells; the common case), straight into ``steps``, every
  row new. Otherwise (a resend, a replayed spool, a resumed job) into a temporary table, then
  one ``INSERT ... SELECT ... ON CONFLICT (run_id, rank, step) DO UPDATE``: a resend replaces
  the row (at-least-once delivery stays idempotent) and only rows that were not there count
  as new (``xmax = 0`` of the returned rows). Either way each new row is credited to the first
  item of the transaction that holds it, as SQLite's IGNORE-then-REPLACE pass does. When one
  transaction holds the same step twice (a resend queued behind its original), only the later
  row goes in, as in SQLite where the later statement runs last (and PostgreSQL refuses to
  update one row twice in one statement). Transactions hold fewer rows than SQLite's
  (``MAX_ROWS_PER_COMMIT``). The float64 columns are stored out of line uncompressed
  (``STORAGE EXTERNAL``): they barely compress, and the attempt cost more than the rest.
  Schema 3's ``samples`` (float32 values, one row per identical content: DDP replicas) go in
  through a staging table and ``ON CONFLICT DO NOTHING``, since another rank may have stored
  the same row in another transaction.
* The other statements of a transaction go out in one pipeline (no round trip each).
* Two connection pools: the writer's (one connection, a ``lock_timeout`` of ``busy_timeout``,
  the temporary table made once per connection) and the readers' (the query executor's
  threads, the loop thread's restore and control reads). A pool checks a connection before
  lending it and replaces a broken one, so a restarted server is used again without a
  collector restart; meanwhile the writer's transactions fail and their items are refused
  (Nacks: the jobs resend them).
* A lost server, a lock held past ``busy_timeout`` or no connection within it fail every item
  alike: no retry per item (``_item_independent``). A commit whose answer is lost with the
  connection counts as failed: its items may be stored, and a resend replaces them.
* The schema is created, checked and migrated at open under a transaction-scoped advisory
  lock, so collectors starting together on one database do not race; a schema version newer
  than this layrot is refused with a message naming the database (its URL without password).
* Types: BIGINT for every integer (the value checks allow signed 64 bits), DOUBLE PRECISION
  for every real (PostgreSQL's REAL is float4), BYTEA for the float32 value columns.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from layrot.server import store_base as sb
from layrot.server.store_api import SCHEMA_VERSION, StoreError, redact_url
from layrot.server.store_base import Item, QueuedStore

log = logging.getLogger(__name__)

# The SQLite schema (server/store.py) in PostgreSQL's types.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_info (key TEXT PRIMARY KEY, value TEXT)",
    """CREATE TABLE IF NOT EXISTS runs (
        id                BIGINT PRIMARY KEY,
        run               TEXT NOT NULL UNIQUE,
        framework         TEXT,
        framework_version TEXT,
        host              TEXT,
        world_size        BIGINT,
        every             BIGINT,
        capabilities      TEXT,
        meta              TEXT,
        created           DOUBLE PRECISION,
        last_seen         DOUBLE PRECISION,
        first_report      DOUBLE PRECISION,
        nonfinite         BIGINT NOT NULL DEFAULT 0,
        key_hash          TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS layers (
        run_id      BIGINT NOT NULL REFERENCES runs(id),
        idx         BIGINT NOT NULL,
        name        TEXT NOT NULL,
        shape       TEXT,
        init_norm   DOUBLE PRECISION,
        numel       BIGINT,
        module_type TEXT,
        sharded     BIGINT,
        PRIMARY KEY (run_id, idx)
    )""",
    """CREATE TABLE IF NOT EXISTS steps (
        run_id          BIGINT NOT NULL,
        rank            BIGINT NOT NULL,
        step            BIGINT NOT NULL,
        time            DOUBLE PRECISION,
        loss            DOUBLE PRECISION,
        command_version BIGINT,
        digest          BYTEA,
        PRIMARY KEY (run_id, rank, step)
    )""",
    """CREATE TABLE IF NOT EXISTS samples (
        run_id      BIGINT NOT NULL,
        step        BIGINT NOT NULL,
        digest      BYTEA NOT NULL,
        rotation    BYTEA,
        step_angle  BYTEA,
        weight_norm BYTEA,
        rho         BYTEA,
        PRIMARY KEY (run_id, step, digest)
    )""",
    """CREATE TABLE IF NOT EXISTS alerts (
        id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        run         TEXT NOT NULL,
        layer       TEXT,
        step        BIGINT,
        kind        TEXT,
        severity    TEXT,
        angle       DOUBLE PRECISION,
        baseline    DOUBLE PRECISION,
        time        DOUBLE PRECISION,
        message     TEXT,
        loss_before DOUBLE PRECISION,
        loss_after  DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS alerts_run ON alerts (run, id)",
    """CREATE TABLE IF NOT EXISTS alert_thresholds (
        run       TEXT PRIMARY KEY,
        overrides TEXT,
        updated   DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS control_acks (
        run_id     BIGINT NOT NULL,
        rank       BIGINT,
        session_id TEXT,
        version    BIGINT,
        applied    BIGINT,
        reason     TEXT,
        step       BIGINT,
        time       DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS commands (
        run_id     BIGINT NOT NULL,
        version    BIGINT NOT NULL,
        time       DOUBLE PRECISION,
        issued_by  TEXT,
        controller TEXT,
        command    BYTEA,
        PRIMARY KEY (run_id, version)
    )""",
    """CREATE TABLE IF NOT EXISTS audit (
        id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        run_id  BIGINT NOT NULL,
        version BIGINT,
        time    DOUBLE PRECISION,
        who     TEXT,
        what    TEXT,
        event   TEXT,
        step    BIGINT,
        reason  TEXT,
        rank    BIGINT
    )""",
    "CREATE INDEX IF NOT EXISTS audit_run ON audit (run_id, id)",
    # Which collector holds a run's sessions (server/cluster.py): a row per (run, collector), written when
    # that collector's count of the run's sessions changes (0: released); the collector is alive while
    # its ``collectors`` heartbeat is recent.
    """CREATE TABLE IF NOT EXISTS holders (
        run_id    BIGINT NOT NULL,
        collector TEXT NOT NULL,
        sessions  BIGINT NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, collector)
    )""",
    "CREATE INDEX IF NOT EXISTS holders_heartbeat ON holders (heartbeat)",
    "CREATE TABLE IF NOT EXISTS collectors (id TEXT PRIMARY KEY, heartbeat DOUBLE PRECISION NOT NULL)",
    # Run ids for every collector on this database (``allocate_run_id``), moved past any id in use at open.
    "CREATE SEQUENCE IF NOT EXISTS run_ids",
    # A samples row of L layers holds 4 float32 columns of 4 L bytes: past ~2 kB PostgreSQL compresses
    # its largest values, then moves them out of line. Float bits barely compress: EXTERNAL skips
    # the attempt (its CPU cost was most of the ingest cost) and stores them out of line as they are.
    "ALTER TABLE samples "
    + ", ".join(f"ALTER COLUMN {c} SET STORAGE EXTERNAL" for c in ("rotation", "step_angle", "weight_norm", "rho")),
)

# Any constant: the advisory lock that serialises schema creation between collectors.
_SCHEMA_LOCK = 0x6C6179726F74  # "layrot"


def _add_key_hash(conn: psycopg.Connection) -> bool:
    """Version 2: runs.key_hash (run ownership). True when the column was added.

    Version 2 is the first schema this backend wrote, so this finds the column
    there; it is the pattern for the next migration.
    """
    row = conn.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'runs' AND column_name = 'key_hash'"
    ).fetchone()
    if row:
        return False
    conn.execute("ALTER TABLE runs ADD COLUMN key_hash TEXT")
    return True


def _v2_steps_aside(conn: psycopg.Connection) -> bool:
    """Version 3, before the schema is created: a version-2 ``steps`` (float64 columns) becomes ``steps_v2``."""
    row = conn.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'steps' AND column_name = 'rotation'"
    ).fetchone()
    if not row:
        return False
    conn.execute("ALTER TABLE steps RENAME TO steps_v2")
    conn.execute("ALTER TABLE steps_v2 RENAME CONSTRAINT steps_pkey TO steps_v2_pkey")
    return True


def _split_steps(conn: psycopg.Connection) -> bool:
    """Version 3: the rows of ``steps_v2`` re-encoded into ``steps`` + ``samples``, in batches; then dropped."""
    if conn.execute("SELECT to_regclass('steps_v2')").fetchone() == (None,):
        return False
    with conn.cursor(name="layrot_v2_steps") as cur:  # server-side: a large history is not read at once
        cur.execute("SELECT " + ", ".join(sb.STEP_COLUMNS) + " FROM steps_v2")
        while batch := cur.fetchmany(1000):
            steps, samples = sb.migrate_v2_rows(batch)
            with conn.cursor() as w:
                w.executemany(_INSERT_SAMPLE, samples)
                w.executemany(_INSERT_STEP, steps)
    conn.execute("DROP TABLE steps_v2")
    return True


# Idempotent steps that bring an older schema to SCHEMA_VERSION (each True when it changed something),
# in order: those of _BEFORE_SCHEMA run before the CREATE statements, the others after.
_BEFORE_SCHEMA = (_v2_steps_aside,)
_MIGRATIONS = (_add_key_hash, _split_steps)

_STEP_COLS = ", ".join(sb.STEP_TABLE_COLUMNS)
_SAMPLE_COLS = ", ".join(sb.SAMPLE_COLUMNS)
_INSERT_STEP = (
    f"INSERT INTO steps ({_STEP_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (run_id, rank, step) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in sb.STEP_TABLE_COLUMNS[3:])
)
_INSERT_SAMPLE = f"INSERT INTO samples ({_SAMPLE_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING"
# The writer's own staging tables (one per connection), emptied by every commit.
_STAGE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS layrot_steps_in"
    " (LIKE steps INCLUDING DEFAULTS INCLUDING STORAGE) ON COMMIT DELETE ROWS"
)
_STAGE_SAMPLES = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS layrot_samples_in"
    " (LIKE samples INCLUDING DEFAULTS INCLUDING STORAGE) ON COMMIT DELETE ROWS"
)
_COPY_STAGE = f"COPY layrot_steps_in ({_STEP_COLS}) FROM STDIN (FORMAT BINARY)"
_COPY_STEPS = f"COPY steps ({_STEP_COLS}) FROM STDIN (FORMAT BINARY)"
_COPY_SAMPLES_STAGE = f"COPY layrot_samples_in ({_SAMPLE_COLS}) FROM STDIN (FORMAT BINARY)"
# Samples another rank (or an earlier send) stored already are kept: identical content, one row.
_MERGE_SAMPLES = (
    f"INSERT INTO samples ({_SAMPLE_COLS}) SELECT {_SAMPLE_COLS} FROM layrot_samples_in ON CONFLICT DO NOTHING"
)
_ANY_STORED = (
    "SELECT EXISTS (SELECT 1 FROM unnest(%s::int8[], %s::int8[], %s::int8[], %s::int8[]) AS b(run_id, rank, lo, hi)"
    " JOIN steps s ON s.run_id = b.run_id AND s.rank = b.rank AND s.step BETWEEN b.lo AND b.hi)"
)
_COPY_TYPES = ["int8"] * 3 + ["float8"] * 2 + ["int8"] + ["bytea"]  # STEP_TABLE_COLUMNS
_COPY_SAMPLE_TYPES = ["int8"] * 2 + ["bytea"] * 5  # SAMPLE_COLUMNS
# Every staged row into steps; a stored (run, rank, step) gets the newest values. The keys come back
# with whether each row is new (xmax = 0: inserted, not updated by ON CONFLICT).
_UPSERT_STEPS = (
    f"INSERT INTO steps ({_STEP_COLS}) SELECT {_STEP_COLS} FROM layrot_steps_in"
    " ON CONFLICT (run_id, rank, step) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in sb.STEP_TABLE_COLUMNS[3:])
    + " RETURNING run_id, rank, step, (xmax = 0)"
)
# Rows per transaction: smaller than SQLite's, since a transaction of 20k rows of 200 layers holds
# ~290 MB of bytea (staged, then copied, when it holds resends).
MAX_ROWS_PER_COMMIT = 4_000
# Seconds a read waits for a pooled connection (less when busy_timeout is shorter).
READ_TIMEOUT = 5.0
# Memory of the staging table before it spills to disk (a session setting, set before its first use).
TEMP_BUFFERS = "64MB"

# The SQL of every named statement an item may hold, but the step rows; upserts where SQLite replaces.
STATEMENTS = {
    sb.RUN: "INSERT INTO runs (id, run, framework, framework_version, host, world_size, every, capabilities,"
    " meta, created, last_seen, first_report, nonfinite, key_hash)"
    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
    sb.LAYER: "INSERT INTO layers (run_id, idx, name, shape, init_norm, numel, module_type, sharded)"
    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (run_id, idx) DO UPDATE SET name = EXCLUDED.name,"
    " shape = EXCLUDED.shape, init_norm = EXCLUDED.init_norm, numel = EXCLUDED.numel,"
    " module_type = EXCLUDED.module_type, sharded = EXCLUDED.sharded",
    sb.PROGRESS: "UPDATE runs SET last_seen=%s, nonfinite=%s WHERE id=%s",
    sb.FIRST_REPORT: "UPDATE runs SET first_report=%s WHERE id=%s",
    sb.WORLD_SIZE: "UPDATE runs SET world_size=%s WHERE id=%s",
    sb.CONTROL_ACK: "INSERT INTO control_acks (run_id, rank, session_id, version, applied, reason, step, time)"
    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
    sb.COMMAND: "INSERT INTO commands (run_id, version, time, issued_by, controller, command)"
    " VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (run_id, version) DO UPDATE SET time = EXCLUDED.time,"
    " issued_by = EXCLUDED.issued_by, controller = EXCLUDED.controller, command = EXCLUDED.command",
    sb.AUDIT: "INSERT INTO audit (run_id, version, time, who, what, event, step, reason, rank)"
    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
    sb.ALERT: "INSERT INTO alerts (run, layer, step, kind, severity, angle, baseline, time, message, loss_before,"
    " loss_after) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
    sb.THRESHOLDS: "INSERT INTO alert_thresholds (run, overrides, updated) VALUES (%s,%s,%s)"
    " ON CONFLICT (run) DO UPDATE SET overrides = EXCLUDED.overrides, updated = EXCLUDED.updated",
}


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """A read written with ``?`` placeholders (server/store_base.py) in psycopg's ``%s`` style."""
    return sql.replace("%", "%%").replace("?", "%s")


def _plain(params: Sequence[Any]) -> tuple:
    """``params`` with bools as ints: the columns are BIGINT, and psycopg sends a bool as boolean."""
    return tuple(int(v) if type(v) is bool else v for v in params)


# The tables VACUUM reclaims and history_bytes sizes.
HISTORY_TABLES = ("steps", "samples", "layers", "runs", "alerts", "audit", "commands", "control_acks", "holders")


class PostgresStore(QueuedStore):
    """The history in a PostgreSQL database. Thread-safe ``submit*`` calls; reads from a pool.

    ``url``: a libpq connection URL (``postgresql://user:password@host:5432/db``, or
    ``postgresql:///db?host=/run/postgresql`` for a unix socket). ``busy_timeout``:
    how long a write waits for a lock (``lock_timeout``) or for a connection
    before it fails. ``readers``: most connections lent to reads at once.
    A server that cannot be reached within ``connect_timeout`` seconds, or a
    schema newer than this layrot, is a ``StoreError``.
    """

    max_rows_per_commit = MAX_ROWS_PER_COMMIT

    def __init__(
        self,
        url: str,
        on_commit: Callable[[list[Any], list[int]], None] | None = None,
        on_failure: Callable[[list[Any], str], None] | None = None,
        busy_timeout: float = 30.0,
        readers: int = 8,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(on_commit, on_failure)
        self.url = url
        self.busy_timeout = float(busy_timeout)
        common: dict[str, Any] = dict(
            kwargs={"autocommit": True},  # transactions are explicit (``transaction()``)
            check=ConnectionPool.check_connection,  # a connection broken by a server restart is replaced
            # A pool gives up reconnecting after this, and tries afresh at the next request: short, so a
            # server that is back is used again soon, not after a long backoff.
            reconnect_timeout=max(self.busy_timeout, 1.0),
            open=False,
        )
        self._writers = ConnectionPool(
            url,
            min_size=1,
            max_size=1,
            configure=self._configure_writer,
            timeout=self.busy_timeout,
            name="layrot-history-writer",
            **common,
        )
        # Reads fail sooner without a server: some run on the event loop's thread (restore, the control
        # plane's step rate), which must not wait the writer's full timeout.
        self._readers = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, readers),
            configure=self._configure_reader,
            timeout=min(self.busy_timeout, READ_TIMEOUT),
            name="layrot-history-readers",
            **common,
        )
        try:
            # One direct connection first: a refused connection, a wrong password or a missing database is
            # told at once, in libpq's words, instead of after the pools' retries.
            with psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout))) as conn:
                self._open_schema(conn)
            for pool in (self._writers, self._readers):
                pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as exc:
            self._close_pools()
            raise StoreError(f"{self.description}: cannot connect to PostgreSQL within {connect_timeout:g} s") from exc
        except psycopg.Error as exc:
            self._close_pools()
            raise StoreError(f"{self.description}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._close_pools()
            raise
        self._start_writer()

    @property
    def description(self) -> str:
        """The database URL without its password."""
        return redact_url(self.url)

    # ------------------------------------------------------------ schema
    def _open_schema(self, conn: psycopg.Connection) -> None:
        """Create the schema, or check and migrate an existing one; refuse a newer one."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            version = None
            if conn.execute("SELECT to_regclass('schema_info')").fetchone() != (None,):
                row = conn.execute("SELECT value FROM schema_info WHERE key = 'version'").fetchone()
                version = int(row[0]) if row and str(row[0]).isdigit() else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.description}: the history database has schema version {version}, newer than this"
                    f" layrot supports ({SCHEMA_VERSION}); upgrade layrot or use another --db"
                )
            changed = any([migrate(conn) for migrate in _BEFORE_SCHEMA])
            for stmt in SCHEMA:
                conn.execute(stmt)
            for migrate in _MIGRATIONS:
                changed = migrate(conn) or changed
            if changed:
                log.info("history store %s: schema migrated to version %d", self.description, SCHEMA_VERSION)
            # The sequence past every id in use (a database written before it existed, orphans too).
            top = max(int(v or 0) for ((v,),) in (conn.execute(q).fetchall() for q in sb.HIGHEST_RUN_ID_SQL))
            seq = conn.execute("SELECT last_value, is_called FROM run_ids").fetchone()
            assert seq is not None  # a sequence has exactly one row
            last, called = seq
            if top > (last if called else last - 1):
                conn.execute("SELECT setval('run_ids', %s)", (top,))
            conn.execute(
                "INSERT INTO schema_info (key, value) VALUES ('version', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (str(SCHEMA_VERSION),),
            )

    # ------------------------------------------------------------ connections
    def _configure_reader(self, conn: psycopg.Connection) -> None:
        """A new connection: a lock held longer than ``busy_timeout`` fails the statement instead of hanging it."""
        conn.execute(f"SET lock_timeout = {max(1, int(self.busy_timeout * 1000))}")

    def _configure_writer(self, conn: psycopg.Connection) -> None:
        """A new writer connection: the lock timeout, and its staging table for COPY (private to the connection)."""
        self._configure_reader(conn)
        conn.execute(f"SET temp_buffers = '{TEMP_BUFFERS}'")
        conn.execute(_STAGE)
        conn.execute(_STAGE_SAMPLES)

    def _close_pools(self) -> None:
        for pool in (self._writers, self._readers):
            pool.close()

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            with self._readers.connection() as conn:
                return conn.execute(_pg(sql), _plain(params)).fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            # One error type for the callers of both backends' reads (control.py catches it).
            raise StoreError(f"{self.description}: {type(exc).__name__}: {exc}") from exc

    def _close_readers(self) -> None:
        self._readers.close()

    def _write_now(self, ops: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        try:
            with self._readers.connection() as conn, conn.transaction():
                for sql, rows in ops:
                    conn.cursor().executemany(_pg(sql), [_plain(r) for r in rows])
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreError(f"{self.description}: {type(exc).__name__}: {exc}") from exc

    def allocate_run_id(self) -> int:
        """The next id of the database's ``run_ids`` sequence: unique over every collector on the database."""
        ((n,),) = self._fetchall("SELECT nextval('run_ids')")
        return int(n)

    def _open_writer(self) -> None:
        return None  # each transaction borrows the writer pool's connection (replaced when broken)

    def _close_writer(self, conn: None) -> None:
        self._writers.close()

    # ------------------------------------------------------------ writes
    def _execute(self, conn: None, items: Sequence[Item]) -> None:
        # One row per (run, rank, step): the last one queued wins, as in SQLite where it is written last
        # (a resend queued behind its original); each key is credited to the first item that holds it.
        rows: dict[tuple[int, int, int], Sequence[Any]] = {}
        samples: dict[tuple[int, int, bytes], Sequence[Any]] = {}
        first: dict[tuple[int, int, int], Item] = {}
        others: list[tuple[str, Sequence[Any], bool]] = []
        maint: list[tuple[Item, Sequence[Any]]] = []
        for it in items:
            it.new_rows = 0
            for name, params, many in it.ops:
                if name == sb.STEPS:
                    srows, sams = sb.encode_steps(params)
                    for sa in sams:
                        samples.setdefault((sa[0], sa[1], sa[2]), sa)
                    for sr in srows:
                        key = (sr[0], sr[1], sr[2])
                        rows[key] = sr
                        first.setdefault(key, it)
                elif name == sb.SQL:
                    maint.append((it, params))
                else:
                    others.append((name, params, many))
        with self._writers.connection() as db, db.transaction():
            if rows:
                with db.cursor() as cur:
                    with cur.copy(_COPY_SAMPLES_STAGE) as copy:
                        copy.set_types(_COPY_SAMPLE_TYPES)
                        for sv in samples.values():
                            copy.write_row(sv)
                    cur.execute(_MERGE_SAMPLES)
                    if self._any_stored(cur, rows):
                        with cur.copy(_COPY_STAGE) as copy:
                            copy.set_types(_COPY_TYPES)
                            for r in rows.values():
                                copy.write_row(r)
                        for run_id, rank, step, new in cur.execute(_UPSERT_STEPS).fetchall():
                            if new:
                                first[(run_id, rank, step)].new_rows += 1
                    else:  # the common case, only new steps: straight in, without staging
                        with cur.copy(_COPY_STEPS) as copy:
                            copy.set_types(_COPY_TYPES)
                            for r in rows.values():
                                copy.write_row(r)
                        for it in first.values():
                            it.new_rows += 1
            for owner, (sql, args, counted) in maint:  # maintenance: one by one, for the rows each deletes
                n = db.execute(_pg(sql), _plain(args)).rowcount
                if counted:
                    owner.new_rows += max(n, 0)
            if others:
                with db.pipeline():
                    for name, params, many in others:
                        if many:
                            db.cursor().executemany(STATEMENTS[name], [_plain(p) for p in params])
                        else:
                            db.execute(STATEMENTS[name], _plain(params))

    def reclaim(self) -> None:
        """VACUUM (ANALYZE) of the history tables: freed rows become reusable (and the planner's view fresh).

        Plain VACUUM, not FULL: it takes no lock that stops ingest; the space is reused by new
        rows rather than given back to the file system.
        """
        self.flush()
        with psycopg.connect(self.url, autocommit=True) as conn:
            for table in HISTORY_TABLES:
                conn.execute(f"VACUUM (ANALYZE) {table}")

    def history_bytes(self) -> int:
        """Bytes the history tables take (heap, TOAST and indexes of every table layrot keeps)."""
        ((n,),) = self._fetchall(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " WHERE c.relkind = 'r' AND c.relname = ANY(%s)",
            (list(HISTORY_TABLES),),
        )
        return int(n)

    @staticmethod
    def _any_stored(cur: psycopg.Cursor, rows: dict[tuple[int, int, int], Sequence[Any]]) -> bool:
        """True when a stored step lies within the step range of any (run, rank) of ``rows`` (one query).

        A range, not each key: cheap, and conservative (a gap in the range takes the upsert path).
        A step stored by someone else after this check fails the COPY on the primary key: the
        transaction is retried (per item), and this check then sees it.
        """
        ranges: dict[tuple[int, int], list[int]] = {}
        for run_id, rank, step in rows:
            r = ranges.get((run_id, rank))
            if r is None:
                ranges[(run_id, rank)] = [step, step]
            elif step < r[0]:
                r[0] = step
            elif step > r[1]:
                r[1] = step
        cols = [[k[0] for k in ranges], [k[1] for k in ranges], [r[0] for r in ranges.values()]]
        cols.append([r[1] for r in ranges.values()])
        row = cur.execute(_ANY_STORED, cols).fetchone()
        return bool(row and row[0])

    def _rollback(self, conn: None) -> None:
        pass  # the transaction block rolled back already (or the connection is gone with it)

    def _item_independent(self, exc: BaseException) -> bool:
        """A lost server, a lock held past the timeout, no connection in time: every item would fail alike."""
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout))
