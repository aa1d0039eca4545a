"""The collector's alert engine: detector numbers, real training runs, query calls, CLI, metrics.

The per-layer jump limits are checked against an independent float64 reference
(``reference_limit``: exact per-step rolling median / MAD of the log angles in plain
numpy; the incident model itself in tests/test_alert_incidents.py) and
real torch runs against angles computed from saved weights. Collectors are
real (embedded, gRPC on loopback); jobs are real torch trainings with
``layrot.watch`` or raw ingest streams (conftest ``SimJob``).
"""

from __future__ import annotations

import json
import math
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from metrics_text import scrape
from torch import nn

import layrot
from layrot.cli.main import cli
from layrot.client.query import CollectorError, QueryClient
from layrot.core.rates import RhoSchedule
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.wire import pack
from layrot.server.alerts import AlertEngine, AlertHub, Thresholds
from layrot.server.state import RunState
from layrot.server.store import LayerRecord, RunRecord

DIGITS: tuple | None = None


# ---------------------------------------------------------------- helpers
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    global DIGITS
    if DIGITS is None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        DIGITS = (torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y, dtype=torch.long))
    return DIGITS


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def ref_angle(u: torch.Tensor, v: torch.Tensor) -> float:
    """Angle between two weight tensors in float64 by 2 atan2(|u^ - v^|, |u^ + v^|)."""
    a = u.detach().double().flatten()
    b = v.detach().double().flatten()
    a, b = a / a.norm(), b / b.norm()
    return 2.0 * math.atan2((a - b).norm().item(), (a + b).norm().item())


def train(model: nn.Module, opt: torch.optim.Optimizer, handle, steps: int, seed: int = 1, on_step=None) -> list[float]:
    """A real training loop; ``on_step(t, phase)`` runs before ("pre") and after ("post") optimizer step t."""
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        handle.observe_loss(loss)
        if on_step:
            on_step(t, "pre")
        opt.step()
        if on_step:
            on_step(t, "post")
        losses.append(loss.item())
    return losses


def reference_limit(history: np.ndarray, th: Thresholds) -> np.ndarray:
    """Per-layer jump limit from the window ending just before the last row of ``history`` (float64).

    A layer jumps above ``median x exp(max(k x spread, log ratio))``, spread = 1.4826 x MAD of the
    log angles (at least 0.1), never below min_angle, never above abs_angle.
    """
    win = np.log(np.maximum(history[-th.window - 1 : -1], 1e-9))
    lmed = np.median(win, axis=0)
    spread = np.maximum(1.4826 * np.median(np.abs(win - lmed), axis=0), 0.1)
    limit = np.maximum(np.exp(lmed + np.maximum(th.k * spread, math.log(th.ratio))), th.min_angle)
    return np.minimum(limit, th.abs_angle)


def reference_fires(angles: np.ndarray, th: Thresholds, rho: np.ndarray | None = None) -> set[tuple[int, int]]:
    """Independent check: (step index, layer) pairs where a layer jumps (the incident rules come on top)."""
    S, L = angles.shape
    out = set()
    for t in range(S):
        limit = reference_limit(angles[: t + 1], th) if t >= th.warmup else np.full(L, th.abs_angle)
        for j in range(L):
            a = angles[t, j]
            fire = a > limit[j]
            if fire and rho is not None and a <= 1.25 * math.atan(rho[t, j]):
                fire = False
            if fire:
                out.add((t, j))
    return out


def run_state(name: str, num_layers: int) -> RunState:
    layers = [
        LayerRecord(index=i, name=f"layer{i}.weight", shape=[4], init_norm=1.0, numel=4, module_type="Linear")
        for i in range(num_layers)
    ]
    return RunState(
        RunRecord(
            run_id=1,
            run=name,
            framework="pytorch",
            framework_version="",
            host="",
            world_size=1,
            every=1,
            capabilities={},
            meta={},
            created=0.0,
            last_seen=None,
            first_report=None,
            nonfinite=0,
            layers=layers,
        )
    )


