"""Ingest backpressure (server/ingest.py): a session over the pending bound waits for commits, not a timer.

A real collector whose history store is held up by a real lock on its SQLite file
(another connection's ``BEGIN EXCLUSIVE``); simulated jobs send real batches over gRPC.
"""

from __future__ import annotations

import sqlite3
import time

from layrot.client.query import QueryClient


def test_a_session_over_the_bound_waits_for_room_and_then_everything_is_stored(
    collector_factory, ingest, sim_job, tmp_path
):
    db = tmp_path / "bp.db"
    c = collector_factory(db, store_busy_timeout=20.0)  # commits wait for the lock instead of failing
    c.ingest.max_pending_samples = 50  # two batches of 10 steps x 4 layers fit, the third waits
    job = sim_job(run="bp", layer_sizes=(8, 8, 8, 8))
    s = ingest(c)
    s.send(job.hello())
    s.send(job.batch(1))
    s.wait_ack(1)
    blocker = sqlite3.connect(str(db), isolation_level=None, timeout=30)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(6):
            s.send(job.batch(10))
        time.sleep(1.0)
        got = s.drain(0.3)
        # Nothing new is stored, so nothing is acked; the servicer read two batches and stopped there.
        assert not any(m.WhichOneof("kind") == "ack" and m.ack.seq > 1 for m in got)
        assert c.ingest.pending_samples == 80
        # Waiting costs no timers: the blocked stream awaits an event. A polling loop keeps a
        # sleep of a few ms scheduled on the collector loop at all times; the loop's own timers
        # (the alert engine's) are a second or more apart.
        short = 0
        for _ in range(20):
            now = c.loop.time()
            short += any(h.when() - now < 0.02 for h in list(c.loop._scheduled))  # noqa: SLF001
            time.sleep(0.01)
        assert short <= 2, f"a short timer was pending in {short} of 20 looks"
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    s.wait_ack(job.seq, timeout=20)
    assert c.ingest.pending_samples == 0
    hist = QueryClient(c.grpc_address).history("bp")
    assert hist.steps.tolist() == list(range(1, 62))
    truth = job.truth_array("rotation")
    assert abs(hist.rotation - truth).max() <= 6e-8 * abs(truth).max()  # stored as float32
