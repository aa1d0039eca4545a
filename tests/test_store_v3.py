"""Schema 3 of the history store on both backends: float32 samples, DDP dedup, and the migration from v2."""

from __future__ import annotations

import numpy as np
import pytest
from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from test_store import Backend, Outcomes, run_record  # noqa: F401  (the backend fixture is re-exported below)
from test_store import backend as backend  # noqa: F401

from layrot.server.store_api import SCHEMA_VERSION

L = 5


def values(rng: np.random.Generator, rho: bool) -> list[bytes | None]:
    """Float64 blobs rotation, step_angle, weight_norm, rho (or None) of L layers."""
    out: list[bytes | None] = [np.abs(rng.standard_normal(L)).tobytes() for _ in range(3 + rho)]
    return out + [None] * (not rho)


def input_row(run_id: int, rank: int, step: int, vals: list, loss: float | None = None) -> tuple:
    raw = np.arange(L, dtype="<f8").tobytes()
    return (run_id, rank, step, float(step), loss, rank, *vals, raw, raw, raw, None, None)


def f64(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, "<f8")


def assert_close(got: bytes | None, ref: bytes | None) -> None:
    if ref is None:
        assert got is None
        return
    g, r = f64(got), f64(ref)
    assert g is not None and r is not None
    assert np.abs(g / r - 1).max() <= 6e-8  # float32 rounding, far inside the 1e-6 the history promises


@pytest.mark.parametrize("rho", [False, True])
def test_identical_ranks_share_one_sample_and_every_rank_reads_its_own_row(backend, rho):  # noqa: F811
    rng = np.random.default_rng(1)
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit)
    ref = {s: values(rng, rho) for s in range(1, 6)}
    other = values(rng, rho)  # rank 3 differs at step 5 (not replicated)
    try:
        store.create_run(run_record(1, "ddp"))
        for rank in (2, 0, 3, 1):  # whichever rank arrives first
            rows = [input_row(1, rank, s, other if (rank == 3 and s == 5) else ref[s], 0.5 + rank) for s in ref]
            store.submit_batch(rows, 1, 5.0, 0, token=rank)
        assert store.flush()
        assert out.new_rows == [5, 5, 5, 5]
        assert backend.query("SELECT COUNT(*) FROM samples") == [(6,)]  # 5 shared + rank 3's own step 5
        assert backend.query("SELECT COUNT(*) FROM steps") == [(20,)]
        assert store.ranks(1) == [0, 1, 2, 3]
        for rank in range(4):
            page = store.history_page(1, rank, 0, 10, 100)
            assert [r[0] for r in page] == [1, 2, 3, 4, 5]
            assert [r[1] for r in page] == [1.0, 2.0, 3.0, 4.0, 5.0] and {r[2] for r in page} == {0.5 + rank}
            for r in page:
                want = other if (rank == 3 and r[0] == 5) else ref[r[0]]
                for k in range(4):
                    assert_close(r[3 + k], want[k])
        # A resend of stored steps replaces them identically: nothing new, nothing duplicated.
        store.submit_batch([input_row(1, 1, s, ref[s], 1.5) for s in ref], 1, 5.0, 0, token="resend")
        assert store.flush()
        assert out.new_rows[-1] == 0
        assert backend.query("SELECT COUNT(*) FROM samples") == [(6,)]
    finally:
        store.close()


# The version-2 tables (their other tables are as in version 3) in each backend's types.
V2_STEPS = {
    "sqlite": "CREATE TABLE steps (run_id INTEGER NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, time REAL,"
    " loss REAL, command_version INTEGER, rotation BLOB, step_angle BLOB, weight_norm BLOB, rho BLOB, dist0 BLOB,"
    " dstep BLOB, norm_prev BLOB, dot0 BLOB, dotstep BLOB, PRIMARY KEY (run_id, rank, step))",
    "postgresql": "CREATE TABLE steps (run_id BIGINT NOT NULL, rank BIGINT NOT NULL, step BIGINT NOT NULL,"
    " time DOUBLE PRECISION, loss DOUBLE PRECISION, command_version BIGINT, rotation BYTEA, step_angle BYTEA,"
    " weight_norm BYTEA, rho BYTEA, dist0 BYTEA, dstep BYTEA, norm_prev BYTEA, dot0 BYTEA, dotstep BYTEA,"
    " PRIMARY KEY (run_id, rank, step))",
}


def test_a_version_2_database_is_migrated_and_reads_the_same(backend):  # noqa: F811
    rng = np.random.default_rng(2)
    backend.query("CREATE TABLE schema_info (key TEXT PRIMARY KEY, value TEXT)")
    backend.query("INSERT INTO schema_info VALUES ('version', '2')")
    backend.query(V2_STEPS[backend.kind])
    ref = {(rank, s): values(rng, s % 2 == 0) for rank in (0, 1) for s in range(1, 2502)}
    for s in range(1, 2502):
        ref[(1, s)] = ref[(0, s)] if s % 3 else ref[(1, s)]  # rank 1 replicates rank 0 at 2 steps in 3
    mark = "?" if backend.kind == "sqlite" else "%s"
    conn = backend._connect()
    try:
        rows = [input_row(7, rank, s, v, 0.25 if s % 5 else None) for (rank, s), v in ref.items()]
        if backend.kind == "sqlite":
            conn.execute("BEGIN")  # one transaction, not a commit per row
        conn.cursor().executemany(f"INSERT INTO steps VALUES ({','.join([mark] * 15)})", rows)
        if backend.kind == "sqlite":
            conn.execute("COMMIT")
    finally:
        conn.close()
    store = backend.open()
    try:
        assert store.ranks(7) == [0, 1]
        for rank in (0, 1):
            page = store.history_page(7, rank, 0, 10_000, 10_000)
            assert [r[0] for r in page] == list(range(1, 2502))
            for r in page:
                assert r[2] == (0.25 if r[0] % 5 else None)
                for k in range(4):
                    assert_close(r[3 + k], ref[(rank, r[0])][k])
        shared = sum(1 for s in range(1, 2502) if s % 3)
        assert backend.query("SELECT COUNT(*) FROM samples") == [(2 * 2501 - shared,)]
    finally:
        store.close()
    assert backend.query("SELECT value FROM schema_info WHERE key='version'") == [(str(SCHEMA_VERSION),)]
    assert SCHEMA_VERSION == 3
    store = backend.open()  # a second open finds version 3: nothing to migrate, the same history
    try:
        assert len(store.history_page(7, 1, 0, 10_000, 10_000)) == 2501
    finally:
        store.close()
