"""The history store on its own, on both backends: value checks, item isolation, idempotence, schema versions.

Every test that takes ``backend`` runs on SQLite (a temp file) and on PostgreSQL
(a fresh database on a real server of our own, tests/postgres_server.py); what
they assert is read back through a connection of the test's own, not the store's.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)

from layrot.server.store import (
    SCHEMA_VERSION,
    LayerRecord,
    RunRecord,
    Store,
    StoreError,
    StoreValueError,
    check_params,
    hash_run_key,
    open_store,
)
from layrot.server.store_api import redact_url

BLOB = b"\0" * 24


def step_row(run_id: int, step: int, blob: bytes = BLOB, rank: int = 0) -> tuple:
    return (run_id, rank, step, 1.0, None, None, blob, blob, blob, None, blob, blob, blob, None, None)


def f32_rounded(blob: bytes) -> bytes:
    """Float64 bytes of ``blob``'s values rounded to float32: what schema 3 gives back."""
    return np.frombuffer(blob, "<f8").astype("<f4").astype("<f8").tobytes()


def run_record(run_id: int, name: str, numel: int = 4) -> RunRecord:
    layers = [LayerRecord(0, "w", [2, 2], 1.0, numel, "Linear")]
    return RunRecord(run_id, name, "pytorch", "2", "h", 1, 1, {}, {}, 0.0, None, None, 0, layers)


class Outcomes:
    def __init__(self) -> None:
        self.stored: list = []
        self.new_rows: list = []
        self.failed: list = []
        self.done = threading.Event()

    def on_commit(self, tokens: list, new_rows: list | None = None) -> None:
        self.stored += tokens
        self.new_rows += list(new_rows or [])

    def on_failure(self, tokens: list, reason: str) -> None:
        self.failed += [(t, reason) for t in tokens]


class Backend:
    """One database of one backend: open stores on it, read it and lock it from connections of our own."""

    def __init__(self, kind: str, db: str) -> None:
        self.kind = kind
        self.db = db

    @property
    def label(self) -> str:
        """How the store's messages name this database."""
        return self.db if self.kind == "sqlite" else self.db.split("?")[0]

    def open(self, **kwargs: Any) -> Any:
        return open_store(self.db, **kwargs)

    def _connect(self) -> Any:
        if self.kind == "sqlite":
            return sqlite3.connect(self.db, isolation_level=None, timeout=30)
        import psycopg

        return psycopg.connect(self.db, autocommit=True)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of ``sql`` (``?`` placeholders) read through a connection of our own."""
        conn = self._connect()
        try:
            if self.kind != "sqlite":
                sql = sql.replace("?", "%s")
            cur = conn.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold every table's write lock from another connection (the store's writes wait, then fail)."""
        conn = self._connect()
        try:
            if self.kind == "sqlite":
                conn.execute("BEGIN EXCLUSIVE")
            else:
                conn.execute("BEGIN")
                conn.execute("LOCK TABLE runs, layers, steps IN EXCLUSIVE MODE")
            yield
            conn.execute("COMMIT")
        finally:
            conn.close()

    # What the store's reason says when a lock outlasted the timeout.
    @property
    def lock_word(self) -> str:
        return "locked" if self.kind == "sqlite" else "lock timeout"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "history.db"))
    return Backend("postgresql", request.getfixturevalue("postgres_url"))


@pytest.mark.parametrize(
    "params",
    [(2**63,), (-(2**63) - 1,), (2**64 - 1,), ("x" * ((1 << 20) + 1),), ("nul\0",), (object(),), (pytest,)],
)
def test_values_a_database_would_refuse_are_refused_before_queueing(params):
    with pytest.raises(StoreValueError):
        check_params(params)


def test_values_within_bounds_pass():
    check_params((2**63 - 1, -(2**63), 1.5, float("nan"), None, "text", b"blob", True))


def test_store_refuses_out_of_range_rows_and_runs(backend):
    store = backend.open()
    try:
        with pytest.raises(StoreValueError):
            store.submit_rows([step_row(1, 2**63)])
        with pytest.raises(StoreValueError):
            store.create_run(run_record(1, "poison", numel=2**64 - 1))
        with pytest.raises(StoreValueError):
            store.set_world_size(1, 2**64)
        assert store.pending_rows == 0  # nothing was queued
    finally:
        store.close()


