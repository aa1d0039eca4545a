"""Step 4 of ingest: what a batch leaves behind, history rows and the newest ``Snapshot``.

One ``steps`` row per (run, rank, step) with columnar float64 BLOBs (see
server/store.py). The loop over steps only slices bytes: S tuples per batch,
nothing per layer.
"""

from __future__ import annotations

import math

import numpy as np

from layrot.server.decode import DecodedBatch
from layrot.server.derive import Derived
from layrot.server.state import Snapshot


def step_rows(batch: DecodedBatch, derived: Derived, run_id: int, rank: int) -> list[tuple]:
    """Rows for ``Store.submit_rows`` (``INSERT_STEP`` column order); a non-finite loss is stored as NULL."""
    S = batch.num_steps
    stride = batch.num_layers * 8
    rot_b = derived.rotation.tobytes()
    ang_b = derived.angle.tobytes()
    raw_norm, raw_d0, raw_ds, raw_np = batch.raw_norm, batch.raw_dist0, batch.raw_dstep, batch.raw_norm_prev
    raw_rho, raw_dot0, raw_dotstep = batch.raw_rho, batch.raw_dot0, batch.raw_dotstep
    losses = list(batch.loss) if len(batch.loss) else [None] * S
    versions = list(batch.command_version) if len(batch.command_version) else [None] * S
    steps_l = batch.steps.tolist()
    times_l = batch.times.tolist()
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
    return rows


def newest_snapshot(batch: DecodedBatch, derived: Derived, rank: int) -> Snapshot:
    """The values of the batch's highest step (copies: the batch's buffers are not kept)."""
    # One step (the saturated case) needs no argmax, whose call costs more than the rest here.
    last = 0 if batch.num_steps == 1 else int(np.argmax(batch.steps))
    loss = float(batch.loss[last]) if len(batch.loss) else float("nan")
    return Snapshot(
        rank=rank,
        step=int(batch.steps[last]),
        time=float(batch.times[last]),
        loss=loss,
        rotation=derived.rotation[last].copy(),
        step_angle=derived.angle[last].copy(),
        weight_norm=batch.norm[last].copy(),
        rho=None if batch.rho is None else batch.rho[last].copy(),
    )
