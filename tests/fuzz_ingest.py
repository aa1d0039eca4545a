"""A property-based fuzzer of the collector's Ingest and Query services (hypothesis), on real gRPC.

Used by tests/test_fuzz.py (a CI-sized number of examples) and benchmarks/fuzz.py (>= 100,000
messages). Strategies:

* ``sessions()``: one Ingest.Session's worth of messages: a valid Hello (random layer table)
  or a broken one (every field random, from the proto descriptor), then StepBatches with
  random sizes, seqs, steps, times and values (negative, non-finite, impossible, huge), with
  ControlAcks, Goodbyes, second Hellos and empty messages mixed in; or garbage bytes sent
  through a raw ``channel.stream_stream`` with identity serializers.
* ``query_calls()``: a call of every method of the Query service with every field random,
  huge integers and non-finite floats included.

``Fuzzer`` runs them against a collector and records what a property needs: call durations
(a hang is over 1 s), gRPC status codes (never UNKNOWN or INTERNAL), refusals the client was
told about (SessionError), and the collector's health between calls. ``InnocentJob`` is a
real ``Reporter`` training beside the fuzzer; at the end its history must hold every step.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.wire import pack

HANG_SECONDS = 1.0
INNOCENT = "innocent-job"
BAD_STATUS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

# ---------------------------------------------------------------- generic protobuf values
_INT_EDGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
NAMES = st.sampled_from(["", INNOCENT, "fuzz-run", "r", "x" * 201, "a/b c", "\x00", "\u00e9t\u00e9"]) | st.text(
    max_size=12
)


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Small values mostly, the type's edges and huge values often."""
    edges = [v for v in (lo, hi, 0, 1, hi - 1, 2**31 - 1, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1) if lo <= v <= hi]
    return st.sampled_from(edges) | st.integers(max(lo, -1000), min(hi, 1000)) | st.integers(lo, hi)


def floats() -> st.SearchStrategy[float]:
    return st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e300, -1e300, 5e-324]) | st.floats(
        allow_nan=True, allow_infinity=True
    )


def _repeated(f: Any) -> bool:
    rep = getattr(f, "is_repeated", None)  # protobuf >= 6; ``label`` before
    return bool(rep) if rep is not None else f.label == FD.LABEL_REPEATED


def _scalar(f: Any) -> st.SearchStrategy[Any]:
    t = f.type
    if t in _INT_EDGES:
        return ints(*_INT_EDGES[t])
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return floats() if t == FD.TYPE_DOUBLE else floats().filter(lambda x: not math.isfinite(x) or abs(x) < 3e38)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return NAMES if f.name in ("run", "name", "layer", "kind") else st.text(max_size=20)
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values])
    raise TypeError(f"no strategy for field {f.full_name}")


@functools.cache
def messages(cls: Any, depth: int = 2) -> st.SearchStrategy[Any]:
    """Any message of ``cls``: every field random (absent, edge or random values), nested up to ``depth``."""
    desc = cls.DESCRIPTOR
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry:
                vf = f.message_type.fields_by_name["value"]
                if vf.message_type is not None:
                    continue
                parts[f.name] = st.dictionaries(st.text(max_size=8), _scalar(vf), max_size=3)
                continue
            if depth <= 0:
                continue
            sub = messages(getattr(pb, f.message_type.name), depth - 1)
            parts[f.name] = st.lists(sub, max_size=3) if _repeated(f) else sub
        elif _repeated(f):
            parts[f.name] = st.lists(_scalar(f), max_size=6)
        else:
            parts[f.name] = _scalar(f)

    @st.composite
    def build(draw: Any) -> Any:
        m = cls()
        for name, strat in parts.items():
            if not draw(st.booleans()):
                continue
            value = draw(strat)
            field_ = desc.fields_by_name[name]
            target = getattr(m, name)
            if field_.message_type is not None and field_.message_type.GetOptions().map_entry:
                target.update(value)
            elif _repeated(field_):
                target.extend(value)
            elif field_.message_type is not None:
                target.CopyFrom(value)
            else:
                setattr(m, name, value)
        return m

    return build()


# ---------------------------------------------------------------- job sessions
@dataclass
class Session:
    """What one Ingest.Session sends: serialized messages (garbage ones included)."""

    frames: list[bytes]
    garbage: bool = False  # raw bytes, not a JobMessage by construction


