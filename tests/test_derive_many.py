"""``derive_many``: the batches read in one turn of the collector's loop, checked and derived stacked.

Against the float64 truth of simulated weights (conftest.SimJob) and against ``derive_checked``
of each batch alone: the same numbers, a refusal for the lying batch only, non-finite values
counted per batch.
"""

from __future__ import annotations

import numpy as np

from layrot.server.decode import SessionReject, decode_batch
from layrot.server.derive import derive_checked, derive_many


def _init(job) -> np.ndarray:
    return np.array([lay.init_norm for lay in job.hello().layers])


def test_stacked_batches_give_each_batch_its_own_numbers(sim_job):
    jobs = [
        sim_job(layer_sizes=(27, 64), dots=True, seed=1),
        sim_job(layer_sizes=(5, 9, 13), dots=True, seed=2, step_angle=1e-4),  # mostly radial, tiny angles
        sim_job(layer_sizes=(40, 8), dots=False, seed=3),  # no radial dots: a group of its own
        sim_job(layer_sizes=(16, 16, 16), dots=True, seed=4),  # three steps in one batch
        sim_job(layer_sizes=(30,), dots=True, seed=5),  # lies: dist0 beyond ||w(t)|| + ||w(0)||
        sim_job(layer_sizes=(12, 7), dots=True, seed=6),  # diverged: one NaN
        sim_job(layer_sizes=(27, 64), dots=False, seed=7),
    ]
    msgs = [job.batch(3 if i == 3 else 1) for i, job in enumerate(jobs)]
    msgs[4].dist0 = (np.frombuffer(msgs[4].dist0) + 1e3).tobytes()
    dstep = np.frombuffer(msgs[5].dstep).copy()
    dstep[1] = np.nan
    msgs[5].dstep = dstep.tobytes()
    batches = [decode_batch(m, len(job.layer_sizes)) for m, job in zip(msgs, jobs)]
    inits = [_init(job) for job in jobs]

    out = derive_many(batches, inits)

    assert len(out) == len(jobs)
    assert isinstance(out[4], SessionReject) and out[4].reason == "impossible_distance"
    for i, (job, b, init, d) in enumerate(zip(jobs, batches, inits, out)):
        if i == 4:
            continue
        alone = derive_checked(b, init)
        assert not isinstance(d, SessionReject) and not isinstance(alone, SessionReject)
        assert d.rotation.shape == d.angle.shape == d.bad.shape == (b.num_steps, b.num_layers)
        np.testing.assert_array_equal(d.rotation, alone.rotation)
        np.testing.assert_array_equal(d.angle, alone.angle)
        np.testing.assert_array_equal(d.bad, alone.bad)
        assert d.nonfinite == alone.nonfinite == (1 if i == 5 else 0)
        for row, step in enumerate(b.steps.tolist()):
            truth = job.truth[step]
            ok = ~d.bad[row]
            np.testing.assert_allclose(d.rotation[row][ok], truth["rotation"][ok], rtol=1e-6)
            np.testing.assert_allclose(d.angle[row][ok], truth["step_angle"][ok], rtol=1e-6)
    assert out[5].bad[0].tolist() == [False, True]


def test_one_batch_alone_and_an_empty_pass(sim_job):
    job = sim_job(dots=True)
    b = decode_batch(job.batch(2), len(job.layer_sizes))
    (d,) = derive_many([b], [_init(job)])
    alone = derive_checked(b, _init(job))
    np.testing.assert_array_equal(d.rotation, alone.rotation)
    assert derive_many([], []) == []
