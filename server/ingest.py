"""``Ingest.Session``: the bidirectional stream every training process keeps open.

Protocol (see proto/layrot.proto): the job sends ``Hello`` first, then
``StepBatch``es (plus ``ControlAck``s), then ``Goodbye``; the collector
answers with ``Ack(seq)`` once the batch ``seq`` is committed to the history
store, ``SessionError`` for bad input, and (later) ``RateCommand``s.

Everything runs on one asyncio loop (grpc.aio): thousands of sessions cost
coroutines, not threads. The per-message work is a handful of vectorised
numpy calls over the (steps x layers) arrays, then one queue put to the
store's writer thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from layrot.core import rotation as rot
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.wire import unpack
from layrot.server import control
from layrot.server.state import ACK, END, CollectorState, LiveSession, Snapshot
from layrot.server.store import LayerRecord, RunRecord, Store, insert_run_sql

log = logging.getLogger(__name__)

MAX_RUN_NAME = 200
# When the writer thread falls this far behind, stop reading from the
# streams: gRPC flow control then pushes back to the jobs, whose bounded
# queues drop (fail open) instead of the collector growing without limit.
MAX_PENDING_SAMPLES = 2_000_000  # layer-samples, ~9 float64 each stored: ~150 MB of queued rows
# How long a closing session waits for its last commits before ending anyway.
DRAIN_TIMEOUT = 10.0


class SessionReject(Exception):
    """Bad input that ends (Hello) or skips (StepBatch) with a SessionError."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code


def check_token(context: grpc.aio.ServicerContext, token: str | None) -> bool:
    """True when no token is configured or the call carries ``authorization: Bearer <token>``."""
    if not token:
        return True
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return hmac.compare_digest(value[7:].encode(), token.encode())
    return False


def validate_hello(hello: pb.Hello) -> list[LayerRecord]:
    """Check a Hello; return its layer table in forward order, or raise SessionReject("bad_hello")."""
    run = hello.run
    if not run or len(run) > MAX_RUN_NAME or not run.isprintable():
        raise SessionReject("bad_hello", f"run must be 1..{MAX_RUN_NAME} printable characters, got {run!r:.220}")
    if hello.world_size and hello.rank >= hello.world_size:
        raise SessionReject("bad_hello", f"rank {hello.rank} >= world_size {hello.world_size}")
    n = len(hello.layers)
    if n == 0:
        raise SessionReject("bad_hello", "the layer table is empty")
    names = [lay.name for lay in hello.layers]
    if any(not name for name in names):
        raise SessionReject("bad_hello", "a layer has an empty name")
    if len(set(names)) != n:
        dup = sorted({x for x in names if names.count(x) > 1})[:5]
        raise SessionReject("bad_hello", f"duplicate layer names: {dup}")
    indices = sorted(lay.index for lay in hello.layers)
    if indices != list(range(n)):
        raise SessionReject("bad_hello", f"layer indices must be exactly 0..{n - 1}")
    layers = []
    for lay in sorted(hello.layers, key=lambda x: x.index):
        if not (math.isfinite(lay.init_norm) and lay.init_norm >= 0.0):
            raise SessionReject(
                "bad_hello", f"layer {lay.name!r}: init_norm must be finite and >= 0, got {lay.init_norm}"
            )
        layers.append(
            LayerRecord(
                index=lay.index,
                name=lay.name,
                shape=list(lay.shape),
                init_norm=lay.init_norm,
                numel=lay.numel,
                module_type=lay.module_type,
                sharded=lay.sharded,
            )
        )
    return layers


def _capabilities(hello: pb.Hello) -> dict[str, bool]:
    c = hello.capabilities
    return {"layca": bool(c.layca), "control": bool(c.control), "loss": bool(c.loss)}


