"""The generalization indicator: did every layer get far enough from its initialization?

The paper's rule of thumb (Carbonnelle & De Vleeschouwer, Sections 4-5): the
runs that generalize best end with every layer's rotation (cosine distance to
its initialization) close to 1. As a number per run and step:

* the share of layers whose rotation reached ``target`` (default 0.9; the
  paper's optimum is 1);
* the smallest layer rotation (the layer holding the run back);
* per layer, *under-rotated* once the run is past ``share`` of its planned steps
  (a job announces them: ``Hello.total_steps``) and the layer is still below
  ``target``: early in a run every layer is below it, which says nothing.

NaN rotations (a diverged layer) count as not at the target and are left out of
the minimum. Pure numpy: the collector's /metrics, the Query service and the
web view all call these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["DEFAULT_SHARE", "DEFAULT_TARGET", "Indicator", "IndicatorSettings", "indicator"]

DEFAULT_TARGET = 0.9
# Under-rotated is judged past this share of the planned run (half: the paper's curves
# of well-generalizing runs have most of their rotation by mid-training).
DEFAULT_SHARE = 0.5


@dataclass(frozen=True)
class IndicatorSettings:
    """The collector's settings of the indicator (``serve --rotation-target``, ``--under-rotated-share``)."""

    target: float = DEFAULT_TARGET
    share: float = DEFAULT_SHARE

    def __post_init__(self) -> None:
        if not (0.0 < self.target <= 2.0):
            raise ValueError(f"the rotation target must be in (0, 2] (a cosine distance), got {self.target}")
        if not (0.0 <= self.share <= 1.0):
            raise ValueError(f"the under-rotated share must be in [0, 1], got {self.share}")

    def of(self, rotation: ArrayLike, step: int, total_steps: int = 0) -> Indicator:
        """:func:`indicator` with these settings."""
        return indicator(rotation, step, total_steps, self.target, self.share)


@dataclass(frozen=True)
class Indicator:
    """The indicator of one run at one step (see the module docstring)."""

    at_target_ratio: float  # share of layers with rotation >= target (NaN without layers)
    min_rotation: float  # NaN when no layer has a finite rotation
    judged: bool  # past ``share`` of the planned steps (False when the length is unknown)
    under_rotated: np.ndarray  # bool per layer: judged and below target (all False when not judged)


def indicator(
    rotation: ArrayLike,
    step: int,
    total_steps: int = 0,
    target: float = DEFAULT_TARGET,
    share: float = DEFAULT_SHARE,
) -> Indicator:
    """The indicator of per-layer ``rotation`` at ``step`` of a run planned for ``total_steps`` (0 = unknown)."""
    if not (0.0 < target <= 2.0):
        raise ValueError(f"target must be in (0, 2] (a cosine distance), got {target}")
    if not (0.0 <= share <= 1.0):
        raise ValueError(f"share must be in [0, 1], got {share}")
    rot = np.asarray(rotation, dtype=np.float64).ravel()
    finite = np.isfinite(rot)
    reached = finite & (rot >= target)
    ratio = float(reached.mean()) if rot.size else float("nan")
    low = float(rot[finite].min()) if finite.any() else float("nan")
    judged = total_steps > 0 and step >= share * total_steps
    under = ~reached if judged else np.zeros(rot.shape, dtype=bool)
    return Indicator(at_target_ratio=ratio, min_rotation=low, judged=judged, under_rotated=under)
