"""The job's own view of its numbers (agent/local_view.py): what ``on_report`` receives.

A real torch model through ``layrot.watch``: once offline (no collector at all), against
float64 numpy of the weights saved at every step, and once live, against the collector's
history, which must be the same numbers (the same wire rows through the same math).
"""

from __future__ import annotations

import numpy as np
import torch
from reference import angle, cosine_distance, rel_err
from torch import nn

import layrot
from layrot.client.query import QueryClient

torch.set_num_threads(1)


def train(collector: str, run: str, steps: int = 12, on_report="collect"):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    got = []
    callback = got.append if on_report == "collect" else on_report
    handle = layrot.watch(model, opt, run=run, collector=collector, on_report=callback)
    params = dict(model.named_parameters())
    names = handle.layer_names
    w0 = {n: params[n].detach().double().clone() for n in names}
    saved = {}
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        handle.observe_loss(loss)
        saved[t] = {n: params[n].detach().double().clone() for n in names}
    assert handle.flush(10)
    return handle, got, names, w0, saved


def test_offline_reports_are_the_float64_truth():
    handle, got, names, w0, saved = train("offline", "local-offline")
    assert handle.latest() is got[-1]  # the newest report, on the job side
    handle.close()
    assert [r.step for r in got] == list(range(1, 13))
    for r in got:
        prev = w0 if r.step == 1 else saved[r.step - 1]
        for i, n in enumerate(names):
            w = saved[r.step][n].numpy()
            assert rel_err(r.rotation[i], cosine_distance(w0[n].numpy(), w)) <= 1e-6
            assert rel_err(r.step_angle[i], angle(prev[n].numpy(), w)) <= 1e-6
            assert rel_err(r.weight_norm[i], np.linalg.norm(w)) <= 1e-6
        assert r.rho is None
    assert np.isfinite([r.loss for r in got[1:]]).all()  # observe_loss after the step reaches the next report
    d = got[-1].as_dict()
    assert d[f"rotation/{names[0]}"] == got[-1].rotation[0] and "loss" in d


def test_live_reports_equal_the_collectors_history_and_a_bad_callback_costs_nothing(collector):
    seen = []

    def flaky(report):
        seen.append(report)
        if report.step == 3:
            raise RuntimeError("a user's logging bug")

    handle, _, names, _, _ = train(collector.grpc_address, "local-live", on_report=flaky)
    stats = handle.stats
    handle.close()
    h = QueryClient(collector.grpc_address).history("local-live")
    assert [r.step for r in seen] == h.steps.tolist() == list(range(1, 13))  # every step, the bad one too
    np.testing.assert_array_equal(np.stack([r.rotation for r in seen]), h.rotation)
    np.testing.assert_array_equal(np.stack([r.step_angle for r in seen]), h.step_angle)
    np.testing.assert_array_equal(np.array([r.loss for r in seen]), h.loss)
    assert stats.report_callback_errors == 1 and stats.dropped == 0


def test_latest_without_a_callback_is_computed_on_demand():
    handle, _, names, w0, saved = train("offline", "local-latest", on_report=None)
    latest = handle.latest()
    handle.close()
    assert latest is not None and latest.step == 12
    for i, n in enumerate(names):
        assert rel_err(latest.rotation[i], cosine_distance(w0[n].numpy(), saved[12][n].numpy())) <= 1e-6
