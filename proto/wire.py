"""Columnar packing shared by the job side and the collector.

Every per-layer quantity travels as one little-endian float64 array,
step-major (all layers of the first step, then the next step...).
"""

from __future__ import annotations

import numpy as np

DTYPE = np.dtype("<f8")

# Fields of StepBatch that carry S x L float64 arrays.
STEP_FIELDS = ("norm", "dist0", "dstep", "norm_prev")
OPTIONAL_STEP_FIELDS = ("rho",)


def pack(values: np.ndarray) -> bytes:
    """Pack an array of any shape as contiguous little-endian float64 bytes."""
    return np.ascontiguousarray(values, dtype=DTYPE).tobytes()


def unpack(data: bytes, n_steps: int, n_layers: int) -> np.ndarray:
    """Unpack ``n_steps * n_layers`` float64 values into an (S, L) array.

    Raises ValueError when the byte length does not match.
    """
    expected = n_steps * n_layers * DTYPE.itemsize
    if len(data) != expected:
        raise ValueError(f"expected {expected} bytes ({n_steps} steps x {n_layers} layers), got {len(data)}")
    return np.frombuffer(data, dtype=DTYPE).reshape(n_steps, n_layers)
