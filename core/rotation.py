"""Stable float64 rotation math for the collector.

The job sends *distances* (||w(t)||, ||w(t) - w(0)||, ||w(t) - w(t-1)||),
never dot products of the weights themselves: for the tiny angles of a single
Layca step (cosine distance ~1e-7) w(t).w(t-1) has already lost every
significant digit. From
three side lengths the angle is computed with Kahan's formula for
needle-like triangles (W. Kahan, "Miscalculating Area and Angles of a
Needle-like Triangle", 2014), which keeps full relative accuracy down to
angles far below 1e-7 rad, and the cosine distance as 2 sin^2(theta / 2),
which has no cancellation either.

Exact sides give exact angles, but measured sides carry float32 rounding
(~1e-7 relative), and a triangle whose short side is mostly *radial* (weight
decay shrinking a converged layer) amplifies that by ||w|| / ||dw||: 3.7e-3
relative error on 6e-5 rad steps in our tests. Jobs therefore also send the
radial component of each difference, d.w_ref, a dot of a small vector with a
large one whose rounding error is relative to ||d|| ||w_ref|| (harmless), and
:func:`radial_angle` splits d into radial and tangential parts directly. The
triangle formula remains for jobs that send norms only.

Everything is vectorised: one call per quantity per batch, any broadcastable
shapes, NaN out for NaN/Inf in, never an exception for bad numbers.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "TRIANGLE_RTOL",
    "triangle_angle",
    "cosine_distance",
    "rotation",
    "step_angle",
    "radial_angle",
    "layer_rotations",
]

# Side lengths measured on a device (often in float32) may violate the
# triangle inequality by a few rounding errors of the longest side, typically
# when the true angle is ~0 (pure scaling, e.g. weight decay) or ~pi. Such
# violations up to this fraction of the longest side are clamped to the
# degenerate triangle; larger ones mean the three numbers cannot come from
# the same pair of vectors and give NaN.
TRIANGLE_RTOL = 1e-3


def _f64(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def triangle_angle(a: ArrayLike, b: ArrayLike, c: ArrayLike) -> np.ndarray:
    """Angle (radians, in [0, pi]) opposite side ``c`` of the triangle with sides ``a, b, c``.

    For vectors ``u, v`` with ``a = ||u||``, ``b = ||v||``, ``c = ||u - v||``
    this is the angle between ``u`` and ``v``. Uses Kahan's stable formula
    (sorted so ``a >= b``)::

        mu = c - (a - b)   if b >= c   else   b - (a - c)
        C  = 2 atan(sqrt(((a - b) + c) * mu / ((a + (b + c)) * ((a - c) + b))))

    (evaluated as the product of the square roots of the two ratios, which
    gives the same result without underflow for angles below 1e-154 rad).

    Conventions (all elementwise, never raising):

    * NaN or Inf in any side -> NaN; a negative side -> NaN.
    * ``a == b`` and ``c == 0`` (identical vectors, including two zero
      vectors) -> 0.
    * otherwise ``a == 0`` or ``b == 0`` (a zero vector has no direction) -> NaN.
    * triangle inequality violated by at most ``TRIANGLE_RTOL * max(a, b, c)``
      (rounding in the measured norms) -> clamped: 0 when ``c`` is too short,
      pi when it is too long. Larger violations -> NaN.
    """
    return _triangle(_f64(a), _f64(b), _f64(c))


def _triangle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        hi = np.maximum(a, b)  # NaN-propagating
        lo = np.minimum(a, b)
        a, b = hi, lo
        mu = np.where(b >= c, c - (a - b), b - (a - c))
        far = (a - c) + b  # < 0 when c > a + b
        tol = TRIANGLE_RTOL * np.maximum(a, c)
        bad = (mu < -tol) | (far < -tol)
        mu = np.maximum(mu, 0.0)
        far = np.maximum(far, 0.0)
        # sqrt of each factor separately (not of their product): the product
        # of two tiny factors underflows into subnormals for angles < 1e-154.
        near = ((a - b) + c) / (a + (b + c))
        ratio = np.where((mu == 0.0) & (far == 0.0), 0.0, mu / far)
        # mu > 0 with far == 0 is the flat triangle with angle pi:
        # sqrt(inf) -> atan(inf) = pi/2 -> pi, which is what we want.
        angle = 2.0 * np.arctan(np.sqrt(near) * np.sqrt(ratio))
        finite = np.isfinite(a) & np.isfinite(b) & np.isfinite(c)
        nonneg = (b >= 0.0) & (c >= 0.0)
        same = (a == b) & (c == 0.0)
        zero = b == 0.0  # b is the shorter side after sorting
        angle = np.where(zero, np.nan, angle)
        angle = np.where(same, 0.0, angle)
        angle = np.where(finite & nonneg & ~bad, angle, np.nan)
    return angle


def cosine_distance(theta: ArrayLike) -> np.ndarray:
    """Cosine distance ``1 - cos(theta)`` computed as ``2 sin^2(theta / 2)`` (no cancellation)."""
    theta = np.asarray(theta, dtype=np.float64)
    with np.errstate(all="ignore"):
        s = np.sin(theta * 0.5)
        return 2.0 * s * s


def rotation(init_norm: ArrayLike, norm: ArrayLike, dist0: ArrayLike) -> np.ndarray:
    """Layer rotation: cosine distance between w(0) and w(t) from ||w(0)||, ||w(t)||, ||w(t) - w(0)||."""
    return cosine_distance(triangle_angle(init_norm, norm, dist0))


def step_angle(norm_prev: ArrayLike, norm: ArrayLike, dstep: ArrayLike) -> np.ndarray:
    """Angle (radians) rotated in one step from ||w(t-1)||, ||w(t)||, ||w(t) - w(t-1)||."""
    return triangle_angle(norm_prev, norm, dstep)


def radial_angle(ref_norm: ArrayLike, dist: ArrayLike, dot: ArrayLike) -> np.ndarray:
    """Angle between w_ref and w = w_ref + d from ||w_ref||, ||d|| and d.w_ref.

    With p = d.w_ref / ||w_ref|| the radial and q = sqrt((||d|| - p)(||d|| + p))
    the tangential part of d, the angle is atan2(q, ||w_ref|| + p): no
    difference of nearly equal norms, so float32 rounding of the inputs stays
    at the relative level of ||d|| even for tiny, mostly radial steps.
    |p| may exceed ||d|| by rounding (purely radial step): clamped to q = 0.
    """
    a = np.asarray(ref_norm, dtype=np.float64)
    c = np.asarray(dist, dtype=np.float64)
    with np.errstate(all="ignore"):
        p = np.asarray(dot, dtype=np.float64) / a
        q2 = (c - p) * (c + p)
        if q2.size and a.size and q2.min() >= 0.0 and q2.max() < np.inf and a.min() > 0.0 and a.max() < np.inf:
            # The common case, in four reductions instead of a dozen passes: q2 >= 0 everywhere is
            # consistent, a finite q2 needs finite c and p, and a is finite and > 0, so every mask
            # below is a no-op (a NaN anywhere fails these comparisons and takes the full path).
            return np.asarray(np.arctan2(np.sqrt(np.maximum(q2, 0.0)), a + p))
        # Beyond rounding, |p| > ||d|| cannot come from real vectors.
        inconsistent = q2 < -((TRIANGLE_RTOL * np.maximum(c, np.abs(p))) ** 2)
        theta = np.arctan2(np.sqrt(np.maximum(q2, 0.0)), a + p)
        theta = np.where(inconsistent | ~(a > 0), np.nan, theta)
        return np.where(np.isfinite(a) & np.isfinite(c) & np.isfinite(p), theta, np.nan)


def layer_rotations(
    init_norm: ArrayLike,
    norm: ArrayLike,
    dist0: ArrayLike,
    dstep: ArrayLike,
    norm_prev: ArrayLike,
    dot0: ArrayLike | None = None,
    dotstep: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(rotation, step angle) per layer from what a job measures: the radial split when the dots
    are there (well conditioned for mostly radial steps), the triangle formulas otherwise.

    The one place both the collector (server/derive.py) and the job's own view of its
    numbers (agent/local_view.py) compute them, so the two always agree.
    """
    if dot0 is not None:
        rot = cosine_distance(radial_angle(init_norm, dist0, dot0))
    else:
        rot = rotation(init_norm, norm, dist0)
    if dotstep is not None:
        angle = radial_angle(norm_prev, dstep, dotstep)
    else:
        angle = step_angle(norm_prev, norm, dstep)
    return rot, angle
