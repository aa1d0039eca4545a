"""Many ingest sessions against one collector: cheap grpc.aio clients speaking the real protocol.

Used by ``benchmarks/ingest.py --sessions N``. Each client process runs one
asyncio loop holding its share of the sessions; a session is one
``Ingest.Session`` stream: Hello, then a StepBatch every ``interval`` seconds
(``interval`` 0: saturated, as many batches as ``max_inflight`` unacknowledged
ones allow), then Goodbye and the final Ack. The latency of a batch is the time
from its send to the Ack that covers it (``Ack.seq`` or ``Ack.stored``).

What the clients count, by code, is compared by the caller with the
collector's own counters: an error that the collector did not count is an
uncounted error.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layrot.agent.reporter import (
    FLUSH_INTERVAL,
    MAX_FLUSH_INTERVAL,
    batch_step_bound,
    batch_wait,
    smoothed_ack_latency,
)

# The SessionResult fields of per-batch ack latencies, gathered alike over sessions and processes.
LATENCY_KEYS = ("latencies", "later", "sent_times")


@dataclass
class SessionPlan:
    """What one group of sessions does (every session of a group is alike)."""

    label: str  # "light", "saturated", "probe": latencies are reported per label
    runs: list[str]
    layers: int
    interval: float  # seconds between batches; 0 = saturated
    steps_per_batch: int = 1
    max_inflight: int = 8  # saturated sessions: unacknowledged batches at most
    # > 0: a job making this many steps a second, batched as the job's Reporter batches them
    # (layrot.agent.reporter.batch_wait: one-step batches while the collector keeps up, bigger
    # ones while batches wait for their acks); ``interval`` and ``steps_per_batch`` are unused.
    step_rate: float = 0.0


@dataclass
class SessionResult:
    """One session's outcome."""

    label: str
    sent: int = 0
    acked: int = 0
    acked_steps: int = 0
    welcomed: bool = False
    finished: bool = False  # the stream ended cleanly after Goodbye, every batch acked
    latencies: list[float] = field(default_factory=list)
    later: list[float] = field(default_factory=list)  # latencies of every batch but the session's first
    sent_times: list[float] = field(default_factory=list)  # unix time each batch of ``latencies`` was sent
    errors: Counter = field(default_factory=Counter)
    sent_steps: dict[int, int] = field(default_factory=dict)  # seq -> steps, until acked
    ack_latency: float = 0.0  # smoothed as the Reporter smooths it (paced sessions' batch_wait)


def _hello(pb: Any, run: str, layers: int) -> Any:
    return pb.Hello(
        run=run,
        world_size=1,
        framework="pytorch",
        framework_version="bench",
        host="bench",
        pid=1,
        layers=[
            pb.Layer(name=f"block{i}.weight", index=i, shape=[64, 64], init_norm=8.0, numel=4096) for i in range(layers)
        ],
        capabilities=pb.Capabilities(loss=False),
        client_version="bench",
        every=1,
        session_id=f"bench-{run}",
    )


async def _send(
    call: Any, pb: Any, plan: SessionPlan, res: SessionResult, sent_at: dict, steps: list[int], cols: dict
) -> None:
    res.sent += 1
    batch = pb.StepBatch(seq=res.sent, steps=steps, times=[time.time()] * len(steps), num_layers=plan.layers, **cols)
    sent_at[res.sent] = time.monotonic()
    res.sent_steps[res.sent] = len(steps)
    await call.write(pb.JobMessage(steps=batch))


async def _paced_job(
    call: Any, pb: Any, plan: SessionPlan, res: SessionResult, sent_at: dict, read_task: Any, until: float
) -> None:
    """A job at ``plan.step_rate`` steps/s whose steps are batched by the Reporter's own rule."""
    bound = batch_step_bound(plan.layers)
    cols: dict[int, dict[str, bytes]] = {}
    dt = 1.0 / plan.step_rate
    made = 0  # steps the job has made and handed over
    t0 = time.monotonic() + random.random() * dt  # jobs started at different times

    def unsent() -> int:  # steps made by now and not yet sent
        return int((time.monotonic() - t0) / dt) + 1 - made

    while not read_task.done():
        first = t0 + made * dt  # when the next batch's first step is made
        if first >= until:
            return
        while True:  # the exporter's wait, recomputed as acks come back (as Reporter._export_loop does)
            due = first + batch_wait(FLUSH_INTERVAL, MAX_FLUSH_INTERVAL, len(sent_at), res.ack_latency)
            now = time.monotonic()
            if (now >= due or unsent() >= bound) and len(sent_at) < plan.max_inflight:  # its in-flight bound too
                break
            await asyncio.sleep(min(max(due - now, 0.005), 0.05))
        n = max(1, min(bound, unsent()))
        if n not in cols:
            cols[n] = _columns(plan.layers, n)
        await _send(call, pb, plan, res, sent_at, list(range(made + 1, made + 1 + n)), cols[n])
        made += n


