"""The measurement contract shared by the PyTorch and the TensorFlow hooks.

On a reported step each hook computes, on the device and for every layer l, with
d0 = w(t) - w(0) and ds = w(t) - w(t-1), the four sums of :data:`DEVICE_ROWS`

    ||d0||^2,  d0 . w(0),  ||ds||^2,  ds . w(t)

in float64 (accumulated in at least float32), and packs them with the step's loss
into one ``(PACKED_ROWS, L)`` float64 array: rows ``DEVICE_ROWS`` in that order,
then row :data:`LOSS_ROW` holding the loss in column 0 (NaN: no loss) and NaN
elsewhere. The array stays on the device until the reporter's exporter thread
asks for it; :class:`PackedMeasurement` then derives the six wire rows of
:data:`WIRE_ROWS` (the ``StepBatch`` fields) on the host, exactly
(:func:`wire_rows`), from ||w(0)||, which the hooks know in float64:

    ||w(t)||^2   = ||w(0)||^2 + 2 d0.w(0) + ||d0||^2
    ||w(t-1)||^2 = ||w(t)||^2 - 2 ds.w(t-1) - ||ds||^2,   ds.w(t-1) = ds.w(t) - ||ds||^2

Why dots of differences rather than norms of the weights: the angle of a small
step comes out of norms alone only through a needle-like triangle, and when the
step is mostly radial float32 rounding of ||w|| is amplified by ||w|| / ||ds||. A
dot of the small difference with the weights has error relative to ||ds|| ||w||,
so the collector can split each difference into radial and tangential parts
without cancellation. Four sums are also one full-size reduction fewer than
measuring ||w(t)|| directly.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable

import numpy as np

from layrot.agent.reporter import WIRE_ROWS, StepRecord

__all__ = ["DEVICE_ROWS", "LOSS_ROW", "PACKED_ROWS", "WIRE_ROWS", "wire_rows", "PackedMeasurement"]

#: Rows the device computes per layer, in this order.
DEVICE_ROWS = ("dist0_sq", "dot0", "dstep_sq", "dotstep_w")
#: Row of the packed array that carries the loss (column 0; NaN = none).
LOSS_ROW = len(DEVICE_ROWS)
#: Rows of the packed array a hook hands over.
PACKED_ROWS = LOSS_ROW + 1
# WIRE_ROWS (imported above): the rows a measurement resolves to for the reporter
# (``StepBatch`` fields), in this order; the reporter, which packs them, defines them.


def wire_rows(device_rows: np.ndarray, init_norms: np.ndarray, prev_is_w0: bool = False) -> np.ndarray:
    """(6, L) rows of :data:`WIRE_ROWS` (norm, dist0, dstep, norm_prev, dot0, dotstep) from the device rows.

    ``prev_is_w0``: w(t-1) is still the w(0) copy (the first report before any
    refresh), so ||w(t-1)|| = ||w(0)|| exactly. ``dotstep`` on the wire is
    ds . w(t-1) = ds . w(t) - ||ds||^2.
    """
    d0sq, dot0, dssq, dsw = np.asarray(device_rows, dtype=np.float64)
    init_sq = np.asarray(init_norms, dtype=np.float64) ** 2
    with np.errstate(invalid="ignore"):
        norm_sq = init_sq + 2.0 * dot0 + d0sq
        dotstep = dsw - dssq
        prev_sq = init_sq if prev_is_w0 else norm_sq - 2.0 * dotstep - dssq
        return np.stack(
            [
                np.sqrt(np.maximum(norm_sq, 0.0)),
                np.sqrt(d0sq),
                np.sqrt(dssq),
                np.sqrt(np.maximum(prev_sq, 0.0)),
                dot0,
                dotstep,
            ]
        )


class PackedMeasurement:
    """One packed ``(PACKED_ROWS, L')`` measurement on its way to the reporter.

    Args:
        fetch: returns the packed array on the host (it may wait for the device);
            called once, on the reporter's exporter thread. Columns beyond
            ``num_layers`` (padding) are ignored.
        num_layers: L, the hook's layers.
        init_norms: ||w(0)|| per layer, float64.
        prev_is_w0: w(t-1) was still the w(0) copy when this step was measured.
    """

    __slots__ = ("_fetch", "_host", "_num_layers", "_init_norms", "_prev_is_w0")

    def __init__(
        self, fetch: Callable[[], np.ndarray], num_layers: int, init_norms: np.ndarray, prev_is_w0: bool = False
    ) -> None:
        self._fetch: Callable[[], np.ndarray] | None = fetch
        self._host: np.ndarray | None = None
        self._num_layers = int(num_layers)
        self._init_norms = np.asarray(init_norms, dtype=np.float64)
        self._prev_is_w0 = bool(prev_is_w0)

    def packed(self) -> np.ndarray:
        """The packed array on the host (fetched on first use)."""
        if self._host is None:
            self._host = np.asarray(self._fetch(), dtype=np.float64)  # type: ignore[misc]
            self._fetch = None  # drop the device tensor
            if self._host.shape[0] != PACKED_ROWS:
                raise ValueError(f"packed measurement has {self._host.shape[0]} rows, expected {PACKED_ROWS}")
        return self._host

    def values(self) -> np.ndarray:
        """The (6, L) wire rows (:data:`WIRE_ROWS`)."""
        return wire_rows(self.packed()[:LOSS_ROW, : self._num_layers], self._init_norms, self._prev_is_w0)

    def loss(self) -> float | None:
        """The step's loss, or None when the hook had none."""
        v = float(self.packed()[LOSS_ROW, 0])
        return None if np.isnan(v) else v

    def record(
        self, step: int, rho: np.ndarray | None = None, command_version: int = 0, time: float | None = None
    ) -> StepRecord:
        """The reporter's record for this step; values and loss resolve lazily on the exporter thread."""
        return StepRecord(
            step=int(step),
            time=_time.time() if time is None else float(time),
            values=self.values,
            loss=self.loss,
            rho=rho,
            command_version=int(command_version),
        )
