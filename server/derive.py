"""Step 2 of ingest: per-layer rotation, step angle and the non-finite mask of a decoded batch.

``derive_many`` does the same for the batches of several sessions that arrived together
(with ``check_physics``) in one pass over their values stacked: the math is elementwise, so
a dozen numpy calls serve any number of batches instead of a dozen per batch, which is
what one-step batches (the common case) spend most of their collector time on.

The math is layrot.core.rotation (float64, vectorised over steps x layers).
With the radial dots the angles are well conditioned even for mostly radial
steps; without them (older or minimal clients) the triangle formulas apply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from layrot.core import rotation as rot
from layrot.server.decode import DecodedBatch, SessionReject, check_physics


@dataclass(slots=True)
class Derived:
    """What the collector computes from a batch, (S, L) each."""

    rotation: np.ndarray  # cosine distance to w(0)
    angle: np.ndarray  # radians rotated in the step
    bad: np.ndarray  # True where an input was NaN/Inf
    nonfinite: int  # count of True in ``bad``


def derive(batch: DecodedBatch, init_norm: np.ndarray) -> Derived:
    """Rotations against the session's ``init_norm`` (L,), step angles, and the non-finite mask."""
    rotation, angle = rot.layer_rotations(
        init_norm[None, :], batch.norm, batch.dist0, batch.dstep, batch.norm_prev, batch.dot0, batch.dotstep
    )
    # A finite sum means every input is finite (NaN and Inf propagate; an overflow to Inf only
    # sends a finite batch down the exact path below): a few passes fewer for the common case.
    with np.errstate(all="ignore"):  # Inf - Inf and overflow are expected here, not warnings
        total = batch.norm + batch.dist0
        total += batch.dstep
        total += batch.norm_prev
        for extra in (batch.dot0, batch.dotstep):
            if extra is not None:
                total += extra
        finite = math.isfinite(total.sum())
    if finite:
        return Derived(rotation, angle, np.zeros(batch.norm.shape, dtype=bool), 0)
    bad = ~(
        np.isfinite(batch.norm) & np.isfinite(batch.dist0) & np.isfinite(batch.dstep) & np.isfinite(batch.norm_prev)
    )
    for extra in (batch.dot0, batch.dotstep):
        if extra is not None:
            bad |= ~np.isfinite(extra)
    return Derived(rotation, angle, bad, int(np.count_nonzero(bad)))


def derive_checked(batch: DecodedBatch, init_norm: np.ndarray) -> Derived | SessionReject:
    """``check_physics`` then ``derive``; the refusal is returned, not raised."""
    try:
        check_physics(batch, init_norm)
    except SessionReject as exc:
        return exc
    return derive(batch, init_norm)


def _joined(raws: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(raws), dtype=np.float64).reshape(1, -1)


def derive_many(batches: Sequence[DecodedBatch], init_norms: Sequence[np.ndarray]) -> list[Derived | SessionReject]:
    """``derive_checked`` of each batch (its session's ``init_norm``), the checks and math done on them stacked.

    Batches with the same optional columns are stacked into one row of values (their
    init norms repeated per step alike); when the stack fails ``check_physics``, its
    batches are checked one by one, so a refusal names its own batch only.
    """
    out: list[Derived | SessionReject | None] = [None] * len(batches)
    groups: dict[tuple[bool, bool, bool], list[int]] = {}
    for i, b in enumerate(batches):
        groups.setdefault((b.rho is None, b.dot0 is None, b.dotstep is None), []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = derive_checked(batches[idx[0]], init_norms[idx[0]])
            continue
        group = [batches[i] for i in idx]
        inits = [init_norms[i] if b.num_steps == 1 else np.tile(init_norms[i], b.num_steps) for i, b in zip(idx, group)]
        init = np.concatenate(inits)
        g0 = group[0]
        # What check_physics and derive read, stacked; the other fields (rho, the raw bytes) are g0's, unused.
        stacked = dataclasses.replace(
            g0,
            num_steps=1,
            num_layers=init.shape[0],
            norm=_joined([b.raw_norm for b in group]),
            dist0=_joined([b.raw_dist0 for b in group]),
            dstep=_joined([b.raw_dstep for b in group]),
            norm_prev=_joined([b.raw_norm_prev for b in group]),
            dot0=None if g0.dot0 is None else _joined([b.raw_dot0 for b in group]),  # type: ignore[misc]
            dotstep=None if g0.dotstep is None else _joined([b.raw_dotstep for b in group]),  # type: ignore[misc]
        )
        try:
            check_physics(stacked, init)
        except SessionReject:  # some batch lies: find which, one by one
            for i in idx:
                out[i] = derive_checked(batches[i], init_norms[i])
            continue
        d = derive(stacked, init)
        o = 0
        for i, b in zip(idx, group):
            n = b.num_steps * b.num_layers
            shape = (b.num_steps, b.num_layers)
            bad = d.bad[0, o : o + n].reshape(shape)
            out[i] = Derived(
                d.rotation[0, o : o + n].reshape(shape),
                d.angle[0, o : o + n].reshape(shape),
                bad,
                int(np.count_nonzero(bad)) if d.nonfinite else 0,
            )
            o += n
    return out  # type: ignore[return-value]
