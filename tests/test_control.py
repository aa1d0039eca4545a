"""Control plane end to end: real Layca training jobs, real collector, real gRPC.

Each job trains a small PyTorch model with ``layrot.watch(..., control=True)``
and a ``layrot.Layca`` optimizer and saves its layer weights after every step.
The tests send commands through the Query service (and the CLI), then check
the step angles computed in float64 from the saved weights against arctan of
the rates the paper's formulas give, written out independently here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from metrics_text import scrape
from reference import angle, eq1
from torch import nn

import layrot
from layrot.cli.main import cli
from layrot.client.query import CollectorError, QueryClient
from layrot.proto import layrot_pb2 as pb

IN, WIDTH, CLASSES, BATCH = 12, 24, 4, 32
RTOL = 1e-4  # Layca's angle is exact to float32 rounding of the weights (~1e-6)


# ---------------------------------------------------------------- independent formulas
# ---------------------------------------------------------------- a real controllable job
class Job:
    """A real Layca(SGD momentum 0.9) training job with watch(control=True); weights saved every step.

    ``angles[t]`` (t = 1, 2, ...) is the float64 angle each layer rotated in step t,
    ``rates[t]`` the rates Layca reports for step t, ``versions[t]`` its command version.
    """

    def __init__(
        self,
        address: str,
        run: str,
        *,
        seed: int = 0,
        rho: float = 0.05,
        alpha: float = 0.5,
        rho_max: float = 0.5,
        token: str | None = None,
        control: bool = True,
        depth: int = 5,
        model: nn.Module | None = None,
    ) -> None:
        torch.manual_seed(seed)
        if model is None:
            mods: list[nn.Module] = []
            d = IN
            for _ in range(depth - 1):
                mods += [nn.Linear(d, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU()]
                d = WIDTH
            mods.append(nn.Linear(d, CLASSES))
            model = nn.Sequential(*mods)
        self.model = model
        self.opt = layrot.Layca(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=rho, alpha=alpha, rho_max=rho_max
        )
        self.handle = layrot.watch(
            model,
            self.opt,
            run=run,
            collector=address,
            token=token,
            control=control,
            reporter_options={"backoff_initial": 0.05, "backoff_max": 0.3, "flush_interval": 0.01},
        )
        self.layers = [p for p in model.parameters() if p.ndim >= 2]
        g = torch.Generator().manual_seed(seed + 1)
        self.teacher = torch.randn(IN, CLASSES, generator=g)
        self.gen = g
        self.t = 0
        self.angles: dict[int, np.ndarray] = {}
        self.rates: dict[int, np.ndarray] = {}
        self.versions: dict[int, int] = {}
        self.prev = self._weights()

    def _weights(self) -> list[np.ndarray]:
        return [p.detach().double().numpy().copy() for p in self.layers]

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            x = torch.randn(BATCH, IN, generator=self.gen)
            y = (x @ self.teacher).argmax(1)
            self.opt.zero_grad()
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            self.handle.observe_loss(loss)
            self.opt.step()
            self.t += 1
            now = self._weights()
            self.angles[self.t] = np.array([angle(a, b) for a, b in zip(self.prev, now)])
            self.rates[self.t] = self.opt.current_rates().copy()
            self.versions[self.t] = self.opt.command_version
            self.prev = now

    def warmup(self, n: int) -> None:
        """``n`` steps, then wait until the collector stored them (the run exists from then on)."""
        self.step(n)
        assert self.handle.flush(5.0), "the collector did not acknowledge the first steps"

    def step_until(self, cond: Callable[[], bool], max_steps: int = 400, pause: float = 0.002) -> int:
        """Train until ``cond()`` holds (checked after every step); returns the steps taken."""
        for i in range(max_steps):
            if cond():
                return i
            self.step()
            time.sleep(pause)
        raise AssertionError(f"condition not met within {max_steps} steps")

    @property
    def names(self) -> list[str]:
        return self.handle.layer_names

    def check_angles(self, steps: range, rates: np.ndarray | Callable[[int], np.ndarray]) -> float:
        """Every layer's step angle equals arctan(rate) in ``steps``; returns the worst relative error."""
        worst = 0.0
        for t in steps:
            want = np.arctan(rates(t) if callable(rates) else rates)
            got = self.angles[t]
            err = np.abs(got - want) / want
            worst = max(worst, float(err.max()))
            assert np.all(err <= RTOL), f"step {t}: angles {got} vs arctan(rho) {want}"
        return worst

    def close(self) -> None:
        self.handle.close(timeout=2.0)


