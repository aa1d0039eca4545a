"""The collector's rotation math against independent references.

References: mpmath at 60 digits (law of cosines / dot products are exact
enough there), and the float64 formula 2*atan2(|u^ - v^|, |u^ + v^|) from
the vectors themselves. Neither shares code with Kahan's triangle formula.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from layrot.core.rotation import TRIANGLE_RTOL, cosine_distance, rotation, step_angle, triangle_angle

mpmath.mp.dps = 60


def mp_triangle_angle(a: float, b: float, c: float) -> mpmath.mpf:
    """Exact-ish angle opposite c for the triangle with the given float64 sides."""
    a, b, c = mpmath.mpf(a), mpmath.mpf(b), mpmath.mpf(c)
    cos_c = (a * a + b * b - c * c) / (2 * a * b)
    cos_c = max(mpmath.mpf(-1), min(mpmath.mpf(1), cos_c))
    return mpmath.acos(cos_c)


def mp_vectors(u: np.ndarray, v: np.ndarray) -> tuple[float, float, float, mpmath.mpf]:
    """Norms |u|, |v|, |u - v| rounded once to float64, and the angle between u and v, at 60 digits."""
    U = [mpmath.mpf(float(x)) for x in u]
    V = [mpmath.mpf(float(x)) for x in v]
    nu = mpmath.sqrt(mpmath.fsum(x * x for x in U))
    nv = mpmath.sqrt(mpmath.fsum(x * x for x in V))
    nd = mpmath.sqrt(mpmath.fsum((x - y) ** 2 for x, y in zip(U, V)))
    dot = mpmath.fsum(x * y for x, y in zip(U, V))
    # acos is ill-conditioned near 0, so use atan2(|u x v|-like, dot) with the
    # Lagrange identity evaluated at 60 digits.
    cross = mpmath.sqrt(max(mpmath.mpf(0), nu * nu * nv * nv - dot * dot))
    return float(nu), float(nv), float(nd), mpmath.atan2(cross, dot)


def rotated(rng: np.random.Generator, n: int, theta: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    u = rng.standard_normal(n)
    d = rng.standard_normal(n)
    d -= (d @ u) / (u @ u) * u
    d *= np.linalg.norm(u) / np.linalg.norm(d)
    v = (math.cos(theta) * u + math.sin(theta) * d) * scale
    return u, v


# ---------------------------------------------------------------- triangle formula vs exact angle of the same triangle
@pytest.mark.parametrize("theta", [1.0, 1e-2, 1e-4, 1e-6, 1e-7, 1e-9, 1e-12, 1e-200, math.pi / 2, math.pi - 1e-3])
@pytest.mark.parametrize("ratio", [1.0, 1.0 + 1e-9, 0.7, 3.0, 1e3])
def test_triangle_angle_matches_high_precision(theta: float, ratio: float) -> None:
    # Build the third side in high precision, round it once to float64: the
    # triangle (a, b, c) is then exact input and Kahan's formula must give its
    # angle to a few ulps, even for needles.
    a = 1.2345
    b = float(mpmath.mpf(a) * mpmath.mpf(ratio))
    A, B = mpmath.mpf(a), mpmath.mpf(b)
    c = float(mpmath.sqrt(A * A + B * B - 2 * A * B * mpmath.cos(theta)))
    got = float(triangle_angle(a, b, c))
    want = mp_triangle_angle(a, b, c)
    if want == 0:
        assert got == 0.0
    else:
        assert abs(got - float(want)) <= 1e-13 * float(want), (got, float(want))


def test_triangle_angle_random_needles_vectorised() -> None:
    rng = np.random.default_rng(1)
    n = 400
    a = np.exp(rng.uniform(-5, 5, n))
    b = a * np.exp(rng.uniform(-1e-3, 1e-3, n))  # nearly equal sides
    theta = np.exp(rng.uniform(np.log(1e-10), np.log(3.0), n))
    c = np.array(
        [
            float(
                mpmath.sqrt(mpmath.mpf(x) ** 2 + mpmath.mpf(y) ** 2 - 2 * mpmath.mpf(x) * mpmath.mpf(y) * mpmath.cos(t))
            )
            for x, y, t in zip(a, b, theta)
        ]
    )
    got = triangle_angle(a, b, c)  # one call for all
    want = np.array([float(mp_triangle_angle(x, y, z)) for x, y, z in zip(a, b, c)])
    assert got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- from real vectors, as the collector receives them
@pytest.mark.parametrize("theta", [0.3, 1e-2, 1e-4, 1e-6, 1e-7])
@pytest.mark.parametrize("scale", [1.0, 1.0 + 1e-8])
def test_rotation_from_vectors_matches_mpmath(theta: float, scale: float) -> None:
    rng = np.random.default_rng(int(1e6 * theta) % 1000 + 7)
    u, v = rotated(rng, 300, theta, scale)
    nu, nv, nd, exact = mp_vectors(u, v)  # exact float64 norms, as a careful job would send
    got_angle = float(triangle_angle(nu, nv, nd))
    assert abs(got_angle - float(exact)) <= 1e-6 * float(exact)
    exact_cd = 2 * mpmath.sin(exact / 2) ** 2
    got_cd = float(rotation(nu, nv, nd))
    assert abs(got_cd - float(exact_cd)) <= 1e-6 * float(exact_cd)
    # Independent float64 reference straight from the vectors.
    uh, vh = u / np.linalg.norm(u), v / np.linalg.norm(v)
    ref = 2 * np.arctan2(np.linalg.norm(uh - vh), np.linalg.norm(uh + vh))
    assert abs(got_angle - ref) <= 1e-6 * ref


def test_dot_product_formula_would_fail_where_we_succeed() -> None:
    """Guards the reason for the triangle formula: 1 - cos from dots loses everything at 1e-7 rad in float32."""
    rng = np.random.default_rng(3)
    u, v = rotated(rng, 1000, 1e-4, 1.0)  # cosine distance 5e-9
    u32, v32 = u.astype(np.float32), v.astype(np.float32)
    naive = 1.0 - float(u32 @ v32) / (float(np.linalg.norm(u32)) * float(np.linalg.norm(v32)))
    n0, n1, d = (
        float(np.linalg.norm(x))
        for x in (u32.astype(np.float64), v32.astype(np.float64), (u32.astype(np.float64) - v32.astype(np.float64)))
    )
    exact = 2 * math.sin(1e-4 / 2) ** 2
    ours = float(rotation(n0, n1, d))
    assert abs(ours - exact) < 1e-3 * exact
    assert abs(naive - exact) > 0.1 * exact  # the dot-product route is off by > 10 %


def test_step_angle_and_rotation_wrappers() -> None:
    rng = np.random.default_rng(4)
    u, v = rotated(rng, 50, 0.2, 0.9)
    a, b, c = np.linalg.norm(u), np.linalg.norm(v), np.linalg.norm(u - v)
    assert step_angle(a, b, c) == triangle_angle(a, b, c)
    assert rotation(a, b, c) == cosine_distance(triangle_angle(a, b, c))
    assert abs(float(rotation(a, b, c)) - (1 - u @ v / (a * b))) < 1e-12  # fine at a large angle


def test_cosine_distance_values() -> None:
    th = np.array([0.0, 1e-8, 0.5, math.pi / 2, math.pi])
    want = np.array([float(1 - mpmath.cos(mpmath.mpf(float(t)))) for t in th])
    np.testing.assert_allclose(cosine_distance(th), want, rtol=1e-15, atol=0)
    assert math.isnan(float(cosine_distance(float("nan"))))


# ---------------------------------------------------------------- conventions for bad / degenerate input
def test_degenerate_and_non_finite_inputs() -> None:
    nan, inf = float("nan"), float("inf")
    cases = {
        (0.0, 0.0, 0.0): 0.0,  # identical zero vectors
        (2.0, 2.0, 0.0): 0.0,  # identical vectors
        (0.0, 1.0, 1.0): nan,  # zero vector has no direction
        (1.0, 0.0, 1.0): nan,
        (nan, 1.0, 1.0): nan,
        (1.0, inf, 1.0): nan,
        (1.0, 1.0, -inf): nan,
        (-1.0, 1.0, 1.0): nan,  # negative length
        (1.0, 1.0, 2.0): math.pi,  # opposite vectors
        (1.0, 1.0, 3.0): nan,  # impossible triangle, far beyond rounding
        (3.0, 1.0, 0.5): nan,
    }
    a, b, c = (np.array(x) for x in zip(*cases))
    got = triangle_angle(a, b, c)
    for (key, want), g in zip(cases.items(), got):
        if math.isnan(want):
            assert math.isnan(g), key
        else:
            assert g == pytest.approx(want, abs=1e-15), key


def test_rounding_violations_are_clamped() -> None:
    # Pure scaling measured with rounding: |w0 - w| slightly below | |w0| - |w| |.
    a, b = 1.0, 0.999
    c_short = (a - b) * (1 - 1e-9)
    assert triangle_angle(a, b, c_short) == 0.0
    c_long = (a + b) * (1 + 1e-9)
    assert triangle_angle(a, b, c_long) == pytest.approx(math.pi)
    # beyond the tolerance it is not rounding any more
    assert math.isnan(triangle_angle(a, b, (a - b) - 2 * TRIANGLE_RTOL * a))


def test_broadcasting_and_no_exceptions() -> None:
    init = np.array([1.0, 1.05, 0.0])
    norm = np.ones((5, 3))
    d0 = np.full((5, 3), 0.1)
    out = rotation(init[None, :], norm, d0)
    assert out.shape == (5, 3)
    assert np.isnan(out[:, 2]).all() and np.isfinite(out[:, :2]).all()
    with np.errstate(all="raise"):  # the module must shield callers from FP warnings/errors
        triangle_angle(np.array([0.0, np.nan, np.inf]), np.array([0.0, 1.0, 1.0]), np.array([1.0, 0.0, np.inf]))


# ---------------------------------------------------------------- properties
sides = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
anything = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None)
@given(sides, sides, st.floats(min_value=0.0, max_value=1.0))
def test_property_symmetric_in_range_and_exact(a: float, b: float, frac: float) -> None:
    c = abs(a - b) + frac * ((a + b) - abs(a - b))  # any valid third side
    x = float(triangle_angle(a, b, c))
    assert x == float(triangle_angle(b, a, c))
    assert 0.0 <= x <= math.pi
    want = float(mp_triangle_angle(a, b, c))
    assert abs(x - want) <= 1e-9 * max(want, 1e-300) or abs(x - want) < 1e-15
    cd = float(cosine_distance(x))
    assert 0.0 <= cd <= 2.0


@settings(max_examples=300, deadline=None)
@given(anything, anything, anything)
def test_property_never_raises_nan_in_nan_out(a: float, b: float, c: float) -> None:
    with np.errstate(all="raise"):
        x = float(triangle_angle(a, b, c))
    if not all(math.isfinite(v) for v in (a, b, c)):
        assert math.isnan(x)
    else:
        assert math.isnan(x) or 0.0 <= x <= math.pi


@settings(max_examples=200, deadline=None)
@given(sides, sides, st.floats(min_value=0.0, max_value=1.0), st.integers(min_value=-40, max_value=40))
def test_property_scale_invariant(a: float, b: float, frac: float, j: int) -> None:
    # Scaling by a power of two is exact in binary floating point, so the
    # angle must not move at all (no hidden absolute tolerances).
    c = abs(a - b) + frac * ((a + b) - abs(a - b))
    k = 2.0**j
    assume(c == 0.0 or min(c, c * k) > 1e-290)  # subnormal sides round when scaled
    assert float(triangle_angle(a * k, b * k, c * k)) == float(triangle_angle(a, b, c))
