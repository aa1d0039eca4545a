"""Several StepBatches in one transaction: one progress UPDATE per run, the same runs rows as one per batch.

On both backends (a real PostgreSQL of our own too, tests/postgres_server.py). Batches of two
runs are queued behind a held lock so they drain into one transaction; what the runs rows
hold at the end must be each run's last submitted (last_seen, nonfinite), read back through a
connection of the test's own, and the joint transaction must have carried one UPDATE per run.
A failing item in the same drain forces the one-by-one retry, which keeps every item's own UPDATE.
"""

from __future__ import annotations

import time

import numpy as np
from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from test_store import Outcomes, backend, run_record, step_row  # noqa: F401  (fixture)

from layrot.server import store_base as sb


def _watch_progress(store) -> list[int]:
    """Progress UPDATEs of each transaction the store executes (spied on its own _execute)."""
    seen: list[int] = []
    real = store._execute

    def spy(conn, items):
        seen.append(sum(op[0] == sb.PROGRESS for it in items for op in it.ops))
        return real(conn, items)

    store._execute = spy
    return seen


def _submit(store, rng, n):
    want = {}
    for i in range(1, n + 1):
        run_id = int(rng.integers(1, 3))
        last_seen, nonfinite = float(rng.uniform(0, 1e6)), int(rng.integers(0, 100))
        store.submit_batch([step_row(run_id, i)], run_id, last_seen, nonfinite, token=i)
        want[run_id] = (last_seen, nonfinite)  # the last one queued per run decides
    return want


def test_one_progress_update_per_run_per_transaction(backend):  # noqa: F811
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit, on_failure=out.on_failure)
    rng = np.random.default_rng(7)
    try:
        store.create_run(run_record(1, "a"), token="a")
        store.create_run(run_record(2, "b"), token="b")
        assert store.flush()
        seen = _watch_progress(store)
        with backend.locked():
            store.submit_batch([step_row(1, 1000)], 1, 1.0, 0, token="first")  # the writer waits with this one
            time.sleep(0.2)
            want = _submit(store, rng, 40)
            time.sleep(0.3)
        assert store.flush()
    finally:
        store.close()
    assert out.failed == [] and sorted(t for t in out.stored if isinstance(t, int)) == list(range(1, 41))
    assert max(seen) == 2, seen  # 40 batches of two runs in one transaction: two UPDATEs, not 40
    got = {r[0]: (r[1], r[2]) for r in backend.query("SELECT id, last_seen, nonfinite FROM runs")}
    assert got == want


def test_a_failed_joint_transaction_retries_each_item_with_its_own_update(backend):  # noqa: F811
    out = Outcomes()
    store = backend.open(on_commit=out.on_commit, on_failure=out.on_failure)
    rng = np.random.default_rng(8)
    try:
        store.create_run(run_record(1, "a"), token="a")
        store.create_run(run_record(2, "b"), token="b")
        assert store.flush()
        seen = _watch_progress(store)
        with backend.locked():
            store.submit_batch([step_row(1, 1000)], 1, 1.0, 0, token="first")
            time.sleep(0.2)
            want = _submit(store, rng, 10)
            store.create_run(run_record(3, "a"), token="dup")  # same name: UNIQUE fails, the drain is retried
            time.sleep(0.3)
        assert store.flush()
    finally:
        store.close()
    assert [t for t, _ in out.failed] == ["dup"]
    assert seen.count(1) >= 10  # the retry: one transaction per item, each with its own UPDATE
    got = {r[0]: (r[1], r[2]) for r in backend.query("SELECT id, last_seen, nonfinite FROM runs")}
    assert got == want
