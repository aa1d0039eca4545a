"""The abrupt-rotation baseline ring: limits after any pushes and resizes, against a float64 reference.

``Baseline`` keeps the newest ``window`` step angles per layer (float32) and the log of
each column, taken when it is pushed; ``refresh`` must give the limits that the
window's plain median / MAD of the log angles give (tests/test_alerts.py's
``reference_limit`` rule), whatever the chunk sizes, wrap-arounds and resizes were.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from layrot.server.alert_detectors import Baseline
from layrot.server.alert_thresholds import Thresholds


def reference(window_angles: np.ndarray, th: Thresholds) -> np.ndarray:
    """Per-layer limit from (steps, layers) angles, float64 (the angles rounded to float32 as the ring holds them).

    The centre is the log of the median angle (for an even count, the mean of the middle two
    angles, as the engine defines it; not the median of the logs), the spread the MAD of the
    log angles around it.
    """
    angles = window_angles.astype(np.float32).astype(np.float64)
    lmed = np.log(np.maximum(np.median(angles, axis=0), 1e-9))
    win = np.log(np.maximum(angles, 1e-9))
    spread = np.maximum(1.4826 * np.median(np.abs(win - lmed), axis=0), 0.1)
    limit = np.maximum(np.exp(lmed + np.maximum(th.k * spread, math.log(th.ratio))), th.min_angle)
    return np.minimum(limit, th.abs_angle)


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12),
    resize_at=st.integers(min_value=0, max_value=12),
    new_window=st.integers(min_value=3, max_value=30),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_limits_after_any_pushes_and_resizes_match_the_reference(
    chunks: list[int], resize_at: int, new_window: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    L, window = 7, 11
    th = Thresholds(window=window, warmup=3)
    b = Baseline(0, L, window)
    newest = np.zeros((0, L))  # what the ring must hold: the newest `window` steps, cut again at a resize
    for i, n in enumerate(chunks):
        if i == resize_at:
            window = new_window
            th = Thresholds(window=window, warmup=3)
            b.resize(window)
            newest = newest[-window:]
        # Log-normal angles over six decades, some below TINY_ANGLE (clamped in the logs).
        a = np.exp(rng.normal(-6.0, 3.0, size=(n, L)))
        b.push(a)
        b.reported += n
        newest = np.concatenate([newest, a])[-window:]
    b.refresh(th)
    assert b.count == newest.shape[0]
    assert np.array_equal(np.sort(b.columns(), axis=1), np.sort(newest.T.astype(np.float32), axis=1))
    if b.armed:
        np.testing.assert_allclose(b.limit, reference(newest, th), rtol=2e-5)
