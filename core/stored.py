"""The precision of the history: what the collector keeps of each per-layer value.

The history stores rotation, step angle, weight norm and rho as little-endian float32
(store schema 3): the collector computes them in float64 and rounds once on the way to
disk. Whatever shows the job its own numbers as the history will hold them (the job's
local view, and through it the W&B / MLflow / TensorBoard bridges) rounds the same way
here, so both sides agree bit for bit instead of to float32's 6e-8.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HISTORY_DTYPE", "as_stored"]

HISTORY_DTYPE = np.dtype("<f4")


def as_stored(values: np.ndarray) -> np.ndarray:
    """``values`` rounded as the history stores them, returned as float64 (the readers' dtype)."""
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as the store keeps it
        return np.asarray(values, dtype=np.float64).astype(HISTORY_DTYPE).astype(np.float64)