def test_a_failing_item_costs_only_itself(backend):
    """Items queued behind a lock with a failing one: the others are stored, the bad one alone refused."""
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit, on_failure=out.on_failure)
    try:
        store.create_run(run_record(1, "a"), token="run-a")
        assert store.flush()
        # Hold the write locks, so that what is queued below waits (and drains together where it can).
        with backend.locked():
            store.submit_batch([step_row(1, 1)], 1, 1.0, 0, token="batch-1")
            store.create_run(run_record(2, "a"), token="dup-run")  # same name: UNIQUE fails
            store.submit_batch([step_row(1, 2)], 1, 2.0, 0, token="batch-2")
            time.sleep(0.3)
        assert store.flush()
    finally:
        store.close()
    assert out.stored == ["run-a", "batch-1", "batch-2"]
    assert [t for t, _ in out.failed] == ["dup-run"]
    assert "UNIQUE" in out.failed[0][1] or "UniqueViolation" in out.failed[0][1]
    assert [r[0] for r in backend.query("SELECT step FROM steps ORDER BY step")] == [1, 2]
    assert backend.query("SELECT COUNT(*) FROM runs") == [(1,)]
    assert backend.query("SELECT COUNT(*) FROM layers WHERE run_id = 2") == [(0,)]  # no orphan layers


def test_a_locked_database_fails_every_item_without_retrying_each(backend):
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit, on_failure=out.on_failure, busy_timeout=0.2)
    try:
        with backend.locked():
            t0 = time.monotonic()
            for i in range(1, 21):
                store.submit_batch([step_row(1, i)], 1, float(i), 0, token=i)
            assert store.flush()
            elapsed = time.monotonic() - t0
    finally:
        store.close()
    assert out.stored == [] and sorted(t for t, _ in out.failed) == list(range(1, 21))
    assert all(backend.lock_word in reason for _, reason in out.failed), out.failed[0]
    assert elapsed < 20 * 0.2  # not one lock timeout per item
    assert backend.query("SELECT COUNT(*) FROM steps") == [(0,)]  # failed means not stored


def test_resends_are_idempotent_and_counted_once(backend):
    """A batch stored twice is one row per step holding the newest values; only new rows are counted."""
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit, on_failure=out.on_failure)
    old, new = np.arange(3.0).tobytes(), np.arange(3.0, 6.0).tobytes()
    try:
        store.create_run(run_record(1, "r"), token="run")
        store.submit_batch([step_row(1, s, old) for s in (1, 2, 3)], 1, 3.0, 0, token="b1")
        assert store.flush()
        store.submit_batch([step_row(1, s, new) for s in (2, 3, 4)], 1, 4.0, 0, token="b2")  # 2, 3 again
        store.submit_batch([step_row(1, s, new) for s in (4, 5)], 1, 5.0, 0, token="b3")
        assert store.flush()
        page = store.history_page(1, 0, 0, 10, 100)
    finally:
        store.close()
    assert out.stored == ["run", "b1", "b2", "b3"] and out.failed == []
    assert out.new_rows == [0, 3, 1, 1]  # the run has no step rows; 2, 3 and then 4 were stored already
    assert [r[0] for r in page] == [1, 2, 3, 4, 5]
    assert [bytes(r[3]) for r in page] == [old, new, new, new, new]
    assert backend.query("SELECT COUNT(*) FROM steps") == [(5,)]
    assert [tuple(r) for r in backend.query("SELECT last_seen, nonfinite FROM runs")] == [(5.0, 0)]