@pytest.fixture
def jobs():
    made: list[Job] = []

    def make(*args: Any, **kwargs: Any) -> Job:
        j = Job(*args, **kwargs)
        made.append(j)
        return j

    yield make
    for j in made:
        j.close()


def per_layer(samples: dict, name: str, run: str, names: list[str]) -> np.ndarray:
    got = {lab["layer"]: v for lab, v in samples.get(name, []) if lab.get("run") == run}
    return np.array([got.get(n, np.nan) for n in names])


def command(alpha: float = 0.0, rho0: float = 0.02, **kw: Any) -> pb.RateCommand:
    kw.setdefault("issued_by", "tester@lab")
    return pb.RateCommand(alpha=alpha, schedule=pb.RhoSchedule(rho0=rho0, **kw.pop("schedule", {})), **kw)


def answered(q: QueryClient, run: str, version: int) -> Callable[[], bool]:
    def check() -> bool:
        st = q.get_control(run)
        return st["applied_version"] >= version or (st["requested_version"] == version and bool(st["rejected_reason"]))

    return check


# ---------------------------------------------------------------- set: applied from the next step boundary
def test_set_applies_at_step_boundary_angles_status_audit_metrics(collector, jobs):
    job = jobs(collector.grpc_address, "set-run", rho=0.05, alpha=0.5)
    job.warmup(5)
    L = len(job.names)
    old = 0.05 * eq1(0.5, L)
    with QueryClient(collector.grpc_address) as q:
        st = q.get_control("set-run")
        assert st["requested"] is None and st["applied_version"] == 0 and st["audit"] == []
        # Step decays at steps 30 and 45, a per-layer boost of the second layer by name.
        cmd = command(
            alpha=-0.3,
            rho0=0.03,
            schedule=dict(kind="step", milestones=[30, 45], factor=0.5),
            layer_multipliers={job.names[1]: 2.0},
            reason="test profile",
        )
        st = q.set_control("set-run", cmd)
        assert st["requested_version"] == 1 and st["requested"]["issued_by"] == "tester@lab"
        job.step_until(answered(q, "set-run", 1))
        job.step(55 - job.t)
        st = q.get_control("set-run")
    first = st["applied_step"]
    assert st["applied_version"] == 1 and not st["rejected_reason"]
    assert 6 <= first <= job.t and job.versions[first] == 1 and job.versions[first - 1] == 0

    boost = np.ones(L)
    boost[1] = 2.0

    def new(t: int) -> np.ndarray:
        return 0.03 * (0.5 ** ((t > 30) + (t > 45))) * eq1(-0.3, L) * boost

    job.check_angles(range(1, first), old)  # before: the job's own rule
    job.check_angles(range(first, job.t + 1), new)  # from the ack's step on: the command, decays included
    assert job.t > 45

    # Status: requested vs applied per layer at the newest reported step, and the audit trail.
    job.handle.flush()
    with QueryClient(collector.grpc_address) as q:
        st = q.get_control("set-run")
    assert st["layer_names"] == job.names
    np.testing.assert_allclose(st["requested_rho"], new(job.t), rtol=1e-12)
    np.testing.assert_allclose(st["applied_rho"], new(job.t), rtol=1e-12)
    events = [(a["event"], a["version"]) for a in st["audit"]]
    assert events == [("requested", 1), ("sent", 1), ("applied", 1)]
    req, sent, applied = st["audit"]
    assert req["who"].startswith("tester@lab from ") and "alpha=-0.3" in req["what"] and req["reason"] == "test profile"
    assert "rank 0" in sent["who"] and applied["step"] == first
    assert req["time"] <= sent["time"] <= applied["time"]

    # Prometheus: requested and applied rho per run and layer.
    m = scrape(collector)
    np.testing.assert_allclose(per_layer(m, "layrot_layer_rho_requested", "set-run", job.names), new(job.t), rtol=1e-12)
    np.testing.assert_allclose(per_layer(m, "layrot_layer_rho_applied", "set-run", job.names), new(job.t), rtol=1e-12)
    assert ({"run": "set-run"}, 1.0) in m["layrot_run_command_version_requested"]
    assert ({"run": "set-run"}, 1.0) in m["layrot_run_command_version_applied"]


