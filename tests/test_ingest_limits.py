"""A hardened ingest: limits, impossible values, raw-gRPC garbage, run ownership, replay, one port per collector.

Every refusal must be counted in ``layrot_messages_rejected_total{reason}``
and leave the collector answering others.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from metrics_text import scrape

from layrot.client.query import QueryClient
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.wire import pack
from layrot.server.decode import IngestLimits


def rejected(collector, reason: str) -> float:
    for lab, v in scrape(collector).get("layrot_messages_rejected_total", []):
        if lab.get("reason") == reason:
            return v
    return 0.0


def errors(msgs) -> list[pb.SessionError]:
    return [m.error for m in msgs if m.WhichOneof("kind") == "error"]


def nacks(msgs) -> list[pb.Nack]:
    return [x for m in msgs if m.WhichOneof("kind") == "ack" for x in m.ack.failed]


def read_until(s, done, timeout: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while not done(got):
        got.append(s.recv(max(0.01, deadline - time.monotonic())))
    return got


def big_hello(n: int, duplicate: bool) -> pb.Hello:
    layers = [pb.Layer(name=f"block{i}.weight", index=i, shape=[4, 4], init_norm=1.0, numel=16) for i in range(n)]
    if duplicate:
        layers[-1].name = layers[n // 2].name
    return pb.Hello(run="huge", layers=layers, world_size=1)


# ---------------------------------------------------------------- Hello limits, linear time
def test_a_40000_layer_hello_is_refused_while_queries_are_answered(collector_factory, ingest):
    # The limit raised far above the Hello, so the whole table is validated (one duplicate at the end).
    c = collector_factory(ingest_limits=IngestLimits(max_layers=100_000))
    latencies: list[float] = []
    stop = threading.Event()

    def query() -> None:
        with QueryClient(c.grpc_address) as q:
            while not stop.is_set():
                t0 = time.monotonic()
                q.list_runs()
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)

    t = threading.Thread(target=query)
    t.start()
    try:
        time.sleep(0.2)
        for _ in range(3):
            s = ingest(c)
            s.send(big_hello(40_000, duplicate=True))
            assert s.wait_end(10)
            errs = errors(s.drain(0.1))
            assert [e.code for e in errs] == ["bad_hello"] and "duplicate layer names" in errs[0].message
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(10)
    # Answered throughout, never stuck behind the refusals. Not a speed bound (this ran beside other
    # work at 1.0 s once; a quiet run answers in ~2 ms): a hang or a loop blocked for seconds fails it.
    assert latencies and max(latencies) < 5.0
    assert rejected(c, "bad_hello") == 3 and c.state.runs == {}


def test_default_limits_refuse_huge_tables_long_names_and_batches(collector, ingest, sim_job):
    s = ingest(collector)
    s.send(big_hello(40_000, duplicate=False))
    assert s.wait_end(10)
    assert "at most 10000" in errors(s.drain(0.1))[0].message
    assert rejected(collector, "too_many_layers") == 1

    s = ingest(collector)
    s.send(pb.Hello(run="long-layer", layers=[pb.Layer(name="w" * 2000, index=0, init_norm=1.0)]))
    assert s.wait_end(5)
    assert rejected(collector, "name_too_long") == 1

    s = ingest(collector)
    s.send(pb.Hello(run="r" * 201, layers=[pb.Layer(name="w", index=0, init_norm=1.0)]))
    assert s.wait_end(5)
    assert "1..200 printable" in errors(s.drain(0.1))[0].message


def test_runs_per_collector_and_steps_per_batch_are_bounded(collector_factory, ingest, sim_job):
    c = collector_factory(ingest_limits=IngestLimits(max_runs=2, max_steps_per_batch=4))
    for i in range(2):
        job = sim_job(run=f"r{i}")
        s = ingest(c)
        s.send(job.hello())
        s.send(job.batch(4))
        s.wait_ack(1)
    third = ingest(c)
    third.send(sim_job(run="r2").hello())
    assert third.wait_end(5)
    assert [e.code for e in errors(third.drain(0.1))] == ["too_many_runs"]
    assert rejected(c, "too_many_runs") == 1
    job = sim_job(run="r0")
    s = ingest(c)
    s.send(job.hello())
    job.step = 4
    s.send(job.batch(5))
    msgs = read_until(s, lambda got: nacks(got))
    assert nacks(msgs)[0].code == "bad_batch" and not nacks(msgs)[0].retry
    assert rejected(c, "too_many_steps") == 1


# ---------------------------------------------------------------- raw gRPC: oversized and undecodable
def raw_session(address: str, payloads: list[bytes]) -> tuple[list[bytes], grpc.RpcError | None]:
    """Send ``payloads`` as-is on Ingest.Session (identity serializers); returns the raw answers and the status."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 300 << 20)])
    call = channel.stream_stream("/layrot.v1.Ingest/Session")  # no serializers: bytes in, bytes out
    got: list[bytes] = []
    try:
        for answer in call(iter(payloads), timeout=10):
            got.append(answer)
        return got, None
    except grpc.RpcError as exc:
        return got, exc
    finally:
        channel.close()


