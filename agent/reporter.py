"""In-process reporter: hands per-step layer measurements to the collector, and to the spool.

Shaped like OpenTelemetry's ``BatchSpanProcessor``: the training thread only
enqueues (never blocks, never touches the disk or the network); a background
exporter thread batches steps into columnar ``StepBatch`` messages and appends
each to the run's on-disk spool (:mod:`layrot.agent.spool`); a connection thread
keeps one bidirectional gRPC session open, sends what the collector has not
stored (the spool's leftovers first), and delivers control commands.

Delivery is exact: a batch leaves the resend buffer and the spool only when an
``Ack`` names it (``Ack.seq`` covers every batch up to it, ``Ack.stored`` single
batches above it). A ``Nack`` with ``retry`` keeps the batch and sends it again
under a new sequence number; one without is a refusal for good, counted in
``dropped_refused``. So, as the job sees it: *acked => stored*, and every step
that is truly gone is counted in ``stats.dropped``; a step that is neither acked
nor dropped is in the spool (``stats.spool_pending_steps``), where a resumed job
or ``layrot-agent sync`` picks it up.
"""

from __future__ import annotations

import atexit
import heapq
import logging
import os
import queue
import random
import secrets
import socket
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from layrot.agent.local_view import LayerReport, LocalView
from layrot.agent.spool import DEFAULT_MAX_BYTES, Spool, default_spool_root, spool_dir_name
from layrot.agent.transport import (
    RUN_METADATA_KEY,
    TLSConfig,
    collector_order,
    explain_connection_error,
    header_value,
    open_channel,
    split_collectors,
)
from layrot.proto import layrot_pb2 as pb
from layrot.proto.wire import pack

log = logging.getLogger(__name__)

DEFAULT_COLLECTOR = "localhost:50051"
#: ``collector=`` value (and ``LAYROT_MODE=offline``) that records to the spool only.
OFFLINE = "offline"
#: Longest run name the collector accepts (``server/decode.py`` has the same; a test checks they agree).
MAX_RUN_NAME = 200
#: Hello refusals that no retry can fix: this process stops trying (its steps stay in the spool).
FINAL_REFUSALS = frozenset({"run_owned", "bad_hello", "layer_table_mismatch", "unauthenticated"})
SESSION_METHOD = "/layrot.v1.Ingest/Session"
_STOP = object()
#: Rows a measurement resolves to for the reporter (``StepBatch`` fields), in this order. The
#: measurement contract (:mod:`layrot.agent.measurement`) re-exports them: hooks compute its
#: ``DEVICE_ROWS`` on the device, and these wire rows are derived from them on the host.
WIRE_ROWS = ("norm", "dist0", "dstep", "norm_prev", "dot0", "dotstep")
# The exporter's batching (Reporter's flush_interval / max_flush_interval / max_batch_bytes defaults).
FLUSH_INTERVAL = 0.05
MAX_FLUSH_INTERVAL = 2.0
MAX_BATCH_BYTES = 1 << 20
# Weight of the newest ack's latency in the smoothed one (an exponential moving average).
ACK_LATENCY_WEIGHT = 0.2
ROWS = WIRE_ROWS  # the former name, still imported by older code


def default_run_name() -> str:
    """``LAYROT_RUN`` or ``<script>-<yyyymmdd-hhmmss>-<host>``: the run id when the job names none."""
    env = os.environ.get("LAYROT_RUN")
    if env:
        return env
    script = os.path.splitext(os.path.basename(sys.argv[0] or "python"))[0] or "python"
    return f"{script}-{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}"


def collector_address(collector: str | None = None) -> str:
    """The collector address: explicit, else ``LAYROT_COLLECTOR``, else localhost:50051.

    It may be a list, ``a:50051,b:50051``: the job then picks one collector by its run
    name (:func:`layrot.agent.transport.collector_order`) and fails over to the next.

    ``LAYROT_MODE=offline`` overrides everything (an operator switch that needs no code change).
    """
    if os.environ.get("LAYROT_MODE", "").strip().lower() == OFFLINE:
        return OFFLINE
    return collector or os.environ.get("LAYROT_COLLECTOR") or DEFAULT_COLLECTOR


def check_run_name(run: str) -> str:
    """``run`` if the collector would accept it (1..MAX_RUN_NAME printable characters), else ValueError."""
    if not isinstance(run, str) or not run:
        raise ValueError("the run name is empty")
    if len(run) > MAX_RUN_NAME:
        raise ValueError(f"the run name has {len(run)} characters; the collector accepts at most {MAX_RUN_NAME}")
    if not run.isprintable():
        raise ValueError(f"the run name {run!r} has non-printable characters")
    return run


def spool_settings(spool: bool | None = None, max_bytes: int | None = None) -> tuple[bool, int]:
    """(spool on, its bound in bytes): explicit values, else ``LAYROT_SPOOL`` / ``LAYROT_SPOOL_MAX_BYTES``.

    Raises ValueError for a bound that is not a positive integer (checked before training starts).
    """
    if spool is None:
        spool = os.environ.get("LAYROT_SPOOL", "1").strip().lower() not in ("0", "false", "no", "off")
    if max_bytes is None:
        env = os.environ.get("LAYROT_SPOOL_MAX_BYTES")
        try:
            max_bytes = int(env) if env else DEFAULT_MAX_BYTES
        except ValueError:
            raise ValueError(f"LAYROT_SPOOL_MAX_BYTES must be a number of bytes, got {env!r}") from None
    if int(max_bytes) <= 0:
        raise ValueError(f"spool_max_bytes must be > 0, got {max_bytes}")
    return bool(spool), int(max_bytes)


def check_collector(collector: str | None, tls: TLSConfig | None = None) -> str:
    """The resolved collector address (or ``"offline"``), checked; raises ValueError before training starts.

    A list ``a:50051,b:50051`` is checked address by address.
    """
    address = collector_address(collector)
    if address == OFFLINE:
        return address
    split_collectors(address)
    tls = tls if tls is not None else TLSConfig.from_env()
    if tls.enabled:
        tls.credentials()  # reads the files now: a wrong path is a ValueError here, not a warning later
    return address