def test_off_returns_the_job_to_its_own_rule(collector, jobs):
    job = jobs(collector.grpc_address, "off-run", rho=0.04, alpha=0.0)
    job.warmup(3)
    with QueryClient(collector.grpc_address) as q:
        q.set_control("off-run", command(rho0=0.01))
        job.step_until(answered(q, "off-run", 1))
        st = q.set_control("off-run", pb.RateCommand(mode="off", reason="done"))
        assert st["requested_version"] == 2 and st["requested"]["mode"] == "off"
        job.step_until(answered(q, "off-run", 2))
        job.step(3)
        st = q.get_control("off-run")
    assert st["applied_version"] == 2 and st["requested_rho"] == []  # the collector cannot know the job's own rule
    first_off = st["applied_step"]
    L = len(job.names)
    job.check_angles(range(first_off, job.t + 1), np.full(L, 0.04))
    job.check_angles(range(first_off - 1, first_off), np.full(L, 0.01))


# ---------------------------------------------------------------- safety
# What no job could accept is refused by the collector itself (INVALID_ARGUMENT, nothing stored or
# sent); the job checks those too, and what depends on the job (rho_max, layer names) only it can.
REFUSED_BY_COLLECTOR = {
    "nan_alpha": (dict(alpha=float("nan")), "alpha is not finite"),
    "alpha_out_of_range": (dict(alpha=1.5), "outside [-1, 1]"),
    "negative_rho0": (dict(rho0=-0.01), "must be >= 0"),
    "inf_rho0": (dict(rho0=float("inf")), "not finite"),
    "negative_multiplier": (dict(multipliers=[1.0, -1.0, 1.0, 1.0, 1.0]), "multipliers must be >= 0"),
    "nan_multiplier": (dict(layer_multipliers={"conv1.weight": float("nan")}), "not finite"),
    "huge_apply_at_step": (dict(apply_at_step=2**64 - 1), "apply_at_step"),
}


def test_commands_no_job_could_accept_are_refused_by_the_collector(collector, jobs):
    job = jobs(collector.grpc_address, "refused-cmds", rho=0.05, alpha=0.5, rho_max=0.5)
    job.warmup(2)
    with QueryClient(collector.grpc_address) as q:
        for kind, (fields, reason) in REFUSED_BY_COLLECTOR.items():
            fields = dict(fields)
            rho0 = fields.pop("rho0", 0.02)
            with pytest.raises(CollectorError) as e:
                q.set_control("refused-cmds", command(rho0=rho0, **fields))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and reason in str(e.value), kind
        st = q.get_control("refused-cmds")
    assert st["requested"] is None and st["audit"] == []
    assert job.handle.stats.commands_received == 0
    m = scrape(collector)
    got = [v for lab, v in m["layrot_messages_rejected_total"] if lab.get("reason") == "bad_command"]
    assert got == [len(REFUSED_BY_COLLECTOR)]


INVALID = {
    "rho0_above_rho_max": (dict(rho0=0.9), "exceeds the job's rho_max"),
    "unknown_layer": (dict(layer_multipliers={"conv99.weight": 1.0}), "unknown layer name 'conv99.weight'"),
    "wrong_multiplier_count": (dict(multipliers=[1.0, 2.0]), "2 multipliers for 5 layers"),
    "multiplier_too_high": (dict(multipliers=[1.0, 30.0, 1.0, 1.0, 1.0]), "above the job's rho_max"),
    "bad_table": (dict(table=pb.RateTable(start_step=1, num_layers=5, rates=b"\x00" * 12)), "not a multiple"),
    "table_above_rho_max": (
        dict(table=pb.RateTable(start_step=1, num_layers=5, rates=np.full(5, 0.8).tobytes())),
        "rate table values",
    ),
    "unknown_mode": (dict(mode="turbo"), "unknown mode 'turbo'"),
    "bad_schedule": (dict(schedule=dict(kind="cosine")), "cosine schedule needs total_steps"),
}


