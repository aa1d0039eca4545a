"""Alert thresholds: the collector defaults and per-run overrides (``SetThresholds``).

``Thresholds`` is immutable; the engine (server/alerts.py) keeps the defaults
and, per run, only the fields a ``SetThresholds`` request changed, merged on
demand. Why the default values are what they are: server/alert_detectors.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from layrot.proto import layrot_pb2 as pb


@dataclass(frozen=True)
class Thresholds:
    """Alert thresholds; the defaults are the collector's unless ``serve`` flags change them.

    Abrupt rotations (the model and why these values: server/alert_detectors.py):

    abs_angle: radians; an extreme step angle: fires from the first step,
        whatever the baseline, as a critical incident (0.6 rad = 34 deg).
    k: a layer jumps when its log step angle is more than k robust spreads
        (1.4826 x MAD of the log angles, at least ``SPREAD_FLOOR``) above the
        median log angle of its last ``window`` reported steps...
    ratio: ...and its angle is at least ``ratio`` x that median.
    group: an incident is a step where this share of the layers (at least 2)
        jump together...
    single_ratio: ...or where one layer jumps ``single_ratio`` x its median
        and ``single_ratio`` x the median angle of the other layers at that step.
    window: reported steps in the per-layer baseline (rolling median / MAD).
    warmup: reported steps of a layer before its baseline rules arm (before:
        only ``abs_angle``).
    refractory: reported steps after an incident's newest jump during which
        new jumps update that incident instead of raising a new one.
    min_angle: radians; a layer never jumps below this.

    Other kinds:

    stall_seconds: a connected run silent this long is stalled (same as the
        15 min of the Prometheus rule LayrotRunStalled).
    not_learning_share: a run that announced its planned length (``Hello.total_steps``,
        ``watch(..., total_steps=N)`` and the callbacks) is judged for ``not_learning``
        at this share of it (0.05: step 15 of a 300-step run)...
    not_learning_steps: ...a run that did not, after this many reported steps with
        a loss.
    not_learning_drop: the loss counts as "still at its untrained value" while it
        has not fallen this share below it (the test at each judgment point:
        server/alert_detectors.py, ``NotLearning``).

    ``math.inf`` disables abs_angle, k, ratio, single_ratio, stall_seconds or
    not_learning_steps.
    """

    abs_angle: float = 1.0
    k: float = 9.0
    window: int = 50
    warmup: int = 20
    stall_seconds: float = 900.0
    min_angle: float = 0.01
    ratio: float = 3.0
    group: float = 0.5
    single_ratio: float = 8.0
    refractory: int = 20
    not_learning_steps: float = 100.0
    not_learning_drop: float = 0.05
    not_learning_share: float = 0.05

    def __post_init__(self) -> None:
        for name in ("abs_angle", "k", "stall_seconds", "single_ratio", "not_learning_steps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not math.isnan(v) and v > 0):
                raise ValueError(f"{name} must be > 0 (inf disables it), got {v!r}")
        if not (isinstance(self.ratio, (int, float)) and not math.isnan(self.ratio) and self.ratio >= 1):
            raise ValueError(f"ratio must be >= 1 (inf disables it), got {self.ratio!r}")
        for name in ("group", "not_learning_drop", "not_learning_share"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        if not (isinstance(self.min_angle, (int, float)) and math.isfinite(self.min_angle) and self.min_angle >= 0):
            raise ValueError(f"min_angle must be a finite number >= 0, got {self.min_angle!r}")
        if not (isinstance(self.window, int) and 3 <= self.window <= 10_000):
            raise ValueError(f"window must be an integer in 3..10000, got {self.window!r}")
        if not (isinstance(self.warmup, int) and 1 <= self.warmup <= 10_000_000):
            raise ValueError(f"warmup must be an integer >= 1, got {self.warmup!r}")
        if not (isinstance(self.refractory, int) and 1 <= self.refractory <= 10_000_000):
            raise ValueError(f"refractory must be an integer >= 1, got {self.refractory!r}")

    def to_pb(self) -> pb.Thresholds:
        """As the wire message."""
        return pb.Thresholds(**asdict(self))

    def as_dict(self) -> dict[str, float | int]:
        """Field name -> value."""
        return asdict(self)


_INT_FIELDS = {"window", "warmup", "refractory"}
FIELDS = tuple(f.name for f in fields(Thresholds))


def apply_update(current: dict[str, Any], update: pb.Thresholds) -> dict[str, Any]:
    """Overrides after a SetThresholds request.

    Per field: 0 keeps the current value, a negative value (double fields)
    removes the override (back to the default), anything else sets it. Values
    are validated by building a ``Thresholds`` from them.
    """
    out = dict(current)
    for name in FIELDS:
        v = getattr(update, name)
        if isinstance(v, float) and math.isnan(v):
            raise ValueError(f"{name} must not be NaN")
        if v == 0:
            continue
        if v < 0:
            out.pop(name, None)
        else:
            out[name] = int(v) if name in _INT_FIELDS else float(v)
    return out