def test_oversized_and_undecodable_messages_are_counted(collector, ingest, sim_job):
    hello = pb.JobMessage(hello=sim_job(run="raw").hello()).SerializeToString()
    big = pb.JobMessage(steps=pb.StepBatch(seq=1, norm=b"\0" * (17 << 20))).SerializeToString()
    got, status = raw_session(collector.grpc_address, [hello, big])
    assert status is None
    codes = [pb.CollectorMessage.FromString(g).WhichOneof("kind") for g in got]
    assert codes[0] == "welcome" and pb.CollectorMessage.FromString(got[-1]).error.code == "too_large"
    assert rejected(collector, "too_large") == 1
    # A runaway 200 MB message (far above the 16 MiB limit) is counted too.
    huge = pb.JobMessage(steps=pb.StepBatch(seq=1, norm=b"\0" * (200 << 20))).SerializeToString()
    got, status = raw_session(collector.grpc_address, [hello, huge])
    del huge
    assert status is None and pb.CollectorMessage.FromString(got[-1]).error.code == "too_large"
    assert rejected(collector, "too_large") == 2

    for garbage in (b"\xff\xff\xff\xff garbage", b"\x0a\xff\xff\xff\xff\x0f"):
        got, status = raw_session(collector.grpc_address, [garbage])
        assert status is None and pb.CollectorMessage.FromString(got[-1]).error.code == "undecodable"
    assert rejected(collector, "undecodable") == 2
    # ... and the collector serves the next job as if nothing happened.
    job = sim_job(run="after")
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(2))
    s.wait_ack(1)


# ---------------------------------------------------------------- physically impossible values
def _impossible(job) -> dict[str, tuple[pb.StepBatch, str]]:
    def batch(**over) -> pb.StepBatch:
        b = job.batch_for([1, 2], seq=0)
        for k, v in over.items():
            if isinstance(v, list):
                b.ClearField(k)
                getattr(b, k).extend(v)
            else:
                setattr(b, k, v)
        return b

    L = len(job.layer_sizes)
    norm = np.frombuffer(batch().norm).reshape(2, L)
    neg = norm.copy()
    neg[1, 0] = -neg[1, 0]
    far = np.frombuffer(batch().dist0).reshape(2, L).copy()
    far[0, 1] = 3.0 * (norm[0, 1] + 1.0) * 10
    far_step = np.frombuffer(batch().dstep).reshape(2, L).copy()
    far_step[1, 2] = 10.0 * (norm[1, 2] + norm[0, 2] + 1.0)
    return {
        "negative norm": (batch(norm=pack(neg)), "negative_norm"),
        "dist0 beyond the triangle": (batch(dist0=pack(far)), "impossible_distance"),
        "dstep beyond the triangle": (batch(dstep=pack(far_step)), "impossible_distance"),
        "time 1e300": (batch(times=[1e300, 1e300]), "bad_time"),
        "negative time": (batch(times=[-5.0, 1.0]), "bad_time"),
        "step beyond 2**62": (batch(steps=[1, 2**62 + 1]), "bad_step"),
        "step 2**63-1": (batch(steps=[1, 2**63 - 1]), "bad_step"),
        "repeated step": (batch(steps=[2, 2]), "bad_step"),
        "decreasing steps": (batch(steps=[2, 1]), "bad_step"),
        "command version beyond int64": (batch(command_version=[1, 2**64 - 1]), "bad_batch"),
    }