def new_run_key() -> str:
    """``LAYROT_RUN_KEY`` when set (every rank of a launcher-started job shares it), else a fresh random key."""
    return os.environ.get("LAYROT_RUN_KEY") or secrets.token_hex(16)


@dataclass(frozen=True)
class LayerSpec:
    """One monitored layer as announced in ``Hello``."""

    name: str
    index: int
    shape: tuple[int, ...]
    init_norm: float
    numel: int
    module_type: str = ""
    sharded: bool = False  # FSDP: shape, numel and init_norm are the whole layer's

    def to_proto(self) -> pb.Layer:
        return pb.Layer(
            name=self.name,
            index=self.index,
            shape=list(self.shape),
            init_norm=float(self.init_norm),
            numel=int(self.numel),
            module_type=self.module_type,
            sharded=bool(self.sharded),
        )


@dataclass
class StepRecord:
    """One reported step as the training thread hands it over.

    ``values`` resolves (on the exporter thread, where waiting is harmless) to the
    wire rows: a float array of shape ``(len(WIRE_ROWS), L)`` with the rows of
    :data:`WIRE_ROWS` (what :meth:`layrot.agent.measurement.PackedMeasurement.values`
    derives from a hook's packed device rows). ``loss`` resolves to a float or None.
    Resolving may wait for the device.
    """

    step: int
    time: float
    values: Callable[[], np.ndarray] | np.ndarray
    loss: Callable[[], float | None] | float | None = None
    rho: np.ndarray | None = None
    command_version: int = 0


def batch_wait(flush_interval: float, max_flush_interval: float, waiting: int, ack_latency: float = 0.0) -> float:
    """Seconds the exporter lets a batch fill while ``waiting`` batches wait for their acks.

    Each waiting batch adds one ``flush_interval``, and the wait is never shorter than
    the recent ``ack_latency`` (seconds from a batch's send to its ack), up to
    ``max_flush_interval``: a job sends one-step batches while the collector keeps up,
    and fewer, bigger ones when it falls behind (see ``Reporter._batch_wait``).
    """
    return min(max_flush_interval, max(flush_interval * (1 + waiting), ack_latency))


def smoothed_ack_latency(current: float, sample: float) -> float:
    """The smoothed ack latency after one more ack's ``sample`` (an exponential moving average).

    Smoothed over a few acks: one slow commit should not make the next batches long.
    """
    return current + ACK_LATENCY_WEIGHT * (sample - current)


