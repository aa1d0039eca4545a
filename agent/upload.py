"""Upload one spool to a collector: the replay session shared by ``layrot-agent sync`` and the reporter.

The spool's own ``Hello`` (its layer table, w(0) norms and run key) opens an
``Ingest.Session`` with ``replay=True``; its unacknowledged records follow, read
lazily segment by segment, under fresh sequence numbers. A record is released
from the spool when an ``Ack`` names it (acked => stored), kept and sent again
after a ``Nack`` with ``retry``, and released and counted as refused after one
without. Uploading the same spool twice stores nothing twice: what was acked is
no longer in it, and the collector's history keys rows by step.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from layrot.agent.spool import Spool
from layrot.agent.transport import RUN_METADATA_KEY, header_value
from layrot.proto import layrot_pb2 as pb

log = logging.getLogger(__name__)

__all__ = ["UploadResult", "upload_spool"]


@dataclass
class UploadResult:
    """What one upload did."""

    path: Path
    run: str = ""
    rank: int = 0
    steps_uploaded: int = 0  # stored by the collector during this upload
    steps_already: int = 0  # of those, steps the history already held (at or below Welcome.stored_step)
    steps_refused: int = 0  # refused for good (Nack without retry): released, counted
    steps_left: int = 0  # still in the spool afterwards
    error: str = ""
    refused_hello: bool = False  # the collector refused the spool's Hello (e.g. run_owned)

    @property
    def complete(self) -> bool:
        return not self.error and self.steps_left == 0


def upload_spool(
    spool: Spool,
    channel: grpc.Channel,
    *,
    token: str | None = None,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    window: int = 32,
    idle_timeout: float = 60.0,
    welcome_timeout: float = 1.0,
    backoff: float = 0.25,
) -> UploadResult:
    """Send ``spool``'s pending records on one replay session; never raises for a collector problem.

    ``progress(steps)`` is called as records are acknowledged (or refused). ``idle_timeout``:
    give up when nothing is acknowledged for that long (a stopped collector).
    """
    from layrot.agent.reporter import FINAL_REFUSALS, frame_batch, session_call

    result = UploadResult(spool.directory)
    raw = spool.read_hello()
    try:
        hello = pb.Hello.FromString(raw) if raw else None
    except Exception:
        hello = None
    if hello is None or not hello.run:
        result.error = "the spool has no readable Hello (layer table); it cannot be uploaded"
        result.steps_left = spool.pending_steps
        return result
    result.run, result.rank = hello.run, hello.rank
    hello.replay = True
    hello.session_id = uuid.uuid4().hex
    hello.pid = os.getpid()

    cond = threading.Condition()
    inflight: OrderedDict[int, tuple[int, int, bytes, int]] = OrderedDict()  # seq -> (rid, steps, payload, last)
    retry: list[tuple[float, int, tuple[int, int, bytes, int]]] = []
    st: dict[str, Any] = {"welcomed": False, "stored_step": 0, "exhausted": False, "done": False, "seq": 0}
    refused_seqs: set[int] = set()
    last_progress = [time.monotonic()]
    source: Iterator[Any] = spool.pending()

    def stopping() -> bool:
        return st["done"] or (should_stop is not None and should_stop())

    def requests() -> Iterator[Any]:
        yield pb.JobMessage(hello=hello)
        started = time.monotonic()
        while True:
            item = None
            finished = False
            with cond:
                while True:
                    if stopping():
                        return
                    ready = st["welcomed"] or time.monotonic() - started >= welcome_timeout
                    now = time.monotonic()
                    if ready and len(inflight) < window:
                        if retry and retry[0][0] <= now:
                            item = heapq.heappop(retry)[2]
                            break
                        if not st["exhausted"]:
                            break  # read the next record off the lock
                    if ready and st["exhausted"] and not retry and not inflight:
                        st["done"] = finished = True
                        break
                    wait = 0.25 if not retry else max(0.005, min(0.25, retry[0][0] - now))
                    cond.wait(wait)
            if finished:
                yield pb.JobMessage(goodbye=pb.Goodbye(last_seq=st["seq"], reason="sync done"))
                return
            if item is None:
                rec = next(source, None)
                if rec is None:
                    with cond:
                        st["exhausted"] = True
                        cond.notify_all()
                    continue
                try:
                    steps = pb.StepBatch.FromString(rec.payload).steps
                    last = max(steps) if steps else 0
                except Exception:
                    last = 0
                item = (rec.record_id, rec.steps, rec.payload, last)
            with cond:
                st["seq"] += 1
                seq = st["seq"]
                inflight[seq] = item
            yield frame_batch(item[2], seq)

    def settle(seq: int, stored: bool, item: tuple[int, int, bytes, int]) -> None:
        rid, steps, _, last = item
        spool.ack(rid)  # stored, or refused for good: either way resending cannot help
        if stored and seq not in refused_seqs:
            result.steps_uploaded += steps
            if last and last <= st["stored_step"]:
                result.steps_already += steps
        else:
            result.steps_refused += steps
        last_progress[0] = time.monotonic()
        if progress is not None:
            progress(steps)

    # The run name as metadata, as the live reporter sends it, so an L7 proxy hashes the replay
    # onto the collector that holds the run.
    md = [(RUN_METADATA_KEY, header_value(hello.run))]
    if token:
        md.append(("authorization", f"Bearer {token}"))
    call = session_call(channel)(requests(), metadata=md)

    def watchdog() -> None:
        while not st["done"]:
            time.sleep(0.2)
            if time.monotonic() - last_progress[0] > idle_timeout or (should_stop is not None and should_stop()):
                if not st["done"]:
                    result.error = result.error or f"no acknowledgement for {idle_timeout:g} s"
                call.cancel()
                return

    dog = threading.Thread(target=watchdog, name="layrot-sync-watchdog", daemon=True)
    dog.start()
    try:
        for resp in call:
            kind = resp.WhichOneof("kind")
            if kind in ("welcome", "ack") and not st["welcomed"]:
                with cond:
                    st["welcomed"] = True
                    if kind == "welcome":
                        st["stored_step"] = resp.welcome.stored_step
                    cond.notify_all()
            if kind == "ack":
                done: list[tuple[int, bool, tuple[int, int, bytes, int]]] = []
                with cond:
                    for seq in [s for s in inflight if s <= resp.ack.seq] + list(resp.ack.stored):
                        item = inflight.pop(seq, None)
                        if item is not None:
                            done.append((seq, True, item))
                    for nack in resp.ack.failed:
                        item = inflight.pop(nack.seq, None)
                        if item is None:
                            continue
                        if nack.retry:
                            due = time.monotonic() + (nack.retry_after_s if nack.retry_after_s > 0 else backoff)
                            heapq.heappush(retry, (due, nack.seq, item))
                        else:
                            done.append((nack.seq, False, item))
                            log.warning("layrot sync: %s: batch refused (%s): %s", hello.run, nack.code, nack.message)
                    cond.notify_all()
                for seq, stored, item in done:
                    settle(seq, stored, item)
            elif kind == "error":
                err = resp.error
                if err.seq:
                    refused_seqs.add(err.seq)  # an older collector acks a refused batch afterwards
                elif not st["welcomed"] or err.code in FINAL_REFUSALS:
                    result.error = f"{err.code}: {err.message}"
                    result.refused_hello = err.code in FINAL_REFUSALS
                    break
    except grpc.RpcError as exc:
        if not result.error:
            code = exc.code() if hasattr(exc, "code") else None
            result.error = f"{code.name if code else 'error'}: {exc.details() if hasattr(exc, 'details') else exc}"
    finally:
        with cond:
            st["done"] = True
            cond.notify_all()
        call.cancel()
        dog.join(timeout=1.0)
    result.steps_left = spool.pending_steps
    if result.steps_left and not result.error:
        result.error = "the collector ended the session before storing everything"
    return result
