"""The incident model of the abrupt-rotation detector and the not_learning kind (server/alert_detectors.py).

Synthetic runs with their own seeds and settings (not a replay of benchmarks/alert_corpus.py):
log-normal step angles around per-layer levels, a fast-decaying start, noisy plain-SGD-like
layers, injected jumps with known steps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from layrot.cli.main import cli
from layrot.client.query import QueryClient
from layrot.proto import layrot_pb2 as pb
from layrot.server.alerts import AlertEngine, AlertHub, Thresholds
from tests.test_alerts import Clock, feed, run_state


def noisy_run(seed: int, S: int, L: int, sigma: float = 0.35) -> np.ndarray:
    """Step angles of a healthy run: per-layer levels, log-normal noise, a 4x start decaying over 30 steps."""
    rng = np.random.default_rng(seed)
    levels = np.geomspace(2e-3, 4e-2, L)
    angles = levels * np.exp(sigma * rng.standard_normal((S, L)))
    angles[:30] *= np.linspace(4.0, 1.0, 30)[:, None]
    return angles


def incidents(engine: AlertEngine, run: str) -> list[pb.Alert]:
    return [a for a in engine.hub.list(run) if a.kind == "abrupt_rotation"]


@pytest.mark.parametrize("seed,L,sizes", [(11, 7, [1]), (12, 12, [5, 1, 17]), (13, 3, [64])])
def test_healthy_noisy_runs_raise_nothing(seed, L, sizes):
    engine = AlertEngine(AlertHub(), Thresholds())
    rs = run_state("healthy", L)
    feed(engine, rs, noisy_run(seed, 600, L), sizes, loss=np.linspace(2.3, 0.2, 600))
    assert engine.hub.list("healthy") == []


def test_a_step_where_most_layers_jump_is_one_incident_and_repeats_update_it():
    L, S = 9, 300
    angles = noisy_run(21, S, L, sigma=0.15)  # momentum/Adam-like: steadier angles than plain SGD
    loss = np.linspace(2.3, 0.5, S)
    angles[149, :6] *= 12.0  # step 150: 6 of 9 layers jump 12x (an lr spike)
    loss[150] = 3.0  # the loss after the jump is worse: critical
    angles[155, 4:] *= 15.0  # step 156: a repeat inside the refractory window with 3 new layers: an update
    angles[160, :6] *= 15.0  # step 161: a repeat with no new layer: joins silently
    angles[229, :6] *= 12.0  # step 230: after the window, a new incident
    clock = Clock()
    engine = AlertEngine(AlertHub(), Thresholds(), loss_wait=0.5, monotonic=clock)
    rs = run_state("spike", L)
    feed(engine, rs, angles, [4, 1, 9], loss=loss)
    got = incidents(engine, "spike")
    assert [a.step for a in got] == [150, 230]
    first, second = got
    assert len(first.layers) == L and first.layer == f"layer{int(np.argmax(angles[149]))}.weight"  # largest at 150
    assert first.angle == pytest.approx(angles[149].max(), rel=1e-6)
    assert first.incident == "spike/abrupt_rotation/150" and first.severity == "critical"
    assert first.loss_after == 3.0 and first.last_step == 156 and first.updates == 1
    assert "9 layers rotated abruptly at step 150" in first.message and "2 steps with jumps" in first.message
    assert len(second.layers) == 6


def test_one_layer_far_above_its_own_and_the_others_is_an_incident_a_milder_one_is_not():
    L, S = 8, 200
    angles = noisy_run(31, S, L, sigma=0.15)
    angles[99, 3] *= 40.0  # a re-initialized layer (below the extreme angle)
    angles[149, 5] *= 5.0  # one layer 5x: below single_ratio, and alone
    engine = AlertEngine(AlertHub(), Thresholds())
    rs = run_state("single", L)
    feed(engine, rs, angles, [3])
    (a,) = incidents(engine, "single")
    assert a.step == 100 and list(a.layers) == ["layer3.weight"] and a.severity == "warning"  # no loss, not extreme
    assert "one layer far above" in a.message


def test_warm_up_only_extreme_angles_fire_and_they_are_critical():
    L = 4
    angles = noisy_run(41, 60, L)
    angles[1] = 0.7  # step 2: huge for the layers but below the extreme angle (plain SGD's take-off)
    angles[4, 2] = 1.3  # step 5: extreme
    engine = AlertEngine(AlertHub(), Thresholds())
    rs = run_state("warm", L)
    feed(engine, rs, angles, [2], loss=np.full(60, 2.3))
    (a,) = incidents(engine, "warm")
    assert a.step == 5 and a.severity == "critical" and "extreme" in a.message


def test_severity_follows_the_loss_and_waits_for_it():
    L, S = 6, 200
    angles = noisy_run(51, S, L, sigma=0.1)
    loss = np.linspace(2.0, 1.0, S)
    angles[79] *= 10.0  # step 80: loss improves across it -> warning
    angles[139] *= 10.0  # step 140: last step of a batch; the next batch's loss is worse -> critical
    loss[140] = 5.0
    clock = Clock()
    engine = AlertEngine(AlertHub(), Thresholds(), loss_wait=0.5, monotonic=clock)
    rs = run_state("sev", L)
    feed(engine, rs, angles[:140], [10], loss=loss[:140])
    assert [a.step for a in incidents(engine, "sev")] == [80]
    feed(engine, rs, angles[140:], [10], loss=loss[140:], start=141)
    a80, a140 = incidents(engine, "sev")
    assert a80.severity == "warning" and "improved" in a80.message
    assert a140.severity == "critical" and a140.loss_after == 5.0 and "worse" in a140.message


def test_layca_commanded_angles_are_exempt():
    L, S = 5, 200
    rho = np.full((S, L), 0.01)
    rho[100:] = 0.1  # a controller raises the rate 10x: commanded, not abrupt
    angles = np.arctan(rho)
    engine = AlertEngine(AlertHub(), Thresholds())
    rs = run_state("layca", L)
    feed(engine, rs, angles, [7], rho=rho)
    assert engine.hub.list("layca") == []


def test_thresholds_are_settable_per_run():
    L, S = 6, 200
    angles = noisy_run(61, S, L, sigma=0.1)
    angles[99, :2] *= 10.0  # 2 of 6 layers: below the default group share (half)
    engine = AlertEngine(AlertHub(), Thresholds())
    for run, group in (("default", 0.0), ("tuned", 0.3)):
        if group:
            engine.set_thresholds(run, pb.Thresholds(group=group))
        feed(engine, run_state(run, L), angles, [5])
    assert engine.hub.list("default") == []
    assert [a.step for a in incidents(engine, "tuned")] == [100]
    with pytest.raises(ValueError):
        engine.set_thresholds("tuned", pb.Thresholds(group=1.5))


# ---------------------------------------------------------------- not_learning
def losses(kind: str, S: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = 0.03 * rng.standard_normal(S)
    t = np.arange(S)
    if kind == "flat":
        return 2.3 + noise
    if kind == "layca-huge":  # a huge first loss that collapses to the chance level, then flat
        return np.where(t < 4, 80.0, 2.3) + noise
    if kind == "slow":  # learns slowly: 8 % down by step 60
        return 2.3 * np.exp(-t / 700) + noise
    if kind == "finetune-blowup":  # starts trained, blows up, recovers slowly
        return np.where(t < 5, 0.3, 0.3 + 1.5 * np.exp(-(t - 5) / 40)) + 0.01 * noise
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind,fires", [("flat", True), ("layca-huge", True), ("slow", False), ("finetune-blowup", False)]
)
def test_not_learning(kind, fires):
    S = 160
    engine = AlertEngine(AlertHub(), Thresholds(not_learning_steps=80))
    rs = run_state("nl", 3)
    feed(engine, rs, np.full((S, 3), 0.01), [3], loss=losses(kind, S, seed=71))
    got = [a for a in engine.hub.list("nl") if a.kind == "not_learning"]
    if not fires:
        assert got == []
        return
    (a,) = got
    assert 80 <= a.step <= 83 and a.severity == "warning" and a.resolved == 0
    assert a.loss_before == pytest.approx(2.3, abs=0.1)


def test_not_learning_resolves_with_a_terminal_update_of_the_same_incident():
    S = 200
    loss = losses("flat", S, seed=81)
    loss[120:] = 0.8  # it starts learning
    engine = AlertEngine(AlertHub(), Thresholds(not_learning_steps=60))
    rs = run_state("late", 2)
    watched: list[pb.Alert] = []
    engine.hub.pushers = [
        type("P", (), {"fire": lambda self, a, hold=False: watched.append(a), "resolve": lambda *x: None})()
    ]
    feed(engine, rs, np.full((S, 2), 0.01), [4], loss=loss)
    (a,) = [x for x in engine.hub.list("late") if x.kind == "not_learning"]
    assert a.resolved > 0 and a.updates == 1 and "resolved at step" in a.message
    assert [x.incident for x in watched] == [a.incident, a.incident]


# ---------------------------------------------------------------- the CLI
def test_json_says_when_the_listing_was_cut(collector, ingest, sim_job):
    job = sim_job(run="many", layer_sizes=(30, 30))
    s = ingest(collector)
    s.send(job.hello())
    for _ in range(3):  # three incidents, each past the previous one's refractory window
        s.send(job.batch(1, angle=1.2, loss=False))
        s.send(job.batch(25, angle=0.01, loss=False))
    s.wait_ack(job.seq)
    base = ["alerts", "--run", "many", "--json", "--collector", collector.grpc_address]
    out = json.loads(CliRunner().invoke(cli, base + ["--limit", "2"]).output)
    assert out["truncated"] is True and out["limit"] == 2 and [a["step"] for a in out["alerts"]] == [27, 53]
    out = json.loads(CliRunner().invoke(cli, base + ["--limit", "0"]).output)
    assert out["truncated"] is False and [a["step"] for a in out["alerts"]] == [1, 27, 53]
    assert all(a["incident"] == f"many/abrupt_rotation/{a['step']}" for a in out["alerts"])
    out = json.loads(CliRunner().invoke(cli, base + ["--limit", "3"]).output)
    assert out["truncated"] is False and len(out["alerts"]) == 3
    r = CliRunner().invoke(cli, ["alerts", "--run", "many", "--limit", "1", "--collector", collector.grpc_address])
    assert "more exist" in r.output
    with QueryClient(collector.grpc_address) as q:
        assert math.isfinite(q.list_alerts("many")[0]["angle"])


def test_watchers_get_an_incident_then_its_updates_and_list_keeps_it_once():
    import asyncio

    hub = AlertHub()
    engine = AlertEngine(hub, Thresholds())
    L, S = 6, 150
    angles = noisy_run(91, S, L, sigma=0.1)
    angles[99, :3] *= 10.0  # step 100: 3 of 6 layers
    angles[102, 3:] *= 10.0  # step 103: the other 3, inside the window: an update

    async def main() -> list[pb.Alert]:
        got: list[pb.Alert] = []

        async def consume() -> None:
            async for a in hub.watch("w"):
                got.append(a)
                if len(got) == 2:
                    return

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0)
        feed(engine, run_state("w", L), angles, [1])
        await asyncio.wait_for(task, 5)
        return got

    got = asyncio.run(main())
    assert [(a.incident, a.updates, len(a.layers)) for a in got] == [
        ("w/abrupt_rotation/100", 0, 3),
        ("w/abrupt_rotation/100", 1, 6),
    ]
    (kept,) = hub.list("w")
    assert kept.updates == 1 and kept.last_step == 103
    (count,) = [n for (run, _, kind, _), n in hub._counts.items() if run == "w" and kind == "abrupt_rotation"]
    assert count == 1  # an update is not a second alert in layrot_alerts_total