def test_each_invalid_command_is_refused_with_its_reason_and_rates_stay(collector, jobs):
    job = jobs(collector.grpc_address, "bad-cmds", rho=0.05, alpha=0.5, rho_max=0.5)
    job.warmup(3)
    L = len(job.names)
    before = 0.05 * eq1(0.5, L)
    runner = CliRunner()
    with QueryClient(collector.grpc_address) as q:
        for version, (kind, (fields, reason)) in enumerate(INVALID.items(), start=1):
            fields = dict(fields)
            rho0 = fields.pop("rho0", 0.02)
            cmd = command(rho0=rho0, **fields)
            st = q.set_control("bad-cmds", cmd)
            assert st["requested_version"] == version, kind
            start = job.t
            job.step_until(answered(q, "bad-cmds", version))
            job.step(2)
            st = q.get_control("bad-cmds")
            assert st["applied_version"] == 0, kind
            assert reason in st["rejected_reason"], (kind, st["rejected_reason"])
            job.check_angles(range(start + 1, job.t + 1), before)  # the rates never changed
            assert all(job.versions[t] == 0 for t in range(1, job.t + 1))
            # ... and the reason is what an operator sees.
            out = runner.invoke(cli, ["control", "status", "bad-cmds", "--collector", collector.grpc_address])
            assert out.exit_code == 0, out.output
            assert "REJECTED by the job" in out.output and reason in out.output, (kind, out.output)
        audit = q.get_control("bad-cmds")["audit"]
    rejected = [a for a in audit if a["event"] == "rejected"]
    assert [a["version"] for a in rejected] == list(range(1, len(INVALID) + 1))
    assert all(a["reason"] for a in rejected)
    np.testing.assert_array_equal(job.opt.current_rates(), before)


def test_token_required_for_control_rates_unchanged(collector_factory, jobs):
    c = collector_factory(token="s3cret")
    job = jobs(c.grpc_address, "secure", token="s3cret", rho=0.05, alpha=0.0)
    job.warmup(3)
    for token in (None, "wrong"):
        with QueryClient(c.grpc_address, token=token) as q, pytest.raises(CollectorError) as e:
            q.set_control("secure", command(rho0=0.01))
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    out = CliRunner().invoke(
        cli, ["control", "set", "secure", "--rho0", "0.01", "--collector", c.grpc_address], env={"LAYROT_TOKEN": ""}
    )
    assert out.exit_code == 1 and "refused the token" in out.output
    job.step(5)
    with QueryClient(c.grpc_address) as q:  # reads stay open
        st = q.get_control("secure")
    assert st["requested"] is None and st["audit"] == []
    assert job.handle.stats.commands_received == 0
    job.check_angles(range(1, job.t + 1), np.full(len(job.names), 0.05))
    # With the token it goes through.
    with QueryClient(c.grpc_address, token="s3cret") as q:
        q.set_control("secure", command(rho0=0.01))
        job.step_until(answered(q, "secure", 1))
        assert q.get_control("secure")["applied_version"] == 1


