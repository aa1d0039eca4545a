"""``Ingest.Session``: the bidirectional stream every training process keeps open.

Protocol (see proto/layrot.proto): the job sends ``Hello`` first, then
``StepBatch``es (plus ``ControlAck``s), then ``Goodbye``; the collector
answers an accepted Hello with ``Welcome``, then ``Ack``s, ``SessionError``
for bad input, and (later) ``RateCommand``s.

The invariant: **acked => in the history store**. ``Ack.seq`` covers a batch
only once the transaction holding its rows has committed (server/store.py),
and it never passes a batch that is still pending, failed or was refused:
batches stored above such a gap are listed in ``Ack.stored``. A batch whose
commit failed gets a ``Nack`` (code "store_failed", ``retry=true``: the job
keeps it and sends it again under a new seq); one refused for its content a
``Nack`` with ``retry=false`` (code "bad_batch", beside the SessionError
older clients read). A run exists only once its ``runs`` row has committed:
its first Hello waits for that commit before the session is accepted, so no
row is ever stored under a run id without its run.

Everything runs on one asyncio loop (grpc.aio): thousands of sessions cost
coroutines, not threads. Validation is linear in the message size and bounded
by ``IngestLimits`` (server/decode.py), so no client can stall the loop. The
StepBatches that every stream delivers in one turn of the loop go through a
pipeline of plain steps together (one-step batches are the common case, and
a dozen numpy calls then serve them all, not each):

1. ``decode_batch`` (server/decode.py): validate, view the bytes as arrays;
2. ``derive_many`` (server/derive.py): ``check_physics`` (refuse impossible
   values), rotations, step angles and the non-finite mask, over the batches'
   values stacked (a refusal still names its own batch only);
3. ``AlertEngine.observe`` (server/alerts.py): alert evaluation;
4. ``step_rows`` / ``newest_snapshot`` (server/records.py): history rows and
   the run's newest values, then the run-state update and one queue put to
   the store's writer thread (``_record``).

Runs belong to the job that created them: the ``runs`` row keeps a hash of
the creating Hello's ``run_key``, and a later Hello with another key (or
none, when the run has one) is refused with code "run_owned". A Hello with
``replay=true`` (``layrot-agent sync``) writes history but is no live session:
it takes no commands and never counts as connected (stall alerts, control).

The servicer gets its collaborators (state, store, control plane, alert
engine) from the composition root, server/app.py.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from layrot.core.version import __version__
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.server.decode import (
    DEFAULT_LIMITS,
    INT64_MAX,
    MAX_RUN_NAME,
    DecodedBatch,
    IngestLimits,
    SessionReject,
    capabilities,
    decode_batch,
    validate_hello,
)
from layrot.server.derive import derive_many
from layrot.server.records import newest_snapshot, step_rows
from layrot.server.state import ACK, END, CollectorState, LiveSession, RunState, Snapshot, hello_meta
from layrot.server.store_api import HistoryStore, RunRecord, StoreError, StoreValueError, hash_run_key

if TYPE_CHECKING:
    from layrot.server.alerts import AlertEngine
    from layrot.server.cluster import Cluster
    from layrot.server.control import ControlPlane, StoredControl

log = logging.getLogger(__name__)

# When the writer thread falls this far behind, stop reading from the
# streams: gRPC flow control then pushes back to the jobs, whose bounded
# queues drop (fail open) instead of the collector growing without limit.
# Admission control (serve --max-sessions): how long a refused job is asked to wait, and where it is told.
ADMISSION_RETRY_S = 5.0
RETRY_AFTER_KEY = "retry-after-ms"
MAX_PENDING_SAMPLES = 2_000_000  # layer-samples, ~9 float64 each stored: ~150 MB of queued rows
# How long a closing session waits for its last commits before ending anyway.
DRAIN_TIMEOUT = 10.0
# What a job waits before resending a batch the store could not commit (Nack.retry_after_s).
STORE_RETRY_AFTER = 1.0
# gRPC itself refuses messages beyond this multiple of IngestLimits.max_message_bytes, and
# those never reach the servicer (the job gets RESOURCE_EXHAUSTED, nothing is counted).
# Up to it, the servicer refuses and counts them (reason too_large): see grpc_receive_limit.
GRPC_LIMIT_FACTOR = 4
GRPC_LIMIT_FLOOR = 256 << 20
# Characters of a ControlAck reason kept (a longer one is cut, not refused).
MAX_ACK_REASON = 4096

# Moved to server/decode.py; the old names stay importable from here.
_capabilities = capabilities
__all__ = [
    "DRAIN_TIMEOUT",
    "MAX_PENDING_SAMPLES",
    "MAX_RUN_NAME",
    "IngestLimits",
    "IngestServicer",
    "SessionReject",
    "add_ingest_to_server",
    "grpc_receive_limit",
    "validate_hello",
]


class MessageRefused(Exception):
    """A message the servicer's deserializer refused (too large, undecodable); ends the session, counted."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def grpc_receive_limit(max_message_bytes: int) -> int:
    """``grpc.max_receive_message_length`` for a collector whose ingest limit is ``max_message_bytes``.

    Above the ingest limit, so that messages between the two reach the
    servicer's deserializer and are refused *and counted*; gRPC refuses
    larger ones silently (to the servicer, the stream just ends). At least
    GRPC_LIMIT_FLOOR, so a runaway client's 200 MB message is still counted.
    """
    return min(2**31 - 1, max(max_message_bytes * GRPC_LIMIT_FACTOR, GRPC_LIMIT_FLOOR))