class IngestServicer(pb_grpc.IngestServicer):
    """The Ingest service on a grpc.aio server."""

    def __init__(
        self,
        state: CollectorState,
        store: Store,
        token: str | None = None,
        max_pending_samples: int = MAX_PENDING_SAMPLES,
    ) -> None:
        self.state = state
        self.store = store
        self.token = token
        self.max_pending_samples = max_pending_samples
        self.pending_samples = 0  # accepted, not yet committed (loop thread only)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: set[LiveSession] = set()
        store.on_commit = self._on_commit_thread
        store.on_failure = self._on_failure_thread
        # Control plane (server/control.py): commands, their delivery and audit.
        self.control = control.attach(state, store)

    # ------------------------------------------------------------ commits -> acks
    def _on_commit_thread(self, tokens: list[Any]) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_commit, tokens)
            except RuntimeError:  # loop closed during shutdown: nobody left to ack
                pass

    def _on_failure_thread(self, tokens: list[Any]) -> None:
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
                capabilities=_capabilities(hello),
                meta=dict(hello.meta),
                created=now,
                last_seen=None,
                first_report=None,
                nonfinite=0,
                layers=layers,
            )
            rs = state.add_run(rec)
            for sql, params in insert_run_sql(rec):
                self.store.submit(sql, params)
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
                self.store.submit("UPDATE runs SET world_size=? WHERE id=?", (rs.world_size, rs.run_id))
        sess.run = rs
        sess.rank = hello.rank
        sess.world_size = max(1, hello.world_size)
        sess.session_id = hello.session_id
        sess.pid = hello.pid
        sess.host = hello.host
        sess.capabilities = _capabilities(hello)
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
        rs = sess.run
        assert rs is not None
        try:
            rows, snap, nonfinite, n_steps = self._decode(b, sess)
        except SessionReject as exc:
            self.state.reject(exc.reason, rs)
            log.warning("run %s rank %d: batch seq=%d rejected: %s", rs.run, sess.rank, b.seq, exc.message)
            sess.send(pb.CollectorMessage(error=pb.SessionError(code=exc.code, message=exc.message, seq=b.seq)))
            # Acknowledge it anyway (after everything queued before it): a
            # malformed batch stays malformed, resending it would loop forever.
            sess.inflight += 1
            self.store.barrier((sess, b.seq, 0, 0))
            return
        n_samples = n_steps * sess.num_layers
        self.pending_samples += n_samples
        if nonfinite:
            rs.nonfinite += nonfinite
        if rs.first_report is None:
            rs.first_report = snap.time
            self.store.submit("UPDATE runs SET first_report=? WHERE id=?", (snap.time, rs.run_id))
        if rs.last_report is None or snap.time >= rs.last_report:
            rs.last_report = snap.time
        rs.update(snap)
        sess.inflight += 1
        self.store.submit_rows(rows)
        self.store.submit(
            "UPDATE runs SET last_seen=?, nonfinite=? WHERE id=?",
            (rs.last_report, rs.nonfinite, rs.run_id),
            token=(sess, b.seq, n_steps, n_samples),
        )

    def _decode(self, b: pb.StepBatch, sess: LiveSession) -> tuple[list[tuple], Snapshot, int, int]:
        L = sess.num_layers
        S = len(b.steps)
        if b.num_layers != L:
            raise SessionReject("bad_batch", f"num_layers={b.num_layers} but the Hello declared {L} layers")
        if S == 0 or len(b.times) != S:
            raise SessionReject(
                "bad_batch", f"need >= 1 step and len(times) == len(steps), got {S} steps, {len(b.times)} times"
            )
        steps = np.fromiter(b.steps, dtype=np.uint64, count=S)
        if steps.min() < 1:
            raise SessionReject("bad_batch", "steps must be >= 1 (1 after the first optimizer step)")
        if steps.max() >= 2**63:
            raise SessionReject("bad_batch", "step out of range")
        times = np.fromiter(b.times, dtype=np.float64, count=S)
        if not np.isfinite(times).all():
            raise SessionReject("bad_batch", "times must be finite unix seconds")
        if len(b.loss) not in (0, S):
            raise SessionReject("bad_batch", f"len(loss) must be 0 or {S}, got {len(b.loss)}")
        if len(b.command_version) not in (0, S):
            raise SessionReject("bad_batch", f"len(command_version) must be 0 or {S}, got {len(b.command_version)}")
        try:
            norm = unpack(b.norm, S, L)
            dist0 = unpack(b.dist0, S, L)
            dstep = unpack(b.dstep, S, L)
            norm_prev = unpack(b.norm_prev, S, L)
            rho = unpack(b.rho, S, L) if b.rho else None
            dot0 = unpack(b.dot0, S, L) if b.dot0 else None
            dotstep = unpack(b.dotstep, S, L) if b.dotstep else None
        except ValueError as exc:
            raise SessionReject("bad_batch", f"bad array size: {exc}") from None

        # With the radial dots the angles are well conditioned even for mostly
        # radial steps; without them (older or minimal clients) use the triangle.
        if dot0 is not None:
            rotation = rot.cosine_distance(rot.radial_angle(sess.init_norm[None, :], dist0, dot0))
        else:
            rotation = rot.rotation(sess.init_norm[None, :], norm, dist0)
        if dotstep is not None:
            angle = rot.radial_angle(norm_prev, dstep, dotstep)
        else:
            angle = rot.step_angle(norm_prev, norm, dstep)
        bad = ~(np.isfinite(norm) & np.isfinite(dist0) & np.isfinite(dstep) & np.isfinite(norm_prev))
        for extra in (dot0, dotstep):
            if extra is not None:
                bad |= ~np.isfinite(extra)
        nonfinite = int(np.count_nonzero(bad))
        alerts = self.state.alerts
        if alerts is not None and alerts.enabled:  # alert engine (server/alerts.py): vectorised, never raises
            alerts.observe(sess.run, sess.rank, steps, angle, bad, rho, b.loss)

        stride = L * 8
        rot_b = rotation.tobytes()
        ang_b = angle.tobytes()
        raw_norm, raw_d0, raw_ds, raw_np = b.norm, b.dist0, b.dstep, b.norm_prev
        raw_rho = b.rho if rho is not None else None
        raw_dot0 = b.dot0 if dot0 is not None else None
        raw_dotstep = b.dotstep if dotstep is not None else None
        losses = list(b.loss) if len(b.loss) else [None] * S
        versions = list(b.command_version) if len(b.command_version) else [None] * S
        run_id, rank = sess.run.run_id, sess.rank  # type: ignore[union-attr]
        steps_l = steps.tolist()
        times_l = times.tolist()
        rows = []
        for i in range(S):
            lo, hi = i * stride, (i + 1) * stride
            loss = losses[i]
            if loss is not None and not math.isfinite(loss):
                loss = None
            rows.append(
                (
                    run_id,
                    rank,
                    steps_l[i],
                    times_l[i],
                    loss,
                    versions[i],
                    rot_b[lo:hi],
                    ang_b[lo:hi],
                    raw_norm[lo:hi],
                    None if raw_rho is None else raw_rho[lo:hi],
                    raw_d0[lo:hi],
                    raw_ds[lo:hi],
                    raw_np[lo:hi],
                    None if raw_dot0 is None else raw_dot0[lo:hi],
                    None if raw_dotstep is None else raw_dotstep[lo:hi],
                )
            )
        last = int(np.argmax(steps))
        loss_last = losses[last]
        snap = Snapshot(
            rank=rank,
            step=steps_l[last],
            time=times_l[last],
            loss=float("nan") if loss_last is None else float(loss_last),
            rotation=rotation[last].copy(),
            step_angle=angle[last].copy(),
            weight_norm=norm[last].copy(),
            rho=None if rho is None else rho[last].copy(),
        )
        return rows, snap, nonfinite, S

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
        self.store.submit(
            "INSERT INTO control_acks (run_id, rank, session_id, version, applied, reason, step, time)"
            " VALUES (?,?,?,?,?,?,?,?)",
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
