"""The history store on its own (server/store.py): value checks, item isolation, schema versions."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from layrot.server.store import (
    SCHEMA_VERSION,
    LayerRecord,
    RunRecord,
    Store,
    StoreError,
    StoreValueError,
    check_params,
    hash_run_key,
)

BLOB = b"\0" * 24


def step_row(run_id: int, step: int) -> tuple:
    return (run_id, 0, step, 1.0, None, None, BLOB, BLOB, BLOB, None, BLOB, BLOB, BLOB, None, None)


def run_record(run_id: int, name: str, numel: int = 4) -> RunRecord:
    layers = [LayerRecord(0, "w", [2, 2], 1.0, numel, "Linear")]
    return RunRecord(run_id, name, "pytorch", "2", "h", 1, 1, {}, {}, 0.0, None, None, 0, layers)


class Outcomes:
    def __init__(self) -> None:
        self.stored: list = []
        self.failed: list = []
        self.done = threading.Event()

    def on_commit(self, tokens: list, new_rows: list | None = None) -> None:
        self.stored += tokens

    def on_failure(self, tokens: list, reason: str) -> None:
        self.failed += [(t, reason) for t in tokens]


@pytest.mark.parametrize(
    "params",
    [(2**63,), (-(2**63) - 1,), (2**64 - 1,), ("x" * ((1 << 20) + 1),), (object(),), (pytest,)],
)
def test_values_sqlite_would_refuse_are_refused_before_queueing(params):
    with pytest.raises(StoreValueError):
        check_params(params)


def test_values_within_bounds_pass():
    check_params((2**63 - 1, -(2**63), 1.5, float("nan"), None, "text", b"blob", True))


def test_store_refuses_out_of_range_rows_and_runs(tmp_path):
    store = Store(str(tmp_path / "v.db"))
    try:
        with pytest.raises(StoreValueError):
            store.submit_rows([step_row(1, 2**63)])
        with pytest.raises(StoreValueError):
            store.create_run(run_record(1, "poison", numel=2**64 - 1))
        with pytest.raises(StoreValueError):
            store.submit("UPDATE runs SET world_size=? WHERE id=?", (2**64, 1))
        assert store.pending_rows == 0  # nothing was queued
    finally:
        store.close()


def test_a_failing_item_costs_only_itself(tmp_path):
    """Items that share a transaction with a failing one are retried alone and stored."""
    path = str(tmp_path / "iso.db")
    out = Outcomes()
    store = Store(path, on_commit=out.on_commit, on_failure=out.on_failure)
    try:
        store.create_run(run_record(1, "a"), token="run-a")
        assert store.flush()
        # Hold the write lock so that everything below is drained into one transaction.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        store.submit_batch([step_row(1, 1)], 1, 1.0, 0, token="batch-1")
        store.create_run(run_record(2, "a"), token="dup-run")  # same name: UNIQUE fails
        store.submit_batch([step_row(1, 2)], 1, 2.0, 0, token="batch-2")
        time.sleep(0.3)
        blocker.execute("COMMIT")
        blocker.close()
        assert store.flush()
    finally:
        store.close()
    assert out.stored == ["run-a", "batch-1", "batch-2"]
    assert [t for t, _ in out.failed] == ["dup-run"] and "UNIQUE" in out.failed[0][1]
    conn = sqlite3.connect(path)
    try:
        assert [r[0] for r in conn.execute("SELECT step FROM steps ORDER BY step")] == [1, 2]
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM layers WHERE run_id = 2").fetchone()[0] == 0  # no orphan layers
    finally:
        conn.close()


def test_a_locked_database_fails_every_item_without_retrying_each(tmp_path):
    path = str(tmp_path / "locked.db")
    out = Outcomes()
    store = Store(path, on_commit=out.on_commit, on_failure=out.on_failure, busy_timeout=0.2)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        for i in range(1, 21):
            store.submit_batch([step_row(1, i)], 1, float(i), 0, token=i)
        assert store.flush()
        elapsed = time.monotonic() - t0
    finally:
        blocker.execute("COMMIT")
        blocker.close()
        store.close()
    assert out.stored == [] and sorted(t for t, _ in out.failed) == list(range(1, 21))
    assert all("locked" in reason for _, reason in out.failed)
    assert elapsed < 20 * 0.2  # not one busy timeout per item


def test_schema_is_versioned_and_a_newer_one_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(str(path)).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM schema_info WHERE key='version'").fetchone()[0] == str(SCHEMA_VERSION)
    conn.execute("UPDATE schema_info SET value = ? WHERE key = 'version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as e:
        Store(str(path))
    assert str(path) in str(e.value) and f"version {SCHEMA_VERSION + 1}" in str(e.value)


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE schema_info (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO schema_info VALUES ('version', '1');
        CREATE TABLE runs (id INTEGER PRIMARY KEY, run TEXT NOT NULL UNIQUE, framework TEXT,
            framework_version TEXT, host TEXT, world_size INTEGER, every INTEGER, capabilities TEXT,
            meta TEXT, created REAL, last_seen REAL, first_report REAL, nonfinite INTEGER NOT NULL DEFAULT 0);
        INSERT INTO runs (id, run) VALUES (3, 'old');
        """
    )
    conn.commit()
    conn.close()
    store = Store(str(path))
    try:
        runs = store.load_runs()
        assert [(r.run_id, r.run, r.key_hash) for r in runs] == [(3, "old", None)]
        assert store.highest_run_id() == 3
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM schema_info WHERE key='version'").fetchone()[0] == str(SCHEMA_VERSION)
    conn.close()


def test_run_keys_are_stored_hashed(tmp_path):
    path = str(tmp_path / "keys.db")
    store = Store(path)
    rec = run_record(1, "owned")
    rec.key_hash = hash_run_key("secret-key")
    store.create_run(rec)
    store.flush()
    store.close()
    assert b"secret-key" not in open(path, "rb").read()  # closed: the WAL is checkpointed into the file
    store = Store(path)
    try:
        assert store.load_runs()[0].key_hash == hash_run_key("secret-key") and hash_run_key("") is None
    finally:
        store.close()