def _layer_table(draw: Any) -> tuple[list[pb.Layer], np.ndarray]:
    n = draw(st.integers(1, 12))
    norms = np.array(draw(st.lists(st.floats(0.1, 100.0), min_size=n, max_size=n)))
    layers = [
        pb.Layer(name=f"l{i}.weight", index=i, shape=[4, 4], init_norm=float(norms[i]), numel=16, module_type="Linear")
        for i in range(n)
    ]
    return layers, norms


STEP_EDGES = [0, 1, 2, 3, 2**31, 2**53, 2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64 - 1]
BAD_VALUES = [-1.0, -1e-300, math.nan, math.inf, -math.inf, 1e300, -0.0]
TIME_EDGES = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e11 + 1, 1e300, 5e-324]


@st.composite
def _batch(draw: Any, num_layers: int, init_norm: np.ndarray, seq: int, step0: int) -> tuple[pb.StepBatch, int]:
    """A StepBatch: valid values often, every kind of broken one too. Returns it and the next first step.

    Two draws (a kind and a seed); the seed drives a numpy generator for the rest, so a batch costs
    hypothesis little (the benchmark sends 100,000 messages).
    """
    kind = draw(st.sampled_from(["valid", "valid", "valid", "values", "steps", "shape", "time", "random"]))
    if kind == "random":
        b = draw(messages(pb.StepBatch, 0))
        if draw(st.integers(0, 3)):  # mostly the session's own seq: a random one usually ends the session (bad_seq)
            b.seq = seq
        return b, step0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    S = int(rng.integers(1, 25))
    if kind == "shape":
        S = int(rng.choice([0, 1, 3, 10_001]))
    steps = [int(x) for x in range(step0, step0 + S)]
    if kind == "steps":
        edges = rng.integers(len(STEP_EDGES), size=S)
        steps = [STEP_EDGES[int(e)] if rng.random() < 0.5 else int(rng.integers(0, 50)) for e in edges]
        if rng.random() < 0.3:
            steps.sort()
    L = num_layers if kind != "shape" or rng.random() < 0.5 else int(rng.integers(0, 20))
    angle = rng.uniform(0.0, 0.05, size=(S, num_layers))
    norm = np.broadcast_to(init_norm, (S, num_layers)) * rng.uniform(0.9, 1.1, size=(S, num_layers))
    cols = [norm, norm * rng.uniform(0.0, 0.5, size=(S, num_layers)), norm * angle, norm.copy()]
    if kind == "values":
        col = int(rng.integers(0, 4))
        where = rng.random((S, num_layers)) < rng.choice([0.01, 0.5, 1.0])
        cols[col] = np.where(where, rng.choice(BAD_VALUES), cols[col])
        if rng.random() < 0.3:
            cols[1] = cols[0] * 5.0 + 1.0  # beyond the triangle inequality
    times = [time.time() + 1e-3 * i for i in range(S)]
    if kind == "time":
        times = [float(rng.choice(TIME_EDGES)) if rng.random() < 0.5 else t for t in times]
    data = [pack(c) if c.shape[0] else b"" for c in cols]
    if kind == "shape":
        data[int(rng.integers(0, 4))] += rng.bytes(int(rng.integers(1, 17)))
        times = times[: int(rng.integers(0, S + 1))]
    b = pb.StepBatch(
        seq=seq,
        steps=steps,
        times=times,
        num_layers=L,
        norm=data[0],
        dist0=data[1],
        dstep=data[2],
        norm_prev=data[3],
        loss=[[], [1.0] * S, [math.nan] * S, [1.0]][int(rng.integers(0, 4))],
    )
    return b, step0 + S


