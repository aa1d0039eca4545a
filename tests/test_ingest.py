"""The collector over real gRPC on loopback: ingest semantics, history, metrics, health, auth.

Jobs are simulated with raw ``IngestStub`` streams carrying hand-built
Hello/StepBatch messages from real float64 weight vectors (see
``SimJob`` in conftest); the truth is computed from the vectors, not with
the collector's formulas.
"""

from __future__ import annotations

import math
import sqlite3
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_text import scrape

from layrot.client.query import CollectorError, QueryClient
from layrot.core.version import __version__ as layrot_version
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.wire import pack


def value(samples: dict, name: str, **labels) -> float | None:
    for lab, v in samples.get(name, []):
        if all(lab.get(k) == str(x) for k, x in labels.items()):
            return v
    return None


def errors(msgs) -> list[pb.SessionError]:
    return [m.error for m in msgs if m.WhichOneof("kind") == "error"]


def nacks(msgs) -> list[pb.Nack]:
    return [x for m in msgs if m.WhichOneof("kind") == "ack" for x in m.ack.failed]


def stored_seqs(msgs) -> set[int]:
    """Seqs named stored by the Acks in ``msgs`` beyond the cumulative ones."""
    return {x for m in msgs if m.WhichOneof("kind") == "ack" for x in m.ack.stored}