def test_a_resend_in_the_same_transaction_as_its_original(backend):
    """Queued behind a lock, an original and its resend drain into one transaction: the later values win."""
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit, on_failure=out.on_failure)
    old, new = np.arange(3.0).tobytes(), np.arange(3.0, 6.0).tobytes()
    try:
        store.create_run(run_record(1, "r"), token="run")
        assert store.flush()
        with backend.locked():
            store.update_progress(1, 0.5, 0, token="first")  # the writer waits on the lock with this one
            store.submit_batch([step_row(1, s, old) for s in (1, 2)], 1, 2.0, 0, token="original")
            store.submit_batch([step_row(1, s, new) for s in (2, 3)], 1, 3.0, 0, token="resend")
            time.sleep(0.3)
        assert store.flush()
    finally:
        store.close()
    assert out.stored == ["run", "first", "original", "resend"] and out.failed == []
    assert out.new_rows == [0, 0, 2, 1]
    rows = backend.query(
        "SELECT s.step, m.rotation FROM steps s JOIN samples m"
        " ON m.run_id = s.run_id AND m.step = s.step AND m.digest = s.digest ORDER BY s.step"
    )
    f32 = [np.frombuffer(b, "<f8").astype("<f4").tobytes() for b in (old, new)]  # stored as float32
    assert [(r[0], bytes(r[1])) for r in rows] == [(1, f32[0]), (2, f32[1]), (3, f32[1])]


def test_batches_queued_together_are_stored_alike(backend):
    """Batches of two runs (3 and 2 layers) drained into one transaction: every row, value and progress as queued."""
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit, on_failure=out.on_failure)
    rng = np.random.default_rng(5)
    vals = {(run, s): rng.normal(size=3 if run == 1 else 2).tobytes() for run in (1, 2) for s in (1, 2, 3)}
    try:
        store.create_run(run_record(1, "a"), token="run-a")
        store.create_run(run_record(2, "b"), token="run-b")
        assert store.flush()
        commits = store.commits
        with backend.locked():
            store.update_progress(1, 0.5, 0, token="first")  # the writer waits on the lock with this one
            for s in (1, 2, 3):
                for run in (1, 2):
                    store.submit_batch(
                        [step_row(run, s, vals[run, s])],
                        run,
                        10.0 * run + s,
                        s,
                        first_report=10.0 * run if s == 1 else None,
                        token=(run, s),
                    )
            time.sleep(0.3)
        assert store.flush()
        assert store.commits - commits == 2  # the progress update alone, then the six batches in one
    finally:
        store.close()
    assert out.failed == [] and out.stored[3:] == [(run, s) for s in (1, 2, 3) for run in (1, 2)]
    assert out.new_rows[3:] == [1] * 6
    rows = backend.query(
        "SELECT s.run_id, s.step, m.rotation FROM steps s JOIN samples m"
        " ON m.run_id = s.run_id AND m.step = s.step AND m.digest = s.digest ORDER BY s.run_id, s.step"
    )
    f32 = {k: np.frombuffer(v, "<f8").astype("<f4").tobytes() for k, v in vals.items()}
    assert [(r[0], r[1], bytes(r[2])) for r in rows] == [(run, s, f32[run, s]) for run in (1, 2) for s in (1, 2, 3)]
    progress = backend.query("SELECT id, last_seen, nonfinite, first_report FROM runs ORDER BY id")
    assert [tuple(r) for r in progress] == [(1, 13.0, 3, 10.0), (2, 23.0, 3, 20.0)]


