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


def sgd_amom_step(
    w_prev: np.ndarray,
    v_prev: np.ndarray,
    grad: np.ndarray,
    t: int,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    bias_correction: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Step t (>= 1) of the paper's Appendix B.4 (SGD with Adam-style momentum) in float64.

    g_t = grad + weight_decay * w_{t-1};  v_t = m v_{t-1} + (1 - m) g_t  (v_0 = 0);
    w_t = w_{t-1} - lr v_t  (lr v_t / (1 - m^t) with bias_correction). Returns (w_t, v_t).
    """
    w_prev = np.asarray(w_prev, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64) + weight_decay * w_prev
    v = momentum * np.asarray(v_prev, dtype=np.float64) + (1.0 - momentum) * g
    v_used = v / (1.0 - momentum**t) if bias_correction else v
    return w_prev - lr * v_used, v


def sgd_amom(
    w0: np.ndarray,
    grads: list[np.ndarray],
    lr: float | list[float],
    momentum: float,
    weight_decay: float = 0.0,
    bias_correction: bool = False,
) -> list[np.ndarray]:
    """[w_0, w_1, ..., w_T] of :func:`sgd_amom_step` for given gradients (``grads[t - 1]`` at step t).

    ``lr``: a constant or one rate per step.
    """
    w = np.asarray(w0, dtype=np.float64).copy()
    v = np.zeros_like(w)
    out = [w.copy()]
    for t, grad in enumerate(grads, start=1):
        rate = lr[t - 1] if isinstance(lr, list) else lr
        w, v = sgd_amom_step(w, v, grad, t, rate, momentum, weight_decay, bias_correction)
        out.append(w.copy())
    return out
