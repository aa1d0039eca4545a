"""``Ingest.Session``: the bidirectional stream every training process keeps open.

Protocol (see proto/layrot.proto): the job sends ``Hello`` first, then
``StepBatch``es (plus ``ControlAck``s), then ``Goodbye``; the collector
answers with ``Ack(seq)`` once the batch ``seq`` is committed to the history
store, ``SessionError`` for bad input, and (later) ``RateCommand``s.

Everything runs on one asyncio loop (grpc.aio): thousands of sessions cost
coroutines, not threads. A StepBatch goes through a pipeline of plain steps,
each a handful of vectorised numpy calls over the (steps x layers) arrays:

1. ``decode_batch`` (server/decode.py): validate, view the bytes as arrays;
2. ``derive`` (server/derive.py): rotations, step angles, non-finite mask;
3. ``AlertEngine.observe`` (server/alerts.py): alert evaluation;
4. ``step_rows`` / ``newest_snapshot`` (server/records.py): history rows and
   the run's newest values, then the run-state update and one queue put to
   the store's writer thread (``_record``).

The servicer gets its collaborators (state, store, control plane, alert
engine) from the composition root, server/app.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.server.decode import MAX_RUN_NAME, SessionReject, capabilities, decode_batch, validate_hello
from layrot.server.derive import derive
from layrot.server.records import newest_snapshot, step_rows
from layrot.server.state import ACK, END, CollectorState, LiveSession, RunState, Snapshot
from layrot.server.store import RunRecord, Store

if TYPE_CHECKING:
    from layrot.server.alerts import AlertEngine
    from layrot.server.control import ControlPlane

log = logging.getLogger(__name__)

# When the writer thread falls this far behind, stop reading from the
# streams: gRPC flow control then pushes back to the jobs, whose bounded
# queues drop (fail open) instead of the collector growing without limit.
MAX_PENDING_SAMPLES = 2_000_000  # layer-samples, ~9 float64 each stored: ~150 MB of queued rows
# How long a closing session waits for its last commits before ending anyway.
DRAIN_TIMEOUT = 10.0

# Moved to server/decode.py; the old names stay importable from here.
_capabilities = capabilities
__all__ = [
    "DRAIN_TIMEOUT",
    "MAX_PENDING_SAMPLES",
    "MAX_RUN_NAME",
    "IngestServicer",
    "SessionReject",
    "check_token",
    "validate_hello",
]


def check_token(context: grpc.aio.ServicerContext, token: str | None) -> bool:
    """True when no token is configured or the call carries ``authorization: Bearer <token>``."""
    if not token:
        return True
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return hmac.compare_digest(value[7:].encode(), token.encode())
    return False


class IngestServicer(pb_grpc.IngestServicer):
    """The Ingest service on a grpc.aio server.

    ``on_store_commit`` / ``on_store_failure`` are the store's callbacks (the
    composition root connects them): commits become Acks.
    """

    def __init__(
        self,
        state: CollectorState,
        store: Store,
        control: ControlPlane,
        alerts: AlertEngine | None = None,
        token: str | None = None,
        max_pending_samples: int = MAX_PENDING_SAMPLES,
    ) -> None:
        self.state = state
        self.store = store
        self.control = control
        self.alerts = alerts
        self.token = token
        self.max_pending_samples = max_pending_samples
        self.pending_samples = 0  # accepted, not yet committed (loop thread only)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: set[LiveSession] = set()

    # ------------------------------------------------------------ commits -> acks
    def on_store_commit(self, tokens: list[Any]) -> None:
        """Store writer thread: these batches are committed; ack them on the loop."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_commit, tokens)
            except RuntimeError:  # loop closed during shutdown: nobody left to ack
                pass

    def on_store_failure(self, tokens: list[Any]) -> None:
        """Store writer thread: these batches were rolled back; tell their jobs on the loop."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_failure, tokens)
            except RuntimeError:
                pass

    def _on_failure(self, tokens: list[Any]) -> None:
        # Not stored, so not acknowledged: the job keeps these batches and
        # resends them on its next session. Tell it why.
        for sess, seq, _n_steps, n_samples in tokens:
            self.pending_samples -= n_samples
            sess.inflight -= 1
            sess.send(
                pb.CollectorMessage(
                    error=pb.SessionError(
                        code="store_error", seq=seq, message="the collector could not store this batch; resend it later"
                    )
                )
            )
            if sess.closing and sess.inflight <= 0:
                sess.drained.set()

    def _on_commit(self, tokens: list[Any]) -> None:
        state = self.state
        for sess, seq, n_steps, n_samples in tokens:
            # Counted here, not on receipt: "ingested" means stored.
            state.steps_ingested += n_steps
            state.samples_ingested += n_samples
            self.pending_samples -= n_samples
            sess.committed(seq)

    # ------------------------------------------------------------ the stream
    async def Session(
        self, request_iterator: AsyncIterator[pb.JobMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        if not check_token(context, self.token):
            self.state.reject("unauthenticated")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer <token>'")
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        sess = LiveSession(asyncio.get_running_loop(), context.peer())
        self.sessions.add(sess)
        self.state.sessions_opened += 1
        self.state.sessions_active += 1
        reader = asyncio.create_task(self._read(request_iterator, sess))
        try:
            while True:
                item = await sess.outbox.get()
                if item is ACK:
                    sess.ack_queued = False
                    if sess.committed_seq > sess.sent_seq:
                        sess.sent_seq = sess.committed_seq
                        yield pb.CollectorMessage(ack=pb.Ack(seq=sess.committed_seq))
                elif item is END:
                    break
                else:
                    yield item
        finally:
            if not reader.done():
                reader.cancel()
            if not sess.said_goodbye and not sess.ended_by_collector:
                # Job killed, network lost, client cancel, or a message over
                # the size limit (gRPC refuses those before they reach us and
                # tells only the client: RESOURCE_EXHAUSTED).
                self.state.sessions_lost += 1
            self._detach(sess)

    def _detach(self, sess: LiveSession) -> None:
        if sess in self.sessions:
            self.sessions.discard(sess)
            self.state.sessions_active -= 1
        if sess.run is not None:
            sess.run.sessions.discard(sess)
            log.info("session closed: run=%s rank=%d peer=%s", sess.run.run, sess.rank, sess.peer)

    async def _read(self, requests: AsyncIterator[pb.JobMessage], sess: LiveSession) -> None:
        try:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                if sess.run is None:
                    if kind != "hello":
                        raise SessionReject(
                            "bad_hello", f"the first message must be Hello, got {kind or 'an empty message'}"
                        )
                    self._hello(msg.hello, sess)
                    continue
                if kind == "steps":
                    while self.pending_samples > self.max_pending_samples:
                        await asyncio.sleep(0.005)
                    self._batch(msg.steps, sess)
                elif kind == "control_ack":
                    self._control_ack(msg.control_ack, sess)
                elif kind == "goodbye":
                    sess.said_goodbye = True
                    log.info(
                        "goodbye: run=%s rank=%d last_seq=%d reason=%s",
                        sess.run.run,
                        sess.rank,
                        msg.goodbye.last_seq,
                        msg.goodbye.reason,
                    )
                    break
                elif kind == "hello":
                    self.state.reject("bad_hello", sess.run)
                    sess.send(
                        pb.CollectorMessage(
                            error=pb.SessionError(
                                code="bad_hello", message="Hello was already received on this session; ignored"
                            )
                        )
                    )
                else:
                    self.state.reject("empty_message", sess.run)
        except SessionReject as exc:  # bad Hello: report and end the stream
            self.state.reject(exc.reason, sess.run)
            log.warning("session rejected (%s) from %s: %s", exc.code, sess.peer, exc.message)
            sess.send(pb.CollectorMessage(error=pb.SessionError(code=exc.code, message=exc.message)))
            sess.ended_by_collector = True
            sess.send(END)
            return
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as exc:
            self._stream_error(sess, exc)
        except Exception as exc:  # e.g. a message over the size limit surfaces here
            self._stream_error(sess, exc)
        await self._close(sess)

    def _stream_error(self, sess: LiveSession, exc: BaseException) -> None:
        text = str(exc)
        if "RESOURCE_EXHAUSTED" in text or "larger than max" in text.lower():
            self.state.reject("too_large", sess.run)
        log.info("session stream ended with an error (peer=%s): %s", sess.peer, text[:300])

    async def _close(self, sess: LiveSession) -> None:
        """Wait for this session's batches to commit, send the final Ack, end the stream."""
        sess.closing = True
        if sess.inflight > 0:
            try:
                await asyncio.wait_for(sess.drained.wait(), DRAIN_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning(
                    "session of run %s closed with %d uncommitted batches", sess.run and sess.run.run, sess.inflight
                )
        sess.send(END)

    # ------------------------------------------------------------ Hello
    def _hello(self, hello: pb.Hello, sess: LiveSession) -> None:
        layers = validate_hello(hello)
        state = self.state
        rs = state.runs.get(hello.run)
        now = time.time()
        if rs is None:
            rec = RunRecord(
                run_id=state.next_run_id,
                run=hello.run,
                framework=hello.framework,
                framework_version=hello.framework_version,
                host=hello.host,
                world_size=max(1, hello.world_size),
                every=max(1, hello.every),
                capabilities=capabilities(hello),
                meta=dict(hello.meta),
                created=now,
                last_seen=None,
                first_report=None,
                nonfinite=0,
                layers=layers,
            )
            rs = state.add_run(rec)
            self.store.insert_run(rec)
            log.info("new run %s: %d layers, framework=%s host=%s", rec.run, len(layers), rec.framework, rec.host)
        else:
            names = [lay.name for lay in layers]
            if names != rs.names:
                diff = next(
                    (i for i, (a, b) in enumerate(zip(names, rs.names)) if a != b), min(len(names), len(rs.names))
                )
                raise SessionReject(
                    "layer_table_mismatch",
                    f"run {hello.run!r} already exists with a different layer table ({rs.num_layers} layers, this job"
                    f" sends {len(names)}; first difference at index {diff}); use a new run name",
                )
            if hello.world_size > rs.world_size:
                rs.world_size = hello.world_size
                self.store.set_world_size(rs.run_id, rs.world_size)
        sess.run = rs
        sess.rank = hello.rank
        sess.world_size = max(1, hello.world_size)
        sess.session_id = hello.session_id
        sess.pid = hello.pid
        sess.host = hello.host
        sess.capabilities = capabilities(hello)
        sess.applied_command_version = hello.applied_command_version
        # Each session computes rotations against its own ||w(0)||: a resumed
        # job or another rank may carry (slightly) different init norms.
        sess.init_norm = np.array([lay.init_norm for lay in layers], dtype=np.float64)
        sess.num_layers = len(layers)
        rs.sessions.add(sess)
        log.info(
            "session opened: run=%s rank=%d/%d pid=%d host=%s peer=%s",
            rs.run,
            sess.rank,
            sess.world_size,
            sess.pid,
            sess.host,
            sess.peer,
        )
        self.control.on_hello(sess)

    # ------------------------------------------------------------ StepBatch
    def _batch(self, b: pb.StepBatch, sess: LiveSession) -> None:
        """The StepBatch pipeline: decode -> derive -> alerts -> rows and run state."""
        rs = sess.run
        assert rs is not None
        try:
            batch = decode_batch(b, sess.num_layers)
        except SessionReject as exc:
            self._refuse_batch(b.seq, sess, rs, exc)
            return
        derived = derive(batch, sess.init_norm)
        alerts = self.alerts
        if alerts is not None and alerts.enabled:  # vectorised, never raises
            alerts.observe(rs, sess.rank, batch.steps, derived.angle, derived.bad, batch.rho, batch.loss)
        rows = step_rows(batch, derived, rs.run_id, sess.rank)
        snap = newest_snapshot(batch, derived, sess.rank)
        self._record(b.seq, sess, batch.num_steps, rows, snap, derived.nonfinite)

    def _refuse_batch(self, seq: int, sess: LiveSession, rs: RunState, exc: SessionReject) -> None:
        self.state.reject(exc.reason, rs)
        log.warning("run %s rank %d: batch seq=%d rejected: %s", rs.run, sess.rank, seq, exc.message)
        sess.send(pb.CollectorMessage(error=pb.SessionError(code=exc.code, message=exc.message, seq=seq)))
        # Acknowledge it anyway (after everything queued before it): a
        # malformed batch stays malformed, resending it would loop forever.
        sess.inflight += 1
        self.store.barrier((sess, seq, 0, 0))

    def _record(
        self, seq: int, sess: LiveSession, n_steps: int, rows: list[tuple], snap: Snapshot, nonfinite: int
    ) -> None:
        """Update the run state (one published view) and queue the batch for the store; its commit acks ``seq``."""
        rs = sess.run
        assert rs is not None
        n_samples = n_steps * sess.num_layers
        self.pending_samples += n_samples
        if rs.record_batch(snap, nonfinite):
            self.store.set_first_report(rs.run_id, snap.time)
        sess.inflight += 1
        self.store.submit_rows(rows)
        self.store.update_progress(rs.run_id, rs.last_report, rs.nonfinite, token=(sess, seq, n_steps, n_samples))

    # ------------------------------------------------------------ ControlAck
    def _control_ack(self, ack: pb.ControlAck, sess: LiveSession) -> None:
        rs = sess.run
        assert rs is not None
        entry = {
            "rank": sess.rank,
            "session_id": sess.session_id,
            "version": ack.version,
            "applied": ack.applied,
            "reason": ack.reason,
            "step": ack.step,
            "time": time.time(),
        }
        rs.control_acks.append(entry)
        if ack.applied:
            sess.applied_command_version = ack.version
        log.info(
            "control ack: run=%s rank=%d version=%d applied=%s step=%d %s",
            rs.run,
            sess.rank,
            ack.version,
            ack.applied,
            ack.step,
            ack.reason,
        )
        self.store.insert_control_ack(
            (rs.run_id, sess.rank, sess.session_id, ack.version, int(ack.applied), ack.reason, ack.step, entry["time"]),
        )
        self.control.on_ack(sess, ack)

    # ------------------------------------------------------------ shutdown
    async def close_all(self, timeout: float = 5.0) -> None:
        """End every open session cleanly (final acks included), e.g. before a restart."""
        sessions = list(self.sessions)
        for sess in sessions:
            sess.ended_by_collector = True
            if not sess.closing:
                asyncio.ensure_future(self._close(sess))
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
