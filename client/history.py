"""A run's per-step history as numpy arrays, whichever transport brought it (gRPC or the HTTP API).

numpy loads on the first history only: the table commands of the CLI start
faster without it (benchmarks/cli_startup.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["History", "concat_histories"]


@dataclass
class History:
    """Per-step, per-layer history of one rank of a run; 2-D arrays are (steps, layers)."""

    run: str
    layer_names: list[str]
    steps: np.ndarray
    times: np.ndarray
    loss: np.ndarray
    rotation: np.ndarray
    step_angle: np.ndarray
    weight_norm: np.ndarray
    rho: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def __len__(self) -> int:
        return int(self.steps.size)


def concat_histories(run: str, parts: Sequence[History]) -> History:
    """One History from consecutive chunks (layer names from the first; empty arrays for no chunk)."""
    import numpy as np

    names = parts[0].layer_names if parts else []
    L = len(names)

    def cat(key: str, two_d: bool = True) -> np.ndarray:
        arrays = [getattr(p, key) for p in parts]
        if not arrays:
            return np.empty((0, L)) if two_d else np.empty(0)
        return np.concatenate(arrays, axis=0)

    return History(
        run=run,
        layer_names=names,
        steps=cat("steps", False).astype(np.int64),
        times=cat("times", False),
        loss=cat("loss", False),
        rotation=cat("rotation"),
        step_angle=cat("step_angle"),
        weight_norm=cat("weight_norm"),
        rho=cat("rho"),
    )
