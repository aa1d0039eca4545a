"""not_learning judged at a share of the run's announced length (server/alert_detectors.py, ``NotLearning``).

Its own settings, not a replay of benchmarks/alert_corpus.py: synthetic engine inputs for
the rules (runs of 1,000 steps judged at step 50), and real training of a 3-layer MLP on
seeded Gaussian clusters (5 classes, 20 features, batches of 32, 400 steps announced with
``watch(..., total_steps=400)``: judged at step 20) against a real collector on loopback.
The real runs' premises are checked from saved float64 weights and the losses: a dead run
(lr 0: no weight moves; Layca at rho 1: every layer > 45 degrees from w(0) with the loss
at the chance level) must fire AT the share step, a healthy run that learns slowly (its
loss at step 20 is still within 5 % of its first losses, so a loss-only judgment there
would call it dead) and a Layca run at rho 1/3 that does learn (> 45 degrees from w(0) at
step 20) must stay silent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import layrot
from layrot.client.query import QueryClient
from layrot.proto import layrot_pb2 as pb
from layrot.server.alerts import AlertEngine, AlertHub, Thresholds
from layrot.server.state import hello_meta, meta_total_steps
from tests.test_alerts import run_state

torch.set_num_threads(1)


# ---------------------------------------------------------------- the rules, on the engine
def engine_run(
    total: int,
    angles: np.ndarray,
    loss: np.ndarray,
    rotation: np.ndarray | None = None,
    sizes: tuple[int, ...] = (7,),
    thresholds: Thresholds | None = None,
    share: float | None = None,
) -> list[pb.Alert]:
    """Feed one run (``total`` announced steps, 0 = unknown) to a fresh engine; its not_learning alerts."""
    engine = AlertEngine(AlertHub(), thresholds or Thresholds())
    rs = run_state("nl", angles.shape[1])
    rs.total_steps = total
    if share is not None:
        engine.set_thresholds("nl", pb.Thresholds(not_learning_share=share))
    S = angles.shape[0]
    i = k = 0
    while i < S:
        n = min(sizes[k % len(sizes)], S - i)
        k += 1
        sl = slice(i, i + n)
        engine.observe(
            rs,
            0,
            np.arange(1 + i, 1 + i + n, dtype=np.uint64),
            angles[sl],
            ~np.isfinite(angles[sl]),
            None,
            list(loss[sl]),
            None if rotation is None else rotation[sl],
        )
        i += n
    return [a for a in engine.hub.list("nl") if a.kind == "not_learning"]


def flat_loss(S: int, seed: int, level: float = 2.3) -> np.ndarray:
    return level + 0.03 * np.random.default_rng(seed).standard_normal(S)


def test_frozen_weights_fire_at_the_share_step_even_inside_a_batch():
    S, L = 300, 4
    (a,) = engine_run(1000, np.zeros((S, L)), flat_loss(S, 3), sizes=(7,))  # batches 43-49, 50-56: crosses 50
    assert a.step == math.ceil(0.05 * 1000) == 50
    assert "frozen" in a.message and "of 1000" in a.message and a.resolved == 0


def test_scrambled_weights_fire_at_the_share_step():
    S, L = 300, 5
    rotation = np.full((S, L), 1.0 - math.cos(math.radians(80)))  # every layer 80 deg from w(0)
    (a,) = engine_run(1000, np.full((S, L), 0.5), flat_loss(S, 4), rotation, sizes=(3, 1, 9))
    assert a.step == 50 and "scrambled" in a.message


def test_scrambled_weights_with_a_falling_loss_are_learning():
    S, L = 300, 5
    rotation = np.full((S, L), 1.0)
    loss = 2.3 * np.exp(-np.arange(S) / 60) + 0.01 * np.random.default_rng(5).standard_normal(S)
    assert engine_run(1000, np.full((S, L), 0.5), loss, rotation) == []


def test_moving_weights_are_left_to_the_loss_test_after_not_learning_steps():
    # Flat loss, weights moving like a healthy run's: the share point (50) says nothing;
    # the loss test fires at not_learning_steps (100) reported steps, as without a length.
    S, L = 300, 4
    rotation = np.full((S, L), 1.0 - math.cos(math.radians(5)))
    got = engine_run(1000, np.full((S, L), 0.01), flat_loss(S, 6), rotation, sizes=(5,))
    assert [a.step for a in got] == [100] and "reported steps" in got[0].message


def test_a_long_run_does_the_loss_test_at_its_share_point():
    S, L = 700, 3
    got = engine_run(10_000, np.full((S, L), 0.01), flat_loss(S, 7), np.full((S, L), 1e-3), sizes=(4,))
    assert [a.step for a in got] == [500]  # 5 % of 10,000, later than not_learning_steps


def test_without_a_length_frozen_weights_are_judged_with_the_loss_test():
    S, L = 200, 3
    got = engine_run(0, np.zeros((S, L)), flat_loss(S, 8), thresholds=Thresholds(not_learning_steps=70), sizes=(6,))
    # Judged in the batch of steps 67-72, as of step 70: the step whose loss was the 70th.
    assert [a.step for a in got] == [70] and "frozen" in got[0].message


def test_the_share_is_a_per_run_threshold():
    S, L = 400, 3
    assert [a.step for a in engine_run(1000, np.zeros((S, L)), flat_loss(S, 9), share=0.2, sizes=(1,))] == [200]
    with pytest.raises(ValueError, match="not_learning_share"):
        Thresholds(not_learning_share=1.5)
    assert Thresholds().not_learning_share == 0.05


def test_a_frozen_run_resolves_when_its_loss_falls():
    S, L = 300, 3
    loss = flat_loss(S, 10)
    loss[150:] = 0.9
    (a,) = engine_run(1000, np.zeros((S, L)), loss)
    assert a.step == 50 and a.resolved > 0 and a.updates == 1 and "resolved at step" in a.message


def test_total_steps_kept_in_the_run_meta():
    hello = pb.Hello(run="r", meta={"team": "a"}, total_steps=1234)
    meta = hello_meta(hello)
    assert meta == {"team": "a", "total_steps": "1234"} and meta_total_steps(meta) == 1234
    assert hello_meta(pb.Hello(run="r")) == {}
    for bad in ("", "x", "-5", "1.5"):
        assert meta_total_steps({"total_steps": bad}) == 0


# ---------------------------------------------------------------- real training, real collector
STEPS = 400
SHARE_STEP = math.ceil(0.05 * STEPS)  # 20


def clusters(seed: int = 1234, n: int = 2000, d: int = 20, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    y = rng.integers(0, k, n)
    x = centers[y] + 1.5 * rng.standard_normal((n, d))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def train(collector, run: str, kind: str, value: float) -> dict:
    """One real run watched with ``total_steps``; returns its losses and float64 weights at w(0) and the share step."""
    x, y = clusters()
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=value)
    else:
        opt = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1), rho=value, alpha=0.0)
    layers = [p for p in model.parameters() if p.ndim >= 2]
    w0 = [p.detach().double().clone() for p in layers]
    handle = layrot.watch(model, opt, run, collector=collector.grpc_address, total_steps=STEPS)
    gen = torch.Generator().manual_seed(11)
    losses, at_share = [], []
    for t in range(1, STEPS + 1):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        handle.observe_loss(loss)
        opt.step()
        losses.append(float(loss.detach()))
        if t == SHARE_STEP:
            at_share = [p.detach().double().clone() for p in layers]
    handle.close()
    with QueryClient(collector.grpc_address) as q:
        alerts = q.list_alerts(run, limit=0)
    angles = [
        math.degrees(math.acos(min(1.0, float((a * b).sum() / (a.norm() * b.norm()))))) for a, b in zip(at_share, w0)
    ]
    return {"losses": np.array(losses), "alerts": alerts, "angles_at_share": angles}


def test_a_run_with_lr_0_is_not_learning_at_5_percent_of_its_length(collector):
    r = train(collector, "mlp-lr0", "sgd", 0.0)
    assert max(r["angles_at_share"]) == 0.0  # premise: nothing moved
    (a,) = r["alerts"]
    assert a["kind"] == "not_learning" and a["step"] == SHARE_STEP and "frozen" in a["message"]
    assert collector.state.runs["mlp-lr0"].total_steps == STEPS


def test_layca_at_rho_1_is_not_learning_at_5_percent_of_its_length(collector):
    r = train(collector, "mlp-layca-rho1", "layca", 1.0)
    assert np.median(r["angles_at_share"]) > 45.0  # premise: the weights are scrambled
    chance = math.log(5)
    assert abs(np.median(r["losses"][-50:]) - chance) < 0.1 * chance  # premise: it never learns
    nl = [a for a in r["alerts"] if a["kind"] == "not_learning"]
    assert [a["step"] for a in nl] == [SHARE_STEP] and "scrambled" in nl[0]["message"]


def test_a_slow_healthy_run_is_not_called_dead_at_its_share_point(collector):
    r = train(collector, "mlp-slow", "sgd", 0.008)
    loss = r["losses"]
    first, at_share = np.median(loss[:5]), np.median(loss[SHARE_STEP - 7 : SHARE_STEP])
    assert at_share > 0.95 * first  # premise: by its loss alone, at step 20 it has not started
    assert np.median(loss[-20:]) < 0.5 * first  # premise: it learns
    assert r["alerts"] == []


def test_layca_at_a_high_rate_that_learns_is_not_called_dead(collector):
    r = train(collector, "mlp-layca-rho0.33", "layca", 1 / 3)
    assert np.median(r["angles_at_share"]) > 45.0  # premise: far from w(0) at step 20...
    assert np.median(r["losses"][-50:]) < 0.5 * math.log(5)  # ...and learning
    assert [a for a in r["alerts"] if a["kind"] == "not_learning"] == []


def test_total_steps_survives_a_collector_restart(collector_factory, tmp_path):
    db = tmp_path / "restart.db"
    c = collector_factory(db_path=db)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        layrot.watch(model, opt, "bad", collector=c.grpc_address, total_steps=-1)
    handle = layrot.watch(model, opt, "planned", collector=c.grpc_address, total_steps=777)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    handle.close()
    assert c.state.runs["planned"].total_steps == 777
    c.stop(grace=0.5)
    again = collector_factory(db_path=db)
    rs = again.state.runs["planned"]
    assert rs.total_steps == 777 and rs.meta["total_steps"] == "777"
