"""Step 1 of ingest: validate a job's messages and decode them into arrays.

``validate_hello`` turns a ``Hello`` into its layer table; ``decode_batch``
turns a ``StepBatch`` into a ``DecodedBatch`` of (steps x layers) float64
views on the message's bytes (no copy). Both raise ``SessionReject`` with the
code and message the job gets back; nothing here touches collector state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from layrot.proto import layrot_pb2 as pb
from layrot.proto.wire import unpack
from layrot.server.store import LayerRecord

MAX_RUN_NAME = 200

INT64_MAX = 2**63 - 1
# Steps beyond this are refused: far beyond any training run, and it leaves
# room for arithmetic on steps (leads, offsets) without leaving int64.
MAX_STEP = 2**62
# Unix seconds: a measurement time beyond this (year ~5138) is a unit error or garbage.
MAX_TIME = 1e11
# Relative slack of the triangle check (see check_physics): far above float32
# rounding of norms and distances measured on a device, far below anything a
# real (non-antiparallel) pair of weight tensors comes near.
TRIANGLE_SLACK = 1e-3


@dataclass(frozen=True)
class IngestLimits:
    """What one job may send; every refusal is counted in ``layrot_messages_rejected_total{reason}``.

    Defaults fit the largest models layrot is used with by an order of
    magnitude, and bound what one client can make the collector hold or
    compute (the Hello's layer table is validated on the event loop).
    """

    max_layers: int = 10_000  # layers in one Hello (reason too_many_layers)
    max_name_length: int = 1024  # characters of a layer name, and of other Hello strings (name_too_long)
    max_run_name: int = MAX_RUN_NAME  # characters of a run name (bad_hello)
    max_steps_per_batch: int = 10_000  # steps in one StepBatch (too_many_steps)
    max_runs: int = 50_000  # runs a collector keeps, restored ones included (too_many_runs)
    max_sessions: int = 20_000  # open Ingest sessions; one more is refused RESOURCE_EXHAUSTED (too_many_sessions)
    max_message_bytes: int = 16 * 1024 * 1024  # one message on the stream (too_large)
    max_meta: int = 256  # Hello.meta entries (bad_hello)
    max_world_size: int = 1 << 20  # Hello.world_size (bad_hello)

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"ingest limit {name} must be an integer >= 1, got {v!r}")


DEFAULT_LIMITS = IngestLimits()


class SessionReject(Exception):
    """Bad input that ends (Hello) or skips (StepBatch) with a SessionError."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code


def _text(what: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise SessionReject("bad_hello", f"{what} has {len(value)} characters (at most {limit})", "name_too_long")


def validate_hello(hello: pb.Hello, limits: IngestLimits = DEFAULT_LIMITS) -> list[LayerRecord]:
    """Check a Hello; return its layer table in forward order, or raise SessionReject(code "bad_hello").

    Linear in the number of layers (one pass, a set for duplicate names):
    it runs on the event loop, so a huge or hostile Hello must not stall
    other sessions.
    """
    run = hello.run
    if not run or len(run) > limits.max_run_name or not run.isprintable():
        raise SessionReject("bad_hello", f"run must be 1..{limits.max_run_name} printable characters, got {run!r:.220}")
    if hello.world_size > limits.max_world_size:
        raise SessionReject("bad_hello", f"world_size {hello.world_size} > {limits.max_world_size}")
    if hello.world_size and hello.rank >= hello.world_size:
        raise SessionReject("bad_hello", f"rank {hello.rank} >= world_size {hello.world_size}")
    if hello.applied_command_version > INT64_MAX:
        raise SessionReject("bad_hello", f"applied_command_version {hello.applied_command_version} out of range")
    for what in ("framework", "framework_version", "host", "client_version", "session_id", "run_key"):
        _text(what, getattr(hello, what), limits.max_name_length)
    if len(hello.meta) > limits.max_meta:
        raise SessionReject("bad_hello", f"{len(hello.meta)} meta entries (at most {limits.max_meta})")
    for k, v in hello.meta.items():
        _text("a meta key", k, limits.max_name_length)
        _text(f"meta[{k!r:.40}]", v, limits.max_name_length)
    n = len(hello.layers)
    if n == 0:
        raise SessionReject("bad_hello", "the layer table is empty")
    if n > limits.max_layers:
        raise SessionReject(
            "bad_hello",
            f"{n} layers in the Hello (this collector accepts at most {limits.max_layers})",
            "too_many_layers",
        )
    max_name = limits.max_name_length
    seen: set[str] = set()
    dups: list[str] = []
    slots: list[LayerRecord | None] = [None] * n
    for lay in hello.layers:
        name = lay.name
        if not name:
            raise SessionReject("bad_hello", "a layer has an empty name")
        if len(name) > max_name:
            raise SessionReject(
                "bad_hello", f"a layer name has {len(name)} characters (at most {max_name})", "name_too_long"
            )
        if name in seen:
            if len(dups) < 5:
                dups.append(name)
            continue
        seen.add(name)
        idx = lay.index
        if idx >= n or slots[idx] is not None:
            raise SessionReject("bad_hello", f"layer indices must be exactly 0..{n - 1}")
        init_norm = lay.init_norm
        if not (math.isfinite(init_norm) and init_norm >= 0.0):
            raise SessionReject("bad_hello", f"layer {name!r:.100}: init_norm must be finite and >= 0, got {init_norm}")
        if lay.numel > INT64_MAX:
            raise SessionReject("bad_hello", f"layer {name!r:.100}: numel {lay.numel} out of range")
        shape = list(lay.shape)
        if len(shape) > 64 or any(d < 0 for d in shape):
            raise SessionReject(
                "bad_hello", f"layer {name!r:.100}: shape must be at most 64 sizes >= 0, got {str(shape)[:100]}"
            )
        module_type = lay.module_type
        _text(f"layer {name!r:.100}: module_type", module_type, max_name)
        slots[idx] = LayerRecord(
            index=idx,
            name=name,
            shape=shape,
            init_norm=init_norm,
            numel=lay.numel,
            module_type=module_type,
            sharded=lay.sharded,
        )
    if dups:
        raise SessionReject("bad_hello", f"duplicate layer names: {sorted(dups)}")
    return slots  # type: ignore[return-value]  # every slot is filled: n distinct indices in 0..n-1


def capabilities(hello: pb.Hello) -> dict[str, bool]:
    """What the job announced it supports."""
    c = hello.capabilities
    return {"layca": bool(c.layca), "control": bool(c.control), "loss": bool(c.loss)}


@dataclass(slots=True)
class DecodedBatch:
    """A validated StepBatch: S steps x L layers.

    The (S, L) arrays are read-only views on the ``raw_*`` bytes, which the
    history store keeps as they came. ``loss`` and ``command_version`` are the
    message's repeated fields (empty or S long).
    """

    num_steps: int
    num_layers: int
    steps: np.ndarray  # (S,) uint64, >= 1
    times: np.ndarray  # (S,) float64, finite
    loss: Any  # Sequence[float], 0 or S
    command_version: Any  # Sequence[int], 0 or S
    norm: np.ndarray
    dist0: np.ndarray
    dstep: np.ndarray
    norm_prev: np.ndarray
    rho: np.ndarray | None
    dot0: np.ndarray | None
    dotstep: np.ndarray | None
    raw_norm: bytes
    raw_dist0: bytes
    raw_dstep: bytes
    raw_norm_prev: bytes
    raw_rho: bytes | None
    raw_dot0: bytes | None
    raw_dotstep: bytes | None


def decode_batch(b: pb.StepBatch, num_layers: int, limits: IngestLimits = DEFAULT_LIMITS) -> DecodedBatch:
    """Validate ``b`` against the session's layer count; raise SessionReject("bad_batch") when it is malformed.

    Steps must be in 1..MAX_STEP and strictly increasing (a step repeated in
    one batch is refused), times finite unix seconds in 0..MAX_TIME,
    command versions within int64: every value that reaches SQL is checked
    here, before anything is queued.
    """
    L = num_layers
    S = len(b.steps)
    if b.num_layers != L:
        raise SessionReject("bad_batch", f"num_layers={b.num_layers} but the Hello declared {L} layers")
    if S == 0 or len(b.times) != S:
        raise SessionReject(
            "bad_batch", f"need >= 1 step and len(times) == len(steps), got {S} steps, {len(b.times)} times"
        )
    if S > limits.max_steps_per_batch:
        raise SessionReject(
            "bad_batch", f"{S} steps in one batch (at most {limits.max_steps_per_batch})", "too_many_steps"
        )
    if S == 1:
        # One-step batches (the common saturated case): the same checks on Python scalars, which
        # costs a fraction of the array reductions below for a single value.
        step, t = b.steps[0], b.times[0]
        lo_step = hi_step = step
        finite_times = math.isfinite(t)
        lo_time = hi_time = t
    else:
        steps = np.fromiter(b.steps, dtype=np.uint64, count=S)
        lo_step, hi_step = steps.min(), steps.max()
    if lo_step < 1:
        raise SessionReject("bad_batch", "steps must be >= 1 (1 after the first optimizer step)")
    if hi_step > MAX_STEP:
        raise SessionReject("bad_batch", f"step {int(hi_step)} out of range (at most 2**62)", "bad_step")
    if S == 1:
        steps = np.array([step], dtype=np.uint64)
        times = np.array([t], dtype=np.float64)
    else:
        if not (steps[1:] > steps[:-1]).all():
            i = int(np.argmin(steps[1:] > steps[:-1]))
            what = "repeated" if steps[i + 1] == steps[i] else "not increasing"
            raise SessionReject(
                "bad_batch", f"steps must increase within a batch: step {int(steps[i + 1])} {what}", "bad_step"
            )
        times = np.fromiter(b.times, dtype=np.float64, count=S)
        finite_times = bool(np.isfinite(times).all())
        if finite_times:
            lo_time, hi_time = times.min(), times.max()
    if not finite_times:
        raise SessionReject("bad_batch", "times must be finite unix seconds")
    if lo_time < 0.0 or hi_time > MAX_TIME:
        raise SessionReject(
            "bad_batch",
            f"times must be unix seconds in 0..{MAX_TIME:g}, got {lo_time:g}..{hi_time:g}",
            "bad_time",
        )
    if len(b.loss) not in (0, S):
        raise SessionReject("bad_batch", f"len(loss) must be 0 or {S}, got {len(b.loss)}")
    if len(b.command_version) not in (0, S):
        raise SessionReject("bad_batch", f"len(command_version) must be 0 or {S}, got {len(b.command_version)}")
    if len(b.command_version) and max(b.command_version) > INT64_MAX:
        raise SessionReject("bad_batch", "command_version out of range")
    raw_norm, raw_d0, raw_ds, raw_np = b.norm, b.dist0, b.dstep, b.norm_prev
    raw_rho, raw_dot0, raw_dotstep = b.rho or None, b.dot0 or None, b.dotstep or None
    try:
        norm = unpack(raw_norm, S, L)
        dist0 = unpack(raw_d0, S, L)
        dstep = unpack(raw_ds, S, L)
        norm_prev = unpack(raw_np, S, L)
        rho = unpack(raw_rho, S, L) if raw_rho else None
        dot0 = unpack(raw_dot0, S, L) if raw_dot0 else None
        dotstep = unpack(raw_dotstep, S, L) if raw_dotstep else None
    except ValueError as exc:
        raise SessionReject("bad_batch", f"bad array size: {exc}") from None
    return DecodedBatch(
        S,
        L,
        steps,
        times,
        b.loss,
        b.command_version,
        norm,
        dist0,
        dstep,
        norm_prev,
        rho,
        dot0,
        dotstep,
        raw_norm,
        raw_d0,
        raw_ds,
        raw_np,
        raw_rho,
        raw_dot0,
        raw_dotstep,
    )


def _over(dist: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """True when a finite ``dist`` exceeds ``a + b`` (with slack) anywhere; NaN/Inf are divergence, not lies."""
    bad = dist > (a + b) * (1.0 + TRIANGLE_SLACK)
    if not bad.any():
        return False
    return bool((bad & np.isfinite(dist)).any())


def check_physics(batch: DecodedBatch, init_norm: np.ndarray) -> None:
    """Refuse measurements no weight tensors can produce; raise SessionReject(code "bad_batch").

    Norms and distances are never negative, and by the triangle inequality
    ||w(t) - w(0)|| <= ||w(t)|| + ||w(0)|| and ||w(t) - w(t-1)|| <=
    ||w(t)|| + ||w(t-1)||. Only the upper bound is checked: the lower one
    (|a - b|) is what float32 rounding of mostly radial steps crosses in
    honest jobs. Non-finite values pass: they are divergence, stored and
    counted as such.
    """
    for name in ("norm", "dist0", "dstep", "norm_prev"):
        # fmin ignores NaN (divergence), so a negative value beside a NaN is still seen; one pass per array.
        if np.fmin.reduce(getattr(batch, name), axis=None) < 0.0:
            raise SessionReject("bad_batch", f"{name} has negative values (a norm is >= 0)", "negative_norm")
    if _over(batch.dist0, batch.norm, init_norm):
        raise SessionReject(
            "bad_batch",
            "dist0 = ||w(t) - w(0)|| exceeds ||w(t)|| + ||w(0)|| (the triangle inequality) for the norms given",
            "impossible_distance",
        )
    if _over(batch.dstep, batch.norm, batch.norm_prev):
        raise SessionReject(
            "bad_batch",
            "dstep = ||w(t) - w(t-1)|| exceeds ||w(t)|| + ||w(t-1)|| (the triangle inequality) for the norms given",
            "impossible_distance",
        )
