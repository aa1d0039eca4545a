"""The collector's ingest steps one by one (server/decode.py, derive.py, records.py) and the run view.

The end-to-end behaviour over gRPC is in test_ingest.py; these check each
step on its own, and that the ``/metrics`` thread sees a consistent run while
the loop publishes new batches.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from layrot.core import rotation as rot
from layrot.proto import layrot_pb2 as pb
from layrot.proto.wire import pack
from layrot.server.decode import SessionReject, decode_batch
from layrot.server.derive import derive
from layrot.server.metrics import LayrotCollector
from layrot.server.records import newest_snapshot, step_rows
from layrot.server.state import CollectorState, RunState, Snapshot
from layrot.server.store import LayerRecord, RunRecord

L = 3


def batch(steps=(1, 2), dots=True, **over) -> pb.StepBatch:
    S = len(steps)
    rng = np.random.default_rng(1)
    norm = rng.uniform(1.0, 2.0, (S, L))
    fields = dict(
        seq=1,
        num_layers=L,
        steps=list(steps),
        times=[100.0 + s for s in steps],
        loss=[1.0 + s for s in steps],
        norm=pack(norm),
        dist0=pack(0.1 * norm),
        dstep=pack(0.01 * norm),
        norm_prev=pack(norm),
    )
    if dots:
        fields.update(dot0=pack(-1e-3 * norm), dotstep=pack(-1e-4 * norm))
    fields.update(over)
    return pb.StepBatch(**fields)


@pytest.mark.parametrize(
    "over, text",
    [
        (dict(num_layers=4), "num_layers=4"),
        (dict(steps=[], times=[]), "need >= 1 step"),
        (dict(times=[1.0]), "need >= 1 step"),
        (dict(steps=[0, 1]), "steps must be >= 1"),
        (dict(times=[1.0, float("nan")]), "times must be finite"),
        (dict(loss=[1.0]), "len(loss)"),
        (dict(command_version=[1]), "len(command_version)"),
        (dict(norm=b"\0" * 8), "bad array size"),
        (dict(rho=b"\0" * 8), "bad array size"),
    ],
)
def test_decode_refuses_malformed_batches(over, text):
    with pytest.raises(SessionReject) as info:
        decode_batch(batch(**over), L)
    assert info.value.code == info.value.reason == "bad_batch" and text in info.value.message


def test_derive_uses_the_radial_formulas_when_the_dots_are_there():
    init = np.array([1.5, 1.2, 1.9])
    d = decode_batch(batch(), L)
    out = derive(d, init)
    assert np.array_equal(out.rotation, rot.cosine_distance(rot.radial_angle(init[None, :], d.dist0, d.dot0)))
    assert np.array_equal(out.angle, rot.radial_angle(d.norm_prev, d.dstep, d.dotstep))
    assert out.nonfinite == 0 and not out.bad.any()
    tri = derive(decode_batch(batch(dots=False), L), init)
    assert np.array_equal(tri.rotation, rot.rotation(init[None, :], d.norm, d.dist0), equal_nan=True)
    assert np.array_equal(tri.angle, rot.step_angle(d.norm_prev, d.norm, d.dstep), equal_nan=True)
    nan = np.ones((2, L))
    nan[1, 2] = np.nan
    assert derive(decode_batch(batch(norm=pack(nan)), L), init).nonfinite == 1


def test_rows_and_snapshot():
    b = batch(steps=(5, 6, 7), loss=[1.0, 2.0, float("inf")], command_version=[3, 3, 4])
    d = decode_batch(b, L)
    out = derive(d, np.ones(L))
    rows = step_rows(d, out, run_id=9, rank=2)
    assert [r[:6] for r in rows] == [(9, 2, 5, 105.0, 1.0, 3), (9, 2, 6, 106.0, 2.0, 3), (9, 2, 7, 107.0, None, 4)]
    assert rows[1][6] == out.rotation[1].tobytes() and rows[1][8] == b.norm[L * 8 : 2 * L * 8]
    assert all(len(r) == 15 and r[9] is None for r in rows)  # no rho sent
    snap = newest_snapshot(d, out, rank=2)
    assert (snap.rank, snap.step, snap.time) == (2, 7, 107.0) and snap.loss == float("inf")
    assert np.array_equal(snap.rotation, out.rotation[2]) and snap.rho is None


def run_state() -> RunState:
    layers = [LayerRecord(i, f"l{i}", [1], 1.0, 1, "Linear") for i in range(L)]
    return RunState(RunRecord(1, "r", "pytorch", "", "h", 1, 1, {}, {}, 0.0, None, None, 0, layers))


def snap(rank: int, step: int, t: float) -> Snapshot:
    v = np.full(L, float(step))
    return Snapshot(rank, step, t, 0.0, v, v, v, None)


def test_record_batch_publishes_one_view():
    rs = run_state()
    before = rs.view
    assert rs.record_batch(snap(1, 10, 5.0), 2) is True  # the run's first report
    assert before.primary is None and before.last == {}  # an old view never changes
    assert rs.record_batch(snap(1, 8, 6.0), 1) is False  # resent older steps: newest stays
    assert rs.primary().step == 10 and rs.last_report == 6.0 and rs.first_report == 5.0 and rs.nonfinite == 3
    rs.record_batch(snap(0, 3, 4.0), 0)
    assert rs.primary().rank == 0 and sorted(rs.last) == [0, 1] and rs.last_report == 6.0


def test_a_scrape_sees_one_batch_of_a_run():
    state = CollectorState()
    rs = run_state()
    with state.lock:
        state.runs[rs.run] = rs
    metrics = LayrotCollector(state, clock=lambda: 0.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    stop = threading.Event()
    problems: list[str] = []

    def scrape() -> None:
        while not stop.is_set():
            try:  # the whole exposition, as /metrics sends it: per-run text (cached) and the registry's
                text = metrics.exposition(registry).decode()
                fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
            except Exception as exc:  # e.g. a dict changing size under the scrape
                problems.append(repr(exc))
                return
            step = [s.value for s in fams["layrot_run_step"]]
            if not step:
                continue
            rot_v = {s.value for s in fams["layrot_layer_rotation"]}
            last = [s.value for s in fams["layrot_run_last_report_timestamp_seconds"]]
            nonfinite = [s.value for s in fams["layrot_run_nonfinite_samples"]]
            if rot_v != {step[0]} or last != [step[0]] or nonfinite != [step[0]]:
                problems.append(f"step {step} rotation {rot_v} last_report {last} nonfinite {nonfinite}")
                return

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for step in range(1, 20001):
            rs.record_batch(snap(0, step, float(step)), 1)
            if step % 50 == 0:  # more ranks join (older steps, so rank 0's numbers stay the run's)
                rs.record_batch(snap(step // 50, 0, 0.0), 0)
    finally:
        stop.set()
        t.join()
    assert not problems, problems[0]