def batch_step_bound(num_layers: int, max_batch_bytes: int = MAX_BATCH_BYTES) -> int:
    """Steps a batch holds at most: ``max_batch_bytes`` of wire rows and rho (float64), 256 at most."""
    per_step = 8 * max(1, num_layers) * (len(WIRE_ROWS) + 1) + 64
    return max(1, min(256, max_batch_bytes // per_step))


@dataclass
class ReporterStats:
    """Counters a user can read from ``handle.stats``.

    Every reported step ends in exactly one of: ``acked_steps`` (the collector
    stored it), one of the ``dropped_*`` counters (it is gone, and why), or the
    spool (``spool_pending_steps``, not acknowledged yet but kept on disk).
    ``sent_steps`` counts steps written to a live stream (resends included), so it
    can exceed ``acked_steps``; it stays 0 without a collector.
    """

    submitted: int = 0
    sent_steps: int = 0
    #: StepBatch messages written to a live stream (resends included): fewer per step when the collector lags.
    sent_batches: int = 0
    acked_steps: int = 0
    spooled_steps: int = 0
    spool_pending_steps: int = 0
    dropped_queue_full: int = 0
    dropped_unacked_overflow: int = 0
    dropped_spool: int = 0
    dropped_refused: int = 0
    dropped_at_close: int = 0
    dropped_bad_values: int = 0
    retried_batches: int = 0
    reconnects: int = 0
    session_errors: int = 0
    commands_received: int = 0
    #: Exceptions a watch handle caught in its hooks after setup (training went on; the first stops
    #: its measurements). Set by the handle, not by the reporter.
    hook_errors: int = 0
    #: Batches the exporter thread failed to pack (their steps count in ``dropped_bad_values``).
    export_errors: int = 0
    #: Exceptions of ``on_report`` callbacks (logged once; reporting went on).
    report_callback_errors: int = 0
    #: Sessions the collector refused at its session limit (the job waited its retry hint, then came back).
    admission_refusals: int = 0
    connected: bool = False
    refused: str = ""
    spool_dir: str = ""
    last_error: str = ""

    @property
    def dropped(self) -> int:
        """Steps that are truly gone (never stored, not kept anywhere)."""
        return (
            self.dropped_queue_full
            + self.dropped_unacked_overflow
            + self.dropped_spool
            + self.dropped_refused
            + self.dropped_at_close
            + self.dropped_bad_values
        )


def _retry_after(exc: grpc.RpcError) -> float:
    """Seconds the collector asked a refused session to wait (``retry-after-ms`` trailing metadata), else 0."""
    try:
        for key, value in exc.trailing_metadata() or ():
            if key == "retry-after-ms":
                return max(0.0, min(float(value) / 1000.0, 300.0))
    except Exception:  # no metadata on this error, or a malformed value
        pass
    return 0.0


def _resolve(x: Any) -> Any:
    return x() if callable(x) else x


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def frame_batch(payload: bytes, seq: int) -> bytes:
    """A serialized ``JobMessage(steps=...)`` from a serialized ``StepBatch`` without seq, and its seq.

    Protobuf parsers take the last value of a field, so appending ``seq`` (field 1)
    to the stored bytes sets it; a resend under a new seq costs no parse.
    """
    inner = payload + b"\x08" + _varint(seq)
    return b"\x12" + _varint(len(inner)) + inner


def serialize_request(msg: Any) -> bytes:
    """The session's request serializer: raw bytes from :func:`frame_batch` pass through."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def session_call(channel: grpc.Channel) -> Any:
    """The ``Ingest.Session`` method on ``channel``, taking messages or pre-framed bytes."""
    return channel.stream_stream(
        SESSION_METHOD, request_serializer=serialize_request, response_deserializer=pb.CollectorMessage.FromString
    )


def check_total_steps(total_steps: int | None) -> int:
    """The planned last step as the Hello carries it (0 = unknown); ValueError for a negative or non-integer one."""
    if total_steps is None:
        return 0
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 0:
        raise ValueError(f"total_steps must be an integer >= 0 (0 or None = unknown), got {total_steps!r}")
    return int(total_steps)


def same_binding(a: pb.Hello, b: pb.Hello) -> bool:
    """Whether batches recorded under Hello ``a`` mean the same under ``b`` (same key and layer table)."""

    def table(h: pb.Hello) -> list[tuple[str, float, tuple[int, ...]]]:
        return [(lay.name, lay.init_norm, tuple(lay.shape)) for lay in h.layers]

    return a.run == b.run and a.rank == b.rank and a.run_key == b.run_key and table(a) == table(b)


@dataclass(eq=False)
class _Entry:
    """One packed batch not yet stored by the collector."""

    key: int  # order of packing (leftovers of a previous process first)
    steps: int
    payload: bytes | None  # serialized StepBatch without seq; None: only on disk
    rid: int | None  # spool record id; None: only in memory
    seq: int = 0  # seq on the current session while in flight, 0 otherwise
    sent_at: float = 0.0  # monotonic time it was handed to the stream (its ack latency's start)
    lost: str = ""  # counter to charge if it must be resent but cannot be (no payload, no record)
    refused: bool = False  # an old collector's SessionError named it; its later Ack is not a store


@dataclass(eq=False)
class _Session:
    """State of one Ingest.Session stream (touched under the reporter's lock)."""

    seq: int = 0
    inflight: OrderedDict[int, _Entry] = field(default_factory=OrderedDict)
    welcomed: bool = False
    done: bool = False
    refusal: pb.SessionError | None = None


class _Marker:
    """Travels through the queue behind everything submitted before it (flush, close)."""

    __slots__ = ("event", "key", "stop")

    def __init__(self, stop: bool = False) -> None:
        self.event = threading.Event()
        self.key = 0
        self.stop = stop


class Reporter:
    """Streams step measurements of one process to the collector, through the run's spool.

    Args:
        run: run id shared by all ranks of the job.
        layers: the layer table, forward order.
        collector: ``host:port``, or ``"offline"`` to record to the spool only; defaults
            to ``LAYROT_COLLECTOR`` or localhost:50051 (``LAYROT_MODE=offline`` forces offline).
        token: bearer token (``LAYROT_TOKEN``) when the collector requires one.
        tls: client TLS settings (default ``TLSConfig.from_env()``: ``LAYROT_TLS_CA`` ...).
        run_key: the job's secret binding of the run (sent in Hello, kept in the spool); default
            :func:`new_run_key`. A spool the previous process left for this run and rank lends
            its key unless ``run_key_restored`` (the key came from a checkpoint).
        spool: keep every batch on disk until it is acknowledged (default on, ``LAYROT_SPOOL=0`` off).
        spool_dir: spool root (default :func:`layrot.agent.spool.default_spool_root`).
        spool_max_bytes: the spool's bound (default 1 GiB, ``LAYROT_SPOOL_MAX_BYTES``).
        on_command: called on the connection thread with each ``RateCommand``;
            must return quickly.
        total_steps: the optimizer step the job plans to end at, sent in the Hello (0 or
            None = unknown); the collector judges ``not_learning`` at a share of it.
        max_queue: steps waiting for the exporter before new ones are dropped.
        max_unacked_bytes: bytes of unacknowledged batches kept in memory for resending;
            beyond it the oldest are read back from the spool when needed (without
            a spool they are dropped and counted).
        flush_interval: seconds the exporter waits to fill a batch while the collector keeps up;
            each batch waiting for its ack lengthens the wait by as much again, and the wait
            is never shorter than the recent ack latency, up to ``max_flush_interval``, so a
            loaded collector gets bigger batches, not more of them.
        max_flush_interval: the longest wait (seconds) for a batch to fill.
        max_inflight: batches sent on a session and not yet acknowledged before sending pauses.
        welcome_timeout: seconds to wait for the collector's ``Welcome`` before sending
            batches anyway (a collector older than ``Welcome`` sends none).
    """

    def __init__(
        self,
        run: str,
        layers: Sequence[LayerSpec],
        *,
        collector: str | None = None,
        token: str | None = None,
        tls: TLSConfig | None = None,
        run_key: str | None = None,
        run_key_restored: bool = False,
        framework: str = "pytorch",
        framework_version: str = "",
        rank: int = 0,
        world_size: int = 1,
        every: int = 1,
        layca: bool = False,
        control: bool = False,
        loss: bool = False,
        meta: dict[str, str] | None = None,
        on_command: Callable[[pb.RateCommand], None] | None = None,
        on_report: Callable[[LayerReport], object] | None = None,
        total_steps: int | None = None,
        spool: bool | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int | None = None,
        max_queue: int = 4096,
        max_unacked_bytes: int = 64 << 20,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        flush_interval: float = FLUSH_INTERVAL,
        max_flush_interval: float = MAX_FLUSH_INTERVAL,
        backoff_initial: float = 0.25,
        backoff_max: float = 10.0,
        max_inflight: int = 256,
        welcome_timeout: float = 1.0,
    ) -> None:
        from layrot.core.version import __version__

        self.address = collector_address(collector)
        self.offline = self.address == OFFLINE
        # Several collectors (``a:50051,b:50051``): one order per run name, the same in every process
        # of the run, so its sessions land on one collector; ``self.address`` is the one tried now.
        self._addresses = [self.address] if self.offline else collector_order(split_collectors(self.address), run)
        self._pick = 0
        self.address = self._addresses[0]
        self.token = token if token is not None else os.environ.get("LAYROT_TOKEN")
        self.tls = tls if tls is not None else TLSConfig.from_env()
        self.run = run
        self.rank = int(rank)
        self.layers = list(layers)
        self.num_layers = len(self.layers)
        self.stats = ReporterStats()
        self.on_command = on_command
        # The job's own view of each reported step (agent/local_view.py): handle.latest(), on_report.
        self.local = LocalView(run, [lay.name for lay in self.layers], [lay.init_norm for lay in self.layers])
        if on_report is not None:
            self.local.callbacks.append(on_report)
        self.run_key = run_key or new_run_key()
        self._key_restored = bool(run_key_restored and run_key)
        self._spool_on, self._spool_max = spool_settings(spool, spool_max_bytes)
        if self.offline and not self._spool_on:
            raise ValueError("offline mode records to the spool only: it cannot run with spool=False")
        self._spool_root = Path(spool_dir) if spool_dir is not None else default_spool_root()
        self.spool_path = self._spool_root / spool_dir_name(run, self.rank)
        self._hello = pb.Hello(
            run=run,
            rank=rank,
            world_size=world_size,
            framework=framework,
            framework_version=framework_version,
            host=socket.gethostname(),
            pid=os.getpid(),
            layers=[layer.to_proto() for layer in self.layers],
            capabilities=pb.Capabilities(layca=layca, control=control, loss=loss),
            client_version=__version__,
            every=every,
            meta=dict(meta or {}),
            session_id=uuid.uuid4().hex,
            run_key=self.run_key,
            total_steps=check_total_steps(total_steps),
        )
        self._queue: queue.Queue[StepRecord | object] = queue.Queue(maxsize=max_queue)
        self._max_unacked_bytes = max_unacked_bytes
        self._batch_steps = batch_step_bound(self.num_layers, max_batch_bytes)
        self._flush_interval = flush_interval
        self._max_flush_interval = max(flush_interval, max_flush_interval)
        self._backoff = (backoff_initial, backoff_max)
        self._max_inflight = max(1, int(max_inflight))
        self._welcome_timeout = welcome_timeout

        # Everything below is guarded by _lock; no disk or network I/O ever happens under it,
        # so the training thread (control acks) and the exporter only ever wait microseconds.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # key order = send order
        self._ack_latency = 0.0  # seconds from send to ack, smoothed (batch_wait's lower bound)
        self._by_rid: dict[int, _Entry] = {}
        self._mem_order: deque[_Entry] = deque()  # entries holding a payload, oldest first
        self._mem_bytes = 0
        self._todo: deque[_Entry] = deque()  # to send on the current session, in order
        self._retry: list[tuple[float, int, _Entry]] = []  # (due, key, entry): Nacked, resent when due
        self._next_key = 1
        self._sess: _Session | None = None
        self._pending_acks: list[pb.JobMessage] = []
        self._call: Any = None
        self._spool: Spool | None = None
        self._leftovers: list[Path] = []  # spools of a previous process with another Hello, uploaded on connect
        self._goodbye = False  # close(): end the request stream with Goodbye
        self._closing = threading.Event()  # stop the connection thread
        self._closed = False
        self._ready = threading.Event()  # the exporter opened the spool (its leftovers are entries)
        self._exporter_done = threading.Event()
        self._warned_down = False
        self._warned_full = False
        self._warned_codes: set[str] = set()
        self._dropped_seen = 0  # stats.dropped when the previous flush returned

        self._exporter = threading.Thread(target=self._export_loop, name="layrot-exporter", daemon=True)
        self._exporter.start()
        self._conn: threading.Thread | None = None
        if not self.offline:
            self._conn = threading.Thread(target=self._connection_loop, name="layrot-connection", daemon=True)
            self._conn.start()
        _live_reporters.add(self)

    # ------------------------------------------------------------ training side

    def submit(self, record: StepRecord) -> bool:
        """Queue one step; never blocks. Returns False (and counts) when dropped."""
        self.stats.submitted += 1
        try:
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            self.stats.dropped_queue_full += 1
            if not self._warned_full:
                self._warned_full = True
                log.warning(
                    "layrot: report queue full (%d steps); dropping steps, training continues", self._queue.maxsize
                )
            return False

    def send_control_ack(self, version: int, applied: bool, reason: str, step: int) -> None:
        """Tell the collector whether a RateCommand was applied (thread-safe, no I/O)."""
        msg = pb.JobMessage(control_ack=pb.ControlAck(version=version, applied=applied, reason=reason, step=step))
        with self._cond:
            # Sent by the session's request stream; kept for the next (re)connect meanwhile.
            self._pending_acks = (self._pending_acks + [msg])[-16:]
            self._cond.notify_all()

    def command_result(self, version: int, applied: bool, reason: str, step: int) -> None:
        """Layca command listener: acknowledge the result and announce the version on reconnect."""
        if applied:
            self.set_applied_version(version)
        self.send_control_ack(version, applied, reason, step)

    def set_applied_version(self, version: int) -> None:
        """Version announced in Hello on the next reconnect."""
        self._hello.applied_command_version = version

    def set_total_steps(self, total_steps: int | None) -> None:
        """The planned last step announced in Hello from the next (re)connect on (0 or None = unknown)."""
        self._hello.total_steps = check_total_steps(total_steps)

    @property
    def unacked_steps(self) -> int:
        """Steps packed and not yet acknowledged (in memory or in the spool)."""
        with self._lock:
            return sum(e.steps for e in self._entries.values())

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted before this call is acknowledged by the collector.

        A marker goes through the queue behind those steps, so the exporter has packed
        them all when it comes out; then this waits for their acks. True only if all of
        them were acknowledged and no step was dropped since the previous flush (a drop
        makes one flush say so); False on timeout, when
        the collector refused the run, or (offline) when there is no collector to ask:
        offline, True means everything is written to the spool.
        """
        deadline = time.monotonic() + timeout
        dropped = self._dropped_seen
        try:
            marker = self._mark(deadline)
            if marker is None:
                return False
            if self.offline:
                return self.stats.dropped == dropped
            with self._cond:
                while not self._covered(marker.key) and not self.stats.refused:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 0.25))
                return self._covered(marker.key) and self.stats.dropped == dropped
        finally:
            self._dropped_seen = self.stats.dropped

    def close(self, timeout: float = 5.0) -> None:
        """Pack what is queued, wait (up to ``timeout``) for the collector to store it, say Goodbye, stop.

        This waits for a first connection too, so a short job that ends before the
        collector answered still delivers its steps. What is left unacknowledged
        stays in the spool (the warning says where); only steps that cannot be kept
        are counted as dropped at close.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        marker = self._mark(deadline, stop=True)
        if marker is None:  # the exporter is stuck (e.g. waiting on a device): stop it anyway
            self._exporter_done.wait(0.5)
        if self._conn is not None:
            with self._cond:
                while self._entries and not self.stats.refused:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 0.25))
                self._goodbye = True
                if self._sess is None:  # not connected: nobody to say Goodbye to
                    self._closing.set()
                self._cond.notify_all()
                call = self._call
            self._conn.join(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
            self._closing.set()
            with self._cond:
                self._cond.notify_all()
            if self._conn.is_alive() and call is not None:
                call.cancel()
            self._conn.join(timeout=1.0)
        with self._lock:
            kept = sum(e.steps for e in self._entries.values() if e.rid is not None)
            lost = sum(e.steps for e in self._entries.values() if e.rid is None)
            self.stats.dropped_at_close += lost
            self.stats.spool_pending_steps = kept
        unpacked = self._queue.qsize()  # only if the exporter could not finish in time
        self.stats.dropped_at_close += unpacked
        if self._spool is not None:
            self._spool.close()  # removes the folder when nothing is left in it
        where = str(self.spool_path)
        if self.offline:
            log.info(
                "layrot: offline run %s: %d steps recorded in the spool %s; upload them with "
                "`layrot-agent sync --collector HOST:PORT`",
                self.run,
                kept,
                where,
            )
        elif kept:
            log.warning(
                "layrot: closed with %d steps not acknowledged by the collector; they are kept in the spool %s "
                "(a resumed job replays them, or run `layrot-agent sync`)",
                kept,
                where,
            )
        if lost or unpacked:
            log.warning("layrot: closed with %d reported steps not acknowledged and not kept: lost", lost + unpacked)
        _live_reporters.discard(self)

    def _mark(self, deadline: float, stop: bool = False) -> _Marker | None:
        """Put a marker behind what is queued and wait for the exporter to pass it; None on timeout."""
        if self._exporter_done.is_set():
            return None
        marker = _Marker(stop)
        try:
            self._queue.put(marker, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            return None
        return marker if marker.event.wait(max(0.0, deadline - time.monotonic())) else None

    def _covered(self, key: int) -> bool:
        """No entry packed at or before ``key`` is still waiting (under the lock)."""
        return not self._entries or next(iter(self._entries)) > key

    # ------------------------------------------------------------ exporter thread

    def _export_loop(self) -> None:
        try:
            self._open_spool()
        except Exception as exc:  # never let the spool stop reporting: go on in memory
            log.warning("layrot: cannot open the spool %s (%s); steps are kept in memory only", self.spool_path, exc)
            self._spool = None
        self._ready.set()
        batch: list[StepRecord] = []
        first = 0.0
        while True:
            interval = self._batch_wait()
            timeout = interval if not batch else max(0.0, first + interval - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, _Marker):
                if batch:
                    self._emit_guarded(batch)
                    batch = []
                item.key = self._next_key - 1
                item.event.set()
                if item.stop:
                    self._exporter_done.set()
                    return
                continue
            if item is not None:
                if not batch:
                    first = time.monotonic()
                batch.append(item)  # type: ignore[arg-type]
            if batch and (len(batch) >= self._batch_steps or time.monotonic() - first >= interval):
                self._emit_guarded(batch)
                batch = []

    def _batch_wait(self) -> float:
        """How long the exporter lets a batch fill: longer the more batches wait for their acks.

        Unacknowledged batches pile up when the collector (or the path to it) is slow; more,
        smaller messages would only add to its per-message cost. So each waiting batch adds one
        ``flush_interval``, and the wait is never shorter than the recent ack latency, up to
        ``max_flush_interval`` (and a batch never exceeds its step bound): under load the job
        sends fewer, bigger batches, and nothing is dropped for it. The latency bound matters for
        slow jobs: one whose steps come further apart than the acks take has few batches waiting
        however loaded the collector is, and would otherwise go on sending one step per message.
        """
        waiting = len(self._entries)  # read without the lock: hints, one len() of a dict and a float
        return batch_wait(self._flush_interval, self._max_flush_interval, waiting, self._ack_latency)

    def _emit_guarded(self, batch: list[StepRecord]) -> None:
        """``_emit``, but a failure loses this batch (counted, logged once) instead of the exporter thread."""
        try:
            self._emit(batch)
        except Exception as exc:
            self.stats.export_errors += 1
            self.stats.dropped_bad_values += len(batch)
            if self.stats.export_errors == 1:
                log.warning(
                    "layrot: the exporter failed to pack %d steps of run %s (%s: %s); they are dropped, "
                    "training and reporting go on",
                    len(batch),
                    self.run,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
            else:
                log.debug("layrot: the exporter failed again: %r", exc)

    def _open_spool(self) -> None:
        """Open the run's spool (on the exporter thread: the training thread never waits on the disk)."""
        if not self._spool_on:
            return
        sp = Spool(self.spool_path, max_bytes=self._spool_max)
        if not sp.try_lock():
            log.warning(
                "layrot: the spool %s is in use by another process (same run and rank?); this one keeps its "
                "steps in memory only",
                self.spool_path,
            )
            return
        old = _parse_hello(sp.read_hello())
        if old is not None and old.run_key and not sp.is_empty():
            if not self._key_restored and old.run_key != self.run_key:
                # The same spool folder is the same job restarted: it keeps the run's key.
                self.run_key = self._hello.run_key = old.run_key
            if not same_binding(old, self._hello):
                # Recorded under another layer table (w(0)): uploaded with its own Hello, apart.
                sp.close()
                aside = self.spool_path.with_name(f"{self.spool_path.name}.{int(time.time())}-{os.getpid()}")
                os.replace(self.spool_path, aside)
                self._leftovers.append(aside)
                sp = Spool(self.spool_path, max_bytes=self._spool_max)
                sp.try_lock()
        sp.write_hello(self._hello.SerializeToString())
        with self._lock:
            for rid, steps in sp.pending_index():  # a previous process's batches, sent first
                e = _Entry(self._next_key, steps, None, rid)
                self._next_key += 1
                self._entries[e.key] = e
                self._by_rid[rid] = e
            self.stats.spool_pending_steps = sum(e.steps for e in self._entries.values())
        left = self.stats.spool_pending_steps
        self._spool = sp
        self.stats.spool_dir = str(self.spool_path)
        if left or self._leftovers:
            log.info("layrot: the spool %s holds steps of a previous process; they are sent first", self.spool_path)
        if self.offline:
            log.info("layrot: offline mode: run %s records to the spool %s only", self.run, self.spool_path)

    def _emit(self, records: list[StepRecord]) -> None:
        L = self.num_layers
        rows, steps, times, losses, rhos, versions = [], [], [], [], [], []
        have_rho = any(r.rho is not None for r in records)
        have_loss = False
        for r in records:
            try:
                values = np.asarray(_resolve(r.values), dtype=np.float64)
                if values.shape != (len(WIRE_ROWS), L):
                    raise ValueError(f"measurement shape {values.shape}, expected ({len(WIRE_ROWS)}, {L})")
                loss = _resolve(r.loss)
            except Exception as exc:  # a broken measurement must not kill the exporter
                self.stats.dropped_bad_values += 1
                log.debug("layrot: dropping step %s: %s", r.step, exc)
                continue
            rows.append(values)
            steps.append(r.step)
            times.append(r.time)
            have_loss |= loss is not None
            losses.append(float("nan") if loss is None else float(loss))
            rhos.append(np.full(L, np.nan) if r.rho is None else np.asarray(r.rho, dtype=np.float64))
            versions.append(r.command_version)
        if not rows:
            return
        arr = np.stack(rows, axis=1)  # (len(WIRE_ROWS), S, L): one packed array per wire row
        self.local.observe(steps, times, losses, arr, rhos if have_rho else None)
        self.stats.report_callback_errors = self.local.callback_errors
        payload = pb.StepBatch(
            steps=steps,
            times=times,
            num_layers=L,
            norm=pack(arr[0]),
            dist0=pack(arr[1]),
            dstep=pack(arr[2]),
            norm_prev=pack(arr[3]),
            dot0=pack(arr[4]),
            dotstep=pack(arr[5]),
            rho=pack(np.stack(rhos)) if have_rho else b"",
            loss=losses if have_loss else [],
            command_version=versions if any(versions) else [],
        ).SerializeToString()  # seq is set per session at send time (frame_batch)
        n = len(steps)
        rid = dropped = None
        if self._spool is not None:
            rid = self._spool.append(payload, n)
            dropped = self._spool.take_dropped()
            if rid is not None:
                self.stats.spooled_steps += n
        with self._cond:
            e = _Entry(self._next_key, n, payload, rid)
            self._next_key += 1
            self._entries[e.key] = e
            if rid is not None:
                self._by_rid[rid] = e
                self.stats.spool_pending_steps += n
            self._mem_order.append(e)
            self._mem_bytes += len(payload)
            if len(self._mem_order) > 2 * len(self._entries) + 64:
                # Acked entries leave _mem_order only here: keep it proportional to what is pending.
                self._mem_order = deque(x for x in self._mem_order if x.payload is not None)
            for old in dropped or ():
                self._spool_lost(old)
            self._trim_memory()
            if self._sess is not None and not self._sess.done:
                self._todo.append(e)
            self._cond.notify_all()

    def _spool_lost(self, rid: int) -> None:
        """The spool's bound dropped record ``rid`` (under the lock): gone unless it is still in memory."""
        e = self._by_rid.pop(rid, None)
        if e is None or e.key not in self._entries:
            return
        e.rid = None
        self.stats.spool_pending_steps -= e.steps
        if e.payload is None:
            self._lose(e, "dropped_spool")

    def _trim_memory(self) -> None:
        """Keep payloads in memory within the bound (under the lock); spooled ones stay readable on disk."""
        while self._mem_bytes > self._max_unacked_bytes and len(self._mem_order) > 1:
            e = self._mem_order.popleft()
            if e.payload is None:
                continue
            self._mem_bytes -= len(e.payload)
            e.payload = None
            if e.key in self._entries and e.rid is None:
                self._lose(e, "dropped_unacked_overflow")

    def _lose(self, e: _Entry, counter: str) -> None:
        """``e`` can no longer be resent (under the lock): drop it now, or when its in-flight send fails."""
        if e.seq:  # in flight: an Ack may still store it
            e.lost = counter
            return
        self._forget(e)
        setattr(self.stats, counter, getattr(self.stats, counter) + e.steps)

    def _forget(self, e: _Entry) -> None:
        """Remove ``e`` from the bookkeeping (under the lock); the caller counts it."""
        self._entries.pop(e.key, None)
        if e.rid is not None:
            self._by_rid.pop(e.rid, None)
            self.stats.spool_pending_steps -= e.steps
        if e.payload is not None:
            self._mem_bytes -= len(e.payload)
            e.payload = None
        self._cond.notify_all()

    # ------------------------------------------------------------ connection thread

    def _metadata(self) -> list[tuple[str, str]]:
        # The run name on every call lets an L7 proxy hash sessions of one run onto one collector.
        md = [(RUN_METADATA_KEY, header_value(self.run))]
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return md

    def _connection_loop(self) -> None:
        self._ready.wait()
        delay = self._backoff[0]
        while not self._closing.is_set():
            got_response = False
            self.address = self._addresses[self._pick % len(self._addresses)]
            try:
                channel = open_channel(self.address, self.tls)
            except Exception as exc:  # e.g. an unreadable TLS file: watch() checked, the disk may have changed
                self.stats.last_error = str(exc)
                channel = None
            try:
                if channel is not None and self._wait_ready(channel, delay):
                    self._upload_leftovers(channel)
                    got_response = self._session(channel)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if not (code == grpc.StatusCode.CANCELLED and self._closing.is_set()):
                    self.stats.last_error = f"{code.name if code else 'error'}: {_details(exc)}"
                    if code == grpc.StatusCode.UNAUTHENTICATED:
                        self._refuse("unauthenticated", self.stats.last_error)
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        # The collector is at its session limit: come back when it says, not sooner.
                        delay = max(delay, _retry_after(exc))
                        self.stats.admission_refusals += 1
            except Exception as exc:  # never let the connection thread die
                self.stats.last_error = repr(exc)
                log.debug("layrot: connection loop error", exc_info=True)
            finally:
                if channel is not None:
                    channel.close()
            if self._closing.is_set() or self.stats.refused or self._goodbye:
                break
            if not got_response and len(self._addresses) > 1:
                # This collector did not answer: the next attempt tries the next one in the run's order
                # (and comes back round to the first, so a run returns to its collector when it is back).
                self._pick += 1
            if got_response:
                delay = self._backoff[0]
                log.warning(
                    "layrot: lost the collector at %s (%s); training continues, reconnecting",
                    self.address,
                    self.stats.last_error,
                )
            elif not self._warned_down:
                self._warned_down = True
                kept = f"kept in the spool {self.spool_path}" if self._spool is not None else "buffered in memory"
                # A TLS mismatch is worth one clear line (this runs once, on the connection thread).
                mismatch = explain_connection_error(self.address, self.tls, self.stats.last_error)
                if mismatch:
                    self.stats.last_error = mismatch
                log.warning(
                    "layrot: cannot reach the collector at %s (%s); training continues, steps are %s and sent "
                    "when it answers",
                    self.address,
                    self.stats.last_error or "no answer",
                    kept,
                )
            self.stats.reconnects += 1
            self._closing.wait(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, self._backoff[1])

    def _wait_ready(self, channel: grpc.Channel, patience: float) -> bool:
        """Wait for the channel to connect; False after ``patience`` s (at least 1 s) or when closing."""
        future = grpc.channel_ready_future(channel)
        deadline = time.monotonic() + max(1.0, patience)
        try:
            while not self._closing.is_set():
                try:
                    future.result(timeout=0.1)
                    return True
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        self.stats.last_error = self.stats.last_error or "no answer"
                        return False
            return False
        finally:
            future.cancel()

    def _upload_leftovers(self, channel: grpc.Channel) -> None:
        """Upload spools a previous process left under another layer table, each with its own Hello."""
        from layrot.agent.upload import upload_spool

        for path in list(self._leftovers):
            sp = Spool(path, max_bytes=self._spool_max)
            if not sp.try_lock():
                continue
            result = upload_spool(sp, channel, token=self.token, should_stop=self._closing.is_set)
            if result.complete or result.refused_hello:
                self._leftovers.remove(path)
            if result.refused_hello:
                log.warning(
                    "layrot: the collector refused the steps a previous process left in %s (%s); they stay there",
                    path,
                    result.error,
                )
            sp.close()

    def _session(self, channel: grpc.Channel) -> bool:
        """One Ingest.Session stream until it ends; True if the collector answered at all."""
        sess = _Session()
        with self._cond:
            self._sess = sess
            self._retry = []
            self._todo = deque(self._entries.values())  # everything unstored, oldest (spooled) first
        got_response = False
        try:
            call = session_call(channel)(self._requests(sess), metadata=self._metadata())
            with self._lock:
                self._call = call
            for resp in call:
                if not got_response:
                    got_response = True
                self._handle(resp, sess)
                if sess.refusal is not None:
                    call.cancel()
                    break
            if not self._closing.is_set() and not self._goodbye:
                self.stats.last_error = "collector ended the session"
        finally:
            with self._cond:
                sess.done = True
                self._sess = None
                self._call = None
                self.stats.connected = False
                for e in sess.inflight.values():  # not acknowledged: resent on the next session
                    e.seq = 0
                    if e.lost and e.key in self._entries:
                        self._forget(e)
                        setattr(self.stats, e.lost, getattr(self.stats, e.lost) + e.steps)
                sess.inflight.clear()
                self._todo.clear()
                self._cond.notify_all()
        return got_response

    def _requests(self, sess: _Session) -> Iterator[Any]:
        """The request stream: Hello, control acks, then unstored batches in order, then Goodbye."""
        hello = pb.JobMessage(hello=self._hello)
        yield hello
        started = time.monotonic()
        while True:
            with self._cond:
                msg: Any = None
                entry: _Entry | None = None
                while msg is None and entry is None:
                    if sess.done or self._closing.is_set():
                        return
                    if self._pending_acks:
                        msg = self._pending_acks.pop(0)
                        break
                    if self._goodbye:
                        # The collector still stores and acks what is in flight before it ends the stream.
                        msg = pb.JobMessage(goodbye=pb.Goodbye(last_seq=sess.seq, reason="closed"))
                        break
                    ready = sess.welcomed or time.monotonic() - started >= self._welcome_timeout
                    wait = 0.25
                    if ready and len(sess.inflight) < self._max_inflight:
                        entry, wait = self._next_entry(wait)
                    elif not ready:
                        wait = min(wait, max(0.005, started + self._welcome_timeout - time.monotonic()))
                    if entry is None:
                        self._cond.wait(wait)
                if entry is not None:
                    sess.seq += 1
                    entry.seq = sess.seq
                    entry.sent_at = time.monotonic()
                    entry.refused = False  # a SessionError named its previous seq, not this one
                    sess.inflight[sess.seq] = entry
                    payload = entry.payload
            if msg is not None:
                if msg.WhichOneof("kind") == "goodbye":
                    yield msg
                    return
                yield msg
                continue
            assert entry is not None
            if payload is None:
                # Only on disk (a previous process's, or spilled from memory): read it off the lock.
                payload = self._spool.read(entry.rid) if (self._spool is not None and entry.rid is not None) else None
                if payload is None:
                    with self._cond:
                        sess.inflight.pop(entry.seq, None)
                        entry.seq = 0
                        if entry.key in self._entries:
                            self._forget(entry)
                            counter = entry.lost or "dropped_spool"
                            setattr(self.stats, counter, getattr(self.stats, counter) + entry.steps)
                    continue
            self.stats.sent_steps += entry.steps
            self.stats.sent_batches += 1
            yield frame_batch(payload, entry.seq)

    def _next_entry(self, wait: float) -> tuple[_Entry | None, float]:
        """The next batch to send (under the lock): a due retry first, then the oldest unsent one."""
        now = time.monotonic()
        while self._retry and self._retry[0][0] <= now:
            _, _, e = heapq.heappop(self._retry)
            if e.key in self._entries and not e.seq:
                return e, wait
        while self._todo:
            e = self._todo.popleft()
            if e.key in self._entries and not e.seq:
                return e, wait
        if self._retry:
            wait = min(wait, max(0.005, self._retry[0][0] - now))
        return None, wait

    def _handle(self, resp: pb.CollectorMessage, sess: _Session) -> None:
        kind = resp.WhichOneof("kind")
        if kind in ("welcome", "ack") and not sess.welcomed:
            # A collector older than Welcome answers first with an Ack: that is a connection too.
            with self._cond:
                sess.welcomed = True
                self.stats.connected = True
                self._cond.notify_all()
            if self._warned_down or self.stats.reconnects:
                log.info("layrot: connected to the collector at %s", self.address)
        if kind == "ack":
            self._on_ack(resp.ack, sess)
        elif kind == "rate_command":
            self.stats.commands_received += 1
            if self.on_command is not None:
                try:
                    self.on_command(resp.rate_command)
                except Exception:
                    log.exception("layrot: control command handler failed")
        elif kind == "error":
            self._on_error(resp.error, sess)

    def _on_ack(self, ack: pb.Ack, sess: _Session) -> None:
        released: list[int] = []
        now = time.monotonic()
        with self._cond:
            stored = [s for s in sess.inflight if s <= ack.seq]
            stored += [s for s in ack.stored if s in sess.inflight]
            latency = n_latency = 0.0
            for seq in stored:
                e = sess.inflight.pop(seq, None)
                if e is None:
                    continue
                e.seq = 0
                latency += now - e.sent_at
                n_latency += 1
                if e.key not in self._entries:
                    continue
                if e.rid is not None:
                    released.append(e.rid)
                self._forget(e)
                if e.refused:
                    self.stats.dropped_refused += e.steps
                else:
                    self.stats.acked_steps += e.steps
            for nack in ack.failed:
                e = sess.inflight.pop(nack.seq, None)
                if e is None:
                    continue
                e.seq = 0
                if e.key not in self._entries:
                    continue
                if nack.retry and not e.lost:
                    self.stats.retried_batches += 1
                    due = time.monotonic() + (nack.retry_after_s if nack.retry_after_s > 0 else self._backoff[0])
                    heapq.heappush(self._retry, (due, e.key, e))
                else:
                    if e.rid is not None:
                        released.append(e.rid)  # refused for good: resending cannot help
                    self._forget(e)
                    counter = e.lost if nack.retry else "dropped_refused"
                    setattr(self.stats, counter, getattr(self.stats, counter) + e.steps)
                self._warn_code(nack.code, f"batch not stored ({nack.code}): {nack.message}", nack.retry)
            if n_latency:
                self._ack_latency = smoothed_ack_latency(self._ack_latency, latency / n_latency)
            self._cond.notify_all()
        if self._spool is not None:
            for rid in released:  # disk I/O off the lock
                self._spool.ack(rid)

    def _on_error(self, err: pb.SessionError, sess: _Session) -> None:
        self.stats.session_errors += 1
        if err.seq:
            with self._lock:
                e = sess.inflight.get(err.seq)
                if e is not None:
                    # An older collector acks a refused batch afterwards: that Ack is no store.
                    e.refused = True
            self._warn_code(err.code, f"collector rejected batch {err.seq}: {err.message} ({err.code})", False)
            return
        if not sess.welcomed or err.code in FINAL_REFUSALS:
            if err.code in FINAL_REFUSALS:
                sess.refusal = err
                self._refuse(err.code, err.message)
            else:
                self.stats.last_error = f"{err.code}: {err.message}"
                self._warn_code(err.code, f"collector refused the session: {err.message} ({err.code})", True)
            return
        self._warn_code(err.code, f"collector error: {err.message} ({err.code})", True)

    def _refuse(self, code: str, message: str) -> None:
        """The collector will not take this run from this process: stop trying, say so once."""
        with self._cond:
            if self.stats.refused:
                return
            self.stats.refused = code
            self.stats.last_error = f"{code}: {message}"
            self._cond.notify_all()
        kept = f"its steps are kept in the spool {self.spool_path}" if self._spool is not None else "its steps are lost"
        if code == "run_owned":
            log.warning(
                "layrot: run %s belongs to another job; pick another run name, or load the handle's state_dict to "
                "resume it (%s; training continues)",
                self.run,
                kept,
            )
        else:
            log.warning(
                "layrot: the collector at %s refused run %s: %s (%s); no more attempts, %s, training continues",
                self.address,
                self.run,
                message,
                code,
                kept,
            )

    def _warn_code(self, code: str, text: str, transient: bool) -> None:
        """One warning per code; repeats go to debug (a flood of one cause is one line)."""
        if code not in self._warned_codes:
            self._warned_codes.add(code)
            log.warning("layrot: %s%s", text, "; it is kept and sent again" if transient else "")
        else:
            log.debug("layrot: %s", text)


def _details(exc: grpc.RpcError) -> str:
    return exc.details() if hasattr(exc, "details") else str(exc)


def _parse_hello(data: bytes | None) -> pb.Hello | None:
    if not data:
        return None
    try:
        return pb.Hello.FromString(data)
    except Exception:
        return None


_live_reporters: weakref.WeakSet[Reporter] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for reporter in list(_live_reporters):
        try:
            reporter.close(timeout=5.0)
        except Exception:
            pass
