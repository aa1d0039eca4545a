"""Admission control (``serve --max-sessions``): one session too many is refused, counted, told when to come back.

A real collector with a session limit of 2, two simulated jobs holding real sessions,
and a job's real reporter that arrives third: it is refused with RESOURCE_EXHAUSTED and
a retry hint, keeps its steps, and once a place is free every one of them is stored.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from metrics_text import scrape

import layrot.server.ingest as ingest_mod
from layrot.agent.reporter import LayerSpec, Reporter, StepRecord
from layrot.client.query import QueryClient
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.server.decode import IngestLimits


def test_a_session_over_the_limit_is_refused_with_a_hint_and_comes_back(
    collector_factory, ingest, sim_job, monkeypatch
):
    monkeypatch.setattr(ingest_mod, "ADMISSION_RETRY_S", 0.5)
    c = collector_factory(ingest_limits=IngestLimits(max_sessions=2))
    holders = []
    for i in range(2):
        job = sim_job(run=f"holder-{i}", layer_sizes=(8,), seed=i)
        s = ingest(c)
        s.send(job.hello())
        s.send(job.batch(1))
        s.wait_ack(job.seq)
        holders.append(s)

    # A raw third session: the refusal itself, as a client sees it.
    with grpc.insecure_channel(c.grpc_address) as ch:
        call = pb_grpc.IngestStub(ch).Session(iter([pb.JobMessage(hello=sim_job(run="third").hello())]))
        with pytest.raises(grpc.RpcError) as e:
            list(call)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-sessions" in e.value.details()
    hint = dict(e.value.trailing_metadata())["retry-after-ms"]
    assert 500 <= int(hint) <= 1500

    specs = [LayerSpec(name="w", index=0, shape=(4, 4), init_norm=2.0, numel=16)]
    rep = Reporter("latecomer", specs, collector=c.grpc_address, every=1)
    rows = np.array([[2.0], [0.5], [0.1], [2.0], [0.1], [0.01]])  # norm, dist0, dstep, norm_prev, dot0, dotstep
    for t in range(1, 31):
        rep.submit(StepRecord(step=t, time=time.time(), values=rows))
    deadline = time.time() + 10
    while rep.stats.admission_refusals == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert rep.stats.admission_refusals >= 1 and rep.stats.acked_steps == 0
    holders[0].close()  # a place frees up
    assert rep.flush(20)
    rep.close()
    assert rep.stats.dropped == 0 and rep.stats.acked_steps == 30
    assert QueryClient(c.grpc_address).history("latecomer").steps.tolist() == list(range(1, 31))
    rejected = {lab["reason"]: v for lab, v in scrape(c.metrics_url)["layrot_messages_rejected_total"]}
    assert rejected["too_many_sessions"] >= 2  # the raw client's and the job's