def test_impossible_measurements_are_refused_for_good_and_counted(collector, ingest, sim_job):
    job = sim_job(run="physics", layer_sizes=(6, 7, 8))
    s = ingest(collector)
    s.send(job.hello())
    job.batch(2)  # simulate steps 1 and 2 (batch_for reuses them)
    cases = _impossible(job)
    for seq, (b, _reason) in enumerate(cases.values(), start=1):
        b.seq = seq
        s.send(b)
    msgs = read_until(s, lambda got: len(nacks(got)) >= len(cases))
    refused = nacks(msgs)
    assert [x.seq for x in refused] == list(range(1, len(cases) + 1))
    assert all(x.code == "bad_batch" and not x.retry and x.message for x in refused)
    for reason in {r for _, r in cases.values()}:
        assert rejected(collector, reason) == sum(1 for _, r in cases.values() if r == reason), reason
    # None of it reached the history or the live view.
    with QueryClient(collector.grpc_address) as q:
        assert q.get_run("physics")["step"] == 0
    good = job.batch_for([1, 2], seq=len(cases) + 1)
    s.send(good)
    msgs = read_until(s, lambda got: any(len(cases) + 1 in m.ack.stored for m in got if m.WhichOneof("kind") == "ack"))
    with QueryClient(collector.grpc_address) as q:
        assert q.history("physics").steps.tolist() == [1, 2]
        assert q.get_run("physics")["step"] == 2


def test_non_finite_values_are_still_divergence_not_refusals(collector, ingest, sim_job):
    job = sim_job(run="diverging", layer_sizes=(5, 5))
    s = ingest(collector)
    s.send(job.hello())
    b = job.batch(2)
    dist0 = np.frombuffer(b.dist0).reshape(2, 2).copy()
    dist0[1, 1] = np.inf
    norm = np.frombuffer(b.norm).reshape(2, 2).copy()
    norm[1, 0] = np.nan
    b.dist0, b.norm = pack(dist0), pack(norm)
    s.send(b)
    msgs = s.wait_ack(1)
    assert nacks(msgs) == [] and errors(msgs) == []


def test_seqs_must_increase_in_a_session(collector, ingest, sim_job):
    job = sim_job(run="seqs")
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(1))
    s.wait_ack(1)
    s.send(job.batch_for([1], seq=1))
    assert s.wait_end(5)
    assert [e.code for e in errors(s.drain(0.1))] == ["bad_seq"]
    assert rejected(collector, "bad_seq") == 1


