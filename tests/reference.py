"""Independent float64 reference for rotations and step angles.

Deliberately computed differently from the collector (which uses Kahan's
triangle formula on norms): here the angle between two weight vectors comes
from the normalised vectors themselves, theta = 2 atan2(|u - v|, |u + v|),
which is accurate for tiny and large angles alike.
"""

from __future__ import annotations

import numpy as np


def angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in radians between two tensors, flattened, in float64."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    u = a / np.linalg.norm(a)
    v = b / np.linalg.norm(b)
    return float(2.0 * np.arctan2(np.linalg.norm(u - v), np.linalg.norm(u + v)))


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cos(angle), computed as 2 sin^2(theta / 2)."""
    return float(2.0 * np.sin(angle(a, b) / 2.0) ** 2)


def rel_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return np.abs(got - want) / np.abs(want)


def eq1(alpha: float, L: int) -> np.ndarray:
    """The paper's Eq. 1 layer multipliers, term by term (independent of layrot.core.rates)."""
    if L == 1:
        return np.ones(1)
    if alpha > 0:
        return np.array([(1 - alpha) ** (5 * (L - 1 - l) / (L - 1)) for l in range(L)])
    return np.array([(1 + alpha) ** (5 * l / (L - 1)) for l in range(L)])