def job_message_deserializer(max_message_bytes: int) -> Callable[[bytes], pb.JobMessage]:
    """``JobMessage.FromString`` that raises MessageRefused (counted by the servicer) instead of failing the call."""

    def decode(data: bytes) -> pb.JobMessage:
        if len(data) > max_message_bytes:
            raise MessageRefused(
                "too_large", f"message of {len(data)} bytes, over this collector's limit of {max_message_bytes}"
            )
        try:
            return pb.JobMessage.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise MessageRefused("undecodable", f"message of {len(data)} bytes is not a JobMessage: {exc}") from None

    return decode


def add_ingest_to_server(servicer: IngestServicer, server: grpc.aio.Server) -> None:
    """Register the Ingest service like ``add_IngestServicer_to_server``, with the refusing deserializer."""
    handler = grpc.method_handlers_generic_handler(
        "layrot.v1.Ingest",
        {
            "Session": grpc.stream_stream_rpc_method_handler(
                servicer.Session,
                request_deserializer=job_message_deserializer(servicer.limits.max_message_bytes),
                response_serializer=pb.CollectorMessage.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


class BatchToken(NamedTuple):
    """What the store hands back for a queued StepBatch."""

    sess: LiveSession
    seq: int
    n_steps: int
    n_samples: int
    max_step: int


class RunToken(NamedTuple):
    """What the store hands back for a new run: the run record and who waits for it."""

    rec: RunRecord
    done: asyncio.Future


class IngestServicer(pb_grpc.IngestServicer):
    """The Ingest service on a grpc.aio server.

    ``on_store_commit`` / ``on_store_failure`` are the store's callbacks (the
    composition root connects them): commits become Acks, failures Nacks.
    ``limits`` bounds what a job may send (see ``IngestLimits`` for the
    defaults); register with ``add_ingest_to_server`` so that oversized and
    undecodable messages are counted too.
    """

    def __init__(
        self,
        state: CollectorState,
        store: HistoryStore,
        control: ControlPlane,
        alerts: AlertEngine | None = None,
        max_pending_samples: int = MAX_PENDING_SAMPLES,
        limits: IngestLimits | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.control = control
        self.alerts = alerts
        self.max_pending_samples = max_pending_samples
        self.limits = limits or DEFAULT_LIMITS
        self.pending_samples = 0  # accepted, not yet committed (loop thread only)
        # Set while pending_samples is within bounds: a session over the bound waits on it (set by
        # the commits that make room), with no polling timer per blocked stream.
        self._room = asyncio.Event()
        self._room.set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: set[LiveSession] = set()
        self.creating: dict[str, asyncio.Future] = {}  # run name -> its runs row commit (loop thread)
        # StepBatches read this turn of the loop, not yet through the pipeline (_take, drain_inbox).
        self._inbox: list[tuple[pb.StepBatch, LiveSession]] = []
        self._drain_scheduled = False
        # Several collectors on one database (server/cluster.py): run ids from the database, runs made elsewhere.
        self.cluster: Cluster | None = None
        # Never reuse a run id that rows of any table carry (orphans of older versions).
        state.next_run_id = max(state.next_run_id, store.highest_run_id() + 1)

    # ------------------------------------------------------------ commits -> acks
    def on_store_commit(self, tokens: list[Any], new_rows: list[int] | None = None) -> None:
        """Store writer thread: these items are committed (``new_rows``: step rows each added); ack them on the loop."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_commit, tokens, new_rows)
            except RuntimeError:  # loop closed during shutdown: nobody left to ack
                pass

    def on_store_failure(self, tokens: list[Any], reason: str = "") -> None:
        """Store writer thread: these items were rolled back; tell their jobs on the loop."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_failure, tokens, reason)
            except RuntimeError:
                pass

    def _on_failure(self, tokens: list[Any], reason: str) -> None:
        # Not stored, so not acknowledged: the Nack tells the job to keep the
        # batch and send it again.
        for tok in tokens:
            if isinstance(tok, RunToken):
                if not tok.done.done():
                    tok.done.set_result(reason or "the history store could not commit it")
                continue
            if not isinstance(tok, BatchToken):
                continue
            self.pending_samples -= tok.n_samples
            log.warning("run batch seq=%d not stored (%s): nacked for a resend", tok.seq, reason)
            tok.sess.failed(
                pb.Nack(
                    seq=tok.seq,
                    code="store_failed",
                    message=f"the collector could not store this batch ({reason[:300]}); send it again",
                    retry=True,
                    retry_after_s=STORE_RETRY_AFTER,
                )
            )
        self._made_room()

    def _made_room(self) -> None:
        if self.pending_samples <= self.max_pending_samples:
            self._room.set()

    def _on_commit(self, tokens: list[Any], new_rows: list[int] | None = None) -> None:
        state = self.state
        for i, tok in enumerate(tokens):
            if isinstance(tok, RunToken):
                # Registered here, not by the waiting Hello: the run exists once its row
                # is committed, even if that session went away meanwhile.
                if tok.rec.run not in state.runs:
                    state.add_run(tok.rec)
                if not tok.done.done():
                    tok.done.set_result(None)
                continue
            if not isinstance(tok, BatchToken):
                continue
            sess = tok.sess
            # Counted here, not on receipt: "ingested" means stored, and only steps new to the
            # history (a resent batch whose steps are stored already adds nothing).
            new = tok.n_steps if new_rows is None else new_rows[i]
            state.steps_ingested += new
            state.samples_ingested += new * (tok.n_samples // tok.n_steps)
            self.pending_samples -= tok.n_samples
            rs = sess.run
            if rs is not None and tok.max_step > rs.stored_step.get(sess.rank, 0):
                rs.stored_step[sess.rank] = tok.max_step
            sess.committed(tok.seq)
        self._made_room()

    # ------------------------------------------------------------ the stream
    async def Session(
        self, request_iterator: AsyncIterator[pb.JobMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        # Tokens are checked for every service by one interceptor (server/auth.py).
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        if len(self.sessions) >= self.limits.max_sessions:
            await self._at_capacity(context)
        sess = LiveSession(asyncio.get_running_loop(), context.peer())
        self.sessions.add(sess)
        self.state.sessions_opened += 1
        self.state.sessions_active += 1
        reader = asyncio.create_task(self._read(request_iterator, sess))
        try:
            while True:
                item = await sess.outbox.get()
                if item is ACK:
                    ack = sess.take_ack()
                    if ack is not None:
                        yield pb.CollectorMessage(ack=ack)
                elif item is END:
                    break
                else:
                    yield item
        finally:
            if not reader.done():
                reader.cancel()
            if not sess.said_goodbye and not sess.ended_by_collector:
                # Job killed, network lost, client cancel, or a message over
                # gRPC's own size limit (refused before it reaches us; only
                # the client is told: RESOURCE_EXHAUSTED).
                self.state.sessions_lost += 1
                self._lost(sess)
            self._detach(sess)

    async def _at_capacity(self, context: grpc.aio.ServicerContext) -> None:
        """Admission control: refuse one session more than ``max_sessions``, counted, with a retry hint.

        RESOURCE_EXHAUSTED before the stream starts, never a silent cancel: the job keeps
        its steps (spool, resend buffer) and comes back after the hint (``retry-after-ms``
        trailing metadata), spread over a second so a crowd does not return at once.
        """
        self.state.reject("too_many_sessions")
        hint_ms = int(1000 * (ADMISSION_RETRY_S + random.random()))
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(hint_ms)),))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the collector holds {len(self.sessions)} ingest sessions, its limit (serve --max-sessions);"
            f" retry in {hint_ms / 1000:.1f} s",
        )

    def _lost(self, sess: LiveSession) -> None:
        """A live job's session ended without Goodbye: the run_lost alert's grace period starts."""
        rs = sess.run
        if rs is None or sess.replay or self.alerts is None:
            return
        self.alerts.lost.on_lost(rs.run, sess.rank, rs.stored_step.get(sess.rank, 0), sess.peer, sess.host, sess.pid)

    def _detach(self, sess: LiveSession) -> None:
        if sess in self.sessions:
            self.sessions.discard(sess)
            self.state.sessions_active -= 1
        if sess.run is not None:
            sess.run.sessions.discard(sess)
            log.info("session closed: run=%s rank=%d peer=%s", sess.run.run, sess.rank, sess.peer)
            if self.cluster is not None and not sess.run.sessions:
                self.cluster.poke()  # tell the other collectors soon that this one let the run go

    def _end(self, sess: LiveSession, code: str, reason: str, message: str) -> None:
        """Refuse the session: count, tell the job why, end the stream."""
        self.state.reject(reason, sess.run)
        log.warning("session rejected (%s) from %s: %s", code, sess.peer, message[:500])
        sess.send(pb.CollectorMessage(error=pb.SessionError(code=code, message=message)))
        sess.ended_by_collector = True
        sess.send(END)

    async def _read(self, requests: AsyncIterator[pb.JobMessage], sess: LiveSession) -> None:
        try:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                if sess.run is None:
                    if kind != "hello":
                        raise SessionReject(
                            "bad_hello", f"the first message must be Hello, got {kind or 'an empty message'}"
                        )
                    await self._hello(msg.hello, sess)
                    continue
                if kind == "steps":
                    while self.pending_samples > self.max_pending_samples and sess.inflight > 0:
                        # Backpressure: stop reading this stream until commits make room (gRPC's
                        # flow control then holds the job's sends), woken by the commit, not a timer.
                        # A session with nothing in flight is always read (fair service: one batch
                        # per session beyond the bound at most), so others' backlog never holds it.
                        self._room.clear()
                        await self._room.wait()
                    self._take(msg.steps, sess)
                    continue
                self.drain_inbox()  # what follows a batch on the stream sees it accepted
                if kind == "control_ack":
                    self._control_ack(msg.control_ack, sess)
                elif kind == "goodbye":
                    sess.said_goodbye = True
                    log.info(
                        "goodbye: run=%s rank=%d last_seq=%d reason=%s",
                        sess.run.run,
                        sess.rank,
                        msg.goodbye.last_seq,
                        msg.goodbye.reason[:200],
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
        except SessionReject as exc:  # bad Hello or protocol violation: report and end the stream
            self._end(sess, exc.code, exc.reason, exc.message)
            return
        except MessageRefused as exc:  # from our deserializer: too large or not a JobMessage
            self._end(sess, exc.reason, exc.reason, exc.message)
            return
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as exc:
            self._stream_error(sess, exc)
        except Exception as exc:  # a bug of ours or of gRPC: the session ends, the collector goes on
            self._stream_error(sess, exc)
        self.drain_inbox()
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
    async def _hello(self, hello: pb.Hello, sess: LiveSession) -> None:
        layers = validate_hello(hello, self.limits)
        state = self.state
        key_hash = hash_run_key(hello.run_key)
        created = False
        while True:
            rs = state.runs.get(hello.run)
            if rs is not None:
                break
            pending = self.creating.get(hello.run)
            if pending is not None:
                # Another session is creating this run: wait for its row, then join it as an existing run.
                await asyncio.shield(pending)
                if hello.run not in state.runs:
                    raise SessionReject(
                        "store_failed", f"run {hello.run!r} could not be created; try again", "store_failed"
                    )
                continue
            rs = await self._create_run(hello, layers, key_hash)
            created = not rs.held_elsewhere
            break
        if self.cluster is not None and not rs.sessions and (rs.held_elsewhere or rs.remote_sessions):
            await self._refresh(rs)  # fed through another collector: its stored steps, newest values
        self._check_owner(hello, rs, key_hash)
        if hello.total_steps > 0 and not hello.replay:
            rs.total_steps = int(hello.total_steps)  # a resumed job may plan a longer run
        if not created:
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
        sess.replay = hello.replay
        sess.capabilities = {} if hello.replay else capabilities(hello)
        sess.applied_command_version = hello.applied_command_version
        # Each session computes rotations against its own ||w(0)||: a resumed
        # job or another rank may carry (slightly) different init norms.
        sess.init_norm = np.array([lay.init_norm for lay in layers], dtype=np.float64)
        sess.num_layers = len(layers)
        sess.send(
            pb.CollectorMessage(
                welcome=pb.Welcome(collector_version=__version__, stored_step=rs.stored_step.get(hello.rank, 0))
            )
        )
        log.info(
            "session opened: run=%s rank=%d/%d pid=%d host=%s peer=%s%s",
            rs.run,
            sess.rank,
            sess.world_size,
            sess.pid,
            sess.host,
            sess.peer,
            " (replay)" if sess.replay else "",
        )
        if sess.replay:
            return  # history only: not connected, no commands
        rs.sessions.add(sess)
        if self.cluster is not None:
            if not rs.remote_sessions:
                rs.held_elsewhere = False  # exported here from now on (the next cluster pass confirms)
            self.cluster.poke()
        if self.alerts is not None:
            self.alerts.lost.on_hello(rs.run, sess.rank)  # a lost job is back
        self.control.on_hello(sess)

    async def _create_run(self, hello: pb.Hello, layers: list, key_hash: str | None) -> RunState:
        """Commit a new run's row and layer table, then return its state; the session waits for the commit."""
        state = self.state
        if len(state.runs) + len(self.creating) >= self.limits.max_runs:
            raise SessionReject(
                "too_many_runs",
                f"this collector holds {len(state.runs)} runs, its limit (max_runs={self.limits.max_runs}); "
                "reuse a run name or ask the operator",
                "too_many_runs",
            )
        run_id = None
        if self.cluster is not None:  # ids from the database's sequence: unique over every collector on it
            try:
                run_id = await asyncio.get_running_loop().run_in_executor(None, self.store.allocate_run_id)
            except StoreError as exc:
                raise SessionReject(
                    "store_failed", f"the collector could not allocate a run id ({str(exc)[:300]}); try again later"
                ) from None
        rec = RunRecord(
            run_id=state.next_run_id if run_id is None else run_id,
            run=hello.run,
            framework=hello.framework,
            framework_version=hello.framework_version,
            host=hello.host,
            world_size=max(1, hello.world_size),
            every=max(1, hello.every),
            capabilities=capabilities(hello),
            meta=hello_meta(hello),
            created=time.time(),
            last_seen=None,
            first_report=None,
            nonfinite=0,
            layers=layers,
            key_hash=key_hash,
        )
        state.next_run_id += 1  # burnt if the creation fails: nothing is stored under it
        done = asyncio.get_running_loop().create_future()
        self.creating[hello.run] = done
        try:
            try:
                self.store.create_run(rec, token=RunToken(rec, done))
            except StoreValueError as exc:  # validate_hello should have caught it: a bug, refuse this run only
                raise SessionReject("bad_hello", f"run {hello.run!r} cannot be stored: {exc}") from None
            failure = await asyncio.shield(done)
        finally:
            if self.creating.get(hello.run) is done:
                del self.creating[hello.run]
        if failure is not None and self.cluster is not None:
            # Another collector of the database may have created the same run a moment earlier: join it.
            joined = await self._stored_run(hello.run)
            if joined is not None:
                return joined
        if failure is not None:
            raise SessionReject(
                "store_failed",
                f"the collector could not store the new run {hello.run!r} ({str(failure)[:300]}); try again later",
                "store_failed",
            )
        log.info("new run %s: %d layers, framework=%s host=%s", rec.run, len(layers), rec.framework, rec.host)
        return state.runs[hello.run]

    async def _stored_run(self, run: str) -> RunState | None:
        """The run of that name as stored (created through another collector), now in the state; None if none."""

        def read() -> tuple[list[RunRecord], StoredControl | None]:
            recs = self.store.load_runs(names=[run])
            ids = [rec.run_id for rec in recs]
            return recs, self.control.read_stored(ids, ids) if recs else None

        try:
            recs, control = await asyncio.get_running_loop().run_in_executor(None, read)
        except StoreError:
            return None
        if not recs or control is None:
            return None
        if run not in self.state.runs:
            self.control.apply_stored(self.state.restore(recs, held_elsewhere=True), control)
        log.info("run %s was created through another collector: joined", run)
        return self.state.runs[run]

    async def _refresh(self, rs: RunState) -> None:
        """Take the stored steps and newest values of a run another collector fed (for the Welcome)."""
        loop = asyncio.get_running_loop()
        try:
            recs = await loop.run_in_executor(None, functools.partial(self.store.load_runs, run_ids=[rs.run_id]))
        except StoreError:
            log.warning("run %s: cannot read its stored steps; the job may resend some", rs.run)
            return
        if recs:
            rs.refresh(recs[0])

    @staticmethod
    def _check_owner(hello: pb.Hello, rs: RunState, key_hash: str | None) -> None:
        """Refuse a Hello for a run bound to another key (or to a key when it sends none)."""
        if rs.key_hash is None:
            return  # unbound (created by a client without keys): open to any key, as before
        if key_hash is not None and hmac.compare_digest(key_hash, rs.key_hash):
            return
        what = "carries no run key" if key_hash is None else "carries another run key"
        raise SessionReject(
            "run_owned",
            f"run {hello.run!r} belongs to the job that created it and this Hello {what}; resume that job"
            " (load its state_dict), sync its spool, or use a new run name",
            "run_owned",
        )

    # ------------------------------------------------------------ StepBatch
    def _take(self, b: pb.StepBatch, sess: LiveSession) -> None:
        """A StepBatch read from ``sess``: check its seq now, run the pipeline with the others read this turn.

        The batches every stream delivers in one turn of the loop go through ``_batches``
        together, at the start of the next turn (or before the next non-batch message
        of their stream, ``drain_inbox``), in the order they were read.
        """
        seq = b.seq
        if seq <= sess.last_seq:
            # Acks are by seq: a seq that does not increase would make them ambiguous.
            raise SessionReject(
                "bad_seq", f"batch seq {seq} after seq {sess.last_seq}: seqs start at 1 and increase in a session"
            )
        sess.last_seq = seq
        self._inbox.append((b, sess))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self.drain_inbox)

    def drain_inbox(self) -> None:
        """Run the StepBatch pipeline on every batch taken and not yet processed."""
        self._drain_scheduled = False
        if not self._inbox:
            return
        inbox, self._inbox = self._inbox, []
        self.state.pipeline_batches += len(inbox)
        self.state.pipeline_passes += 1
        self._batches(inbox)

    def _batches(self, items: list[tuple[pb.StepBatch, LiveSession]]) -> None:
        """The StepBatch pipeline: decode -> check and derive (stacked over the batches) -> alerts -> rows, state."""
        decoded: list[tuple[LiveSession, int, DecodedBatch]] = []
        for b, sess in items:
            try:
                decoded.append((sess, b.seq, decode_batch(b, sess.num_layers, self.limits)))
            except SessionReject as exc:
                self._refuse_batch(b.seq, sess, sess.run, exc)  # type: ignore[arg-type]
        if not decoded:
            return
        derived_all = derive_many([d[2] for d in decoded], [d[0].init_norm for d in decoded])  # type: ignore[misc]
        alerts = self.alerts
        observe = alerts is not None and alerts.enabled
        for (sess, seq, batch), derived in zip(decoded, derived_all):
            rs = sess.run
            assert rs is not None  # set by the session's Hello
            if isinstance(derived, SessionReject):
                self._refuse_batch(seq, sess, rs, derived)
                continue
            try:
                if observe:  # vectorised, never raises
                    alerts.observe(  # type: ignore[union-attr]
                        rs, sess.rank, batch.steps, derived.angle, derived.bad, batch.rho, batch.loss, derived.rotation
                    )
                rows = step_rows(batch, derived, rs.run_id, sess.rank)
                snap = newest_snapshot(batch, derived, sess.rank)
                self._record(seq, sess, batch.num_steps, rows, snap, derived.nonfinite)
            except Exception as exc:  # a bug of ours: this session ends (its job resends), the others go on
                log.exception("run %s rank %d: batch seq=%d failed in the pipeline", rs.run, sess.rank, seq)
                self._end(sess, "internal", "internal_error", f"the collector failed on batch seq={seq}: {exc}")

    def _refuse_batch(self, seq: int, sess: LiveSession, rs: RunState, exc: SessionReject) -> None:
        self.state.reject(exc.reason, rs)
        log.warning("run %s rank %d: batch seq=%d rejected: %s", rs.run, sess.rank, seq, exc.message)
        # The SessionError is what older clients read; the Nack (retry=false) is
        # the answer: a malformed batch stays malformed, resending it would loop.
        sess.send(pb.CollectorMessage(error=pb.SessionError(code=exc.code, message=exc.message, seq=seq)))
        sess.failed(pb.Nack(seq=seq, code=exc.code, message=exc.message, retry=False))

    def _record(
        self, seq: int, sess: LiveSession, n_steps: int, rows: list[tuple], snap: Snapshot, nonfinite: int
    ) -> None:
        """Update the run state (one published view) and queue the batch for the store; its commit acks ``seq``."""
        rs = sess.run
        assert rs is not None
        n_samples = n_steps * sess.num_layers
        first = rs.view.first_report is None
        token = BatchToken(sess, seq, n_steps, n_samples, max(r[2] for r in rows))
        # Fair service: the batch of a run with nothing else queued takes the store's fast lane, so
        # a light job's ack waits for one transaction, not for the saturated jobs' backlog.
        # A run's first batch too (a light job's first ack is its first batch's): its run row is
        # committed already, since a run is in the state only once its row is (_create_run waits
        # for that commit before the Welcome, on_store_commit adds it).
        urgent = sess.inflight == 0 and all(s.inflight == 0 for s in rs.sessions)
        try:
            self.store.submit_batch(
                rows,
                rs.run_id,
                max(rs.last_report or snap.time, snap.time),
                rs.nonfinite + nonfinite,
                first_report=snap.time if first else None,
                token=token,
                urgent=urgent,
            )
        except StoreValueError as exc:  # decode_batch should have caught it: a bug, refuse this batch only
            self._refuse_batch(seq, sess, rs, SessionReject("bad_batch", f"cannot be stored: {exc}"))
            return
        self.pending_samples += n_samples
        sess.queued(seq)
        rs.record_batch(snap, nonfinite)

    # ------------------------------------------------------------ ControlAck
    def _control_ack(self, ack: pb.ControlAck, sess: LiveSession) -> None:
        rs = sess.run
        assert rs is not None
        if sess.replay:
            self.state.reject("bad_control_ack", rs)  # a replay takes no commands, so it answers none
            return
        if ack.version > INT64_MAX or ack.step > INT64_MAX:
            self.state.reject("bad_control_ack", rs)
            log.warning("run %s rank %d: ControlAck out of range ignored", rs.run, sess.rank)
            return
        if len(ack.reason) > MAX_ACK_REASON:
            ack.reason = ack.reason[:MAX_ACK_REASON] + "..."
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
