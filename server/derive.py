"""Step 2 of ingest: per-layer rotation, step angle and the non-finite mask of a decoded batch.

The math is layrot.core.rotation (float64, vectorised over steps x layers).
With the radial dots the angles are well conditioned even for mostly radial
steps; without them (older or minimal clients) the triangle formulas apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from layrot.core import rotation as rot
from layrot.server.decode import DecodedBatch


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
