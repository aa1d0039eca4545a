"""Shared fixtures: an embedded collector on free loopback ports, and a raw ingest client.

``collector``        a started ``layrot.server.app.Collector`` (tmp SQLite db), stopped after the test.
``collector_factory`` ``make(db_path=None, **kwargs)`` -> started Collector (all stopped at teardown);
                      use it to restart a collector on the same db.
``ingest``           ``open(collector_or_address, token=None)`` -> ``RawSession``: a real gRPC
                      ``Ingest.Session`` driven message by message from the test.
``sim_job``          ``SimJob`` factory: real float64 weight vectors whose truth the tests compute
                      independently of the collector's triangle formula.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.wire import pack


@pytest.fixture
def collector_factory(tmp_path: Path) -> Iterator[Any]:
    from layrot.server.app import Collector

    started: list[Collector] = []

    def make(db_path: str | Path | None = None, **kwargs: Any) -> Collector:
        kwargs.setdefault("grpc_host", "127.0.0.1")
        kwargs.setdefault("grpc_port", 0)
        kwargs.setdefault("metrics_host", "127.0.0.1")
        kwargs.setdefault("metrics_port", 0)
        c = Collector(db_path=str(db_path or tmp_path / "layrot.db"), **kwargs).start()
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop(grace=0.5)


@pytest.fixture
def collector(collector_factory: Any) -> Any:
    """A started embedded collector (gRPC + /metrics on free 127.0.0.1 ports, tmp SQLite db)."""
    return collector_factory()


_END = object()


class RawSession:
    """One Ingest.Session stream with explicit send/recv, for protocol tests."""

    def __init__(self, address: str, token: str | None = None, max_send: int = 64 * 1024 * 1024) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", max_send), ("grpc.max_receive_message_length", max_send)]
        )
        self.stub = pb_grpc.IngestStub(self.channel)
        self._out: queue.Queue = queue.Queue()
        self.received: queue.Queue = queue.Queue()
        self.status: grpc.RpcError | None = None
        self.done = threading.Event()
        md = [("authorization", f"Bearer {token}")] if token else None
        self.call = self.stub.Session(self._requests(), metadata=md)
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[pb.JobMessage]:
        while True:
            msg = self._out.get()
            if msg is _END:
                return
            yield msg

    def _pump(self) -> None:
        try:
            for msg in self.call:
                self.received.put(msg)
        except grpc.RpcError as exc:
            self.status = exc
        finally:
            self.done.set()

    def send(self, msg: Any) -> RawSession:
        """Send a JobMessage or one of its parts (Hello, StepBatch, ControlAck, Goodbye)."""
        if isinstance(msg, pb.Hello):
            msg = pb.JobMessage(hello=msg)
        elif isinstance(msg, pb.StepBatch):
            msg = pb.JobMessage(steps=msg)
        elif isinstance(msg, pb.ControlAck):
            msg = pb.JobMessage(control_ack=msg)
        elif isinstance(msg, pb.Goodbye):
            msg = pb.JobMessage(goodbye=msg)
        self._out.put(msg)
        return self

    def recv(self, timeout: float = 5.0) -> pb.CollectorMessage:
        """Next CollectorMessage; raises AssertionError on timeout."""
        try:
            return self.received.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message from the collector within {timeout} s (status={self.status})") from None

    def wait_ack(self, seq: int, timeout: float = 5.0) -> list[pb.CollectorMessage]:
        """Read until an Ack with seq >= ``seq``; returns every message read (in order)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            got.append(msg)
            if msg.WhichOneof("kind") == "ack" and msg.ack.seq >= seq:
                return got

    def drain(self, timeout: float = 0.2) -> list[pb.CollectorMessage]:
        """Everything that arrives within ``timeout`` seconds."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                got.append(self.received.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return got

    def half_close(self) -> None:
        """End the request stream (no Goodbye)."""
        self._out.put(_END)

    def goodbye(self, last_seq: int = 0, timeout: float = 5.0) -> list[pb.CollectorMessage]:
        """Send Goodbye, end our side, wait for the collector to end the stream; returns what arrived."""
        self.send(pb.Goodbye(last_seq=last_seq, reason="test done"))
        self.half_close()
        assert self.done.wait(timeout), "the collector did not end the stream after Goodbye"
        return self.drain(0.0)

    def wait_end(self, timeout: float = 5.0) -> bool:
        return self.done.wait(timeout)

    def close(self) -> None:
        self._out.put(_END)
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def ingest() -> Iterator[Any]:
    """``open(target, token=None)`` -> RawSession; target is a Collector or an address. Closed at teardown."""
    sessions: list[RawSession] = []

    def open_(target: Any, token: str | None = None, **kwargs: Any) -> RawSession:
        address = target if isinstance(target, str) else target.grpc_address
        s = RawSession(address, token=token, **kwargs)
        sessions.append(s)
        return s

    yield open_
    for s in sessions:
        s.close()


# ---------------------------------------------------------------- simulated job with float64 truth
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def ref_angle(u: np.ndarray, v: np.ndarray) -> float:
    """Angle between vectors by 2 atan2(|u^ - v^|, |u^ + v^|): stable, independent of the triangle formula."""
    uh, vh = _unit(u), _unit(v)
    return float(2.0 * np.arctan2(np.linalg.norm(uh - vh), np.linalg.norm(uh + vh)))


def ref_cosine_distance(u: np.ndarray, v: np.ndarray) -> float:
    """1 - cos(u, v) as |u^ - v^|^2 / 2 (exact identity, no cancellation)."""
    d = np.linalg.norm(_unit(u) - _unit(v))
    return float(0.5 * d * d)


@dataclass
class SimJob:
    """Real weight vectors evolving step by step; produces StepBatches and the float64 truth.

    ``step_angles`` sets the per-step rotation: each step rotates every layer
    by exactly that angle in a random direction orthogonal to w (Layca-like),
    then scales w by ``scale`` (weight decay-like drift).
    """

    run: str = "sim"
    layer_sizes: tuple[int, ...] = (27, 64, 128, 40)
    seed: int = 0
    step_angle: float = 0.05
    scale: float = 1.0
    rank: int = 0
    world_size: int = 1
    layca: bool = False
    dots: bool = False  # also send the radial dots (dot0, dotstep)
    float32: bool = False  # round what is sent to float32, as a device measuring in float32 would
    w0: list[np.ndarray] = field(init=False)
    w: list[np.ndarray] = field(init=False)
    step: int = field(init=False, default=0)
    seq: int = field(init=False, default=0)
    truth: dict[int, dict[str, np.ndarray]] = field(init=False, default_factory=dict)
    raw: dict[int, dict[str, np.ndarray]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.t0 = time.time()
        self.w0 = [self.rng.standard_normal(n) * (1.0 / np.sqrt(n)) for n in self.layer_sizes]
        self.w = [x.copy() for x in self.w0]

    @property
    def names(self) -> list[str]:
        return [f"layer{i}.weight" for i in range(len(self.layer_sizes))]

    def hello(self, **overrides: Any) -> pb.Hello:
        layers = [
            pb.Layer(
                name=n, index=i, shape=[size], init_norm=float(np.linalg.norm(w0)), numel=size, module_type="Linear"
            )
            for i, (n, size, w0) in enumerate(zip(self.names, self.layer_sizes, self.w0))
        ]
        kw = dict(
            run=self.run,
            rank=self.rank,
            world_size=self.world_size,
            framework="pytorch",
            framework_version="2.x",
            host="testhost",
            pid=1234,
            layers=layers,
            capabilities=pb.Capabilities(layca=self.layca, loss=True),
            client_version="test",
            every=1,
            session_id=f"s{self.seed}",
        )
        kw.update(overrides)
        return pb.Hello(**kw)

    def _advance(self, angle: float) -> None:
        new = []
        for x in self.w:
            d = self.rng.standard_normal(x.size)
            d -= (d @ x) / (x @ x) * x
            d = _unit(d) * np.linalg.norm(x)
            new.append((np.cos(angle) * x + np.sin(angle) * d) * self.scale)
        prev = self.w
        self.w = new
        self.step += 1
        t = self.step
        self.raw[t] = {
            "norm": np.array([np.linalg.norm(x) for x in new]),
            "dist0": np.array([np.linalg.norm(x - x0) for x, x0 in zip(new, self.w0)]),
            "dstep": np.array([np.linalg.norm(x - p) for x, p in zip(new, prev)]),
            "norm_prev": np.array([np.linalg.norm(p) for p in prev]),
            "rho": np.full(len(new), np.tan(angle)),
            "dot0": np.array([(x - x0) @ x0 for x, x0 in zip(new, self.w0)]),
            "dotstep": np.array([(x - p) @ p for x, p in zip(new, prev)]),
        }
        self.truth[t] = {
            "rotation": np.array([ref_cosine_distance(x0, x) for x, x0 in zip(new, self.w0)]),
            "step_angle": np.array([ref_angle(p, x) for x, p in zip(new, prev)]),
            "weight_norm": self.raw[t]["norm"].copy(),
        }

    def batch(self, n_steps: int = 1, angle: float | None = None, loss: bool = True) -> pb.StepBatch:
        """Advance ``n_steps`` optimizer steps and return them as one StepBatch (next seq)."""
        steps = []
        for _ in range(n_steps):
            self._advance(self.step_angle if angle is None else angle)
            steps.append(self.step)
        self.seq += 1
        return self.batch_for(steps, seq=self.seq, loss=loss)

    def batch_for(self, steps: list[int], seq: int, loss: bool = True) -> pb.StepBatch:
        """A StepBatch for already simulated ``steps`` (e.g. a resend)."""

        def col(key: str) -> bytes:
            values = np.stack([self.raw[s][key] for s in steps])
            if self.float32:
                values = values.astype(np.float32).astype(np.float64)
            return pack(values)

        return pb.StepBatch(
            seq=seq,
            steps=steps,
            times=[self.t0 + s * 1e-3 for s in steps],
            num_layers=len(self.layer_sizes),
            norm=col("norm"),
            dist0=col("dist0"),
            dstep=col("dstep"),
            norm_prev=col("norm_prev"),
            rho=col("rho") if self.layca else b"",
            loss=[1.0 / s for s in steps] if loss else [],
            dot0=col("dot0") if self.dots else b"",
            dotstep=col("dotstep") if self.dots else b"",
        )

    def truth_array(self, key: str, steps: list[int] | None = None) -> np.ndarray:
        steps = steps or sorted(self.truth)
        return np.stack([self.truth[s][key] for s in steps])


@pytest.fixture
def sim_job() -> Any:
    """The SimJob class (call it with the options you need)."""
    return SimJob


@pytest.fixture(autouse=True)
def _spool_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's job-side spool lives in its own temp folder, never in the user's cache dir."""
    root = tmp_path_factory.mktemp("spool")
    monkeypatch.setenv("LAYROT_SPOOL_DIR", str(root))
    return root