async def _finish(call: Any, pb: Any, res: SessionResult, sent_at: dict, read_task: Any) -> SessionResult:
    """Goodbye, then the final Ack: every batch sent must be acknowledged."""
    if read_task.done():  # the stream ended under us: its status is the error
        read_task.result()
        res.errors["stream_ended_early"] += 1
        return res
    await call.write(pb.JobMessage(goodbye=pb.Goodbye(last_seq=res.sent, reason="benchmark done")))
    await call.done_writing()
    await asyncio.wait_for(read_task, 60)
    res.finished = not sent_at and res.acked == res.sent
    if sent_at:
        res.errors["unacked_at_end"] += len(sent_at)
    return res


def _columns(layers: int, steps: int) -> dict[str, bytes]:
    """Plausible measurements (norms 8, small distances), the same every batch: the collector's cost is the same."""
    rng = np.random.default_rng(layers)
    small = np.abs(rng.normal(size=(4, steps, layers))) * 0.01 + 0.001
    full = np.full((steps, layers), 8.0)
    return {
        "norm": full.tobytes(),
        "dist0": small[0].tobytes(),
        "dstep": small[1].tobytes(),
        "norm_prev": full.tobytes(),
        "dot0": (-small[2]).tobytes(),
        "dotstep": (-small[3]).tobytes(),
    }


async def _session(stub: Any, pb: Any, grpc: Any, plan: SessionPlan, run: str, until: float) -> SessionResult:
    res = SessionResult(plan.label)
    cols = _columns(plan.layers, plan.steps_per_batch)
    sent_at: dict[int, float] = {}
    room = asyncio.Event()
    room.set()
    call = stub.Session()
    try:
        await call.write(pb.JobMessage(hello=_hello(pb, run, plan.layers)))
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
            res.errors["no_welcome:" + (first.error.code if first is not grpc.aio.EOF else "eof")] += 1
            call.cancel()
            return res
        res.welcomed = True

        def settle(seq: int, now: float) -> None:
            t = sent_at.pop(seq, None)
            if t is not None:
                res.latencies.append(now - t)
                res.sent_times.append(time.time() - (now - t))
                if seq > 1:  # the first batch meets the start-up burst of every session's Hello
                    res.later.append(now - t)
                res.acked += 1
                res.acked_steps += res.sent_steps.pop(seq, 0)

        async def reader() -> None:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                kind = msg.WhichOneof("kind")
                now = time.monotonic()
                if kind == "ack":
                    acked = [s for s in sent_at if s <= msg.ack.seq] + [s for s in msg.ack.stored if s in sent_at]
                    if acked:
                        sample = sum(now - sent_at[s] for s in acked) / len(acked)
                        res.ack_latency = smoothed_ack_latency(res.ack_latency, sample)
                    for seq in acked:
                        settle(seq, now)
                    for nack in msg.ack.failed:
                        res.errors["nack:" + nack.code] += 1
                        sent_at.pop(nack.seq, None)
                elif kind == "error":
                    res.errors["session_error:" + msg.error.code] += 1
                if len(sent_at) < plan.max_inflight:
                    room.set()

        read_task = asyncio.create_task(reader())
        if plan.step_rate > 0:
            await _paced_job(call, pb, plan, res, sent_at, read_task, until)
            return await _finish(call, pb, res, sent_at, read_task)
        # Spread the sessions' first batches over one interval, as jobs started at different times are.
        if plan.interval > 0:
            await asyncio.sleep(random.random() * plan.interval)
        step = 0
        next_t = time.monotonic()
        while time.monotonic() < until and not read_task.done():
            if plan.interval > 0:
                delay = next_t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_t += plan.interval
            else:
                await room.wait()
            steps = list(range(step + 1, step + 1 + plan.steps_per_batch))
            step += plan.steps_per_batch
            await _send(call, pb, plan, res, sent_at, steps, cols)
            if len(sent_at) >= plan.max_inflight and plan.interval == 0:
                room.clear()
        return await _finish(call, pb, res, sent_at, read_task)
    except grpc.aio.AioRpcError as exc:
        res.errors["rpc:" + exc.code().name] += 1
    except asyncio.InvalidStateError:  # a write after the stream ended: read its status
        try:
            code = call.code() if call.done() else None
            res.errors["rpc:" + (await code).name if code is not None else "rpc:ended"] += 1
        except Exception:
            res.errors["rpc:ended"] += 1
    except asyncio.TimeoutError:
        res.errors["final_ack_timeout"] += 1
        call.cancel()
    return res