def test_everything_stored_is_read_back_exactly(backend):
    """Runs, layers, steps, commands, audit, alerts and thresholds survive a reopen unchanged.

    The per-layer values come back as float64 bytes of their float32 rounding (schema 3), within 6e-8 relative.
    """
    rng = np.random.default_rng(0)
    cols = [rng.standard_normal(3).tobytes() for _ in range(8)]
    row = (1, 2, 7, 123.25, 0.5, 3, *cols[:3], None, *cols[3:7], cols[7])
    rec = run_record(1, "exact", numel=2**40)
    rec.meta = {"k": "v"}
    rec.capabilities = {"layca": True}
    rec.key_hash = hash_run_key("owner")
    store = backend.open()
    try:
        store.create_run(rec)
        store.submit_batch([row], 1, 123.25, 2, first_report=100.0)
        store.set_world_size(1, 4)
        store.insert_command((1, 1, 10.0, "me", "manual", b"\x08\x01"))
        store.insert_command((1, 2, 11.0, "me", "manual", b"\x08\x02"))
        store.insert_audit((1, 2, 11.0, "me", "set", "applied", 7, "", 2))
        store.insert_audit((1, 2, 11.5, "job", "set", "rejected", 7, "too big", 2))
        store.insert_control_ack((1, 2, "s1", 2, True, "", 7, 11.0))  # a bool, as ingest may pass
        store.insert_alert(("exact", "w", 7, "divergence", "critical", None, 0.1, 12.0, "boom", 1.0, 9.0))
        store.save_thresholds("exact", '{"abs_angle": 0.3}', 13.0)
        store.save_thresholds("exact", '{"abs_angle": 0.4}', 14.0)
        assert store.flush()
    finally:
        store.close()
    store = backend.open()
    try:
        (got,) = store.load_runs()
        assert (got.run_id, got.run, got.world_size, got.meta, got.capabilities) == (
            1,
            "exact",
            4,
            {"k": "v"},
            rec.capabilities,
        )
        assert (got.first_report, got.last_seen, got.nonfinite, got.key_hash) == (100.0, 123.25, 2, rec.key_hash)
        assert got.layers == rec.layers and got.stored_steps == {2: 7} and got.last_rank == 2
        assert got.last_row is not None and [
            bytes(v) if isinstance(v, (bytes, memoryview)) else v for v in got.last_row
        ] == [7, 123.25, 0.5, *(f32_rounded(c) for c in cols[:3]), None]
        for c, v in zip(cols[:3], got.last_row[3:6]):
            ref = np.frombuffer(c, "<f8")
            assert np.abs(np.frombuffer(v, "<f8") / ref - 1).max() <= 6e-8
        assert store.ranks(1) == [2] and store.stored_steps(1, 2, [6, 7, 8]) == [7]
        assert store.recent_steps(1, 2, 5) == [(7, 123.25)]
        assert store.highest_run_id() == 1
        assert store.current_commands() == [(1, 2, b"\x08\x02")]
        assert [tuple(r) for r in store.last_applied()] == [(1, 2, 2, 7, 11.0, "")]
        assert [tuple(r) for r in store.last_rejected()] == [(1, 2, 2, "too big")]
        assert [r[4] for r in store.recent_audit(1, 10)] == ["rejected", "applied"]
        assert store.alert_counts() == {("exact", "w", "divergence", "critical"): 1}
        assert store.alert_runs() == ["exact"]
        assert [tuple(r) for r in store.recent_alerts("exact", 5)] == [
            ("exact", "w", 7, "divergence", "critical", None, 0.1, 12.0, "boom", 1.0, 9.0)
        ]
        assert [tuple(r) for r in store.load_thresholds()] == [("exact", '{"abs_angle": 0.4}')]
    finally:
        store.close()
    assert backend.query("SELECT applied FROM control_acks") == [(1,)]


