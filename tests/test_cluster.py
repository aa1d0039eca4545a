"""Two real collectors on one real PostgreSQL database (server/cluster.py).

Each test starts two collectors on a fresh database of the tests' own PostgreSQL
(tests/postgres_server.py) and talks to them with protocol-level jobs: runs made
through one are seen by the other, run ids never collide, a run created through
both at once is one run, each run is in exactly one collector's /metrics (and
moves with its job), a command set through one collector reaches a job on the
other, and a run live on one cannot be deleted through the other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from metrics_text import scrape
from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)

from layrot.client.errors import CollectorError
from layrot.client.query import QueryClient
from layrot.proto import layrot_pb2 as pb

INTERVAL = 0.2  # cluster passes: fast, so the tests wait tenths of a second, not seconds


def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def pair(collector_factory, postgres_url):  # noqa: F811
    """Two collectors (ids a and b) on one database."""
    return tuple(
        collector_factory(postgres_url, collector_id=cid, cluster_interval=INTERVAL, run_ttl=600.0)
        for cid in ("a", "b")
    )


def metric_runs(c) -> set[str]:
    samples = scrape(c)
    return {lab["run"] for lab, _ in samples.get("layrot_run_last_report_timestamp_seconds", [])}


def runs_of(c) -> dict[str, dict]:
    with QueryClient(c.grpc_address) as q:
        return {r["run"]: r for r in q.list_runs()}


def open_job(ingest, c, job, **hello) -> Any:
    s = ingest(c)
    s.send(job.hello(**hello))
    msg = s.recv()
    assert msg.WhichOneof("kind") == "welcome", msg
    return s


def test_runs_made_through_either_collector_are_seen_by_both_with_unique_ids(pair, ingest, sim_job):
    a, b = pair
    jobs = [sim_job(run=f"r{i}", seed=i) for i in range(6)]
    sessions = []
    for i, job in enumerate(jobs):
        s = open_job(ingest, (a, b)[i % 2], job)
        s.send(job.batch(3))
        s.wait_ack(1)
        sessions.append(s)
    names = {j.run for j in jobs}
    for c in (a, b):
        got = wait_for(lambda c=c: names <= set(runs_of(c)) and runs_of(c), what=f"every run on {c.collector_id}")
        assert set(got) == names
        assert all(r["step"] == 3 for r in got.values()), got  # newest values too, fed through either
        assert all(r["connected"] and r["sessions"] == 1 for r in got.values()), got
    ids = {rs.run_id for rs in a.state.runs.values()}
    assert len(ids) == 6 and ids == {rs.run_id for rs in b.state.runs.values()}
    # The history of a run fed through a is read through b, exact.
    with QueryClient(b.grpc_address) as q:
        h = q.history("r0")
    np.testing.assert_allclose(h.rotation, jobs[0].truth_array("rotation"), rtol=6e-8, atol=1e-12)
    for s in sessions:
        s.goodbye(last_seq=1)


def test_a_run_created_through_both_at_once_is_one_run(pair, ingest, sim_job):
    a, b = pair
    for k in range(5):
        jobs = [sim_job(run=f"both-{k}", seed=10 * k + r, rank=r, world_size=2) for r in (0, 1)]
        # Same layer table (same sizes, init norms may differ per rank: the Hello carries each one's own).
        got: dict[int, Any] = {}

        def hello(rank: int, c, job) -> None:
            got[rank] = open_job(ingest, c, job)

        threads = [threading.Thread(target=hello, args=(r, c, j)) for r, c, j in zip((0, 1), (a, b), jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r, job in enumerate(jobs):
            got[r].send(job.batch(2))
            got[r].wait_ack(1)
        assert a.state.runs[f"both-{k}"].run_id == b.state.runs[f"both-{k}"].run_id
        for r in (0, 1):
            got[r].goodbye(last_seq=1)
    with QueryClient(a.grpc_address) as q:
        assert sorted(r["run"] for r in q.list_runs()) == [f"both-{k}" for k in range(5)]


def test_each_run_is_in_one_collectors_metrics_and_moves_with_its_job(pair, ingest, sim_job):
    a, b = pair
    ja, jb = sim_job(run="on-a", seed=1), sim_job(run="on-b", seed=2)
    sa, sb = open_job(ingest, a, ja), open_job(ingest, b, jb)
    for s, j in ((sa, ja), (sb, jb)):
        s.send(j.batch(2))
        s.wait_ack(1)
    wait_for(lambda: metric_runs(a) == {"on-a"} and metric_runs(b) == {"on-b"}, what="one exporter per run")
    # The job of on-a reconnects through b (a failover): b exports it, a no longer does.
    sa.goodbye(last_seq=1)
    sa2 = open_job(ingest, b, ja)
    welcome_step = b.state.runs["on-a"].stored_step.get(0)
    assert welcome_step == 2  # b read what a stored: the job need not resend it
    sa2.send(ja.batch(1))
    sa2.wait_ack(1)
    wait_for(lambda: metric_runs(a) == set() and metric_runs(b) == {"on-a", "on-b"}, what="on-a moved to b")
    # Ended runs stay with their last holder, once.
    sa2.goodbye(last_seq=1)
    sb.goodbye(last_seq=1)
    time.sleep(5 * INTERVAL)
    assert metric_runs(a) == set() and metric_runs(b) == {"on-a", "on-b"}


def test_a_command_set_through_one_collector_reaches_the_job_on_the_other(pair, ingest, sim_job):
    a, b = pair
    job = sim_job(run="steer", seed=3, layca=True)
    s = open_job(ingest, a, job, capabilities=pb.Capabilities(layca=True, control=True, loss=True))
    s.send(job.batch(2))
    s.wait_ack(1)
    wait_for(lambda: "steer" in b.state.runs, what="b to know the run")
    with QueryClient(b.grpc_address) as q:
        st = q.set_control("steer", pb.RateCommand(alpha=0.5, schedule=pb.RhoSchedule(rho0=0.01), issued_by="t"))
    assert st["requested_version"] == 1

    def command() -> pb.RateCommand | None:
        for msg in s.drain(0.05):
            if msg.WhichOneof("kind") == "rate_command":
                return msg.rate_command
        return None

    cmd = wait_for(command, what="the command at the job on a")
    assert cmd.version == 1 and cmd.alpha == 0.5 and cmd.schedule.rho0 == 0.01
    s.send(pb.ControlAck(version=1, applied=True, step=3))
    s.send(job.batch(1))

    def applied() -> dict | None:
        with QueryClient(b.grpc_address) as q:
            st = q.get_control("steer")
        return st if st["applied_version"] == 1 else None

    st = wait_for(applied, what="b to see the job's answer")
    assert [e["event"] for e in st["audit"]] == ["requested", "sent", "applied"]
    assert st["audit"][0]["who"].startswith("t from ")
    # A second command through b continues the run's versions.
    with QueryClient(b.grpc_address) as q:
        assert q.set_control("steer", pb.RateCommand(mode="off", issued_by="t"))["requested_version"] == 2
    assert wait_for(command, what="the second command").version == 2
    s.goodbye(last_seq=2)


def test_a_run_live_on_one_collector_cannot_be_deleted_through_the_other(pair, ingest, sim_job):
    a, b = pair
    job = sim_job(run="keep", seed=4)
    s = open_job(ingest, a, job)
    s.send(job.batch(2))
    s.wait_ack(1)
    wait_for(lambda: runs_of(b).get("keep", {}).get("connected"), what="b to see the live session")
    with QueryClient(b.grpc_address) as q, pytest.raises(CollectorError, match="live session"):
        q.delete_run("keep")
    s.goodbye(last_seq=1)
    wait_for(lambda: not runs_of(b)["keep"]["connected"], what="b to see the session end")
    with QueryClient(b.grpc_address) as q:
        assert q.delete_run("keep") == 2
    wait_for(lambda: "keep" not in runs_of(a), what="a to forget the deleted run")


def test_alerts_raised_by_the_holder_are_listed_and_streamed_by_the_other(pair, ingest, sim_job):
    a, b = pair
    job = sim_job(run="jumpy", layer_sizes=(30, 30))
    s = open_job(ingest, a, job)
    s.send(job.batch(25, angle=0.01, loss=False))
    s.wait_ack(job.seq)
    wait_for(lambda: "jumpy" in b.state.runs, what="b to know the run")
    got: list[dict] = []
    ready = threading.Event()

    def consume() -> None:
        with QueryClient(b.grpc_address) as q:
            stream = q.watch_alerts("jumpy")
            ready.set()
            for alert in stream:
                got.append(alert)
                stream.close()
                return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert ready.wait(5)
    time.sleep(3 * INTERVAL)
    s.send(job.batch(1, angle=1.2, loss=False))  # step 26: an abrupt rotation, raised by a
    s.wait_ack(job.seq)
    t.join(10)
    assert [x["step"] for x in got] == [26] and got[0]["kind"] == "abrupt_rotation"
    with QueryClient(b.grpc_address) as q:
        (listed,) = q.list_alerts("jumpy")
    with QueryClient(a.grpc_address) as q:
        (raised,) = q.list_alerts("jumpy")
    assert (listed["step"], listed["severity"], listed["kind"]) == (raised["step"], raised["severity"], raised["kind"])
    # Counted once: by the collector that raised it (and exports the run).
    counts = {
        c.collector_id: [v for lab, v in scrape(c).get("layrot_alerts_total", []) if lab.get("run") == "jumpy"]
        for c in (a, b)
    }
    assert counts == {"a": [1.0], "b": []}, counts
    s.goodbye(last_seq=job.seq)
