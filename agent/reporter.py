"""In-process reporter: hands per-step layer measurements to the collector.

Shaped like OpenTelemetry's ``BatchSpanProcessor``: the training thread only
enqueues (never blocks, never touches the network); a background exporter
thread batches steps into columnar ``StepBatch`` messages; a connection thread
keeps one bidirectional gRPC session open, resends what the collector has not
acknowledged after a reconnect, and delivers control commands. Everything that
cannot be kept is dropped *and counted*; the job never waits on the collector.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import random
import socket
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.wire import pack

log = logging.getLogger(__name__)

DEFAULT_COLLECTOR = "localhost:50051"
_STOP = object()
# Rows of the (6, L) array a measurement resolves to, in this order (StepBatch fields).
ROWS = ("norm", "dist0", "dstep", "norm_prev", "dot0", "dotstep")


def default_run_name() -> str:
    """``LAYROT_RUN`` or ``<script>-<yyyymmdd-hhmmss>-<host>``: the run id when the job names none."""
    env = os.environ.get("LAYROT_RUN")
    if env:
        return env
    script = os.path.splitext(os.path.basename(sys.argv[0] or "python"))[0] or "python"
    return f"{script}-{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}"


def collector_address(collector: str | None = None) -> str:
    """The collector address: explicit, else ``LAYROT_COLLECTOR``, else localhost:50051."""
    return collector or os.environ.get("LAYROT_COLLECTOR") or DEFAULT_COLLECTOR


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

    ``values`` resolves (on the exporter thread, where waiting is harmless) to a
    float array of shape (6, L) with the rows of ``ROWS``. ``loss``
    resolves to a float or None. Resolving may wait for the device.
    """

    step: int
    time: float
    values: Callable[[], np.ndarray] | np.ndarray
    loss: Callable[[], float | None] | float | None = None
    rho: np.ndarray | None = None
    command_version: int = 0


@dataclass
class ReporterStats:
    """Counters a user can read from ``handle.stats``."""

    submitted: int = 0
    sent_steps: int = 0
    acked_steps: int = 0
    dropped_queue_full: int = 0
    dropped_unacked_overflow: int = 0
    dropped_at_close: int = 0
    dropped_bad_values: int = 0
    reconnects: int = 0
    session_errors: int = 0
    commands_received: int = 0
    connected: bool = False
    last_error: str = ""

    @property
    def dropped(self) -> int:
        return self.dropped_queue_full + self.dropped_unacked_overflow + self.dropped_at_close + self.dropped_bad_values


def _resolve(x: Any) -> Any:
    return x() if callable(x) else x