def test_schema_is_versioned_and_a_newer_one_is_refused(backend):
    backend.open().close()
    assert backend.query("SELECT value FROM schema_info WHERE key='version'") == [(str(SCHEMA_VERSION),)]
    backend.query("UPDATE schema_info SET value = ? WHERE key = 'version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError) as e:
        backend.open()
    assert backend.label in str(e.value) and f"version {SCHEMA_VERSION + 1}" in str(e.value)
    assert "upgrade layrot" in str(e.value)


# A version-1 history (no runs.key_hash) in each backend's types.
V1 = {
    "sqlite": """
        CREATE TABLE schema_info (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO schema_info VALUES ('version', '1');
        CREATE TABLE runs (id INTEGER PRIMARY KEY, run TEXT NOT NULL UNIQUE, framework TEXT,
            framework_version TEXT, host TEXT, world_size INTEGER, every INTEGER, capabilities TEXT,
            meta TEXT, created REAL, last_seen REAL, first_report REAL, nonfinite INTEGER NOT NULL DEFAULT 0);
        INSERT INTO runs (id, run) VALUES (3, 'old');
    """,
    "postgresql": """
        CREATE TABLE schema_info (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO schema_info VALUES ('version', '1');
        CREATE TABLE runs (id BIGINT PRIMARY KEY, run TEXT NOT NULL UNIQUE, framework TEXT,
            framework_version TEXT, host TEXT, world_size BIGINT, every BIGINT, capabilities TEXT,
            meta TEXT, created DOUBLE PRECISION, last_seen DOUBLE PRECISION, first_report DOUBLE PRECISION,
            nonfinite BIGINT NOT NULL DEFAULT 0);
        INSERT INTO runs (id, run) VALUES (3, 'old');
    """,
}


def test_a_version_1_database_is_migrated_in_place(backend):
    for stmt in V1[backend.kind].split(";"):
        if stmt.strip():
            backend.query(stmt)
    store = backend.open()
    try:
        runs = store.load_runs()
        assert [(r.run_id, r.run, r.key_hash) for r in runs] == [(3, "old", None)]
        assert store.highest_run_id() == 3
        rec = run_record(4, "new")
        rec.key_hash = hash_run_key("k")
        store.create_run(rec)
        assert store.flush()
    finally:
        store.close()
    assert backend.query("SELECT value FROM schema_info WHERE key='version'") == [(str(SCHEMA_VERSION),)]
    assert backend.query("SELECT run, key_hash FROM runs ORDER BY id") == [("old", None), ("new", hash_run_key("k"))]


def test_run_keys_are_stored_hashed(backend):
    store = backend.open()
    rec = run_record(1, "owned")
    rec.key_hash = hash_run_key("secret-key")
    store.create_run(rec)
    store.flush()
    store.close()
    rows = backend.query("SELECT * FROM runs")
    assert rows and "secret-key" not in repr(rows)
    if backend.kind == "sqlite":  # closed: the WAL is checkpointed into the file
        assert b"secret-key" not in open(backend.db, "rb").read()
    store = backend.open()
    try:
        assert store.load_runs()[0].key_hash == hash_run_key("secret-key") and hash_run_key("") is None
    finally:
        store.close()


def test_open_store_picks_the_backend_from_the_db_value(tmp_path):
    store = open_store(str(tmp_path / "f.db"))
    try:
        assert isinstance(store, Store) and store.description == str(tmp_path / "f.db")
    finally:
        store.close()
    with pytest.raises(StoreError, match="mysql:// is not a history backend"):
        open_store("mysql://u:pw@h/db")
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert (
        redact_url("postgresql://u@h/db?sslmode=require&password=pw")
        == "postgresql://u@h/db?sslmode=require&password=***"
    )
    assert redact_url("/var/lib/layrot/a:b@c.db") == "/var/lib/layrot/a:b@c.db"  # a file path is left alone


def test_one_commit_holds_at_most_its_byte_budget_of_rows(backend):
    """Queued batches are drained into transactions of at most max_bytes_per_commit bytes of per-layer
    values (a row count alone let one commit hold ~128 MB), and every batch is still stored."""
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit, on_failure=out.on_failure)
    commits: list[list] = []
    orig = store.on_commit
    store.on_commit = lambda tokens, new_rows=None: (commits.append(list(tokens)), orig(tokens, new_rows))
    blob = b"\0" * 8 * 1000  # a 1,000-layer row: 8 kB per column, 48 kB per row (6 blob columns)
    per_batch = 10 * 6 * len(blob)  # 10 rows
    store.max_bytes_per_commit = int(2.5 * per_batch)
    try:
        store.create_run(run_record(1, "big"))
        assert store.flush(10)
        commits.clear()
        with backend.locked():  # the writer waits on the lock while the batches queue up
            store.submit_rows([step_row(1, 1, blob)], token="probe")  # the writer takes this one and waits
            time.sleep(0.2)
            for b in range(8):
                store.submit_rows([step_row(1, 10 * b + k + 2, blob) for k in range(10)], token=b)
            time.sleep(0.2)
        assert store.flush(30)
    finally:
        store.close()
    batches = [c for c in commits if "probe" not in c]
    assert sorted(t for c in batches for t in c) == list(range(8))
    assert max(len(c) for c in batches) == 3  # 2.5 batches' bytes: a third batch tips it over, never a fourth
    assert backend.query("SELECT COUNT(*) FROM steps")[0][0] == 81