async def _run_plans(address: str, plans: list[SessionPlan], seconds: float, per_channel: int) -> list[SessionResult]:
    import grpc

    from layrot.proto import layrot_pb2 as pb
    from layrot.proto import layrot_pb2_grpc as pb_grpc

    until = time.monotonic() + seconds
    channels: list[Any] = []
    tasks = []
    n = 0
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    for plan in plans:
        for run in plan.runs:
            if n % per_channel == 0:
                channels.append(grpc.aio.insecure_channel(address, options=opts))
            n += 1
            stub = pb_grpc.IngestStub(channels[-1])
            tasks.append(asyncio.create_task(_session(stub, pb, grpc, plan, run, until)))
            if n % 100 == 0:
                await asyncio.sleep(0.01)  # open connections at a finite rate, as jobs start
    results = list(await asyncio.gather(*tasks))
    for ch in channels:
        await ch.close()
    return results


def _tally() -> dict[str, Any]:
    return {
        "sessions": 0,
        "served": 0,
        "sent": 0,
        "acked": 0,
        "acked_steps": 0,
        "errors": Counter(),
        **{key: [] for key in LATENCY_KEYS},
    }


def client_process(address: str, plans: list[SessionPlan], seconds: float, per_channel: int, result_q: Any) -> None:
    """A client process: run every plan's sessions for ``seconds``, put a summary on ``result_q``."""
    results = asyncio.run(_run_plans(address, plans, seconds, per_channel))
    summary: dict[str, Any] = {"labels": {}}
    for r in results:
        s = summary["labels"].setdefault(r.label, _tally())
        s["sessions"] += 1
        s["served"] += int(r.welcomed and r.finished)
        s["sent"] += r.sent
        s["acked"] += r.acked
        s["acked_steps"] += r.acked_steps
        s["errors"].update(r.errors)
        for key in LATENCY_KEYS:
            s[key].extend(getattr(r, key))
    for s in summary["labels"].values():
        s["errors"] = dict(s["errors"])
        for key in LATENCY_KEYS:
            s[key] = np.asarray(s[key], dtype=np.float64)
    result_q.put(summary)


def merge(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The client processes' summaries as one, per label."""
    out: dict[str, dict[str, Any]] = {}
    for summ in summaries:
        for label, s in summ["labels"].items():
            m = out.setdefault(label, _tally())
            for k in ("sessions", "served", "sent", "acked", "acked_steps"):
                m[k] += s[k]
            m["errors"].update(s["errors"])
            for key in LATENCY_KEYS:
                m[key].append(s[key])
    for m in out.values():
        for key in LATENCY_KEYS:
            m[key] = np.concatenate(m[key]) if m[key] else np.zeros(0)
        lat, later = m["latencies"], m["later"]
        m["p50_ms"] = float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan")
        m["p99_ms"] = float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan")
        m["max_ms"] = float(lat.max() * 1e3) if lat.size else float("nan")
        m["p99_later_ms"] = float(np.percentile(later, 99) * 1e3) if later.size else float("nan")
        # When the slow acks (over 1 s) were sent, in 5 s bins from the first batch: a start-up burst, or when.
        sent = m["sent_times"]
        slow = sent[lat > 1.0] - sent.min() if lat.size else np.zeros(0)
        edges = np.arange(0.0, (sent.max() - sent.min() if lat.size else 0.0) + 5.0, 5.0)
        m["slow_sent_s"] = np.histogram(slow, bins=edges)[0].tolist() if slow.size else []
        m["errors"] = dict(m["errors"])
    return out