@st.composite
def sessions(draw: Any, max_messages: int = 30) -> Session:
    """One session of a fuzzing client (see the module docstring): a Hello and up to ``max_messages`` more."""
    shape = draw(st.sampled_from(["valid", "valid", "valid", "broken_hello", "garbage", "no_hello"]))
    if shape == "garbage":
        frames = [
            draw(
                st.binary(min_size=0, max_size=256)
                | st.sampled_from([b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 10, bytes(range(256))])
            )
        ]
        return Session(frames, garbage=True)
    out: list[pb.JobMessage] = []
    if shape == "broken_hello":
        out.append(pb.JobMessage(hello=draw(messages(pb.Hello, 1))))
        layers, init = _layer_table(draw)
    elif shape == "valid":
        layers, init = _layer_table(draw)
        hello = pb.Hello(
            # Mostly a new run (accepted, so its batches are processed); sometimes a taken name, the
            # innocent job's included (run_owned, layer_table_mismatch), or any text.
            run=draw(
                st.integers(0, 2**40).map(lambda i: f"fuzz-{i}")
                | st.sampled_from(["fuzz-a", "fuzz-b", INNOCENT])
                | st.text(min_size=1, max_size=30)
            ),
            world_size=(ws := draw(st.sampled_from([0, 1, 4]))),
            rank=draw(st.integers(0, max(0, ws - 1))),  # a valid rank
            framework="fuzz",
            host="fuzzer",
            pid=1,
            layers=layers,
            every=1,
            run_key=draw(st.sampled_from(["", "k1", "k2"])),
            session_id="fuzz",
        )
        if draw(st.integers(0, 9)) == 0:  # one broken detail in an otherwise fine Hello
            what = draw(st.sampled_from(["dup", "index", "init_norm", "numel", "empty"]))
            if what == "dup" and len(layers) > 1:
                hello.layers[1].name = hello.layers[0].name
            elif what == "index":
                hello.layers[0].index = len(layers) + 5
            elif what == "init_norm":
                hello.layers[0].init_norm = draw(st.sampled_from([math.nan, -1.0, math.inf]))
            elif what == "numel":
                hello.layers[0].numel = 2**64 - 1
            else:
                del hello.layers[:]
        out.append(pb.JobMessage(hello=hello))
    else:
        layers, init = _layer_table(draw)
    seq, step0 = 0, draw(st.sampled_from([1, 1, 100, 2**62 - 5, 2**62 + 1]))
    lengths = [0, 1, 3, max_messages // 4, max_messages // 2, max_messages]  # long sessions often
    n = draw(st.sampled_from(lengths) | st.integers(0, max_messages))
    for _ in range(n):
        # A Goodbye or a seq that does not increase ends the session: rare, so sessions run long.
        what = draw(st.sampled_from(["batch"] * 40 + ["seq", "control_ack", "control_ack", "hello", "empty", "bye"]))
        if what in ("batch", "seq"):
            seq = min(seq + 1, 2**64 - 1) if what == "batch" else draw(ints(0, 2**64 - 1))
            b, step0 = draw(_batch(len(layers), init, seq, step0))
            out.append(pb.JobMessage(steps=b))
        elif what == "control_ack":
            out.append(pb.JobMessage(control_ack=draw(messages(pb.ControlAck, 0))))
        elif what == "hello":
            out.append(pb.JobMessage(hello=draw(messages(pb.Hello, 1))))
        elif what == "empty":
            out.append(pb.JobMessage())
        else:
            out.append(pb.JobMessage(goodbye=pb.Goodbye(last_seq=seq)))
    return Session([m.SerializeToString() for m in out])


# ---------------------------------------------------------------- queries
# Compact is left out: its request has no fields to garble, and each call is a VACUUM, slow by design
# (seconds on a busy machine), which the fuzzer would count as a hang.
QUERY_METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["Query"].methods if m.name != "Compact"}


@st.composite
def query_calls(draw: Any) -> tuple[str, Any]:
    """(method name, request) for any method of the Query service, every field random."""
    name = draw(st.sampled_from(sorted(QUERY_METHODS)))
    cls = getattr(pb, QUERY_METHODS[name].input_type.name)
    return name, draw(messages(cls, 3))


# ---------------------------------------------------------------- running them
@dataclass
class Tally:
    """What the fuzzer saw (the properties are checked on it)."""

    messages: int = 0
    sessions: int = 0
    queries: int = 0
    hangs: list[tuple[str, float]] = field(default_factory=list)
    bad_status: list[tuple[str, str, str]] = field(default_factory=list)
    told: int = 0  # refusals the client was told about (SessionError)
    told_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    garbage_sessions: int = 0
    garbage_unanswered: int = 0  # garbage sessions that got no SessionError
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    crashes: int = 0
    unanswered: int = 0  # calls that got no answer before their deadline
    slowest: float = 0.0


def _identity(b: bytes) -> bytes:
    return b


