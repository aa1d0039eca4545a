"""radial_angle: the collector's well-conditioned angle from ||w_ref||, ||d||, d.w_ref."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import angle, rel_err

from layrot.core.rotation import radial_angle, triangle_angle


def pair(rng: np.random.Generator, n: int, step: float, radial: float) -> tuple[np.ndarray, np.ndarray]:
    w = rng.normal(size=n)
    t = rng.normal(size=n)
    t -= (t @ w) / (w @ w) * w
    d = step * np.linalg.norm(w) * (np.sqrt(1 - radial**2) * t / np.linalg.norm(t) - radial * w / np.linalg.norm(w))
    return w, w + d


def test_exact_inputs_give_exact_angles():
    rng = np.random.default_rng(0)
    for step in (1e-1, 1e-4, 1e-7):
        for radial in (0.0, 0.5, 0.99):
            w, v = pair(rng, 1000, step, radial)
            d = v - w
            got = radial_angle(np.linalg.norm(w), np.linalg.norm(d), d @ w)
            assert rel_err(got, angle(w, v)) < 1e-8


def test_float32_rounded_sides_mostly_radial_step():
    # The case that motivated the dots: a mostly radial tiny step. Sides rounded to
    # float32 (what a device measures) wreck the triangle but not the radial split.
    rng = np.random.default_rng(1)
    w, v = pair(rng, 4096, 1e-4, 0.8)
    d = v - w
    a, b, c, dot = (np.float64(np.float32(x)) for x in (np.linalg.norm(w), np.linalg.norm(v), np.linalg.norm(d), d @ w))
    ref = angle(w, v)
    assert rel_err(radial_angle(a, c, dot), ref) < 1e-5
    assert rel_err(triangle_angle(a, b, c), ref) > 1e-4  # the failure mode radial_angle avoids


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))
def test_never_raises_and_range(a, c, dot):
    theta = radial_angle(a, c, dot)
    assert np.isnan(theta) or 0.0 <= theta <= np.pi


def test_nan_and_inconsistent_inputs_give_nan():
    assert np.isnan(radial_angle(np.nan, 1.0, 0.0))
    assert np.isnan(radial_angle(1.0, np.inf, 0.0))
    assert np.isnan(radial_angle(1.0, 0.1, 5.0))  # |d.w|/|w| > |d|: not from real vectors
    assert radial_angle(1.0, 0.0, 0.0) == 0.0