# ---------------------------------------------------------------- query arguments
def test_history_with_steps_beyond_int64_is_invalid_argument(collector, ingest, sim_job):
    job = sim_job(run="q")
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(1))
    s.wait_ack(1)
    channel = grpc.insecure_channel(collector.grpc_address)
    stub = pb_grpc.QueryStub(channel)
    try:
        for req in (pb.HistoryRequest(run="q", since_step=2**64 - 1), pb.HistoryRequest(run="q", until_step=2**63)):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.GetHistory(req, timeout=5))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            stub.ListAlerts(pb.ListAlertsRequest(since=float("nan")), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(list(stub.GetHistory(pb.HistoryRequest(run="q", since_step=2**63 - 1), timeout=5))) == 1
    finally:
        channel.close()


# ---------------------------------------------------------------- run ownership and replay
def hello_code(ingest, collector, hello: pb.Hello) -> str:
    """'welcome' when the Hello is accepted, else the SessionError code."""
    s = ingest(collector)
    s.send(hello)
    first = s.recv()
    kind = first.WhichOneof("kind")
    out = "welcome" if kind == "welcome" else first.error.code
    s.close()
    return out


def test_a_run_belongs_to_the_key_that_created_it(collector, ingest, sim_job):
    job = sim_job(run="owned")
    assert hello_code(ingest, collector, job.hello(run_key="k-owner")) == "welcome"
    assert hello_code(ingest, collector, job.hello(run_key="k-owner")) == "welcome"  # a resumed job
    assert hello_code(ingest, collector, job.hello(run_key="k-thief")) == "run_owned"
    assert hello_code(ingest, collector, job.hello()) == "run_owned"  # a key-less client on a bound run
    assert hello_code(ingest, collector, job.hello(run_key="k-owner", replay=True)) == "welcome"  # sync
    assert hello_code(ingest, collector, job.hello(run_key="k-thief", replay=True)) == "run_owned"
    assert rejected(collector, "run_owned") == 3
    # An unbound run (created without a key, an older client) stays open to key-less Hellos.
    legacy = sim_job(run="legacy")
    assert hello_code(ingest, collector, legacy.hello()) == "welcome"
    assert hello_code(ingest, collector, legacy.hello()) == "welcome"
    s = ingest(collector)
    s.send(job.hello(run_key="k-thief"))
    s.send(job.batch(1))
    assert s.wait_end(5)
    with QueryClient(collector.grpc_address) as q:
        assert q.history("owned").steps.tolist() == []  # 0 foreign steps


def test_ownership_survives_a_restart(collector_factory, ingest, sim_job, tmp_path):
    db = tmp_path / "own.db"
    c = collector_factory(db)
    job = sim_job(run="mine")
    s = ingest(c)
    s.send(job.hello(run_key="k1"))
    s.send(job.batch(3))
    s.wait_ack(1)
    c.stop()
    c2 = collector_factory(db)
    assert hello_code(ingest, c2, job.hello(run_key="k2")) == "run_owned"
    s = ingest(c2)
    s.send(job.hello(run_key="k1"))
    first = s.recv()
    assert first.WhichOneof("kind") == "welcome" and first.welcome.stored_step == 3


def test_a_replay_writes_history_but_is_no_live_session(collector, ingest, sim_job):
    job = sim_job(run="offline", layca=True)
    s = ingest(collector)
    h = job.hello(run_key="k", replay=True)
    h.capabilities.control = True
    s.send(h)
    s.send(job.batch(4))
    s.wait_ack(1)
    with QueryClient(collector.grpc_address) as q:
        runs = {r["run"]: r for r in q.list_runs()}
        assert runs["offline"]["connected"] is False and runs["offline"]["step"] == 4
        assert q.history("offline").steps.tolist() == [1, 2, 3, 4]
    rs = collector.state.runs["offline"]
    assert not rs.sessions and not rs.connected
    s.send(pb.ControlAck(version=1, applied=True))
    s.goodbye(last_seq=1)
    assert rejected(collector, "bad_control_ack") == 1


# ---------------------------------------------------------------- one collector per port
def test_a_second_collector_on_a_taken_port_is_refused(collector_factory):
    first = collector_factory()
    with pytest.raises(RuntimeError) as e:
        collector_factory(grpc_port=first.grpc_port, metrics_port=None)
    assert f"port {first.grpc_port}" in str(e.value) and "in use" in str(e.value)
    with QueryClient(first.grpc_address) as q:
        assert q.list_runs() == []


def test_a_token_holder_cannot_write_into_another_jobs_run(collector_factory, ingest, sim_job):
    c = collector_factory(token="shared-token")
    owner = sim_job(run="victim")
    s = ingest(c, token="shared-token")
    s.send(owner.hello(run_key="k-owner"))
    s.send(owner.batch(1))
    s.wait_ack(owner.seq)
    s.close()
    # Another holder of the same token, with the victim's layer table but not its key.
    thief = sim_job(run="victim")
    t = ingest(c, token="shared-token")
    t.send(thief.hello(run_key="k-thief"))
    t.send(thief.batch(1))
    t.send(thief.batch(2))
    assert t.wait_end(5)
    with QueryClient(c.grpc_address, token="shared-token") as q:
        assert q.history("victim").steps.tolist() == [1]  # the owner's step only: 0 foreign steps
    assert rejected(c, "run_owned") == 1