class Fuzzer:
    """Runs generated sessions and calls against one collector, counting what properties need."""

    def __init__(self, address: str, metrics_url: str) -> None:
        self.address = address
        self.metrics_url = metrics_url
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(address, options=opts)
        self.raw = self.channel.stream_stream(
            "/layrot.v1.Ingest/Session", request_serializer=_identity, response_deserializer=_identity
        )
        self.query = pb_grpc.QueryStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.tally = Tally()

    def close(self) -> None:
        self.channel.close()

    def _timed(self, what: str, t0: float) -> float:
        dt = time.monotonic() - t0
        self.tally.slowest = max(self.tally.slowest, dt)
        if dt > HANG_SECONDS:
            self.tally.hangs.append((what, dt))
        return dt

    def _status(self, what: str, exc: grpc.RpcError) -> None:
        code = exc.code()
        self.tally.statuses[code.name] += 1
        if code in BAD_STATUS:
            self.tally.bad_status.append((what, code.name, (exc.details() or "")[:300]))
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.tally.hangs.append((what, math.inf))
            self.tally.unanswered += 1

    def session(self, s: Session) -> None:
        """Send the session's frames, half-close, read every answer: the call must end within 1 s of the last frame."""
        self.tally.sessions += 1
        told = 0
        sent = [time.monotonic()]

        def frames() -> Any:
            for f in s.frames:  # counted when gRPC takes it: a refused session stops taking them
                self.tally.messages += 1
                yield f
            sent[0] = time.monotonic()  # gRPC asks for more after the last one: everything is sent

        try:
            for raw in self.raw(frames(), timeout=10.0 + 0.01 * len(s.frames)):
                msg = pb.CollectorMessage.FromString(raw)
                if msg.WhichOneof("kind") == "error":
                    told += 1
                    self.tally.told_codes[msg.error.code] += 1
            self.tally.statuses["OK"] += 1
        except grpc.RpcError as exc:
            self._status("Ingest.Session", exc)
        self._timed("Ingest.Session", sent[0])
        self.tally.told += told
        if s.garbage:
            self.tally.garbage_sessions += 1
            if told == 0:
                self.tally.garbage_unanswered += 1

    def call(self, name: str, request: Any) -> None:
        """One Query call (streams read to their end; WatchAlerts for 0.05 s)."""
        self.tally.queries += 1
        self.tally.messages += 1
        method = getattr(self.query, name)
        stream = QUERY_METHODS[name].server_streaming
        t0 = time.monotonic()
        try:
            if name == "WatchAlerts":
                call = method(request, timeout=0.05)
                try:
                    for _ in call:
                        pass
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # our own 0.05 s: the stream was alive
                        raise
                self.tally.statuses["OK"] += 1
            elif stream:
                for _ in method(request, timeout=5.0):
                    pass
                self.tally.statuses["OK"] += 1
            else:
                method(request, timeout=5.0)
                self.tally.statuses["OK"] += 1
        except grpc.RpcError as exc:
            self._status(f"Query.{name}", exc)
        self._timed(f"Query.{name}", t0)

    def alive(self) -> bool:
        """The collector still answers its health check and ListRuns, each within 1 s."""
        try:
            ok = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=HANG_SECONDS)
            self.query.ListRuns(pb.ListRunsRequest(), timeout=HANG_SECONDS)
            return ok.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            self.tally.crashes += 1
            return False

    def rejected(self) -> dict[str, float]:
        """``layrot_messages_rejected_total`` by reason, from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                if smp.name == "layrot_messages_rejected_total":
                    out[smp.labels["reason"]] = smp.value
        return out


class InnocentJob:
    """A real ``Reporter`` (spool on) submitting a step every few ms beside the fuzzer."""

    def __init__(self, address: str, spool_dir: str, layers: int = 8, period: float = 0.003) -> None:
        from layrot.agent.reporter import LayerSpec, Reporter

        self.specs = [LayerSpec(name=f"w{i}", index=i, shape=(8, 8), init_norm=4.0, numel=64) for i in range(layers)]
        self.reporter = Reporter(INNOCENT, self.specs, collector=address, every=1, spool_dir=spool_dir)
        self.period = period
        self.trained = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._train, name="innocent-job", daemon=True)

    def start(self) -> InnocentJob:
        self._thread.start()
        return self

    def _train(self) -> None:
        from layrot.agent.reporter import StepRecord

        L = len(self.specs)
        values = np.zeros((6, L))  # the wire rows: norm, dist0, dstep, norm_prev, dot0, dotstep
        values[0] = values[3] = 4.0
        values[1], values[2] = 0.01, 0.001
        while not self._stop.is_set():
            self.trained += 1
            self.reporter.submit(StepRecord(step=self.trained, time=time.time(), values=values))
            time.sleep(self.period)

    def finish(self, timeout: float = 60.0) -> tuple[bool, int]:
        """Stop training, flush; (flushed, dropped)."""
        self._stop.set()
        self._thread.join(5)
        ok = self.reporter.flush(timeout)
        return ok, self.reporter.stats.dropped
