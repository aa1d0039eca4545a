"""cli/curves.py: the streamed, thinned rotation history behind ``layrot-agent curves``."""

from __future__ import annotations

import numpy as np
import pytest

from layrot.cli.curves import decimated_rotation
from layrot.client.history import History


def chunks(rotation: np.ndarray, size: int):
    S, L = rotation.shape
    for a in range(0, S, size):
        b = min(S, a + size)
        yield History(
            run="r",
            layer_names=[f"l{i}" for i in range(L)],
            steps=np.arange(a + 1, b + 1, dtype=np.int64),
            times=np.zeros(b - a),
            loss=np.zeros(b - a),
            rotation=rotation[a:b],
            step_angle=rotation[a:b],
            weight_norm=rotation[a:b],
            rho=rotation[a:b],
        )


@pytest.mark.parametrize(("total", "size", "max_points"), [(10, 3, 100), (50_001, 2000, 1000), (7_777, 333, 64)])
def test_thinned_rows_are_the_full_rows_at_a_regular_stride_and_end_at_the_newest(total, size, max_points):
    rng = np.random.default_rng(total)
    full = np.cumsum(rng.random((total, 3)), axis=0)
    steps, rot, names = decimated_rotation(chunks(full, size), max_points=max_points)
    assert names == ["l0", "l1", "l2"]
    assert steps.size <= 2 * max_points + 1 and steps[-1] == total and steps[0] == 1
    body = steps[:-1] if steps.size > 1 and (steps[-1] - steps[-2]) != (steps[1] - steps[0]) else steps
    stride = int(steps[1] - steps[0]) if steps.size > 1 else 1
    assert np.array_equal(body, np.arange(1, total + 1, stride)[: body.size])  # every stride-th step, from the first
    if total <= 2 * max_points:
        assert stride == 1 and steps.size == total
    assert np.array_equal(rot, full[steps - 1])  # the rows are the history's rows at those steps


def test_no_rows():
    steps, rot, names = decimated_rotation(iter([]))
    assert steps.size == 0 and rot.shape == (0, 0) and names == []
