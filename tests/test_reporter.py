"""The reporter's delivery contract (agent/reporter.py): acked => stored, every lost step counted, nothing else.

A scripted collector (a real gRPC server on loopback whose answers each test
decides: Welcome, Ack.seq / Ack.stored, Nacks with and without retry, a Hello
refusal) checks the job side message by message; the real collector checks
flush() against the history store.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from layrot.agent.reporter import (
    MAX_RUN_NAME,
    WIRE_ROWS,
    LayerSpec,
    Reporter,
    StepRecord,
    check_collector,
    check_run_name,
    frame_batch,
)
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc

L = 3
SPECS = [LayerSpec(f"l{i}.weight", i, (4, 4), 1.0 + i, 16) for i in range(L)]
FAST = {"flush_interval": 0.01, "backoff_initial": 0.05, "backoff_max": 0.3, "welcome_timeout": 0.2}


def record(step: int, delay: float = 0.0) -> StepRecord:
    """A step whose values (consistent norms) resolve after ``delay`` s, like a device event."""

    def values() -> np.ndarray:
        if delay:
            time.sleep(delay)
        v = np.zeros((len(WIRE_ROWS), L))
        v[0] = v[3] = [1.0 + i for i in range(L)]  # norm, norm_prev: unchanged
        v[1] = v[2] = 1e-3 * step  # dist0, dstep
        v[4] = v[5] = -0.5e-6 * step * step  # radial dots consistent with a pure rotation
        return v

    return StepRecord(step=step, time=1.7e9 + step, values=values, loss=1.0 / step)


class Scripted(pb_grpc.IngestServicer):
    """A collector whose answer to each batch is ``policy(steps, attempt) -> "ack" | "retry" | "refuse"``."""

    def __init__(self, policy: Any = None, hello_error: str = "") -> None:
        self.policy = policy or (lambda steps, attempt: "ack")
        self.hello_error = hello_error
        self.stored: list[int] = []
        self.attempts: dict[int, int] = {}
        self.hellos: list[pb.Hello] = []
        self.lock = threading.Lock()

    def Session(self, request_iterator: Any, context: Any) -> Any:
        hello = next(request_iterator).hello
        self.hellos.append(hello)
        if self.hello_error:
            yield pb.CollectorMessage(error=pb.SessionError(code=self.hello_error, message="scripted refusal"))
            return
        yield pb.CollectorMessage(welcome=pb.Welcome(collector_version="test"))
        for msg in request_iterator:
            if msg.WhichOneof("kind") != "steps":
                continue
            b = msg.steps
            first = b.steps[0]
            with self.lock:
                self.attempts[first] = self.attempts.get(first, 0) + 1
                verdict = self.policy(list(b.steps), self.attempts[first])
                if verdict == "ack":
                    self.stored.extend(b.steps)
            if verdict == "ack":
                yield pb.CollectorMessage(ack=pb.Ack(stored=[b.seq]))
            else:
                nack = pb.Nack(seq=b.seq, code="scripted", message=verdict, retry=verdict == "retry")
                yield pb.CollectorMessage(ack=pb.Ack(failed=[nack]))


@pytest.fixture
def scripted() -> Any:
    servers = []

    def start(**kw: Any) -> tuple[Scripted, str]:
        svc = Scripted(**kw)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_IngestServicer_to_server(svc, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return svc, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def invariant(r: Reporter) -> None:
    """Every submitted step is acked, counted as dropped, or still in the spool."""
    assert r.stats.acked_steps + r.stats.dropped + r.stats.spool_pending_steps == r.stats.submitted


def test_nack_with_retry_is_resent_under_a_new_seq_and_stored(scripted):
    svc, addr = scripted(policy=lambda steps, attempt: "retry" if 3 in steps and attempt < 3 else "ack")
    r = Reporter("nack-retry", SPECS, collector=addr, **FAST)
    for t in range(1, 11):
        r.submit(record(t))
        time.sleep(0.02)  # several batches
    assert r.flush(10.0)
    r.close(timeout=2.0)
    assert sorted(svc.stored) == list(range(1, 11))
    assert r.stats.acked_steps == 10 and r.stats.dropped == 0 and r.stats.retried_batches >= 2
    invariant(r)


def test_nack_without_retry_drops_and_counts_only_that_batch(scripted):
    svc, addr = scripted(policy=lambda steps, attempt: "refuse" if 5 in steps else "ack")
    r = Reporter("nack-refuse", SPECS, collector=addr, **FAST)
    for t in range(1, 11):
        r.submit(record(t))
        time.sleep(0.02)
    assert not r.flush(5.0)  # a step submitted before it was refused: not everything is acknowledged
    r.close(timeout=2.0)
    refused = [s for s in range(1, 11) if s not in svc.stored]
    assert 5 in refused and r.stats.dropped_refused == len(refused)
    assert r.stats.acked_steps == 10 - len(refused)
    invariant(r)
    assert not (r.spool_path).exists()  # refused and acked records are released; the spool is gone


def test_flush_waits_for_slow_values_then_for_the_store(collector):
    from layrot.client.query import QueryClient

    r = Reporter("flush-slow", SPECS, collector=collector.grpc_address, **FAST)
    for t in range(1, 6):
        r.submit(record(t, delay=0.3))  # resolving takes 1.5 s in all, far beyond the flush interval
    assert r.flush(20.0)
    # acked => stored: the history has every step the moment flush returns True
    assert list(QueryClient(collector.grpc_address).history("flush-slow").steps) == [1, 2, 3, 4, 5]
    r.close(timeout=2.0)
    invariant(r)


def test_flush_without_a_collector_is_false_and_sends_nothing():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    r = Reporter("flush-none", SPECS, collector=addr, **FAST)
    for t in range(1, 21):
        r.submit(record(t))
    assert not r.flush(0.5)
    r.close(timeout=0.2)
    assert r.stats.sent_steps == 0 and r.stats.acked_steps == 0 and r.stats.dropped == 0
    assert r.stats.spool_pending_steps == 20
    invariant(r)


def test_hello_refused_as_run_owned_stops_with_one_warning_and_keeps_steps(scripted, caplog):
    svc, addr = scripted(hello_error="run_owned")
    with caplog.at_level(logging.WARNING, logger="layrot"):
        r = Reporter("owned", SPECS, collector=addr, **FAST)
        for t in range(1, 11):
            r.submit(record(t))
        assert not r.flush(3.0)
        time.sleep(0.5)  # time for retries, if there were any
        r.close(timeout=1.0)
    warnings = [x.getMessage() for x in caplog.records if "belongs to another job" in x.getMessage()]
    assert len(warnings) == 1 and "load the handle's state_dict" in warnings[0]
    assert len(svc.hellos) == 1  # no more attempts
    assert r.stats.refused == "run_owned" and r.stats.dropped == 0 and r.stats.spool_pending_steps == 10
    invariant(r)


def test_hello_carries_the_run_key_and_replays_before_new_steps(scripted, tmp_path):
    svc, addr = scripted()
    # A previous process of the same job (same key, same layers) left 5 steps in the spool.
    first = Reporter("replay", SPECS, collector="offline", run_key="k" * 32, spool_dir=tmp_path, **FAST)
    for t in range(1, 6):
        first.submit(record(t))
    first.close(timeout=2.0)
    assert first.stats.spool_pending_steps == 5
    second = Reporter("replay", SPECS, collector=addr, run_key="k" * 32, spool_dir=tmp_path, **FAST)
    for t in range(6, 11):
        second.submit(record(t))
    assert second.flush(10.0)
    second.close(timeout=2.0)
    assert svc.hellos[0].run_key == "k" * 32
    assert svc.stored == list(range(1, 11))  # the spool's leftovers went first
    assert second.stats.acked_steps == 10 and not (tmp_path / "replay.r0").exists()


def test_memory_bound_spills_to_the_spool_without_loss(scripted):
    svc, addr = scripted()
    # 1 kB of memory for unacked batches: everything beyond is read back from the spool on resend.
    r = Reporter("spill", SPECS, collector="offline", max_unacked_bytes=1000, **FAST)
    for t in range(1, 201):
        r.submit(record(t))
    r.close(timeout=5.0)
    assert r.stats.dropped == 0 and r.stats.spool_pending_steps == 200
    r2 = Reporter("spill", SPECS, collector=addr, run_key=r.run_key, run_key_restored=True, **FAST)
    assert r2.flush(20.0)
    r2.close(timeout=2.0)
    assert sorted(svc.stored) == list(range(1, 201)) and r2.stats.acked_steps == 200


def test_frame_batch_sets_the_seq_of_stored_bytes():
    payload = pb.StepBatch(steps=[3, 4], num_layers=2).SerializeToString()
    msg = pb.JobMessage.FromString(frame_batch(payload, 300))
    assert msg.steps.seq == 300 and list(msg.steps.steps) == [3, 4]


def test_run_name_limit_agrees_with_the_collector():
    from layrot.server.decode import MAX_RUN_NAME as SERVER_MAX

    assert MAX_RUN_NAME == SERVER_MAX
    check_run_name("x" * MAX_RUN_NAME)
    for bad in ("", "x" * (MAX_RUN_NAME + 1), "tab\there"):
        with pytest.raises(ValueError):
            check_run_name(bad)


def test_collector_address_and_tls_are_checked_up_front(tmp_path, monkeypatch):
    from layrot.agent.transport import TLSConfig

    assert check_collector("offline") == "offline"
    monkeypatch.setenv("LAYROT_MODE", "offline")
    assert check_collector("localhost:1") == "offline"
    monkeypatch.delenv("LAYROT_MODE")
    for bad in ("http://localhost:50051", "localhost", "localhost:0", "a b:1"):
        with pytest.raises(ValueError):
            check_collector(bad)
    with pytest.raises(ValueError, match="CA certificate"):
        check_collector("localhost:50051", TLSConfig(ca=str(tmp_path / "missing.pem")))


def test_watch_refuses_bad_settings_before_training():
    torch = pytest.importorskip("torch")
    import layrot

    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="at most 200"):
        layrot.watch(model, opt, run="r" * 201)
    with pytest.raises(ValueError, match="scheme"):
        layrot.watch(model, opt, run="ok", collector="grpc://localhost:50051")
    with pytest.raises(ValueError, match="spool"):
        layrot.watch(model, opt, run="ok", collector="offline", spool=False)
    with pytest.raises(ValueError, match="spool_max_bytes"):
        layrot.watch(model, opt, run="ok", spool_max_bytes=0)
