"""Under a slow collector the job's reporter sends fewer, bigger batches, and loses nothing.

A real collector whose history store takes 0.3 s per commit (its writer thread is slowed,
everything else is real: gRPC on loopback, SQLite), and two real reporters feeding it the
same 600 steps at the same pace: one with the adaptive flush interval (the default), one with
it pinned (``max_flush_interval == flush_interval``). The adaptive one must send clearly fewer
StepBatch messages per step, and both must have every step acknowledged and stored.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from layrot.agent.reporter import LayerSpec, Reporter, StepRecord
from layrot.client.query import QueryClient
from layrot.server.store import Store

STEPS = 600
LAYERS = 4


@pytest.fixture
def slow_commits(monkeypatch):
    """The collector's history store takes 0.3 s per commit (its writer thread slowed; the rest is real)."""
    real_execute = Store._execute

    def slow_execute(self, conn, items):
        time.sleep(0.3)
        return real_execute(self, conn, items)

    monkeypatch.setattr(Store, "_execute", slow_execute)


SPECS = [LayerSpec(name=f"l{i}.weight", index=i, shape=(8, 8), init_norm=2.0, numel=64) for i in range(LAYERS)]
ROWS = np.tile(np.array([[2.0], [0.5], [0.1], [2.0], [0.1], [0.01]]), (1, LAYERS))


def _feed(address: str, run: str, tmp_path, **kw) -> Reporter:
    rep = Reporter(run, SPECS, collector=address, every=1, spool_dir=tmp_path / run, flush_interval=0.02, **kw)
    for t in range(1, STEPS + 1):
        assert rep.submit(StepRecord(step=t, time=time.time(), values=ROWS))
        time.sleep(0.003)  # ~2 s of training, a step every 3 ms
    return rep


def test_a_slow_collector_gets_fewer_bigger_batches_and_every_step(collector_factory, slow_commits, tmp_path):
    c = collector_factory()
    adaptive = _feed(c.grpc_address, "adaptive", tmp_path)
    pinned = _feed(c.grpc_address, "pinned", tmp_path, max_flush_interval=0.02)
    for rep in (adaptive, pinned):
        assert rep.flush(30)
        rep.close()
        assert rep.stats.dropped == 0 and rep.stats.acked_steps == STEPS

    per_step = {r.run: r.stats.sent_batches / STEPS for r in (adaptive, pinned)}
    # Pinned: a batch every 20 ms of steps (~100 for 2 s); adaptive: the wait grows with the batches in flight.
    assert per_step["adaptive"] < 0.5 * per_step["pinned"], per_step
    q = QueryClient(c.grpc_address)
    for run in ("adaptive", "pinned"):
        assert q.history(run).steps.tolist() == list(range(1, STEPS + 1))


def test_a_slow_job_batches_by_the_ack_latency(collector_factory, slow_commits, tmp_path):
    """A job whose steps come further apart than its acks take has few batches waiting, however slow
    the collector: only the ack-latency bound of the wait makes it send several steps a message."""
    c = collector_factory()
    steps = 50
    reps = {
        run: Reporter(
            run, SPECS, collector=c.grpc_address, every=1, spool_dir=tmp_path / run, flush_interval=0.01, **kw
        )
        for run, kw in (("slow-adaptive", {}), ("slow-pinned", {"max_flush_interval": 0.01}))
    }
    for t in range(1, steps + 1):
        for rep in reps.values():
            assert rep.submit(StepRecord(step=t, time=time.time(), values=ROWS))
        time.sleep(0.1)  # a step every 100 ms: at most 3-4 batches wait for a 0.3 s commit
    for rep in reps.values():
        assert rep.flush(30)
        rep.close()
        assert rep.stats.dropped == 0 and rep.stats.acked_steps == steps
    per_step = {run: rep.stats.sent_batches / steps for run, rep in reps.items()}
    # Pinned: one step a message. By waiting batches alone (0.01 s x (1 + 4) < 0.1 s) the adaptive
    # one would be too; with the wait at least the ~0.3 s ack latency, it sends about 3 steps a message.
    assert per_step["slow-pinned"] > 0.9, per_step
    assert per_step["slow-adaptive"] < 0.6 * per_step["slow-pinned"], per_step
    q = QueryClient(c.grpc_address)
    for run in reps:
        assert q.history(run).steps.tolist() == list(range(1, steps + 1))