class Clock:
    """Monotonic time the test advances by hand (the engine's deadlines are relative)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def feed(
    engine: AlertEngine, rs: RunState, angles: np.ndarray, sizes, rho=None, loss=None, start: int = 1, rank: int = 0
) -> None:
    """Send (S, L) angles to ``engine.observe`` in batches of the given sizes (cycled)."""
    S = angles.shape[0]
    i = 0
    k = 0
    while i < S:
        n = min(sizes[k % len(sizes)], S - i)
        k += 1
        sl = slice(i, i + n)
        engine.observe(
            rs,
            rank,
            np.arange(start + i, start + i + n, dtype=np.uint64),
            angles[sl],
            ~np.isfinite(angles[sl]),
            None if rho is None else rho[sl],
            [] if loss is None else list(loss[sl]),
        )
        i += n


def abrupt(alerts) -> list:
    return [a for a in alerts if (a["kind"] if isinstance(a, dict) else a.kind) == "abrupt_rotation"]


def wait_for(fn, timeout: float, interval: float = 0.01):
    """Poll ``fn`` until it returns something truthy; returns (value, seconds waited) or (None, timeout)."""
    t0 = time.monotonic()
    while True:
        v = fn()
        if v:
            return v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None, timeout
        time.sleep(interval)


# ---------------------------------------------------------------- the detector against the reference
def test_thresholds_defaults_and_validation():
    th = Thresholds()
    # The documented defaults (module docstring, serve --help, README).
    assert (th.abs_angle, th.k, th.window, th.warmup, th.stall_seconds, th.min_angle) == (
        1.0,
        9.0,
        50,
        20,
        900.0,
        0.01,
    )
    assert (th.ratio, th.group, th.single_ratio, th.refractory) == (3.0, 0.5, 8.0, 20)
    assert (th.not_learning_steps, th.not_learning_drop) == (100.0, 0.05)
    for bad in (
        {"k": 0},
        {"abs_angle": -1.0},
        {"window": 2},
        {"warmup": 0},
        {"min_angle": math.nan},
        {"stall_seconds": math.nan},
    ):
        with pytest.raises(ValueError):
            Thresholds(**bad)
    assert Thresholds(abs_angle=math.inf, k=math.inf).abs_angle == math.inf
    help_text = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    for fragment in (
        "1.0 = 57 deg",
        "[default: 9]",
        "[default: 50]",
        "[default: 20]",
        "[default: 0.01]",
        "[default: 900]",
    ):
        assert fragment in help_text


def test_resent_batches_and_other_ranks_do_not_raise_twice():
    engine = AlertEngine(AlertHub(), Thresholds())
    rs = run_state("dedup", 3)
    a = np.full((30, 3), 0.01)
    a[25, 1] = 1.0
    feed(engine, rs, a, [10])
    feed(engine, rs, a[20:], [10], start=21)  # at-least-once delivery: the same steps again
    feed(engine, rs, a, [10], rank=1)  # a data-parallel rank with the same weights
    assert [(x.step, x.layer) for x in engine.hub.list("dedup")] == [(26, "layer1.weight")]
    # Non-finite angles of a diverged layer do not poison the baseline (the divergence alert covers them).
    b = np.full((30, 3), 0.01)
    b[5:8, 2] = np.nan
    feed(engine, rs, b, [4], start=31)
    kinds = [x.kind for x in engine.hub.list("dedup")]
    assert kinds == ["abrupt_rotation", "divergence"]
    assert np.isfinite(engine.runs["dedup"].baseline.median).all()


# ---------------------------------------------------------------- real training runs
def test_replaced_layer_alert_reaches_the_cli_within_1s_with_right_numbers(collector):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = "replaced-layer"
    handle = layrot.watch(model, opt, run=run, collector=collector.grpc_address)
    K, target = 120, model[2].weight
    saved: dict[str, torch.Tensor] = {}
    seen: dict[str, float] = {}

    def poll() -> None:  # an operator polling the collector while the job trains
        with QueryClient(collector.grpc_address) as q:
            while "reported" not in seen or "found" not in seen:
                if "reported" in seen and any(a["step"] == K for a in abrupt(q.list_alerts(run))):
                    seen["found"] = time.monotonic()
                time.sleep(0.005)

    def on_step(t: int, phase: str) -> None:
        if t == K and phase == "pre":
            saved["before"] = target.detach().clone()
            with torch.no_grad():  # replaced weights: a fresh init of the same layer
                nn.init.kaiming_uniform_(target, a=math.sqrt(5))
        elif t == K and phase == "post":
            saved["after"] = target.detach().clone()
            seen["reported"] = time.monotonic()  # the hook has handed step K to its reporter

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    losses = train(model, opt, handle, K + 30, on_step=on_step)
    assert handle.flush(10)
    poller.join(5)
    handle.close()
    assert "found" in seen, "the alert never appeared"
    latency = seen["found"] - seen["reported"]
    assert latency < 1.0, f"alert visible {latency:.3f} s after step {K} was reported"

    r = CliRunner().invoke(cli, ["alerts", "--run", run, "--json", "--collector", collector.grpc_address])
    assert r.exit_code == 0, r.output
    records = json.loads(r.output)["alerts"]
    name = handle.layer_names[1]
    assert name == "2.weight"
    hit = [x for x in records if x["kind"] == "abrupt_rotation" and x["step"] == K]
    assert [x["layer"] for x in hit] == [name]
    rec = hit[0]
    assert set(rec) >= {"run", "layer", "step", "kind", "severity", "angle", "baseline", "time"}
    assert rec["run"] == run
    truth = ref_angle(saved["before"], saved["after"])
    assert truth > 1.0  # tens of degrees: a fresh init is ~90 deg away
    assert rec["angle"] == pytest.approx(truth, rel=1e-5)
    # Nothing fired before the replacement (SGD's first, large steps included).
    assert all(x["step"] >= K for x in abrupt(records))

    with QueryClient(collector.grpc_address) as q:
        h = q.history(run)
    j = h.layer_names.index(name)
    ang = h.step_angle[:, j]
    steps = h.steps.tolist()
    k = steps.index(K)
    # Baseline: the layer's median over a 50-step window that ends at most 5 steps before K.
    # The reporter batches steps, so the window may end a batch before K: some 50-step window does.
    medians = np.array([float(np.median(ang[k - e - 50 : k - e])) for e in range(0, 70)])
    assert np.isclose(medians, rec["baseline"], rtol=1e-6).any(), (rec["baseline"], medians[:10])
    # Severity: loss before = median of the last 5 reported losses up to K, after = loss at K + 1.
    assert rec["loss_before"] == pytest.approx(float(np.median(h.loss[k - 4 : k + 1])), rel=1e-6)
    assert rec["loss_after"] == pytest.approx(h.loss[k + 1], rel=1e-6)
    assert h.loss[k + 1] == pytest.approx(losses[K], rel=1e-6)
    assert rec["severity"] == ("critical" if rec["loss_after"] >= rec["loss_before"] else "warning")
    assert rec["severity"] == "critical"  # a re-initialized layer does not help the loss


@pytest.mark.slow
def test_normal_layca_and_sgd_runs_raise_no_abrupt_rotation(collector):
    steps = 500
    runs = {}
    for kind in ("layca", "sgd"):
        torch.manual_seed(0)
        model = mlp()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "layca":
            opt = layrot.Layca(
                base,
                alpha=-0.5,
                schedule=RhoSchedule(
                    rho0=3**-3, kind="step", milestones=(0.8, 0.9, 0.97), factor=0.2, total_steps=steps
                ),
            )
        else:
            opt = base
        run = f"normal-{kind}"
        handle = layrot.watch(model, opt, run=run, collector=collector.grpc_address)
        train(model, opt, handle, steps)
        assert handle.flush(10)
        handle.close()
        runs[kind] = run
    th = Thresholds()
    with QueryClient(collector.grpc_address) as q:
        for kind, run in runs.items():
            assert abrupt(q.list_alerts(run)) == [], kind
            h = q.history(run)
            assert len(h) == steps
            # The engine saw every step and its baseline rule was armed.
            b = collector.alert_engine.runs[run].baseline
            assert b.reported == steps and b.armed
            # The independent detector agrees, with margin: angles stay below 80 % of their limits.
            assert reference_fires(h.step_angle, th, h.rho if kind == "layca" else None) == set()
            ratios = [
                (h.step_angle[t] / reference_limit(h.step_angle[: t + 1], th)).max() for t in range(th.warmup, steps)
            ]
            assert max(ratios) < 0.8, (kind, max(ratios))
            if kind == "layca":  # constant angles arctan(rho_l) with step decays
                np.testing.assert_allclose(h.step_angle, np.arctan(h.rho), rtol=1e-3)  # float32 hook
                assert h.rho[-1, 0] / h.rho[0, 0] == pytest.approx(0.2**3)


# ---------------------------------------------------------------- through the collector
def test_divergence_rejections_metrics_and_list_filters(collector, ingest, sim_job):
    job = sim_job(run="diverging", layer_sizes=(30, 40, 50))
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(3))
    b = job.batch(2)
    norm = np.frombuffer(b.norm, dtype="<f8").reshape(2, 3).copy()
    norm[1, 1:] = np.nan  # step 5: layers 1 and 2 diverge
    b.norm = pack(norm)
    s.send(b)
    b2 = job.batch(1)
    b2.norm = pack(np.full((1, 3), np.inf))  # still diverged: no second alert
    s.send(b2)
    s.wait_ack(job.seq)
    with QueryClient(collector.grpc_address) as q:
        (div,) = q.list_alerts("diverging")
    assert (div["kind"], div["severity"], div["step"], div["layer"]) == ("divergence", "critical", 5, "layer1.weight")
    assert "2 of 3 layers" in div["message"]

    # A burst of rejected batches (wrong layer count) raises "rejections" within the timer's second.
    for i in range(12):
        s.send(pb.StepBatch(seq=job.seq + 1 + i, steps=[100 + i], times=[time.time()], num_layers=7))
    with QueryClient(collector.grpc_address) as q:
        rej, waited = wait_for(lambda: [a for a in q.list_alerts("diverging") if a["kind"] == "rejections"], 3.0)
    assert rej, "no rejections alert"
    n = int(rej[0]["message"].split()[0])
    assert rej[0]["severity"] == "warning" and 10 <= n <= 12 and f"(bad_batch: {n})" in rej[0]["message"]

    other = sim_job(run="other", layer_sizes=(20, 20), seed=4)
    s2 = ingest(collector)
    s2.send(other.hello())
    s2.send(other.batch(1))
    b = other.batch(1)
    b.dstep = pack(np.array([[np.nan, 1.0]]))
    s2.send(b)
    s2.wait_ack(other.seq)
    with QueryClient(collector.grpc_address) as q:
        every = q.list_alerts()
        assert {a["run"] for a in every} == {"diverging", "other"}
        assert [a["time"] for a in every] == sorted(a["time"] for a in every)
        (last,) = q.list_alerts(limit=1)
        assert (last["run"], last["kind"], last["time"]) == (every[-1]["run"], every[-1]["kind"], every[-1]["time"])
        assert q.list_alerts(since=time.time() + 60) == []
    m = scrape(collector.metrics_url)
    counts = {(lab["run"], lab["layer"], lab["kind"], lab["severity"]): v for lab, v in m["layrot_alerts_total"]}
    expected: dict[tuple, int] = {}
    for a in every:
        key = (a["run"], a["layer"], a["kind"], a["severity"])
        expected[key] = expected.get(key, 0) + 1
    assert counts == expected


def test_watch_alerts_streams_new_alerts_and_the_backlog(collector, ingest, sim_job):
    job = sim_job(run="watched", layer_sizes=(30, 30))
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(25, angle=0.01, loss=False))
    s.send(job.batch(1, angle=1.2, loss=False))  # step 26: both layers above the extreme angle: ONE incident
    s.wait_ack(job.seq)
    with QueryClient(collector.grpc_address) as q:
        (first_incident,) = q.list_alerts("watched")
        # Both layers rotate by the same angle (to the last bits): either may come first.
        assert first_incident["step"] == 26 and sorted(first_incident["layers"]) == ["layer0.weight", "layer1.weight"]
        assert first_incident["incident"] == "watched/abrupt_rotation/26" and first_incident["updates"] == 0
    got: list[dict] = []
    ready = threading.Event()

    def consume() -> None:
        with QueryClient(collector.grpc_address) as q:
            stream = q.watch_alerts("watched", backlog=1)
            for a in stream:
                got.append(a)
                ready.set()
                if len(got) == 3:
                    stream.close()
                    return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert ready.wait(5)
    assert [a["step"] for a in got] == [26]  # the newest kept alert first
    s.send(job.batch(23, angle=0.01, loss=False))
    s.send(job.batch(1, angle=1.2, loss=False))  # step 50: past the refractory window, a new incident
    s.send(job.batch(24, angle=0.01, loss=False))
    sent = time.monotonic()
    s.send(job.batch(1, angle=1.2, loss=False))  # step 75
    t.join(5)
    assert not t.is_alive()
    delay = time.monotonic() - sent
    assert [a["step"] for a in got] == [26, 50, 75] and delay < 1.0
    # Another run's alerts do not reach a run-filtered watcher; an unfiltered one sees them.
    with QueryClient(collector.grpc_address) as q:
        it = q.watch_alerts()
        first: list = []
        th = threading.Thread(target=lambda: first.append(next(it)), daemon=True)
        th.start()
        time.sleep(0.5)
        other = sim_job(run="watched-2", layer_sizes=(30,), seed=9)
        s2 = ingest(collector)
        s2.send(other.hello())
        s2.send(other.batch(1, angle=1.0, loss=False))
        th.join(5)
        it.close()
    assert first and first[0]["run"] == "watched-2"


def test_set_thresholds_per_run_defaults_token_and_restart(collector_factory, ingest, sim_job, tmp_path):
    c = collector_factory(token="t0k", thresholds={"abs_angle": 0.5})
    with QueryClient(c.grpc_address, token="t0k") as q:
        assert q.set_thresholds()["abs_angle"] == 0.5  # all zero: read the defaults
        th = q.set_thresholds("tuned", abs_angle=0.1, warmup=5)
        assert (th["abs_angle"], th["warmup"], th["k"]) == (0.1, 5, 9.0)
        th = q.set_thresholds("tuned", k=4)  # other fields keep their values
        assert (th["abs_angle"], th["k"]) == (0.1, 4.0)
        th = q.set_thresholds("tuned", k=-1)  # negative: back to the default
        assert th["k"] == 9.0 and th["abs_angle"] == 0.1
        with pytest.raises(CollectorError, match="window"):
            q.set_thresholds("tuned", window=1)
        with pytest.raises(CollectorError, match="NaN"):
            q.set_thresholds("tuned", k=math.nan)
    with QueryClient(c.grpc_address) as q, pytest.raises(CollectorError, match="token"):
        q.set_thresholds("tuned", k=3)
    # The per-run limit is what the engine applies: 0.2 rad fires for "tuned" (0.1), not for "plain" (0.5).
    for name in ("tuned", "plain"):
        job = sim_job(run=name, layer_sizes=(30,), seed=len(name))
        s = ingest(c, token="t0k")
        s.send(job.hello())
        s.send(job.batch(3, angle=0.01, loss=False))
        s.send(job.batch(1, angle=0.2, loss=False))
        s.wait_ack(job.seq)
    with QueryClient(c.grpc_address) as q:
        assert [a["run"] for a in q.list_alerts()] == ["tuned"]
    c.stop()
    # Per-run thresholds and alerts (with their counters) survive a restart.
    c2 = collector_factory(db_path=c.db_path, token="t0k", thresholds={"abs_angle": 0.5})
    with QueryClient(c2.grpc_address, token="t0k") as q:
        assert q.set_thresholds("tuned")["abs_angle"] == 0.1
        assert [a["step"] for a in q.list_alerts("tuned")] == [4]
    m = scrape(c2.metrics_url)
    assert [(lab["run"], v) for lab, v in m["layrot_alerts_total"]] == [("tuned", 1.0)]
    # CLI: show and change.
    r = CliRunner().invoke(
        cli, ["alerts", "thresholds", "tuned", "--collector", c2.grpc_address, "--token", "t0k", "--k", "7", "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["k"] == 7.0 and out["abs_angle"] == 0.1 and out["run"] == "tuned"
    r = CliRunner().invoke(
        cli, ["alerts", "thresholds", "tuned", "--collector", c2.grpc_address, "--token", "t0k", "--reset", "--json"]
    )
    assert json.loads(r.output)["abs_angle"] == 0.5 and json.loads(r.output)["k"] == 9.0


def test_stalled_run_is_raised_and_no_alerts_mode(collector_factory, ingest, sim_job):
    c = collector_factory(thresholds={"stall_seconds": 1.0})
    job = sim_job(run="stalling", layer_sizes=(10,))
    s = ingest(c)
    s.send(job.hello())
    s.send(job.batch(2))
    s.wait_ack(job.seq)
    t0 = time.monotonic()
    with QueryClient(c.grpc_address) as q:
        stalled, _ = wait_for(lambda: [a for a in q.list_alerts("stalling") if a["kind"] == "stalled"], 5.0, 0.05)
    assert stalled, "no stalled alert"
    assert 1.0 <= time.monotonic() - t0 < 3.5
    assert stalled[0]["step"] == 2 and stalled[0]["severity"] == "warning"
    # Reporting again ends the episode; a new silence raises a new one.
    s.send(job.batch(1))
    s.wait_ack(job.seq)
    assert not c.alert_engine.runs["stalling"].stalled
    # A finished run is never stalled.
    s.goodbye(job.seq)
    time.sleep(2.2)
    with QueryClient(c.grpc_address) as q:
        assert len([a for a in q.list_alerts("stalling") if a["kind"] == "stalled"]) == 1

    off = collector_factory(db_path=str(c.db_path) + ".off", alerts=False)
    job2 = sim_job(run="quiet", layer_sizes=(10,))
    s2 = ingest(off)
    s2.send(job2.hello())
    s2.send(job2.batch(2, angle=1.5))
    s2.wait_ack(job2.seq)
    with QueryClient(off.grpc_address) as q:
        assert q.list_alerts() == []
        with pytest.raises(CollectorError, match="no-alerts"):
            q.set_thresholds("quiet", k=3)
    assert off.alert_engine.runs == {}


def test_alerts_cli_table_follow_and_errors(collector, ingest, sim_job):
    job = sim_job(run="cli-run", layer_sizes=(30, 30))
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(1, angle=1.2, loss=False))
    s.wait_ack(job.seq)
    r = CliRunner().invoke(cli, ["alerts", "--collector", collector.grpc_address])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:6] == ["TIME", "RUN", "LAYER", "STEP", "KIND", "SEVERITY"]
    # Both layers in one incident: one line, the largest layer and how many more.
    assert len(lines) == 2 and all("cli-run" in x and "abrupt_rotation" in x and "68.8" in x for x in lines[1:])
    assert "+1" in lines[1]
    r = CliRunner().invoke(cli, ["alerts", "--run", "nope", "--collector", collector.grpc_address])
    assert r.exit_code == 1 and "unknown run 'nope'" in r.output
    r = CliRunner().invoke(cli, ["alerts", "--since", "yesterday", "--collector", collector.grpc_address])
    assert r.exit_code == 2 and "15m" in r.output
    r = CliRunner().invoke(cli, ["alerts", "--collector", "127.0.0.1:1"])
    assert r.exit_code == 1 and "cannot reach" in r.output
    # --follow --json prints JSON lines as alerts arrive (real subprocess, real stream).
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from layrot.cli.main import main; main()",
            "alerts",
            "--follow",
            "--json",
            "--limit",
            "0",
            "--collector",
            collector.grpc_address,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        s.send(job.batch(30, angle=0.01, loss=False))  # past the refractory window of step 1's incident
        s.wait_ack(job.seq)
        time.sleep(2.0)  # interpreter start + subscription
        s.send(job.batch(1, angle=1.1, loss=False))
        line = proc.stdout.readline()
        rec = json.loads(line)
        assert (rec["run"], rec["step"], rec["kind"]) == ("cli-run", 32, "abrupt_rotation")
        assert rec["angle"] == pytest.approx(1.1, rel=1e-9) and rec["baseline"] == pytest.approx(0.01, rel=1e-6)
        assert rec["severity"] == "critical" and rec["loss_before"] is None  # extreme: critical without a loss
    finally:
        proc.terminate()
        proc.wait(10)


def test_query_calls_on_unknown_input(collector):
    stub = pb_grpc.QueryStub(grpc.insecure_channel(collector.grpc_address))
    assert list(stub.ListAlerts(pb.ListAlertsRequest(run="nothing")).alerts) == []
    with pytest.raises(grpc.RpcError) as e:
        stub.SetThresholds(pb.SetThresholdsRequest(run="x", thresholds=pb.Thresholds(abs_angle=math.nan)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