def read_until(s, done, timeout: float = 5.0) -> list:
    """Messages from ``s`` until ``done(messages so far)``; AssertionError on timeout."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not done(got):
        got.append(s.recv(max(0.01, deadline - time.monotonic())))
    return got


def open_job(ingest, collector, job, token=None):
    s = ingest(collector, token=token)
    s.send(job.hello())
    return s


def rows_in_db(db_path: str, run: str) -> list[int]:
    conn = sqlite3.connect(db_path)
    try:
        return [
            r[0]
            for r in conn.execute(
                "SELECT step FROM steps JOIN runs ON runs.id = steps.run_id WHERE runs.run = ? ORDER BY step", (run,)
            )
        ]
    finally:
        conn.close()


# ---------------------------------------------------------------- numbers
def test_rotation_step_angle_norm_match_float64_truth(collector, ingest, sim_job):
    job = sim_job(run="truth", step_angle=0.03, scale=0.999, layca=True)
    s = open_job(ingest, collector, job)
    for n in (1, 3, 5, 2):
        s.send(job.batch(n))
    s.wait_ack(job.seq)
    with QueryClient(collector.grpc_address) as q:
        h = q.history("truth")
    steps = sorted(job.truth)
    assert h.steps.tolist() == steps
    assert h.layer_names == job.names
    np.testing.assert_allclose(h.rotation, job.truth_array("rotation"), rtol=1e-7)
    np.testing.assert_allclose(h.step_angle, job.truth_array("step_angle"), rtol=1e-7)
    np.testing.assert_allclose(h.weight_norm, job.truth_array("weight_norm"), rtol=6e-8)  # float32 in the store
    np.testing.assert_allclose(h.rho, np.tan(0.03), rtol=1e-7)
    np.testing.assert_allclose(h.loss, [1.0 / t for t in steps])
    # rotation grows as the layers keep turning in random directions
    assert (np.diff(h.rotation.mean(axis=1)) > 0).all()


@pytest.mark.parametrize("angle", [1e-4, 1e-6])
def test_tiny_rotations_are_exact(collector, ingest, sim_job, angle):
    """Layca-sized steps: float64 norms in, relative error <= 1e-6 out (dot products would give noise)."""
    job = sim_job(run=f"tiny-{angle:g}", step_angle=angle, layer_sizes=(500, 2000))
    s = open_job(ingest, collector, job)
    s.send(job.batch(1))
    s.send(job.batch(2))
    s.wait_ack(2)
    with QueryClient(collector.grpc_address) as q:
        h = q.history(job.run)
    truth_angle = job.truth_array("step_angle")
    np.testing.assert_allclose(h.step_angle, truth_angle, rtol=1e-6)
    np.testing.assert_allclose(truth_angle, angle, rtol=1e-6)  # the simulation did what it says
    np.testing.assert_allclose(h.rotation, job.truth_array("rotation"), rtol=1e-6)
    assert h.rotation[0, 0] == pytest.approx(2 * math.sin(angle / 2) ** 2, rel=1e-6)


def test_radial_dots_keep_float32_measurements_accurate(collector, ingest, sim_job):
    """Steps as radial as they are tangential (weight decay), measured in float32: the dots save the angle."""
    kw = dict(step_angle=1e-4, scale=1 - 1e-4, layer_sizes=(4096,), float32=True, seed=5)
    with_dots = sim_job(run="dots", dots=True, **kw)
    norms_only = sim_job(run="norms", dots=False, **kw)
    for job in (with_dots, norms_only):
        s = open_job(ingest, collector, job)
        s.send(job.batch(3))
        s.wait_ack(1)
    with QueryClient(collector.grpc_address) as q:
        h_dots, h_norms = q.history("dots"), q.history("norms")
    truth = with_dots.truth_array("step_angle")
    np.testing.assert_array_equal(truth, norms_only.truth_array("step_angle"))  # same trajectory
    err_dots = np.abs(h_dots.step_angle / truth - 1).max()
    err_norms = np.abs(h_norms.step_angle / truth - 1).max()
    assert err_dots < 1e-5
    assert err_norms > 1e-5  # the triangle from float32 norms alone cannot do this
    np.testing.assert_allclose(h_dots.rotation, with_dots.truth_array("rotation"), rtol=1e-4)
    conn = sqlite3.connect(collector.db_path)
    stored = conn.execute(  # the raw dots are not stored (schema 3): the step angles computed from them are
        "SELECT m.step_angle FROM steps s JOIN runs ON runs.id = s.run_id JOIN samples m"
        " ON m.run_id = s.run_id AND m.step = s.step AND m.digest = s.digest WHERE run = 'dots' ORDER BY s.step"
    ).fetchall()
    conn.close()
    assert len(stored) == 3 and all(a is not None for (a,) in stored)


def test_nan_and_inf_are_stored_and_counted(collector, ingest, sim_job):
    job = sim_job(run="diverged", layer_sizes=(10, 20, 30))
    s = open_job(ingest, collector, job)
    b = job.batch(2)
    norm = np.frombuffer(b.norm).reshape(2, 3).copy()
    norm[1, 1] = np.nan
    dist0 = np.frombuffer(b.dist0).reshape(2, 3).copy()
    dist0[1, 2] = np.inf
    b.norm, b.dist0 = pack(norm), pack(dist0)
    s.send(b)
    msgs = s.wait_ack(1)
    assert errors(msgs) == []
    with QueryClient(collector.grpc_address) as q:
        h = q.history("diverged")
        detail = q.get_run("diverged")
    assert np.isfinite(h.rotation[0]).all()
    assert np.isnan(h.rotation[1, 1]) and np.isnan(h.rotation[1, 2])
    np.testing.assert_allclose(h.rotation[1, 0], job.truth[2]["rotation"][0], rtol=1e-7)
    assert math.isnan(detail["layers"][1]["rotation"])
    m = scrape(collector)
    assert value(m, "layrot_run_nonfinite_samples_total", run="diverged") == 2
    assert value(m, "layrot_layer_rotation", run="diverged", layer=job.names[0]) == pytest.approx(
        job.truth[2]["rotation"][0], rel=1e-9
    )
    assert math.isnan(value(m, "layrot_layer_rotation", run="diverged", layer=job.names[1]))


# ---------------------------------------------------------------- acks and durability
def test_ack_only_after_commit(collector, ingest, sim_job):
    job = sim_job(run="durable")
    s = open_job(ingest, collector, job)
    s.send(job.batch(1))
    s.wait_ack(1)
    assert rows_in_db(collector.db_path, "durable") == [1]
    # Hold the database's write lock from outside: the collector cannot commit,
    # so it must not acknowledge.
    blocker = sqlite3.connect(collector.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        s.send(job.batch(2))
        s.send(job.batch(1))
        quiet = s.drain(0.7)
        assert [m for m in quiet if m.WhichOneof("kind") == "ack"] == []
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    t0 = time.monotonic()
    msgs = s.wait_ack(3)
    assert time.monotonic() - t0 < 2.0
    assert [m.ack.seq for m in msgs if m.WhichOneof("kind") == "ack"][-1] == 3
    assert rows_in_db(collector.db_path, "durable") == [1, 2, 3, 4]


def test_acks_are_prompt_monotone_and_coalesced(collector, ingest, sim_job):
    job = sim_job(run="acks", layer_sizes=(8, 8))
    s = open_job(ingest, collector, job)
    t0 = time.monotonic()
    s.send(job.batch(1))
    s.wait_ack(1)
    first = time.monotonic() - t0
    assert first < 1.0  # ~ms in practice; generous for a loaded CI box
    for _ in range(200):
        s.send(job.batch(1))
    msgs = s.wait_ack(201)
    acks = [m.ack.seq for m in msgs if m.WhichOneof("kind") == "ack"]
    assert acks == sorted(acks) and len(set(acks)) == len(acks)
    assert acks[-1] == 201
    assert len(acks) <= 200
    assert len(rows_in_db(collector.db_path, "acks")) == 201


def test_goodbye_gets_final_ack_and_disconnects(collector, ingest, sim_job):
    job = sim_job(run="bye")
    s = open_job(ingest, collector, job)
    s.send(job.batch(3))
    s.wait_ack(1)
    assert value(scrape(collector), "layrot_run_connected", run="bye") == 1
    assert value(scrape(collector), "layrot_sessions_active") == 1
    s.send(job.batch(2))
    rest = s.goodbye(last_seq=2)
    assert s.status is None  # clean end of stream, not an error status
    acked = [m.ack.seq for m in rest if m.WhichOneof("kind") == "ack"]
    assert acked and acked[-1] == 2
    assert rows_in_db(collector.db_path, "bye") == [1, 2, 3, 4, 5]
    time.sleep(0.05)
    m = scrape(collector)
    assert value(m, "layrot_run_connected", run="bye") == 0
    assert value(m, "layrot_sessions_active") == 0
    assert value(m, "layrot_sessions_opened_total") == 1
    assert value(m, "layrot_sessions_lost_total") == 0


def test_session_lost_without_goodbye(collector, ingest, sim_job):
    job = sim_job(run="lost")
    s = open_job(ingest, collector, job)
    s.send(job.batch(1))
    s.wait_ack(1)
    s.call.cancel()  # the job dies
    deadline = time.monotonic() + 5
    while collector.state.sessions_active and time.monotonic() < deadline:
        time.sleep(0.01)
    m = scrape(collector)
    assert value(m, "layrot_sessions_lost_total") == 1
    assert value(m, "layrot_run_connected", run="lost") == 0


def test_idempotent_resend(collector, ingest, sim_job):
    job = sim_job(run="resend")
    s = open_job(ingest, collector, job)
    s.send(job.batch(3))
    s.wait_ack(1)
    # A reconnecting job resends what was not acknowledged (here: all of it) with a new session.
    s2 = open_job(ingest, collector, job)
    s2.send(job.batch_for([1, 2, 3], seq=1))
    s2.send(job.batch(2))
    s2.wait_ack(2)
    assert rows_in_db(collector.db_path, "resend") == [1, 2, 3, 4, 5]
    with QueryClient(collector.grpc_address) as q:
        h = q.history("resend")
    np.testing.assert_allclose(h.rotation, job.truth_array("rotation"), rtol=1e-7)
    assert q and scrape(collector)["layrot_run_step"][0][1] == 5


def test_history_survives_restart(collector_factory, ingest, sim_job, tmp_path):
    db = tmp_path / "restart.db"
    c1 = collector_factory(db)
    job = sim_job(run="persist", layca=True)
    s = open_job(ingest, c1, job)
    s.send(job.batch(4))
    s.send(job.batch(3))
    s.wait_ack(2)
    with QueryClient(c1.grpc_address) as q:
        before_runs = q.list_runs()
        before = q.get_run("persist")
    c1.stop()
    assert s.wait_end(5)  # the collector ended the stream cleanly on shutdown

    c2 = collector_factory(db)
    with QueryClient(c2.grpc_address) as q:
        runs = q.list_runs()
        detail = q.get_run("persist")
        h = q.history("persist")
    assert [r["run"] for r in runs] == ["persist"]
    for key in ("step", "num_layers", "framework", "host", "last_report"):
        assert runs[0][key] == before_runs[0][key], key
    for key in ("min_rotation", "mean_rotation"):  # restored from the store: float32 values (schema 3)
        assert runs[0][key] == pytest.approx(before_runs[0][key], rel=6e-8), key
    assert runs[0]["connected"] is False
    # Restored from the store: the per-layer values as float32 (schema 3), the rest exactly.
    approx = ("rotation", "step_angle", "weight_norm", "rho")
    assert [{k: v for k, v in d.items() if k not in approx} for d in detail["layers"]] == [
        {k: v for k, v in d.items() if k not in approx} for d in before["layers"]
    ]
    for d, b in zip(detail["layers"], before["layers"]):
        for k in approx:
            assert d[k] == pytest.approx(b[k], rel=6e-8), k
    np.testing.assert_allclose(h.rotation, job.truth_array("rotation"), rtol=1e-7)
    m = scrape(c2)
    assert value(m, "layrot_run_step", run="persist") == 7
    assert value(m, "layrot_layer_rho_applied", run="persist", index=0) == pytest.approx(np.tan(job.step_angle))
    # The job reconnects to the restarted collector and goes on.
    s2 = open_job(ingest, c2, job)
    s2.send(job.batch(2))
    s2.wait_ack(3)
    assert rows_in_db(str(db), "persist") == list(range(1, 10))
    # ... while a different model under the same name is refused.
    other = sim_job(run="persist", layer_sizes=(5, 6))
    s3 = open_job(ingest, c2, other)
    assert s3.wait_end(5)
    assert [e.code for e in errors(s3.drain(0.1))] == ["layer_table_mismatch"]


# ---------------------------------------------------------------- bad input
def _layers(n=2, **over):
    kw = {"init_norm": 1.0, **over}
    return [pb.Layer(name=f"l{i}", index=i, **kw) for i in range(n)]


BAD_HELLOS = {
    "empty run": pb.Hello(run="", layers=_layers()),
    "long run": pb.Hello(run="x" * 201, layers=_layers()),
    "unprintable run": pb.Hello(run="a\nb", layers=_layers()),
    "no layers": pb.Hello(run="r"),
    "duplicate names": pb.Hello(run="r", layers=[pb.Layer(name="a", index=0), pb.Layer(name="a", index=1)]),
    "index gap": pb.Hello(run="r", layers=[pb.Layer(name="a", index=0), pb.Layer(name="b", index=2)]),
    "nan init norm": pb.Hello(run="r", layers=_layers(init_norm=float("nan"))),
    "negative init norm": pb.Hello(run="r", layers=_layers(init_norm=-1.0)),
    "rank beyond world": pb.Hello(run="r", rank=2, world_size=2, layers=_layers()),
}


@pytest.mark.parametrize("case", list(BAD_HELLOS))
def test_bad_hello_is_reported_counted_and_ends_session(collector, ingest, case):
    s = ingest(collector)
    s.send(BAD_HELLOS[case])
    assert s.wait_end(5)
    errs = errors(s.drain(0.1))
    assert [e.code for e in errs] == ["bad_hello"] and errs[0].message
    m = scrape(collector)
    assert value(m, "layrot_messages_rejected_total", reason="bad_hello") == 1
    assert collector.state.runs == {}


def test_first_message_must_be_hello(collector, ingest, sim_job):
    job = sim_job(run="nohello")
    s = ingest(collector)
    s.send(job.batch(1))
    assert s.wait_end(5)
    errs = errors(s.drain(0.1))
    assert errs[0].code == "bad_hello" and "Hello" in errs[0].message


def _bad_batches(job):
    ok = job.batch(2)
    L = len(job.layer_sizes)

    def mutate(**kw):
        b = pb.StepBatch()
        b.CopyFrom(ok)
        for k, v in kw.items():
            if isinstance(v, list):
                b.ClearField(k)
                getattr(b, k).extend(v)
            else:
                setattr(b, k, v)
        return b

    return {
        "num_layers": mutate(num_layers=L + 1),
        "times length": mutate(times=[1.0]),
        "no steps": mutate(steps=[], times=[]),
        "short norm": mutate(norm=ok.norm[:-8]),
        "missing dstep": mutate(dstep=b""),
        "odd rho": mutate(rho=b"\0" * 8),
        "loss length": mutate(loss=[0.5]),
        "command_version length": mutate(command_version=[1, 2, 3]),
        "step zero": mutate(steps=[0, 1]),
        "nan time": mutate(times=[float("nan"), 1.0]),
        "short dot0": mutate(dot0=b"\0" * 8),
        "odd dotstep": mutate(dotstep=b"\0" * (8 * 2 * L + 8)),
    }


def test_bad_batches_are_nacked_for_good_and_session_survives(collector, ingest, sim_job):
    job = sim_job(run="badbatch", layer_sizes=(4, 5, 6))
    s = open_job(ingest, collector, job)
    cases = _bad_batches(job)
    for seq, (_name, b) in enumerate(cases.items(), start=1):
        b.seq = seq
        s.send(b)
    n = len(cases)
    msgs = read_until(s, lambda got: len(nacks(got)) >= n and len(errors(got)) >= n)
    errs = errors(msgs)
    assert [e.code for e in errs] == ["bad_batch"] * n  # what older clients read
    assert [e.seq for e in errs] == list(range(1, n + 1))
    assert all(e.message for e in errs)
    refused = nacks(msgs)
    assert [x.seq for x in refused] == list(range(1, n + 1))
    assert all(x.code == "bad_batch" and not x.retry and x.message for x in refused)
    # Not stored, so never acknowledged: the cumulative ack stays below them.
    assert all(m.ack.seq == 0 for m in msgs if m.WhichOneof("kind") == "ack")
    # still open: a good batch goes through, acknowledged by name above the refused ones
    good = job.batch_for([1, 2], seq=n + 1)
    s.send(good)
    msgs = read_until(s, lambda got: n + 1 in stored_seqs(got))
    assert rows_in_db(collector.db_path, "badbatch") == [1, 2]
    m = scrape(collector)
    assert value(m, "layrot_messages_rejected_total", reason="bad_batch") == n
    assert value(m, "layrot_samples_ingested_total") == 2 * 3
    assert value(m, "layrot_steps_ingested_total") == 2


def test_oversized_message_is_refused_and_collector_survives(collector, ingest, sim_job):
    job = sim_job(run="big", layer_sizes=(3,))
    s = open_job(ingest, collector, job)
    S = 500_000  # 1 layer: ~43 B per step -> ~21 MB > 16 MiB
    ones = np.ones((S, 1))
    s.send(
        pb.StepBatch(
            seq=1,
            steps=range(1, S + 1),
            times=[1.0] * S,
            num_layers=1,
            norm=pack(ones),
            dist0=pack(ones),
            dstep=pack(ones),
            norm_prev=pack(ones),
        )
    )
    assert s.wait_end(10)
    # Refused by the servicer's deserializer (gRPC's own limit is higher): counted, told, ended cleanly.
    assert s.status is None
    errs = errors(s.drain(0.1))
    assert [e.code for e in errs] == ["too_large"] and "16777216" in errs[0].message
    assert value(scrape(collector), "layrot_messages_rejected_total", reason="too_large") == 1
    s2 = open_job(ingest, collector, job)
    s2.send(job.batch(1))
    s2.wait_ack(1)


def test_second_hello_and_empty_messages_are_counted(collector, ingest, sim_job):
    job = sim_job(run="proto")
    s = open_job(ingest, collector, job)
    s.send(job.hello())
    s.send(pb.JobMessage())
    s.send(job.batch(1))
    msgs = s.wait_ack(1)
    assert [e.code for e in errors(msgs)] == ["bad_hello"]
    m = scrape(collector)
    assert value(m, "layrot_messages_rejected_total", reason="empty_message") == 1


def test_control_ack_is_recorded(collector, ingest, sim_job):
    job = sim_job(run="ctl")
    s = open_job(ingest, collector, job)
    s.send(pb.ControlAck(version=3, applied=False, reason="not a Layca optimizer", step=10))
    s.send(job.batch(1))
    s.wait_ack(1)
    rs = collector.state.runs["ctl"]
    assert list(rs.control_acks)[-1]["reason"] == "not a Layca optimizer"
    conn = sqlite3.connect(collector.db_path)
    assert conn.execute("SELECT version, applied, reason, step FROM control_acks").fetchall() == [
        (3, 0, "not a Layca optimizer", 10)
    ]
    conn.close()
    # hook point for the control plane: live sessions of the run
    assert len(rs.sessions) == 1 and next(iter(rs.sessions)).rank == 0


def test_collector_pushes_messages_to_live_sessions(collector, ingest, sim_job):
    """The per-session outbox (used later by the control plane) reaches the job."""
    job = sim_job(run="push")
    s = open_job(ingest, collector, job)
    s.send(job.batch(1))
    s.wait_ack(1)
    sess = next(iter(collector.state.runs["push"].sessions))
    sess.send_threadsafe(pb.CollectorMessage(rate_command=pb.RateCommand(version=1, run="push", mode="layca")))
    msg = s.recv()
    assert msg.rate_command.version == 1 and msg.rate_command.mode == "layca"


# ---------------------------------------------------------------- multi-rank
def test_ranks_are_stored_separately_and_run_metrics_use_rank0(collector, ingest, sim_job):
    j0 = sim_job(run="ddp", rank=0, world_size=2, seed=1, step_angle=0.01)
    j1 = sim_job(run="ddp", rank=1, world_size=2, seed=1, step_angle=0.2)  # same layers and w(0)
    s1 = open_job(ingest, collector, j1)
    s1.send(j1.batch(3))
    s1.wait_ack(1)
    s0 = open_job(ingest, collector, j0)
    s0.send(j0.batch(2))
    s0.wait_ack(1)
    with QueryClient(collector.grpc_address) as q:
        h0 = q.history("ddp", rank=0)
        h1 = q.history("ddp", rank=1)
        summary = q.list_runs()[0]
    assert h0.steps.tolist() == [1, 2] and h1.steps.tolist() == [1, 2, 3]
    np.testing.assert_allclose(h1.step_angle, 0.2, rtol=1e-7)
    assert summary["step"] == 2 and summary["sessions"] == 2 and summary["world_size"] == 2
    m = scrape(collector)
    assert value(m, "layrot_layer_step_angle_radians", run="ddp", index=0) == pytest.approx(0.01, rel=1e-9)


# ---------------------------------------------------------------- metrics
def test_metrics_names_labels_values(collector, ingest, sim_job):
    job = sim_job(run="metrics", layca=True, step_angle=0.02)
    s = open_job(ingest, collector, job)
    s.send(job.batch(4))
    s.wait_ack(1)
    m = scrape(collector)
    L = len(job.layer_sizes)
    truth = job.truth[4]
    for name, key in (
        ("layrot_layer_rotation", "rotation"),
        ("layrot_layer_step_angle_radians", "step_angle"),
        ("layrot_layer_weight_norm", "weight_norm"),
    ):
        samples = [x for x in m[name] if x[0]["run"] == "metrics"]
        assert len(samples) == L
        for labels, v in samples:
            assert set(labels) == {"run", "layer", "index"}
            i = int(labels["index"])
            assert labels["layer"] == job.names[i]
            assert v == pytest.approx(truth[key][i], rel=1e-9)
    assert len(m["layrot_layer_rho_applied"]) == L
    assert value(m, "layrot_run_step", run="metrics") == 4
    assert value(m, "layrot_run_layers", run="metrics") == L
    assert value(m, "layrot_run_rotation_min", run="metrics") == pytest.approx(truth["rotation"].min(), rel=1e-9)
    assert value(m, "layrot_run_rotation_mean", run="metrics") == pytest.approx(truth["rotation"].mean(), rel=1e-9)
    assert value(m, "layrot_run_connected", run="metrics") == 1
    assert value(m, "layrot_run_info", run="metrics", framework="pytorch", host="testhost") == 1
    assert value(m, "layrot_run_last_report_timestamp_seconds", run="metrics") == pytest.approx(job.t0 + 4e-3)
    assert value(m, "layrot_run_nonfinite_samples_total", run="metrics") == 0
    assert value(m, "layrot_samples_ingested_total") == 4 * L
    assert value(m, "layrot_steps_ingested_total") == 4
    assert value(m, "layrot_sessions_active") == 1
    assert value(m, "layrot_sessions_opened_total") == 1
    assert value(m, "layrot_store_pending_rows") == 0
    # Run-level aggregates (what a run exported as aggregates only keeps), against numpy.
    rot, ang = truth["rotation"], truth["step_angle"]
    assert value(m, "layrot_run_rotation_max", run="metrics") == pytest.approx(rot.max(), rel=1e-12)
    for q in (0.1, 0.5, 0.9):
        got = value(m, "layrot_run_rotation_quantile", run="metrics", quantile=repr(q))
        assert got == pytest.approx(np.quantile(rot, q), rel=1e-9)
    assert value(m, "layrot_run_step_angle_max_radians", run="metrics") == pytest.approx(ang.max(), rel=1e-9)
    assert value(m, "layrot_run_aggregate_only", run="metrics") == 0
    assert value(m, "layrot_layer_series") == 4 * L
    (build,) = m["layrot_build_info"]
    assert build[0]["version"] == layrot_version and build[1] == 1
    assert value(m, "process_resident_memory_bytes") > 0  # the collector's own process, as exporters have
    for name, samples in m.items():
        assert name.startswith(("layrot_", "process_", "python_")), name
        for labels, _ in samples:
            assert "job" not in labels and "instance" not in labels, name


def test_no_rho_metric_without_layca(collector, ingest, sim_job):
    job = sim_job(run="plain", layca=False)
    s = open_job(ingest, collector, job)
    s.send(job.batch(1))
    s.wait_ack(1)
    m = scrape(collector)
    assert m.get("layrot_layer_rho_applied", []) == []
    with QueryClient(collector.grpc_address) as q:
        assert all(math.isnan(x["rho"]) for x in q.get_run("plain")["layers"])


def test_silent_runs_leave_metrics_but_not_history(collector_factory, ingest, sim_job):
    c = collector_factory(run_ttl=5.0)
    job = sim_job(run="old")
    job.t0 = time.time() - 3600  # measured an hour ago
    s = open_job(ingest, c, job)
    s.send(job.batch(2))
    s.wait_ack(1)
    assert value(scrape(c), "layrot_run_step", run="old") == 2  # connected: still visible
    s.goodbye()
    time.sleep(0.05)
    m = scrape(c)
    assert value(m, "layrot_run_step", run="old") is None
    assert value(m, "layrot_run_info", run="old", framework="pytorch", host="testhost") is None
    with QueryClient(c.grpc_address) as q:
        assert [r["run"] for r in q.list_runs()] == ["old"]
        assert len(q.history("old")) == 2


# ---------------------------------------------------------------- query service
def test_history_chunks_and_bounds(collector, ingest, sim_job):
    job = sim_job(run="long", layer_sizes=(3, 4), step_angle=1e-3)
    s = open_job(ingest, collector, job)
    for _ in range(5):
        s.send(job.batch(1000))
    s.wait_ack(5)
    stub = pb_grpc.QueryStub(grpc.insecure_channel(collector.grpc_address))
    chunks = list(stub.GetHistory(pb.HistoryRequest(run="long")))
    assert [len(c.steps) for c in chunks] == [2000, 2000, 1000]
    assert list(chunks[0].layer_names) == job.names and all(not c.layer_names for c in chunks[1:])
    steps = [x for c in chunks for x in c.steps]
    assert steps == list(range(1, 5001))
    rot = np.concatenate([np.frombuffer(c.rotation).reshape(-1, 2) for c in chunks])
    np.testing.assert_allclose(rot, job.truth_array("rotation"), rtol=1e-7)
    with QueryClient(collector.grpc_address) as q:
        part = q.history("long", since_step=1999, until_step=2002)
    assert part.steps.tolist() == [1999, 2000, 2001, 2002]
    np.testing.assert_allclose(part.rotation, job.truth_array("rotation", [1999, 2000, 2001, 2002]), rtol=1e-7)


def test_unknown_run_is_not_found(collector):
    stub = pb_grpc.QueryStub(grpc.insecure_channel(collector.grpc_address))
    with pytest.raises(grpc.RpcError) as e:
        stub.GetRun(pb.GetRunRequest(run="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GetHistory(pb.HistoryRequest(run="nope")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with QueryClient(collector.grpc_address) as q, pytest.raises(CollectorError, match="unknown run 'nope'"):
        q.get_run("nope")


# ---------------------------------------------------------------- health and auth
def test_health_serving(collector):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(collector.grpc_address))
    for service in ("", "layrot.v1.Ingest"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_token_required_for_ingest_and_writes_not_reads(collector_factory, ingest, sim_job):
    c = collector_factory(token="s3cret")
    job = sim_job(run="auth")
    for token in (None, "wrong"):
        s = open_job(ingest, c, job, token=token)
        assert s.wait_end(5)
        assert s.status is not None and s.status.code() == grpc.StatusCode.UNAUTHENTICATED
    assert c.state.runs == {}
    s = open_job(ingest, c, job, token="s3cret")
    s.send(job.batch(1))
    s.wait_ack(1)
    stub = pb_grpc.QueryStub(grpc.insecure_channel(c.grpc_address))
    assert [r.run for r in stub.ListRuns(pb.ListRunsRequest()).runs] == ["auth"]  # reads stay open
    with pytest.raises(grpc.RpcError) as e:
        stub.SetControl(pb.SetControlRequest(run="auth"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.SetControl(pb.SetControlRequest(run="auth"), metadata=[("authorization", "Bearer s3cret")])
    # Past the token check; refused because this job did not opt in to control.
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "opt in" in e.value.details()
    # Two refused sessions and one refused SetControl: every refused call counts under one reason.
    assert value(scrape(c), "layrot_messages_rejected_total", reason="unauthenticated") == 3


def test_ingest_counters_equal_the_rows_in_the_store_after_resends(collector, ingest, sim_job):
    """A resent batch (steps stored already, new seq), a partly new one and a second session: counted once each."""
    job = sim_job(run="resend", layer_sizes=(5, 6, 7))
    L = 3
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(4))  # seq 1: steps 1..4
    s.wait_ack(1)
    s.send(job.batch_for([1, 2, 3, 4], seq=2))  # all stored already
    job.batch(2)  # simulate steps 5, 6
    s.send(job.batch_for([3, 4, 5, 6], seq=3))  # 2 new, 2 stored
    s.wait_ack(3)
    s2 = ingest(collector)
    s2.send(job.hello())
    s2.send(job.batch_for([1, 2, 3, 4, 5, 6], seq=1))  # a replay of everything on a new session
    s2.wait_ack(1)
    collector.store.flush()
    rows = sqlite3.connect(collector.db_path).execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    m = scrape(collector)
    assert rows == 6
    assert value(m, "layrot_steps_ingested_total") == rows
    assert value(m, "layrot_samples_ingested_total") == rows * L
    h = QueryClient(collector.grpc_address).history("resend")
    assert list(h.steps) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(h.weight_norm[-1], job.truth[6]["weight_norm"], rtol=1e-7)
    s.goodbye()
    s2.goodbye()


def test_batches_of_many_sessions_in_one_pipeline_pass_are_each_stored_exactly(collector, ingest, sim_job):
    """Batches read in one turn of the loop (held busy meanwhile) share a pass: each run keeps its own truth."""
    jobs = [sim_job(run=f"pass-{i}", layer_sizes=(8 + i, 16), dots=i % 2 == 0, seed=i) for i in range(6)]
    sessions = [open_job(ingest, collector, job) for job in jobs]
    for s in sessions:
        assert s.recv().WhichOneof("kind") == "welcome"
    passes0, batches0 = collector.state.pipeline_passes, collector.state.pipeline_batches
    collector.loop.call_soon_threadsafe(time.sleep, 0.5)  # what arrives meanwhile waits for the same turn
    for _ in range(3):
        for s, job in zip(sessions, jobs):
            s.send(job.batch())
    for s in sessions:
        assert errors(s.wait_ack(3)) == []
    passes, batches = collector.state.pipeline_passes - passes0, collector.state.pipeline_batches - batches0
    assert batches == 18 and passes < batches
    with QueryClient(collector.grpc_address) as q:
        for job in jobs:
            h = q.history(job.run)
            np.testing.assert_allclose(h.rotation, job.truth_array("rotation"), rtol=1e-5)
            np.testing.assert_allclose(h.step_angle, job.truth_array("step_angle"), rtol=1e-5)
