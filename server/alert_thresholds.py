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

    abs_angle: radians; a step angle above it fires whatever the baseline
        (0.3 rad = 17 deg: 8x the per-step angle of the paper's best Layca
        setting, rho(0) = 3^-3 -> 0.037 rad; see server/alert_detectors.py).
    k: fire above median + k * spread of the layer's recent angles.
    window: reported steps in the per-layer baseline (rolling median / MAD).
    warmup: reported steps before the baseline rule arms.
    stall_seconds: a connected run silent this long is stalled (same as the
        15 min of the Prometheus rule LayrotRunStalled).
    min_angle: radians; the baseline rule never fires below this.
    ``math.inf`` disables abs_angle, k or stall_seconds.
    """

    abs_angle: float = 0.3
    k: float = 10.0
    window: int = 50
    warmup: int = 20
    stall_seconds: float = 900.0
    min_angle: float = 0.01

    def __post_init__(self) -> None:
        for name in ("abs_angle", "k", "stall_seconds"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not math.isnan(v) and v > 0):
                raise ValueError(f"{name} must be > 0 (inf disables it), got {v!r}")
        if not (isinstance(self.min_angle, (int, float)) and math.isfinite(self.min_angle) and self.min_angle >= 0):
            raise ValueError(f"min_angle must be a finite number >= 0, got {self.min_angle!r}")
        if not (isinstance(self.window, int) and 3 <= self.window <= 10_000):
            raise ValueError(f"window must be an integer in 3..10000, got {self.window!r}")
        if not (isinstance(self.warmup, int) and 1 <= self.warmup <= 10_000_000):
            raise ValueError(f"warmup must be an integer >= 1, got {self.warmup!r}")

    def to_pb(self) -> pb.Thresholds:
        """As the wire message."""
        return pb.Thresholds(**asdict(self))

    def as_dict(self) -> dict[str, float | int]:
        """Field name -> value."""
        return asdict(self)


_INT_FIELDS = {"window", "warmup"}
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
