"""Fair service: a light job's batch is acked after one transaction, not after the saturated jobs' backlog.

A real collector whose history store commits at most 4 rows per transaction, and whose
writer is held (a gate in its transaction) while two heavy jobs queue 30 one-step batches
each and then a light job queues its one batch. When the writer goes on, the light batch
must commit in the transaction under way or the next one, ahead of the heavy backlog queued
before it; in the end every batch of everyone is stored. The test reads that order from the
store's commits (no clock, no sleep: load slows it down, it cannot reorder it), and it fails
when the fast lane is gone (the light batch then commits last, behind all 60).
The store's fast lane on its own: an urgent item is committed ahead of the backlog queued before it.
"""

from __future__ import annotations

import threading
import time

from test_store import Outcomes, run_record, step_row

from layrot.client.query import QueryClient
from layrot.server.ingest import BatchToken
from layrot.server.store import Store

HEAVY_BATCHES = 30
PATIENCE = 60.0  # seconds before a wait gives up: a guard against a hang, not a speed bound


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not cond():
        assert time.monotonic() < deadline, f"not within {PATIENCE} s: {what}"
        time.sleep(0.01)


def test_a_light_job_is_acked_ahead_of_the_heavy_backlog(collector_factory, ingest, sim_job, monkeypatch):
    real_execute, real_submit = Store._execute, Store.submit_batch
    gate = threading.Event()
    gate.set()  # open while the runs are created
    queued: list[tuple[str, int]] = []  # (run, seq) of each StepBatch handed to the store, in order
    commits: list[list[tuple[str, int]]] = []  # (run, seq) of the StepBatches of each transaction

    def batches(tokens) -> list[tuple[str, int]]:
        return [(t.sess.run.run, t.seq) for t in tokens if isinstance(t, BatchToken)]

    def submit_batch(self, *args, **kwargs):
        real_submit(self, *args, **kwargs)
        queued.extend(batches([kwargs.get("token")]))

    def gated_execute(self, conn, items):
        assert gate.wait(PATIENCE), "the test never opened the store's gate"
        real_execute(self, conn, items)
        commits.append(batches([it.token for it in items]))

    monkeypatch.setattr(Store, "_execute", gated_execute)
    monkeypatch.setattr(Store, "submit_batch", submit_batch)
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
    gate.clear()  # from here the writer stops in its next transaction, until the light batch is queued
    try:
        for _ in range(HEAVY_BATCHES):
            for job, s in heavy:
                s.send(job.batch(1))  # one step each
        wait_until(lambda: len(queued) == 2 * HEAVY_BATCHES, "the heavy batches reach the store")
        light.send(light_job.batch(1))
        wait_until(lambda: ("light", 1) in queued, "the light batch reaches the store")
    finally:
        gate.set()
    light.wait_ack(1, timeout=PATIENCE)
    for _job, s in heavy:
        s.wait_ack(HEAVY_BATCHES, timeout=PATIENCE)

    assert queued[-1] == ("light", 1) and len(queued) == 2 * HEAVY_BATCHES + 1  # queued behind all 60
    txns = [txn for txn in commits if txn]  # the transactions with StepBatches: all after the gate closed
    [k] = [i for i, txn in enumerate(txns) if ("light", 1) in txn]
    ahead = sum(len(txn) for txn in txns[: k + 1]) - 1  # heavy batches committed before it or with it
    summary = [len(txn) for txn in txns]
    # The transaction the writer was held in, then the light batch's own: not the backlog (60 without the lane).
    assert k <= 1, (k, ahead, summary)
    assert ahead < HEAVY_BATCHES, (ahead, summary)  # of 2 x 30: most of the heavy backlog still waited
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
