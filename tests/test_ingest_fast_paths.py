"""The collector's shortcuts for the common case give exactly what the full computations give.

``radial_angle`` skips its masks when every input is finite and consistent,
``derive`` skips the per-array non-finite mask when a batch is all finite and
``decode_batch`` checks a one-step batch on Python scalars. Each is compared
bit for bit with the full float64 numpy formula or check written out here.
"""

from __future__ import annotations

import numpy as np
import pytest

from layrot.core import rotation as rot
from layrot.proto import layrot_pb2 as pb
from layrot.proto.wire import pack
from layrot.server.decode import MAX_STEP, MAX_TIME, SessionReject, decode_batch
from layrot.server.derive import derive

L = 5


def full_radial(a: np.ndarray, c: np.ndarray, dot: np.ndarray) -> np.ndarray:
    """The radial split with every mask applied (the formula of core/rotation.py's docstring)."""
    with np.errstate(all="ignore"):
        p = dot / a
        q2 = (c - p) * (c + p)
        inconsistent = q2 < -((rot.TRIANGLE_RTOL * np.maximum(c, np.abs(p))) ** 2)
        theta = np.arctan2(np.sqrt(np.maximum(q2, 0.0)), a + p)
        theta = np.where(inconsistent | ~(a > 0), np.nan, theta)
        return np.where(np.isfinite(a) & np.isfinite(c) & np.isfinite(p), theta, np.nan)


SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-310, 1e308, -1.0]


@pytest.mark.parametrize("seed", range(6))
def test_radial_angle_equals_the_full_formula_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 3.0, (2, L))
    c = rng.uniform(0.0, 0.1, (2, L)) * (10.0 ** rng.integers(-8, 1, (2, L)))
    dot = a * c * rng.uniform(-1.0, 1.0, (2, L))
    if seed:  # seed 0: all finite and consistent (the shortcut); others: one special value somewhere
        which = [a, c, dot][seed % 3]
        which[rng.integers(2), rng.integers(L)] = SPECIALS[seed % len(SPECIALS)] if seed < 5 else 1e-320
    if seed == 5:
        dot[0, 0] = 1.5 * a[0, 0] * c[0, 0]  # |p| > ||d||: inconsistent
    got = rot.radial_angle(a, c, dot)
    want = full_radial(a, c, dot)
    assert got.shape == want.shape and got.tobytes() == want.tobytes()


def test_radial_angle_broadcasts_and_handles_purely_radial_and_zero_steps():
    a = np.array([[1.0, 2.0, 3.0]])
    c = np.array([[0.0, 1e-3, 1e-3], [1e-3, 0.0, 2e-3]])
    dot = np.array([[0.0, -2e-3, 3e-3], [-1e-3, 0.0, 6e-3]])  # exactly radial: q2 == 0
    got = rot.radial_angle(a, c, dot)
    assert got.tobytes() == full_radial(np.broadcast_to(a, c.shape), c, dot).tobytes()
    assert (
        np.asarray(rot.radial_angle(2.0, 0.1, 0.05)).tobytes()
        == full_radial(np.float64(2.0), np.float64(0.1), np.float64(0.05)).tobytes()
    )


def step_batch(steps=(3,), **arrays: np.ndarray) -> pb.StepBatch:
    S = len(steps)
    rng = np.random.default_rng(7)
    norm = rng.uniform(1.0, 2.0, (S, L))
    fields = dict(
        norm=norm,
        dist0=0.1 * norm,
        dstep=0.01 * norm,
        norm_prev=norm * 1.001,
        dot0=-1e-3 * norm,
        dotstep=-1e-4 * norm,
    )
    fields.update(arrays)
    return pb.StepBatch(
        seq=1,
        num_layers=L,
        steps=list(steps),
        times=[100.0 + s for s in steps],
        **{k: pack(v) for k, v in fields.items()},
    )


@pytest.mark.parametrize("field", ["norm", "dist0", "dstep", "norm_prev", "dot0", "dotstep"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e308])
def test_derive_non_finite_mask_equals_isfinite(field, value):
    init = np.linspace(1.0, 2.0, L)
    arrays = {}
    base = decode_batch(step_batch(steps=(3, 4)), L)
    x = np.array(getattr(base, field))
    x[1, 2] = value
    x[0, 4] = value if value == 1e308 else 1.0  # two huge finite values overflow the shortcut's sum
    arrays[field] = x
    d = decode_batch(step_batch(steps=(3, 4), **arrays), L)
    out = derive(d, init)
    want = np.zeros((2, L), dtype=bool)
    for name in ("norm", "dist0", "dstep", "norm_prev", "dot0", "dotstep"):
        want |= ~np.isfinite(getattr(d, name))
    assert out.bad.dtype == bool and np.array_equal(out.bad, want)
    assert out.nonfinite == int(want.sum())
    assert out.rotation.tobytes() == rot.cosine_distance(full_radial(init[None, :], d.dist0, d.dot0)).tobytes()
    assert out.angle.tobytes() == full_radial(d.norm_prev, d.dstep, d.dotstep).tobytes()


def test_one_step_batch_decodes_like_a_longer_one():
    one = decode_batch(step_batch(steps=(9,)), L)
    two = decode_batch(step_batch(steps=(9, 10)), L)
    assert one.steps.dtype == np.uint64 and one.times.dtype == np.float64
    assert one.steps.tolist() == [9] and one.times.tolist() == [109.0]
    assert two.steps[:1].tobytes() == one.steps.tobytes() and two.times[:1].tobytes() == one.times.tobytes()


@pytest.mark.parametrize(
    "steps, times, reason, text",
    [
        ([0], [1.0], "bad_batch", "steps must be >= 1"),
        ([MAX_STEP + 1], [1.0], "bad_step", f"step {MAX_STEP + 1} out of range"),
        ([1], [float("nan")], "bad_batch", "times must be finite"),
        ([1], [float("inf")], "bad_batch", "times must be finite"),
        ([1], [-1.0], "bad_time", "got -1..-1"),
        ([1], [MAX_TIME * 2], "bad_time", f"got {MAX_TIME * 2:g}..{MAX_TIME * 2:g}"),
    ],
)
def test_one_step_batch_refusals_match_the_array_checks(steps, times, reason, text):
    """The same refusal, reason and message for one step as for the same value in a two-step batch."""
    messages = []
    for s, t in ((steps, times), ([steps[0], MAX_STEP], [times[0], 1.0])):
        b = step_batch(steps=(1,) * len(s))
        b.ClearField("steps")
        b.ClearField("times")
        b.steps.extend(s)
        b.times.extend(t)
        with pytest.raises(SessionReject) as info:
            decode_batch(b, L)
        assert info.value.reason == reason
        messages.append(info.value.message)
    assert text in messages[0]
