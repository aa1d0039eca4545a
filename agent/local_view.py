"""The job's own view of its numbers: per-layer rotation and step angle as the collector will compute them.

Computed on the reporter's exporter thread (never the training thread) from the
same wire rows the collector gets, with the same math (``core.rotation.layer_rotations``),
so ``handle.latest()`` and an ``on_report`` callback need no collector at all (offline
runs included) and agree with the history: the values are rounded as the history keeps
them (``core.stored``, float32), so they equal what ``export`` gives bit for bit. A callback that raises is logged once
and counted in ``handle.stats.report_callback_errors``; it never reaches training
or stops reporting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layrot.core.rotation import layer_rotations
from layrot.core.stored import as_stored

log = logging.getLogger(__name__)

__all__ = ["LayerReport", "LocalView"]


@dataclass(frozen=True)
class LayerReport:
    """One reported step of this process: per-layer arrays in forward order (length L).

    float64 arrays holding the values as the history stores them (float32-rounded, ``core.stored``).
    """

    run: str
    step: int
    time: float
    loss: float  # NaN without a loss
    layer_names: tuple[str, ...]
    rotation: np.ndarray  # cosine distance to w(0)
    step_angle: np.ndarray  # radians in this step
    weight_norm: np.ndarray
    rho: np.ndarray | None  # the Layca rate applied, None without Layca

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"rotation/<layer>": value, "step_angle/<layer>": ..., "loss": ...}``, as metric loggers take."""
        out: dict[str, float] = {}
        for key in ("rotation", "step_angle", "weight_norm"):
            values = getattr(self, key)
            out.update({f"{key}/{n}": float(v) for n, v in zip(self.layer_names, values)})
        if np.isfinite(self.loss):
            out["loss"] = float(self.loss)
        return out


class LocalView:
    """Keeps the newest :class:`LayerReport` and hands every one to the callbacks."""

    def __init__(self, run: str, layer_names: Sequence[str], init_norms: Sequence[float]) -> None:
        self.run = run
        self.layer_names = tuple(layer_names)
        self.init_norm = np.asarray(init_norms, dtype=np.float64)
        self.callbacks: list[Callable[[LayerReport], object]] = []
        self.callback_errors = 0
        self._latest: LayerReport | None = None
        self._pending: tuple[Any, ...] | None = None  # the newest batch, not computed yet (no callbacks)
        self._lock = threading.Lock()

    @property
    def latest(self) -> LayerReport | None:
        """The newest report, computed on demand from the newest batch when no callback computed it already."""
        with self._lock:
            if self._latest is None and self._pending is not None:
                reports = self._reports(self._pending)
                self._latest = reports[-1] if reports else None
                self._pending = None
            return self._latest

    def observe(
        self,
        steps: Sequence[int],
        times: Sequence[float],
        losses: Sequence[float],
        wire: np.ndarray,
        rhos: Sequence[np.ndarray] | None,
    ) -> None:
        """A packed batch: ``wire`` is (6, S, L) of norm, dist0, dstep, norm_prev, dot0, dotstep.

        Without callbacks nothing is computed here: the batch is kept (a reference, no
        copy) for :attr:`latest`, so a job that never asks pays nothing per report.
        """
        if not self.callbacks:
            with self._lock:
                self._pending = (steps, times, losses, wire, rhos)
                self._latest = None
            return
        reports = self._reports((steps, times, losses, wire, rhos))
        if reports:
            with self._lock:
                self._latest, self._pending = reports[-1], None
        for report in reports:
            for cb in list(self.callbacks):
                try:
                    cb(report)
                except Exception as exc:  # a user's callback never reaches training or stops reporting
                    self.callback_errors += 1
                    if self.callback_errors == 1:
                        log.warning("layrot: an on_report callback raised %r; reports go on", exc, exc_info=exc)

    def _reports(self, batch: tuple[Any, ...]) -> list[LayerReport]:
        """One report per step of a batch ``(steps, times, losses, wire, rhos)`` as :meth:`observe` takes it."""
        steps, times, losses, wire, rhos = batch
        try:
            norm, dist0, dstep, norm_prev, dot0, dotstep = wire
            rotation, angle = layer_rotations(self.init_norm[None, :], norm, dist0, dstep, norm_prev, dot0, dotstep)
            rotation, angle, norm = as_stored(rotation), as_stored(angle), as_stored(norm)
        except Exception as exc:  # a view of the numbers must never cost the report itself
            self.callback_errors += 1
            log.debug("layrot: the local view failed: %r", exc)
            return []
        out = []
        for s, step in enumerate(steps):
            rho = None if rhos is None else as_stored(rhos[s])
            out.append(
                LayerReport(
                    run=self.run,
                    step=int(step),
                    time=float(times[s]),
                    loss=float(losses[s]),
                    layer_names=self.layer_names,
                    rotation=rotation[s],
                    step_angle=angle[s],
                    weight_norm=norm[s],
                    rho=rho if rho is not None and np.isfinite(rho).any() else None,
                )
            )
        return out
