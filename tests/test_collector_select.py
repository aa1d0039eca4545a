"""Choosing one of several collectors (agent/transport.py, agent/reporter.py).

A job given ``LAYROT_COLLECTOR=a:50051,b:50051`` picks one collector by its run name
(rendezvous hashing) so every session of a run lands on the same collector, fails over
to the next when that one does not answer, and names its run in the ``x-layrot-run``
metadata of every call so an L7 proxy (deploy/nginx/layrot-grpc.conf) can hash on it.
The collectors here are real gRPC servers on loopback that record what they were sent.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from layrot.agent.reporter import Reporter, check_collector
from layrot.agent.transport import (
    RUN_METADATA_KEY,
    AddressError,
    collector_order,
    header_value,
    split_collectors,
)
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from tests.test_reporter import FAST, SPECS, record

ADDRS = [f"collector-{i}.example:50051" for i in range(2)]


def _reference_first(addresses: list[str], run: str) -> str:
    """Independent rendezvous pick: the address with the highest 64-bit hash of (address, run)."""
    best, best_score = "", -1
    for a in addresses:
        h = hashlib.sha256(a.encode() + b"\x00" + run.encode()).hexdigest()
        score = int(h[:16], 16)
        if score > best_score:
            best, best_score = a, score
    return best


def test_split_collectors_checks_every_address_and_keeps_order():
    assert split_collectors("a:1, b:2,a:1,") == ["a:1", "b:2"]
    assert split_collectors("localhost:50051") == ["localhost:50051"]
    for bad in ("", " , ", "a:1,b", "a:1,http://b:2", "a:1,b:99999"):
        with pytest.raises(AddressError):
            split_collectors(bad)
    assert check_collector("127.0.0.1:1,127.0.0.1:2") == "127.0.0.1:1,127.0.0.1:2"
    with pytest.raises(ValueError):
        check_collector("127.0.0.1:1,nope")


def test_order_is_the_rendezvous_order_and_balanced():
    runs = [f"run-{i}" for i in range(2000)]
    firsts = [collector_order(ADDRS, r)[0] for r in runs]
    assert firsts == [_reference_first(ADDRS, r) for r in runs]
    # Same order whatever order the list was given in (every process of a run agrees).
    assert all(collector_order(ADDRS[::-1], r) == collector_order(ADDRS, r) for r in runs[:200])
    # Balanced like a fair coin: within 4 standard deviations of n/2.
    n0 = firsts.count(ADDRS[0])
    assert abs(n0 - len(runs) / 2) < 4 * np.sqrt(len(runs) * 0.25)


def test_adding_a_collector_moves_only_runs_onto_it():
    runs = [f"job-{i}" for i in range(1000)]
    three = ADDRS + ["collector-2.example:50051"]
    moved = 0
    for r in runs:
        before, after = collector_order(ADDRS, r)[0], collector_order(three, r)[0]
        if before != after:
            assert after == three[2]
            moved += 1
    # About a third of the runs move (binomial n=1000, p=1/3), not all of them.
    assert abs(moved - 1000 / 3) < 4 * np.sqrt(1000 * (1 / 3) * (2 / 3))


def test_header_value_is_ascii_and_distinct():
    assert header_value("plain-run_1 x") == "plain-run_1 x"
    assert header_value("a%b") == "a%25b"
    assert header_value("über") == "%C3%BCber"
    assert header_value("a%25b") != header_value("a%b")


class Recording(pb_grpc.IngestServicer):
    """A collector that acks every batch and records the metadata and steps of each session."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.stored: list[int] = []
        self.lock = threading.Lock()

    def Session(self, request_iterator: Any, context: Any) -> Any:
        with self.lock:
            self.metadata.append(dict(context.invocation_metadata()))
        next(request_iterator)
        yield pb.CollectorMessage(welcome=pb.Welcome(collector_version="test"))
        for msg in request_iterator:
            if msg.WhichOneof("kind") == "steps":
                with self.lock:
                    self.stored.extend(msg.steps.steps)
                yield pb.CollectorMessage(ack=pb.Ack(stored=[msg.steps.seq]))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def recording() -> Any:
    servers = []

    def start() -> tuple[Recording, str]:
        svc = Recording()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_IngestServicer_to_server(svc, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return svc, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def _send(run: str, collector: str, steps: int = 5) -> Reporter:
    r = Reporter(run, SPECS, collector=collector, **FAST)
    for t in range(1, steps + 1):
        r.submit(record(t))
    assert r.flush(15.0)
    r.close(timeout=2.0)
    return r


def test_jobs_land_on_their_rendezvous_collector_with_the_run_in_metadata(recording):
    (a, addr_a), (b, addr_b) = recording(), recording()
    listed = f"{addr_a},{addr_b}"
    runs = [f"spread-{i}" for i in range(6)]
    for run in runs:
        _send(run, listed)
    by_addr = {addr_a: a, addr_b: b}
    for run in runs:
        home = by_addr[_reference_first([addr_a, addr_b], run)]
        other = b if home is a else a
        assert run in [md.get(RUN_METADATA_KEY) for md in home.metadata]
        assert run not in [md.get(RUN_METADATA_KEY) for md in other.metadata]
    assert sorted(a.stored + b.stored) == sorted(list(range(1, 6)) * len(runs))


def test_a_job_fails_over_to_the_next_collector_when_its_own_is_down(recording):
    live, addr_live = recording()
    dead = f"127.0.0.1:{_closed_port()}"
    # A run whose first choice is the dead collector.
    run = next(f"failover-{i}" for i in range(100) if collector_order([dead, addr_live], f"failover-{i}")[0] == dead)
    r = _send(run, f"{dead},{addr_live}")
    assert sorted(live.stored) == [1, 2, 3, 4, 5]
    assert r.stats.acked_steps == 5 and r.stats.reconnects >= 1
    assert [md.get(RUN_METADATA_KEY) for md in live.metadata] == [run]
