"""The ``run_lost`` alert (server/alert_lost.py): real torch jobs killed with SIGKILL or closed cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from layrot.cli.main import cli
from layrot.server.alert_lost import LostSessions
from tests.metrics_text import scrape

pytestmark = pytest.mark.timeout(120)

JOB = """
import sys, time
import torch
import layrot

addr, run, n, mode = sys.argv[1:5]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
handle = layrot.watch(model, opt, run=run, collector=addr, every=1)
x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
for _ in range(int(n)):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print("flushed", handle.flush(30.0), flush=True)
if mode == "hang":
    while True:  # the test kills us here: no close(), no Goodbye
        time.sleep(1)
handle.close()
print("closed", flush=True)
"""


def _job(addr: str, run: str, mode: str, n: int = 20) -> subprocess.Popen:
    # The spool folder comes from the environment (tests/conftest.py puts it in a temp dir);
    # LAYROT_RUN_KEY lets a second process resume the run as the same job.
    return subprocess.Popen(
        [sys.executable, "-c", JOB, addr, run, str(n), mode],
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait(pred, timeout: float = 15.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    return pred()


def _lost(c, run: str) -> list:
    return [a for a in c.alert_engine.hub.list(run) if a.kind == "run_lost"]


class SpyPusher:
    """Stands in for an Alertmanager pusher: records what the hub fires and resolves."""

    url = "spy"

    def __init__(self) -> None:
        self.fired: list = []
        self.resolved: list = []

    def fire(self, alert, hold=False):
        self.fired.append((alert.run, alert.kind, hold))

    def resolve(self, run, layer, kind):
        self.resolved.append((run, layer, kind))

    def stats(self):
        return {"posts": 0, "errors": 0, "dropped": 0, "active": 0}


def test_sigkilled_torch_job_raises_run_lost_and_its_return_resolves_it(collector_factory, monkeypatch):
    c = collector_factory(lost_grace=1.0)
    spy = SpyPusher()
    c.alert_engine.hub.pushers.append(spy)
    monkeypatch.setenv("LAYROT_RUN_KEY", "the-killed-job")
    proc = _job(c.grpc_address, "killed", "hang")
    try:
        assert proc.stdout.readline().split() == ["flushed", "True"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    t_kill = time.monotonic()
    alerts = _wait(lambda: _lost(c, "killed"))
    assert len(alerts) == 1, alerts
    waited = time.monotonic() - t_kill
    assert alerts[0].severity == "warning" and alerts[0].step == 20
    assert "rank 0" in alerts[0].message and "without Goodbye" in alerts[0].message
    assert waited >= 0.9  # not before the grace period
    assert spy.fired == [("killed", "run_lost", True)]  # held in Alertmanager until the job is back
    # Listed by the CLI and counted in /metrics.
    r = CliRunner().invoke(cli, ["alerts", "--run", "killed", "--json", "--collector", c.grpc_address])
    assert r.exit_code == 0, r.output
    assert [a["kind"] for a in json.loads(r.output)["alerts"]] == ["run_lost"]
    m = scrape(c)
    counts = {lab["kind"]: v for lab, v in m["layrot_alerts_total"] if lab["run"] == "killed"}
    assert counts.get("run_lost") == 1
    assert [v for _, v in m["layrot_sessions_lost_total"]] == [1]
    # Still lost 2 s later: one alert per episode, not one per tick.
    time.sleep(2.0)
    assert len(_lost(c, "killed")) == 1
    # The job comes back (same run, same key, rank 0) and closes cleanly: resolved, nothing new.
    back = _job(c.grpc_address, "killed", "close", n=5)
    out, _ = back.communicate(timeout=60)
    assert back.returncode == 0 and "closed" in out, out
    assert _wait(lambda: spy.resolved) == [("killed", "", "run_lost")]
    assert len(_lost(c, "killed")) == 1 and not c.alert_engine.lost.runs


def test_cleanly_closed_torch_job_raises_nothing(collector_factory):
    c = collector_factory(lost_grace=0.5)
    proc = _job(c.grpc_address, "clean", "close")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "closed" in out, out
    time.sleep(2.5)  # the grace period five times over, two timer ticks
    assert _lost(c, "clean") == []
    assert c.state.sessions_lost == 0 and not c.alert_engine.lost.runs


def test_reconnect_within_grace_and_refused_sessions_raise_nothing(collector_factory, ingest, sim_job):
    c = collector_factory(lost_grace=2.0)
    job = sim_job(run="blip")
    s = ingest(c)
    s.send(job.hello())
    s.send(job.batch(3))
    s.wait_ack(1)
    s.close()  # cancelled without Goodbye: a network blip
    assert _wait(lambda: c.state.sessions_lost == 1, 5)
    assert c.alert_engine.lost.runs  # its grace period runs
    s2 = ingest(c)
    s2.send(job.hello())  # back within the grace period
    s2.send(job.batch(2))
    s2.wait_ack(1)
    bad = ingest(c)
    bad.send(sim_job(run="x" * 300).hello())  # refused by the collector: not a lost job
    assert bad.wait_end(5)
    time.sleep(3.0)
    assert _lost(c, "blip") == [] and c.alert_engine.hub.list("x" * 300) == []
    assert not c.alert_engine.lost.runs
    s2.goodbye()


class _Hub:
    def __init__(self) -> None:
        self.published: list = []
        self.resolved: list = []

    def publish(self, alert, hold=False):
        self.published.append(alert)

    def resolve(self, run, layer, kind):
        self.resolved.append((run, layer, kind))


def test_one_alert_per_run_resolved_when_every_lost_rank_is_back():
    hub, now = _Hub(), [100.0]
    lost = LostSessions(hub, clock=lambda: 1e9, monotonic=lambda: now[0], grace=10.0)
    lost.on_lost("ddp", 0, 40, host="a", pid=1)
    lost.on_lost("ddp", 1, 39, host="b", pid=2)
    now[0] = 109.0
    lost.check()
    assert hub.published == []
    now[0] = 111.0
    lost.check()
    lost.check()
    assert len(hub.published) == 1
    a = hub.published[0]
    assert (a.run, a.kind, a.step) == ("ddp", "run_lost", 40)
    assert "rank 0" in a.message and "rank 1" in a.message
    lost.on_hello("ddp", 0)
    assert hub.resolved == []  # rank 1 is still gone
    lost.on_hello("ddp", 1)
    assert hub.resolved == [("ddp", "", "run_lost")]
    lost.on_hello("ddp", 1)
    assert hub.resolved == [("ddp", "", "run_lost")]
    with pytest.raises(ValueError):
        LostSessions(hub, time.time, time.monotonic, grace=float("nan"))