def test_control_needs_the_job_to_opt_in(collector, jobs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    with pytest.raises(ValueError, match="Layca"):
        layrot.watch(
            model, torch.optim.SGD(model.parameters(), lr=0.1), run="x", collector=collector.grpc_address, control=True
        )
    job = jobs(collector.grpc_address, "no-opt-in", control=False)
    job.warmup(2)
    with QueryClient(collector.grpc_address) as q:
        with pytest.raises(CollectorError) as e:
            q.set_control("no-opt-in", command())
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "control=True" in str(e.value)
        with pytest.raises(CollectorError) as e:
            q.set_control("never-seen", command())
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert job.handle.stats.commands_received == 0


# ---------------------------------------------------------------- reconnects
def test_collector_restart_resends_current_command_without_double_apply(collector_factory, tmp_path, jobs):
    db = tmp_path / "restart.db"
    c1 = collector_factory(db)
    port = c1.grpc_port
    job = jobs(c1.grpc_address, "restart", rho=0.05, alpha=0.5)
    job.warmup(3)
    L = len(job.names)
    new = 0.02 * eq1(-0.5, L)
    with QueryClient(c1.grpc_address) as q:
        q.set_control("restart", command(alpha=-0.5, rho0=0.02))
        job.step_until(answered(q, "restart", 1))
        first = q.get_control("restart")["applied_step"]
    job.step(3)
    job.handle.flush()
    c1.stop()
    # The collector is gone: the job trains on at its last applied rates.
    job.step(20)
    assert job.handle.stats.commands_received == 1
    c2 = collector_factory(db, grpc_port=port)
    with QueryClient(c2.grpc_address) as q:
        st = q.get_control("restart")  # restored from the store before the job is back
        assert st["requested_version"] == 1 and st["applied_version"] == 1 and st["applied_step"] == first
        job.step_until(lambda: job.handle.stats.commands_received >= 2, pause=0.01)
        job.step(3)
        job.handle.flush()
        st = q.get_control("restart")
    # Re-sent on reconnect, answered with the original application (same step), applied once.
    sent = [a for a in st["audit"] if a["event"] == "sent"]
    assert len(sent) == 2 and "re-sent" in sent[1]["reason"]
    applied = [a for a in st["audit"] if a["event"] == "applied"]
    assert [a["step"] for a in applied] == [first, first]
    assert st["applied_version"] == 1 and st["applied_step"] == first
    job.check_angles(range(first, job.t + 1), new)
    # Versions continue after the restart.
    with QueryClient(c2.grpc_address) as q:
        st = q.set_control("restart", command(rho0=0.01))
        assert st["requested_version"] == 2
        job.step_until(answered(q, "restart", 2))
        job.step(2)
        st = q.get_control("restart")
    job.check_angles(range(st["applied_step"], job.t + 1), np.full(L, 0.01))


def test_job_started_after_the_command_gets_it_on_hello(collector, jobs, monkeypatch):
    """A restarted job (same run) receives the current command with its Hello."""
    # The run belongs to its key: the restarted process must carry it (here from the launcher's environment).
    monkeypatch.setenv("LAYROT_RUN_KEY", "resume-key")
    job = jobs(collector.grpc_address, "resume", seed=3)
    job.warmup(2)
    with QueryClient(collector.grpc_address) as q:
        q.set_control("resume", command(alpha=0.2, rho0=0.015))
        job.step_until(answered(q, "resume", 1))
    job.close()
    job2 = jobs(collector.grpc_address, "resume", seed=3)
    job2.step(1)  # the session opens at the first step
    job2.step_until(lambda: job2.opt.command_version == 1)
    first = next(t for t in sorted(job2.versions) if job2.versions[t] == 1)
    job2.step(2)
    job2.check_angles(range(first, job2.t + 1), 0.015 * eq1(0.2, len(job2.names)))


# ---------------------------------------------------------------- CLI
def test_cli_set_status_off(collector, jobs):
    import threading

    job = jobs(collector.grpc_address, "cli-run", rho=0.05, alpha=0.0)
    job.warmup(2)
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            job.step()
            time.sleep(0.003)

    th = threading.Thread(target=train)
    th.start()
    runner = CliRunner()
    addr = ["--collector", collector.grpc_address]
    try:
        out = runner.invoke(
            cli,
            [
                "control",
                "set",
                "cli-run",
                "--alpha",
                "0.5",
                "--rho0",
                "0.02",
                "--milestones",
                "0.5",
                "--total-steps",
                "100000",
                "--layer",
                f"{job.names[0]}=2",
                "--reason",
                "from the CLI",
                *addr,
            ],
        )
        assert out.exit_code == 0, out.output
        assert "version 1 requested" in out.output and "applied by the job from step" in out.output
        out = runner.invoke(cli, ["control", "status", "cli-run", "--json", *addr])
        assert out.exit_code == 0, out.output
        import json

        st = json.loads(out.output)
        assert st["requested"]["schedule"]["milestones"] == [0.5] and st["requested"]["reason"] == "from the CLI"
        assert st["requested"]["layer_multipliers"] == {job.names[0]: 2.0}
        assert st["applied_version"] == 1
        out = runner.invoke(cli, ["control", "status", "cli-run", *addr])
        assert "applied version 1 from step" in out.output and "RHO REQUESTED" in out.output
        out = runner.invoke(cli, ["control", "set", "cli-run", "--schedule", "cosine", "--rho0", "0.02", *addr])
        assert out.exit_code == 2 and "total_steps" in out.output  # caught before it is sent
        out = runner.invoke(cli, ["control", "off", "cli-run", "--reason", "bye", *addr])
        assert out.exit_code == 0 and "version 2 requested" in out.output, out.output
        out = runner.invoke(cli, ["control", "set", "cli-run", "--layer", "nope.weight=2", *addr])
        assert out.exit_code == 1 and "rejected version 3" in out.output and "unknown layer name" in out.output
    finally:
        stop.set()
        th.join()
    L = len(job.names)
    m = eq1(0.5, L)
    m[0] *= 2
    applied = {v: min(t for t in job.versions if job.versions[t] == v) for v in (1, 2)}
    job.check_angles(range(applied[1], applied[2]), 0.02 * m)
    job.check_angles(range(applied[2], job.t + 1), np.full(L, 0.05))
