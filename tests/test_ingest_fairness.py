"""Fair service: a light job's batch is acked after one transaction, not after the saturated jobs' backlog.

A real collector whose history store is slowed (0.1 s per transaction, at most 4 rows per
transaction: a backlog of 60 queued batches is ~1.5 s of commits) and two jobs that pour
batches in without waiting; then a light job sends one batch. Its ack must come while the
heavy jobs still wait for most of theirs, and in the end every batch of everyone is stored.
The store's fast lane on its own: an urgent item is committed ahead of the backlog queued before it.
"""

from __future__ import annotations

import time

import pytest
from test_store import Outcomes, run_record, step_row

from layrot.client.query import QueryClient
from layrot.server.store import Store

HEAVY_BATCHES = 30


@pytest.mark.xfail(
    strict=False, reason="known: failed in a clean-clone CI run beside other load (issue 13, under study)"
)
def test_a_light_job_is_acked_ahead_of_the_heavy_backlog(collector_factory, ingest, sim_job, monkeypatch):
    real_execute = Store._execute

    def slow_execute(self, conn, items):
        time.sleep(0.1)
        return real_execute(self, conn, items)

    monkeypatch.setattr(Store, "_execute", slow_execute)
    monkeypatch.setattr(Store, "max_rows_per_commit", 4)
    c = collector_factory()
    heavy = []
    for i in range(2):
        job = sim_job(run=f"heavy-{i}", layer_sizes=(8, 8), seed=i)
        s = ingest(c)
        s.send(job.hello())
        s.recv()  # Welcome: the run exists
        heavy.append((job, s))
    light_job = sim_job(run="light", layer_sizes=(8, 8), seed=9)
    light = ingest(c)
    light.send(light_job.hello())
    light.recv()
    for _ in range(HEAVY_BATCHES):
        for job, s in heavy:
            s.send(job.batch(1))  # one step each
    time.sleep(0.3)  # the heavy batches are queued in the store
    light.send(light_job.batch(1))
    light.wait_ack(1, timeout=10)
    # The heavy jobs' acks so far: most of their batches must still be waiting.
    acked_heavy = 0
    for _job, s in heavy:
        acks = [m.ack.seq for m in s.drain(0.0) if m.WhichOneof("kind") == "ack"]
        acked_heavy += max(acks, default=0)
    assert acked_heavy < HEAVY_BATCHES, acked_heavy  # of 2 x 30: the light one did not wait for them
    for _job, s in heavy:
        s.wait_ack(HEAVY_BATCHES, timeout=30)
    q = QueryClient(c.grpc_address)
    for job, _s in heavy:
        assert q.history(job.run).steps.tolist() == list(range(1, HEAVY_BATCHES + 1))
    assert q.history("light").steps.tolist() == [1]


def test_an_urgent_item_commits_ahead_of_the_backlog(tmp_path):
    out = Outcomes()
    store = Store(str(tmp_path / "h.db"), on_commit=out.on_commit, on_failure=out.on_failure)
    store.max_rows_per_commit = 3
    try:
        store.create_run(run_record(1, "heavy"), token="heavy")
        store.create_run(run_record(2, "light"), token="light")
        assert store.flush()
        real = store._execute
        store._execute = lambda conn, items: (time.sleep(0.05), real(conn, items))[1]
        for i in range(1, 31):
            store.submit_batch([step_row(1, i)], 1, float(i), 0, token=i)
        store.submit_batch([step_row(2, 1)], 2, 1.0, 0, token="urgent", urgent=True)
        assert store.flush()
    finally:
        store.close()
    assert sorted(t for t in out.stored if isinstance(t, int)) == list(range(1, 31))
    # Without the fast lane it would be stored after all 30 (position 32 of 33).
    assert out.stored.index("urgent") < 10, out.stored