class Reporter:
    """Streams step measurements of one process to the collector.

    Args:
        run: run id shared by all ranks of the job.
        layers: the layer table, forward order.
        collector: ``host:port``; defaults to ``LAYROT_COLLECTOR`` or localhost:50051.
        token: bearer token (``LAYROT_TOKEN``) when the collector requires one.
        on_command: called on the connection thread with each ``RateCommand``;
            must return quickly.
        max_queue: steps waiting for the exporter before new ones are dropped.
        max_unacked_bytes: bytes of sent-but-unacknowledged batches kept for
            resending after a reconnect; the oldest are dropped beyond it.
        flush_interval: seconds the exporter waits to fill a batch.
    """

    def __init__(
        self,
        run: str,
        layers: Sequence[LayerSpec],
        *,
        collector: str | None = None,
        token: str | None = None,
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
        max_queue: int = 4096,
        max_unacked_bytes: int = 64 << 20,
        max_batch_bytes: int = 1 << 20,
        flush_interval: float = 0.05,
        backoff_initial: float = 0.25,
        backoff_max: float = 10.0,
    ) -> None:
        from layrot.core.version import __version__

        self.address = collector_address(collector)
        self.token = token if token is not None else os.environ.get("LAYROT_TOKEN")
        self.run = run
        self.layers = list(layers)
        self.num_layers = len(self.layers)
        self.stats = ReporterStats()
        self.on_command = on_command
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
        )
        self._queue: queue.Queue[StepRecord | object] = queue.Queue(maxsize=max_queue)
        self._max_unacked_bytes = max_unacked_bytes
        per_step = 8 * max(1, self.num_layers) * 7 + 64
        self._batch_steps = max(1, min(256, max_batch_bytes // per_step))
        self._flush_interval = flush_interval
        self._backoff = (backoff_initial, backoff_max)

        self._lock = threading.Lock()
        self._unacked: OrderedDict[int, tuple[pb.JobMessage, int, int]] = OrderedDict()
        self._unacked_bytes = 0
        self._pending_acks: list[pb.JobMessage] = []
        self._seq = 0
        self._out: queue.SimpleQueue | None = None
        self._call: Any = None
        self._closing = threading.Event()
        self._exporter_done = threading.Event()
        self._all_acked = threading.Condition(self._lock)
        self._warned_down = False
        self._warned_full = False

        self._exporter = threading.Thread(target=self._export_loop, name="layrot-exporter", daemon=True)
        self._conn = threading.Thread(target=self._connection_loop, name="layrot-connection", daemon=True)
        self._exporter.start()
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
        """Tell the collector whether a RateCommand was applied (thread-safe)."""
        msg = pb.JobMessage(control_ack=pb.ControlAck(version=version, applied=applied, reason=reason, step=step))
        with self._lock:
            if self._out is not None:
                self._out.put(msg)
            else:
                # Delivered at the next (re)connect; only the newest few matter.
                self._pending_acks = (self._pending_acks + [msg])[-16:]

    def command_result(self, version: int, applied: bool, reason: str, step: int) -> None:
        """Layca command listener: acknowledge the result and announce the version on reconnect."""
        if applied:
            self.set_applied_version(version)
        self.send_control_ack(version, applied, reason, step)

    def set_applied_version(self, version: int) -> None:
        """Version announced in Hello on the next reconnect."""
        self._hello.applied_command_version = version

    @property
    def unacked_steps(self) -> int:
        with self._lock:
            return sum(n for _, n, _ in self._unacked.values())

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is acknowledged (or timeout)."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.005)
        # Let the exporter finish the batch it may be holding.
        time.sleep(min(self._flush_interval * 1.5, max(0.0, deadline - time.monotonic())))
        with self._lock:
            # Waits through a reconnect too: what is unacknowledged is resent then.
            while self._unacked:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._all_acked.wait(min(left, 0.1))
            return not self._unacked and self._queue.empty()

    def close(self, timeout: float = 5.0) -> None:
        """Flush (only while connected), say Goodbye and stop the threads."""
        if self._closing.is_set():
            return
        if self.stats.connected:
            self.flush(timeout)
        self._queue.put(_STOP) if not self._queue.full() else None
        self._closing.set()
        self._exporter.join(timeout=1.0)
        with self._lock:
            lost = sum(n for _, n, _ in self._unacked.values())
            self.stats.dropped_at_close += lost + self._queue.qsize()
            if self._out is not None:
                self._out.put(pb.JobMessage(goodbye=pb.Goodbye(last_seq=self._seq, reason="closed")))
                self._out.put(_STOP)
            call = self._call
        self._conn.join(timeout=1.0)
        if self._conn.is_alive() and call is not None:
            call.cancel()
            self._conn.join(timeout=1.0)
        if lost:
            log.warning("layrot: closed with %d reported steps not acknowledged by the collector", lost)
        _live_reporters.discard(self)

    # ------------------------------------------------------------ exporter thread

    def _export_loop(self) -> None:
        batch: list[StepRecord] = []
        first = 0.0
        while True:
            timeout = self._flush_interval if not batch else max(0.0, first + self._flush_interval - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP or (self._closing.is_set() and item is None and self._queue.empty()):
                if batch:
                    self._emit(batch)
                self._exporter_done.set()
                return
            if item is not None:
                if not batch:
                    first = time.monotonic()
                batch.append(item)  # type: ignore[arg-type]
            if batch and (len(batch) >= self._batch_steps or time.monotonic() - first >= self._flush_interval):
                self._emit(batch)
                batch = []

    def _emit(self, records: list[StepRecord]) -> None:
        L = self.num_layers
        rows, steps, times, losses, rhos, versions = [], [], [], [], [], []
        have_rho = any(r.rho is not None for r in records)
        have_loss = False
        for r in records:
            try:
                values = np.asarray(_resolve(r.values), dtype=np.float64)
                if values.shape != (len(ROWS), L):
                    raise ValueError(f"measurement shape {values.shape}, expected ({len(ROWS)}, {L})")
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
        arr = np.stack(rows, axis=1)  # (6, S, L): one packed array per quantity
        with self._lock:
            self._seq += 1
            batch = pb.StepBatch(
                seq=self._seq,
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
            )
            msg = pb.JobMessage(steps=batch)
            size = batch.ByteSize()
            self._unacked[self._seq] = (msg, len(steps), size)
            self._unacked_bytes += size
            while self._unacked_bytes > self._max_unacked_bytes and len(self._unacked) > 1:
                _, (_, n, sz) = self._unacked.popitem(last=False)
                self._unacked_bytes -= sz
                self.stats.dropped_unacked_overflow += n
            if self._out is not None:
                self._out.put(msg)
                self.stats.sent_steps += len(steps)

    # ------------------------------------------------------------ connection thread

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _connection_loop(self) -> None:
        delay = self._backoff[0]
        while not self._closing.is_set():
            channel = grpc.insecure_channel(
                self.address,
                options=[
                    ("grpc.max_send_message_length", 16 << 20),
                    ("grpc.max_receive_message_length", 16 << 20),
                    ("grpc.keepalive_time_ms", 30000),
                    ("grpc.initial_reconnect_backoff_ms", 250),
                    ("grpc.max_reconnect_backoff_ms", 5000),
                ],
            )
            out: queue.SimpleQueue = queue.SimpleQueue()
            got_response = False
            try:
                with self._lock:
                    self._out = out
                    out.put(pb.JobMessage(hello=self._hello))
                    for msg, n, _ in self._unacked.values():
                        out.put(msg)
                        self.stats.sent_steps += n
                    for ack in self._pending_acks:
                        out.put(ack)
                    self._pending_acks = []
                call = pb_grpc.IngestStub(channel).Session(self._requests(out), metadata=self._metadata())
                with self._lock:
                    self._call = call
                for resp in call:
                    if not got_response:
                        got_response = True
                        delay = self._backoff[0]
                        self._on_connected()
                    self._handle(resp)
                if not self._closing.is_set():
                    self.stats.last_error = "collector ended the session"
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.CANCELLED and self._closing.is_set():
                    break
                self.stats.last_error = (
                    f"{code.name if code else 'error'}: {exc.details() if hasattr(exc, 'details') else exc}"
                )
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("layrot: collector at %s refused the session: %s", self.address, self.stats.last_error)
            except Exception as exc:  # never let the connection thread die
                self.stats.last_error = repr(exc)
                log.debug("layrot: connection loop error", exc_info=True)
            finally:
                with self._lock:
                    self._out = None
                    self._call = None
                    was_connected = self.stats.connected
                    self.stats.connected = False
                    self._all_acked.notify_all()
                out.put(_STOP)
                channel.close()
            if self._closing.is_set():
                break
            if was_connected or got_response:
                log.warning(
                    "layrot: lost the collector at %s (%s); training continues, reconnecting",
                    self.address,
                    self.stats.last_error,
                )
            elif not self._warned_down:
                self._warned_down = True
                log.warning(
                    "layrot: cannot reach the collector at %s (%s); training continues, "
                    "steps are buffered and retried with backoff",
                    self.address,
                    self.stats.last_error,
                )
            self.stats.reconnects += 1
            self._closing.wait(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, self._backoff[1])

    def _requests(self, out: queue.SimpleQueue):
        while True:
            msg = out.get()
            if msg is _STOP:
                return
            yield msg

    def _on_connected(self) -> None:
        with self._lock:
            self.stats.connected = True
        if self._warned_down or self.stats.reconnects:
            log.info("layrot: connected to the collector at %s", self.address)

    def _handle(self, resp: pb.CollectorMessage) -> None:
        kind = resp.WhichOneof("kind")
        if kind == "ack":
            with self._lock:
                while self._unacked:
                    seq = next(iter(self._unacked))
                    if seq > resp.ack.seq:
                        break
                    _, n, sz = self._unacked.pop(seq)
                    self._unacked_bytes -= sz
                    self.stats.acked_steps += n
                if not self._unacked:
                    self._all_acked.notify_all()
        elif kind == "rate_command":
            self.stats.commands_received += 1
            if self.on_command is not None:
                try:
                    self.on_command(resp.rate_command)
                except Exception:
                    log.exception("layrot: control command handler failed")
        elif kind == "error":
            self.stats.session_errors += 1
            log.warning(
                "layrot: collector rejected %s: %s (%s)",
                f"batch {resp.error.seq}" if resp.error.seq else "the session",
                resp.error.message,
                resp.error.code,
            )


_live_reporters: weakref.WeakSet[Reporter] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for reporter in list(_live_reporters):
        try:
            reporter.close(timeout=5.0)
        except Exception:
            pass
