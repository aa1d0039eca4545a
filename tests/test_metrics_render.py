"""``/metrics`` per-run series (server/metrics_render.py): cached text, series budget, escaping.

Real collectors on loopback fed by simulated jobs over real gRPC sessions; the
exposition is read back with prometheus_client's own parser and compared with the
jobs' float64 truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from metrics_text import scrape

from layrot.server.metrics_render import escape_label, format_value


def value(m, name, **labels):
    (v,) = [v for lab, v in m.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items())]
    return v


def feed(collector, ingest, job, steps: int):
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(steps))
    s.wait_ack(job.seq)
    return s


def test_each_scrape_shows_the_newest_batch(collector, ingest, sim_job):
    """The cached text of a run is replaced when its next batch arrives (and only then)."""
    job = sim_job(run="moving", layer_sizes=(30, 40))
    s = feed(collector, ingest, job, 3)
    first = scrape(collector)
    again = scrape(collector)
    assert first["layrot_layer_rotation"] == again["layrot_layer_rotation"]  # nothing new: the same text
    s.send(job.batch(2))
    s.wait_ack(job.seq)
    m = scrape(collector)
    assert value(m, "layrot_run_step", run="moving") == 5
    for i in range(2):
        assert value(m, "layrot_layer_rotation", run="moving", index=i) == pytest.approx(
            job.truth[5]["rotation"][i], rel=1e-9
        )
        assert value(m, "layrot_layer_rotation", run="moving", index=i) != value(
            first, "layrot_layer_rotation", run="moving", index=i
        )


def test_series_budget_sends_the_runs_that_do_not_fit_to_aggregates(collector_factory, ingest, sim_job):
    # Budget for one run of 3 layers (4 families x 3 = 12 series): the second, newer run is served first.
    c = collector_factory(max_series=12)
    old = sim_job(run="old", layer_sizes=(20, 30, 40), seed=1)
    new = sim_job(run="new", layer_sizes=(20, 30, 40), seed=2, step_angle=0.03)
    s_old = feed(c, ingest, old, 4)
    s_old.close()  # disconnected: served after connected runs
    feed(c, ingest, new, 4)
    m = scrape(c)
    assert {lab["run"] for lab, _ in m["layrot_layer_rotation"]} == {"new"}
    assert value(m, "layrot_run_aggregate_only", run="old") == 1
    assert value(m, "layrot_run_aggregate_only", run="new") == 0
    assert value(m, "layrot_layer_series") == 12 and value(m, "layrot_layer_series_limit") == 12
    # The aggregate-only run keeps its run-level numbers, exact against the job's truth.
    rot = old.truth[4]["rotation"]
    assert value(m, "layrot_run_rotation_min", run="old") == pytest.approx(rot.min(), rel=1e-9)
    assert value(m, "layrot_run_rotation_mean", run="old") == pytest.approx(rot.mean(), rel=1e-9)
    assert value(m, "layrot_run_rotation_max", run="old") == pytest.approx(rot.max(), rel=1e-9)
    for q in (0.1, 0.5, 0.9):
        assert value(m, "layrot_run_rotation_quantile", run="old", quantile=q) == pytest.approx(
            np.quantile(rot, q), rel=1e-9
        )
    assert value(m, "layrot_run_step_angle_max_radians", run="old") == pytest.approx(
        old.truth[4]["step_angle"].max(), rel=1e-9
    )


def test_aggregate_layers_caps_huge_runs_only(collector_factory, ingest, sim_job):
    c = collector_factory(aggregate_layers=3)
    small = sim_job(run="small", layer_sizes=(10, 10, 10))
    big = sim_job(run="big", layer_sizes=(10,) * 4, seed=3)
    feed(c, ingest, small, 2)
    feed(c, ingest, big, 2)
    m = scrape(c)
    assert {lab["run"] for lab, _ in m["layrot_layer_weight_norm"]} == {"small"}
    assert value(m, "layrot_run_aggregate_only", run="big") == 1
    assert value(m, "layrot_run_layers", run="big") == 4


def test_names_that_need_escaping_round_trip(collector, ingest, sim_job):
    job = sim_job(run='odd "run" \\ name', layer_sizes=(12, 14))
    feed(collector, ingest, job, 2)
    m = scrape(collector)
    runs = {lab["run"] for lab, _ in m["layrot_layer_rotation"]}
    assert runs == {'odd "run" \\ name'}
    assert value(m, "layrot_run_connected", run='odd "run" \\ name') == 1
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert [format_value(x) for x in (float("nan"), float("inf"), -float("inf"), 0.1)] == ["NaN", "+Inf", "-Inf", "0.1"]
