"""The generalization indicator (core/indicator.py) and where it is shown: /metrics, the Query answers, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from metrics_text import scrape

from layrot.cli.main import cli
from layrot.client.query import QueryClient
from layrot.core.indicator import IndicatorSettings, indicator


def test_indicator_counts_layers_at_the_target_and_judges_late_enough():
    rot = np.array([0.95, 0.2, np.nan, 0.9, 1.3])
    early = indicator(rot, step=10, total_steps=100, target=0.9, share=0.5)
    assert early.at_target_ratio == pytest.approx(3 / 5) and early.min_rotation == 0.2
    assert not early.judged and not early.under_rotated.any()
    late = indicator(rot, step=50, total_steps=100, target=0.9, share=0.5)
    assert late.judged and late.under_rotated.tolist() == [False, True, True, False, False]  # NaN: not at target
    assert not indicator(rot, step=10**6, total_steps=0).judged  # no announced length: never judged
    assert math.isnan(indicator([], 1).at_target_ratio)
    with pytest.raises(ValueError):
        IndicatorSettings(target=0.0)
    with pytest.raises(ValueError):
        IndicatorSettings(share=1.5)


def test_metrics_query_and_cli_show_the_indicator(collector_factory, ingest, sim_job):
    # Simulated layers rotate 0.03 rad per step in random directions; a twin of the job (same seed)
    # gives the rotations at step 22, and the target goes between the smallest and the others, so
    # that one layer is under-rotated and two are at the target.
    twin = sim_job(run="ind", layer_sizes=(40, 40, 40), step_angle=0.03)
    twin.batch(22)
    low, mid, _ = sorted(twin.truth[22]["rotation"])
    target = (low + mid) / 2
    c = collector_factory(rotation_target=target, under_rotated_share=0.5)
    job = sim_job(run="ind", layer_sizes=(40, 40, 40), step_angle=0.03)
    s = ingest(c)
    s.send(job.hello(total_steps=40))
    s.send(job.batch(10))
    s.wait_ack(job.seq)
    m = scrape(c)
    truth = job.truth[10]["rotation"]
    ratio = float((truth >= target).mean())
    assert m["layrot_run_layers_at_target_ratio"][0][1] == pytest.approx(ratio)
    assert "layrot_run_layers_under_rotated" not in m  # step 10 of 40: not judged yet
    s.send(job.batch(12))  # step 22 >= 0.5 x 40: judged
    s.wait_ack(job.seq)
    truth = job.truth[22]["rotation"]
    under = truth < target
    assert under.sum() == 1
    m = scrape(c)
    assert m["layrot_run_layers_under_rotated"][0][1] == under.sum()
    flagged = sorted(int(lab["index"]) for lab, _ in m.get("layrot_layer_under_rotated", []))
    assert flagged == np.flatnonzero(under).tolist()
    with QueryClient(c.grpc_address) as q:
        (summary,) = q.list_runs()
        detail = q.get_run("ind")
    assert summary["layers_at_target_ratio"] == pytest.approx(float((~under).mean()))
    assert summary["indicator_judged"] and summary["layers_under_rotated"] == under.sum()
    assert summary["total_steps"] == 40 and summary["rotation_target"] == target
    assert [lay["under_rotated"] for lay in detail["layers"]] == under.tolist()
    r = CliRunner().invoke(cli, ["runs", "--json", "--collector", c.http_url])
    assert json.loads(r.output)[0]["layers_under_rotated"] == under.sum()
    r = CliRunner().invoke(cli, ["show", "ind", "--collector", c.grpc_address])
    assert r.exit_code == 0 and f"{int((~under).sum())}/3" in r.output
    marked = [line.split()[1] for line in r.output.splitlines() if line.rstrip().split()[2:3] == ["*"]]
    assert marked == [f"layer{i}.weight" for i in np.flatnonzero(under)]
