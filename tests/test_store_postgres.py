"""The collector on PostgreSQL end to end: a real server of our own (tests/postgres_server.py), a real gRPC
collector, a real torch job; the history against the job's float64 reference, read back both through the
collector and straight from PostgreSQL; a collector restart restoring the runs; failed commits (a locked
table, the server stopped mid-run) answered with Nacks, never Acks (acked => stored, checked at every Ack).

The store's own suite runs on both backends in tests/test_store.py.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from reference import angle, cosine_distance, rel_err
from test_exact_delivery import ExactJob

pytestmark = pytest.mark.timeout(180)

TOL = 1e-4  # the job measures in float32 (as test_torch_watch.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torch_job_on_postgresql_exact_through_a_restart_and_a_locked_table(postgres_url, tmp_path):  # noqa: F811
    torch = pytest.importorskip("torch")
    import psycopg
    from torch import nn

    import layrot
    from layrot.client.query import QueryClient
    from layrot.server.app import Collector
    from layrot.server.store_postgres import PostgresStore

    port = free_port()

    def collector() -> Collector:
        # A short lock wait, so that the lock below makes commits fail (not just wait).
        return Collector(grpc_port=port, metrics_port=None, db_path=postgres_url, store_busy_timeout=0.3).start()

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g)
    c1 = collector()
    assert isinstance(c1.store, PostgresStore)
    handle = layrot.watch(
        model, opt, run="pg-torch", collector=f"127.0.0.1:{port}", reporter_options={"backoff_max": 0.5}
    )
    names = handle.layer_names
    params = dict(model.named_parameters())
    w0 = [params[n].detach().double().numpy().copy() for n in names]
    saved: list[list[np.ndarray]] = []

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            handle.observe_loss(loss)
            opt.step()
            saved.append([params[n].detach().double().numpy().copy() for n in names])

    c2 = None
    try:
        train(20)
        assert handle.flush(15.0)
        c1.stop()
        train(10)  # collector down: steps 21..30 wait in the job's resend buffer
        c2 = collector()
        # Restored from PostgreSQL before the job is back: the run, its layers and its newest stored step.
        restored = {r["run"]: r for r in QueryClient(c2.grpc_address).list_runs()}
        assert restored["pg-torch"]["step"] == 20 and restored["pg-torch"]["num_layers"] == len(names)
        train(10)
        assert handle.flush(15.0)
        errors_before = c2.store.errors
        with psycopg.connect(postgres_url, autocommit=True) as blocker:
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE steps IN EXCLUSIVE MODE")
            train(10)  # reported while no commit can go through
            time.sleep(1.5)
            blocker.execute("COMMIT")
        train(10)
        assert handle.flush(20.0)
        stats = handle.stats
        handle.close()
        assert c2.store.errors > errors_before, "the lock should have made commits fail"
        assert stats.retried_batches > 0, "failed commits should have been Nacked (and sent again), not acked"
        n = len(saved)
        assert n == 60 and stats.acked_steps == n
        hist = QueryClient(c2.grpc_address).history("pg-torch")
    finally:
        for c in (c1, c2):
            if c is not None:
                c.stop()

    # The float64 reference from the weights saved at every step (steps are 1-based).
    rot_ref = np.array([[cosine_distance(w0[l], saved[t][l]) for l in range(len(names))] for t in range(n)])
    ang_ref = np.array(
        [[angle(w0[l] if t == 0 else saved[t - 1][l], saved[t][l]) for l in range(len(names))] for t in range(n)]
    )
    assert list(hist.steps) == list(range(1, n + 1))
    assert rel_err(hist.rotation, rot_ref).max() <= TOL
    assert rel_err(hist.step_angle, ang_ref).max() <= TOL
    # Straight from PostgreSQL, through a connection of our own: one row per step, the same (float32) values.
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute(
            "SELECT s.step, m.rotation, m.step_angle FROM steps s JOIN runs ON runs.id = s.run_id"
            " JOIN samples m ON m.run_id = s.run_id AND m.step = s.step AND m.digest = s.digest"
            " WHERE runs.run = 'pg-torch' ORDER BY s.step"
        ).fetchall()
    assert [r[0] for r in rows] == list(range(1, n + 1))
    db_rot = np.stack([np.frombuffer(r[1], dtype="<f4").astype("<f8") for r in rows])
    db_ang = np.stack([np.frombuffer(r[2], dtype="<f4").astype("<f8") for r in rows])
    assert np.array_equal(db_rot, hist.rotation) and np.array_equal(db_ang, hist.step_angle)


def test_locked_table_never_acks_what_is_not_stored(collector_factory, ingest, sim_job, postgres_url):  # noqa: F811
    import psycopg

    c = collector_factory(postgres_url, store_busy_timeout=0.3)
    job = ExactJob(c, ingest, sim_job, "pg-locked", postgres_url)
    for _ in range(20):
        job.train(3)
        job.pump(0.01)
    with psycopg.connect(postgres_url, autocommit=True) as blocker:
        # EXCLUSIVE: no writes (the collector's commits wait, then fail), reads go on (ExactJob's checks).
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE steps, runs IN EXCLUSIVE MODE")
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            job.train(2)
            job.pump(0.05)
        blocker.execute("COMMIT")
    for _ in range(20):
        job.train(3)
        job.pump(0.01)
    job.finish()
    assert job.nacked > 0, "the lock should have made some commits fail"
    assert c.store.errors > 0
    job.verify()  # every Ack covered stored steps only; history == trained, 0 dropped


def test_server_stopped_mid_run_nacks_then_recovers(collector_factory, ingest, sim_job, postgres_server):  # noqa: F811
    """PostgreSQL goes away under a running collector: Nacks while it is away, stored again once it is back."""
    url = postgres_server.create_database()
    c = collector_factory(url, store_busy_timeout=0.5)
    job = ExactJob(c, ingest, sim_job, "pg-down", url)
    for _ in range(10):
        job.train(3)
        job.pump(0.01)
    job.finish(20)
    job.check.close()  # our checking connection dies with the server: opened again below
    postgres_server.stop("immediate")  # as if it crashed
    try:
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            job.train(2)
            job.pump(0.05)
        assert job.nacked > 0, "commits without a server should have failed"
        assert c.store.errors > 0
        from layrot.server.store_api import StoreError

        with pytest.raises(StoreError, match="layrot_test_"):  # reads fail with the error the callers catch
            c.store.ranks(1)
    finally:
        postgres_server.start()
    from test_exact_delivery import _connect

    job.check = _connect(url)
    for _ in range(10):
        job.train(3)
        job.pump(0.05)
    job.finish(60)
    job.verify()


def test_serve_with_a_postgresql_url(postgres_url, tmp_path):  # noqa: F811
    """``layrot-agent serve --db postgresql://...`` as operators run it: it serves, and never prints the password."""
    import subprocess
    import sys

    from layrot.client.query import QueryClient

    # The test cluster trusts its socket, so a password in the URL is accepted (and must stay unprinted).
    url = postgres_url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "layrot.cli.main", "serve", "--db", url, "--grpc-port", str(port)]
            + ["--metrics-port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "layrot collector:" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert QueryClient(f"127.0.0.1:{port}").list_runs() == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "postgres:***@" in text and "hunter2" not in text, text
    assert not [p for p in tmp_path.iterdir() if p.name != "serve.log"]  # no SQLite file named after the URL
