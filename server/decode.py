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


class SessionReject(Exception):
    """Bad input that ends (Hello) or skips (StepBatch) with a SessionError."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code


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


def decode_batch(b: pb.StepBatch, num_layers: int) -> DecodedBatch:
    """Validate ``b`` against the session's layer count; raise SessionReject("bad_batch") when it is malformed."""
    L = num_layers
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
