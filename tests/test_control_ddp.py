"""Control commands switch every rank of a multi-rank job at the same step.

A real 2-process DDP job (torch.distributed, gloo on the loopback interface,
``layrot.Layca(SGD momentum)`` on every rank, ``layrot.watch(..., control=True)``)
trains against a real collector while the test sends ``layrot-agent control
set``. The collector stamps the command with ``apply_at_step``; each rank holds
it until that step. Checked from what the ranks saved at every step (float64
copies of their layer weights): both ranks switched at the same step, their
weights stay bit-identical to the end, and the single-step angles follow the
old rates before and the new ones from that step on (arctan of the paper's
Eq. 1 rates, written out here).

The check has teeth: ``test_ddp_ranks_switching_apart_diverge`` makes rank 1
hold the same command 3 steps longer (what happened before apply_at_step, when
each rank applied a command at its own next boundary): the weights are
bit-identical up to the switch and differ from there on (measured: max abs
differences per layer of 2e-3 to 3e-2 after 30 more steps, weights of order
0.1-0.3), and the collector reports rank 1 as late.

Late arrival, holding, stamping and the reconnect re-send are checked with a
single real job or a raw session (cheaper than DDP).

Run as a script, this file is the DDP worker: ``python test_control_ddp.py worker ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

IN, WIDTH, CLASSES, BATCH = 12, 24, 4, 32
RTOL = 1e-4  # Layca's angle is exact to float32 rounding of the weights (~1e-6)
OLD_RHO, OLD_ALPHA = 0.05, 0.5
NEW_RHO, NEW_ALPHA = 0.03, -0.3
AFTER = 30  # steps every rank trains after it switched
WORKER_SECONDS = 150.0  # the ranks agree to stop after this long whatever happened


# ---------------------------------------------------------------- a real Layca job (one rank)
class Trainer:
    """An MLP trained with Layca(SGD momentum 0.9) under watch(control=True); float64 weights saved every step.

    With ``ddp`` the model is wrapped in DistributedDataParallel (the process
    group must be up); every rank draws its own batches, so only the all-reduce
    keeps the replicas equal. ``weights[t]`` are the layer weights after step t
    (``weights[0]`` the initial ones), in Layca's (forward) layer order.
    """

    def __init__(self, collector: str, run: str, *, rank: int = 0, ddp: bool = False, shift: int = 0) -> None:
        import torch
        from torch import nn

        import layrot

        self.torch, self.nn = torch, nn
        torch.manual_seed(0)  # same init on every rank (DDP would broadcast rank 0's anyway)
        model = nn.Sequential(
            nn.Linear(IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, CLASSES)
        )
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        self.model = model
        self.opt = layrot.Layca(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=OLD_RHO, alpha=OLD_ALPHA, rho_max=0.5
        )
        if shift:
            # What a rank did before apply_at_step: switch at a step of its own.
            submit = self.opt.submit_command

            def shifted(cmd: Any) -> None:
                cmd.apply_at_step += shift
                submit(cmd)

            self.opt.submit_command = shifted  # type: ignore[method-assign]
        self.handle = layrot.watch(
            model,
            self.opt,
            run=run,
            collector=collector,
            control=True,
            reporter_options={"backoff_initial": 0.05, "backoff_max": 0.3, "flush_interval": 0.01},
        )
        g = torch.Generator().manual_seed(7)
        self.teacher = torch.randn(IN, CLASSES, generator=g)
        self.gen = torch.Generator().manual_seed(100 + rank)
        self.t = 0
        self.layers = [p for p in model.parameters() if p.ndim >= 2]
        self.weights: list[list[np.ndarray]] = [self._weights()]
        self.versions: dict[int, int] = {}
        self.rates: dict[int, np.ndarray] = {}

    def _weights(self) -> list[np.ndarray]:
        return [p.detach().double().numpy().copy() for p in self.layers]

    def step(self) -> None:
        x = self.torch.randn(BATCH, IN, generator=self.gen)
        y = (x @ self.teacher).argmax(1)
        self.opt.zero_grad()
        loss = self.nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.handle.observe_loss(loss)
        self.opt.step()
        self.t += 1
        self.weights.append(self._weights())
        self.versions[self.t] = self.opt.command_version
        self.rates[self.t] = self.opt.current_rates().copy()

    def step_until(self, cond: Callable[[], bool], max_steps: int = 600, pause: float = 0.002) -> None:
        for _ in range(max_steps):
            if cond():
                return
            self.step()
            time.sleep(pause)
        raise AssertionError(f"condition not met within {max_steps} steps")

    def first_step_of(self, version: int) -> int | None:
        return next((t for t in sorted(self.versions) if self.versions[t] >= version), None)

    def angles(self, t: int) -> np.ndarray:
        """Float64 angle each layer rotated in step t, from the saved weights."""
        from reference import angle

        return np.array([angle(a, b) for a, b in zip(self.weights[t - 1], self.weights[t])])

    def close(self) -> None:
        self.handle.close(timeout=2.0)


def check_angles(angles: Callable[[int], np.ndarray], steps: range, rates: np.ndarray) -> float:
    """Every layer's step angle equals arctan(rate) in ``steps``; returns the worst relative error."""
    want = np.arctan(rates)
    worst = 0.0
    for t in steps:
        err = np.abs(angles(t) - want) / want
        worst = max(worst, float(err.max()))
        assert np.all(err <= RTOL), f"step {t}: angles {angles(t)} vs arctan(rho) {want}"
    return worst


# ---------------------------------------------------------------- the DDP worker (a process per rank)
def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--init", required=True, help="file:// rendezvous")
    ap.add_argument("--collector", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shift", type=int, default=0)
    a = ap.parse_args(argv)

    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=a.init, rank=a.rank, world_size=a.world, timeout=timedelta(seconds=180))
    job = Trainer(a.collector, a.run, rank=a.rank, ddp=True, shift=a.shift)
    deadline = time.monotonic() + WORKER_SECONDS
    flags = torch.zeros(2)
    while True:
        job.step()
        first = job.first_step_of(1)
        # Stop together (a rank leaving alone would hang the other in the all-reduce):
        # when every rank ran AFTER steps under the command, or any rank ran out of time.
        flags[0] = float(first is not None and job.t >= first + AFTER)
        flags[1] = float(time.monotonic() > deadline)
        dist.all_reduce(flags)
        if flags[0] == a.world or flags[1] > 0:
            break
        time.sleep(0.003)  # leave the 2 cores some room for the collector and the test
    job.handle.flush(10.0)
    job.close()
    names = job.opt.layer_names
    np.savez(
        Path(a.out) / f"rank{a.rank}.npz",
        **{f"w{i}": np.stack([w[i] for w in job.weights]) for i in range(len(names))},
        versions=np.array([job.versions[t] for t in range(1, job.t + 1)]),
        rates=np.stack([job.rates[t] for t in range(1, job.t + 1)]),
        names=np.array(names),
        timed_out=np.array(bool(flags[1] > 0)),
    )
    dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker_main(sys.argv[2:])
    sys.exit(0)


# ---------------------------------------------------------------- tests
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from metrics_text import scrape  # noqa: E402
from reference import eq1  # noqa: E402

from layrot.cli.main import cli  # noqa: E402
from layrot.client.query import QueryClient  # noqa: E402
from layrot.proto import layrot_pb2 as pb  # noqa: E402
from layrot.proto.commands import split_due  # noqa: E402
from layrot.server import control as ctl  # noqa: E402


def cli_json(*args: str) -> dict:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


class Ranks:
    """The two worker processes of one DDP job and what they saved."""

    def __init__(self, tmp: Path, collector: Any, run: str, shift1: int = 0) -> None:
        self.out = tmp / run
        self.out.mkdir()
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        init = f"file://{tmp / (run + '.rendezvous')}"
        self.logs = [open(self.out / f"rank{r}.log", "w") for r in range(2)]
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "worker",
                    "--rank",
                    str(r),
                    "--init",
                    init,
                    "--collector",
                    collector.grpc_address,
                    "--run",
                    run,
                    "--out",
                    str(self.out),
                    "--shift",
                    str(shift1 if r == 1 else 0),
                ],
                env=env,
                stdout=self.logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(2)
        ]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def log_tail(self) -> str:
        for f in self.logs:
            f.flush()
        return "\n".join(f"--- rank {r}:\n" + (self.out / f"rank{r}.log").read_text()[-3000:] for r in range(2))

    def wait(self, timeout: float = 240.0) -> list[dict[str, np.ndarray]]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("a DDP rank did not finish in time\n" + self.log_tail()) from None
        assert all(p.returncode == 0 for p in self.procs), self.log_tail()
        saved = [dict(np.load(self.out / f"rank{r}.npz")) for r in range(2)]
        assert not any(bool(s["timed_out"]) for s in saved), "the ranks ran out of time\n" + self.log_tail()
        return saved

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for f in self.logs:
            f.close()


@pytest.fixture
def ddp_job(tmp_path: Path):
    made: list[Ranks] = []

    def start(collector: Any, run: str, shift1: int = 0) -> Ranks:
        r = Ranks(tmp_path, collector, run, shift1)
        made.append(r)
        return r

    yield start
    for r in made:
        r.kill()


def drive(collector: Any, ranks: Ranks, run: str) -> tuple[int, dict]:
    """Wait until the job trains, send 'control set' through the CLI; returns (apply_at_step, status)."""
    addr = collector.grpc_address
    with QueryClient(addr) as q:
        deadline = time.monotonic() + 120
        while True:
            assert ranks.alive(), "a DDP rank died\n" + ranks.log_tail()
            assert time.monotonic() < deadline, "the DDP job never reported 20 steps\n" + ranks.log_tail()
            runs = {r["run"]: r for r in q.list_runs()}
            if run in runs and runs[run]["step"] >= 20:
                break
            time.sleep(0.1)
        assert runs[run]["world_size"] == 2
    st = cli_json(
        "control",
        "set",
        run,
        "--alpha",
        str(NEW_ALPHA),
        "--rho0",
        str(NEW_RHO),
        "--reason",
        "ddp test",
        "--wait",
        "0",
        "--json",
        "--collector",
        addr,
    )
    at = st["requested"]["apply_at_step"]
    return at, st


def load_angles(saved: dict[str, np.ndarray]) -> Callable[[int], np.ndarray]:
    from reference import angle

    L = len(saved["names"])

    def angles(t: int) -> np.ndarray:
        return np.array([angle(saved[f"w{i}"][t - 1], saved[f"w{i}"][t]) for i in range(L)])

    return angles


def test_ddp_ranks_switch_at_the_same_step_and_stay_identical(collector, ddp_job):
    run = "ddp-same-step"
    t0 = time.monotonic()
    ranks = ddp_job(collector, run)
    at, st = drive(collector, ranks, run)
    # Stamped ahead of what the job had reported when the command went out.
    assert at > 20 and st["requested_version"] == 1
    saved = ranks.wait()
    took = time.monotonic() - t0

    # Both ranks switched at apply_at_step: the step the first one governed by version 1.
    firsts = [int(np.argmax(s["versions"] >= 1)) + 1 for s in saved]
    assert firsts == [at, at], f"switched at {firsts}, apply_at_step {at}"
    for s in saved:
        assert np.all(s["versions"][: at - 1] == 0) and np.all(s["versions"][at - 1 :] == 1)

    # Bit-identical replicas at every step, to the end (differing switch steps break this: see below).
    T = len(saved[0]["versions"])
    assert T == len(saved[1]["versions"]) >= at + AFTER
    L = len(saved[0]["names"])
    for i in range(L):
        assert np.array_equal(saved[0][f"w{i}"], saved[1][f"w{i}"]), f"layer {i}: the replicas differ"
        assert saved[0][f"w{i}"].shape[0] == T + 1

    # Angles from the saved weights: the job's own rates before, the command's from `at` on, on both ranks.
    old = OLD_RHO * eq1(OLD_ALPHA, L)
    new = NEW_RHO * eq1(NEW_ALPHA, L)
    for s in saved:
        angles = load_angles(s)
        check_angles(angles, range(1, at), old)
        check_angles(angles, range(at, T + 1), new)

    # The collector's view: both ranks acknowledged version 1 at that step, in time.
    status = cli_json("control", "status", run, "--json", "--collector", collector.grpc_address)
    assert [
        (r["rank"], r["applied_version"], r["applied_step"], r["wanted_step"], r["late"]) for r in status["ranks"]
    ] == [(0, 1, at, at, False), (1, 1, at, at, False)]
    applied = [a for a in status["audit"] if a["event"] == "applied"]
    assert len(applied) == 2 and all(a["step"] == at and a["reason"] == "" for a in applied)
    assert f"apply_at_step={at}" in status["audit"][0]["what"]
    assert ({"run": run}, 0.0) in scrape(collector)["layrot_control_late_total"]
    print(f"DDP same-step case: {T} steps, apply_at_step {at}, {took:.1f} s")


def test_ddp_ranks_switching_apart_diverge(collector, ddp_job):
    """Rank 1 holds the command 3 steps past apply_at_step: the replicas part from the switch on."""
    run = "ddp-apart"
    ranks = ddp_job(collector, run, shift1=3)
    at, _ = drive(collector, ranks, run)
    saved = ranks.wait()
    firsts = [int(np.argmax(s["versions"] >= 1)) + 1 for s in saved]
    assert firsts == [at, at + 3]
    L = len(saved[0]["names"])
    diff = []
    for i in range(L):
        a, b = saved[0][f"w{i}"], saved[1][f"w{i}"]
        assert np.array_equal(a[:at], b[:at])  # identical through step at - 1
        assert not np.array_equal(a[at], b[at])  # different rates at step `at`
        diff.append(float(np.abs(a[-1] - b[-1]).max()))
    assert min(diff) > 1e-6, diff
    status = cli_json("control", "status", run, "--json", "--collector", collector.grpc_address)
    got = {r["rank"]: r for r in status["ranks"]}
    assert (got[0]["applied_step"], got[0]["late"]) == (at, False)
    assert (got[1]["applied_step"], got[1]["wanted_step"], got[1]["late"]) == (at + 3, at, True)
    assert ({"run": run}, 1.0) in scrape(collector)["layrot_control_late_total"]
    print(f"DDP apart case: final max abs weight difference per layer {diff}")


# ---------------------------------------------------------------- one real job: holding and late arrival
def control_cmd(alpha: float, rho0: float, apply_at_step: int = 0) -> pb.RateCommand:
    return pb.RateCommand(
        alpha=alpha, schedule=pb.RhoSchedule(rho0=rho0), apply_at_step=apply_at_step, issued_by="tester@lab"
    )


def test_single_rank_command_held_until_its_step(collector):
    run = "held-run"
    job = Trainer(collector.grpc_address, run)
    try:
        for _ in range(10):
            job.step()
        assert job.handle.flush(5.0)
        L = len(job.opt.layer_names)
        with QueryClient(collector.grpc_address) as q:
            # A single-rank run keeps apply_at_step 0: the next boundary, as before.
            st = q.set_control(run, control_cmd(0.2, 0.02))
            assert st["requested"]["apply_at_step"] == 0
            job.step_until(lambda: q.get_control(run)["applied_version"] >= 1)
            first1 = job.first_step_of(1)
            # A step asked for explicitly is kept, and the job holds the command until then.
            at = job.t + 25
            st = q.set_control(run, control_cmd(-0.5, 0.04, apply_at_step=at))
            assert st["requested"]["apply_at_step"] == at
            job.step_until(lambda: job.t >= at + 5)
            assert job.handle.flush(5.0)
            st = q.get_control(run)
    finally:
        job.close()
    assert first1 is not None and 10 < first1 < at
    assert job.first_step_of(2) == at
    check_angles(job.angles, range(1, first1), OLD_RHO * eq1(OLD_ALPHA, L))
    check_angles(job.angles, range(first1, at), 0.02 * eq1(0.2, L))
    check_angles(job.angles, range(at, job.t + 1), 0.04 * eq1(-0.5, L))
    assert [(r["applied_version"], r["applied_step"], r["wanted_step"], r["late"]) for r in st["ranks"]] == [
        (2, at, at, False)
    ]


def test_late_command_applies_at_the_next_boundary_and_shows_as_late(collector):
    run = "late-run"
    job = Trainer(collector.grpc_address, run)
    try:
        for _ in range(30):
            job.step()
        assert job.handle.flush(5.0)
        L = len(job.opt.layer_names)
        with QueryClient(collector.grpc_address) as q:
            q.set_control(run, control_cmd(NEW_ALPHA, NEW_RHO, apply_at_step=5))  # step 5 is long past
            sent_after = job.t
            job.step_until(lambda: q.get_control(run)["applied_version"] >= 1)
            for _ in range(10):
                job.step()
            assert job.handle.flush(5.0)
    finally:
        job.close()
    first = job.first_step_of(1)
    # The job follows the operator: it applied the command at the boundary after it arrived.
    assert first is not None and first > sent_after
    check_angles(job.angles, range(1, first), OLD_RHO * eq1(OLD_ALPHA, L))
    check_angles(job.angles, range(first, job.t + 1), NEW_RHO * eq1(NEW_ALPHA, L))

    status = cli_json("control", "status", run, "--json", "--collector", collector.grpc_address)
    assert [
        (r["rank"], r["applied_version"], r["applied_step"], r["wanted_step"], r["late"]) for r in status["ranks"]
    ] == [(0, 1, first, 5, True)]
    assert status["applied_step"] == first
    applied = [a for a in status["audit"] if a["event"] == "applied"]
    assert [(a["step"], a["reason"]) for a in applied] == [(first, "late (wanted step 5)")]
    assert ({"run": run}, 1.0) in scrape(collector)["layrot_control_late_total"]
    text = CliRunner().invoke(cli, ["control", "status", run, "--collector", collector.grpc_address])
    assert text.exit_code == 0 and f"version 1 applied late at step {first} (wanted 5)" in text.output


# ---------------------------------------------------------------- the collector: stamping, re-send, late acks
def control_hello(job: Any, **kw: Any) -> pb.Hello:
    return job.hello(capabilities=pb.Capabilities(layca=True, control=True, loss=True), **kw)


def next_command(sess: Any, timeout: float = 5.0) -> pb.RateCommand:
    deadline = time.monotonic() + timeout
    while True:
        msg = sess.recv(max(0.01, deadline - time.monotonic()))
        if msg.WhichOneof("kind") == "rate_command":
            return msg.rate_command


def test_multi_rank_stamp_resend_and_late_acks(collector, ingest, sim_job):
    run = "stamp-run"
    r0 = sim_job(run=run, rank=0, world_size=2, layca=True, seed=1)
    r1 = sim_job(run=run, rank=1, world_size=2, layca=True, seed=2)
    s0 = ingest(collector).send(control_hello(r0))
    s1 = ingest(collector).send(control_hello(r1))
    # SimJob stamps step s at t0 + s ms: 1000 steps/s. Rank 0 is ahead (40 steps), rank 1 at 30.
    for _ in range(40):
        s0.send(r0.batch())
    for _ in range(30):
        s1.send(r1.batch())
    s0.wait_ack(40)
    s1.wait_ack(30)
    with QueryClient(collector.grpc_address) as q:
        st = q.set_control(run, control_cmd(0.0, 0.02))
    cmd = st["requested"]
    # The lead, written out: MIN_LEAD_STEPS + every + ceil(rate * (report age + DELIVERY_SECONDS)).
    age = cmd["issued_at"] - (r0.t0 + 40 * 1e-3)
    want = (
        40
        + ctl.MIN_LEAD_STEPS
        + 1
        + math.ceil(1000.0 * (min(max(age, 0.0), ctl.MAX_REPORT_AGE) + ctl.DELIVERY_SECONDS))
    )
    assert abs(cmd["apply_at_step"] - want) <= 1, (cmd["apply_at_step"], want)
    at = cmd["apply_at_step"]
    # Both ranks get it with that step; a rank that reconnects gets the same command again.
    assert next_command(s0).apply_at_step == at and next_command(s1).apply_at_step == at
    s1.close()
    s1b = ingest(collector).send(control_hello(r1, session_id="again"))
    again = next_command(s1b)
    assert (again.version, again.apply_at_step) == (1, at)

    # Acks: rank 0 in time, rank 1 late (twice: a re-sent command is answered again; counted once).
    s0.send(pb.ControlAck(version=1, applied=True, step=at))
    s1b.send(pb.ControlAck(version=1, applied=True, step=at + 2))
    s1b.send(pb.ControlAck(version=1, applied=True, step=at + 2))
    with QueryClient(collector.grpc_address) as q:
        deadline = time.monotonic() + 5
        while sum(a["event"] == "applied" for a in q.get_control(run)["audit"]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        st = q.get_control(run)
    got = {r["rank"]: (r["applied_step"], r["wanted_step"], r["late"], r["step"], r["connected"]) for r in st["ranks"]}
    assert got == {0: (at, at, False, 40, True), 1: (at + 2, at, True, 30, True)}
    assert ({"run": run}, 1.0) in scrape(collector)["layrot_control_late_total"]

    # The CLI's per-rank lines.
    text = CliRunner().invoke(cli, ["control", "status", run, "--collector", collector.grpc_address]).output
    assert f"rank 1 (step 30): version 1 applied late at step {at + 2} (wanted {at})" in text
    assert f"rank 0 (step 40): version 1 applied at step {at}" in text

    # A job whose layrot does not hold commands applies at once: recorded as early, not counted as late.
    with QueryClient(collector.grpc_address) as q:
        at2 = q.set_control(run, control_cmd(0.0, 0.01))["requested"]["apply_at_step"]
        assert at2 >= at
        s0.send(pb.ControlAck(version=2, applied=True, step=41))
        deadline = time.monotonic() + 5
        while not any(a["event"] == "applied" and a["version"] == 2 for a in q.get_control(run)["audit"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        st = q.get_control(run)
    early = [a for a in st["audit"] if a["event"] == "applied" and a["version"] == 2]
    assert early[0]["reason"].startswith(f"early (wanted step {at2})")
    assert [(r["applied_version"], r["applied_step"], r["wanted_step"], r["late"]) for r in st["ranks"]][0] == (
        2,
        41,
        at2,
        False,
    )
    assert ({"run": run}, 1.0) in scrape(collector)["layrot_control_late_total"]


def test_collector_restart_keeps_apply_at_and_late_state(collector_factory, ingest, sim_job, tmp_path):
    db = tmp_path / "restart.db"
    c1 = collector_factory(db)
    run = "restart-run"
    r0 = sim_job(run=run, rank=0, world_size=2, layca=True)
    s0 = ingest(c1).send(control_hello(r0))
    for _ in range(5):
        s0.send(r0.batch())
    s0.wait_ack(5)
    with QueryClient(c1.grpc_address) as q:
        at = q.set_control(run, control_cmd(0.0, 0.02))["requested"]["apply_at_step"]
    assert at > 5
    next_command(s0)
    s0.send(pb.ControlAck(version=1, applied=True, step=at + 7))
    s0.goodbye(5)
    c1.stop(grace=0.5)
    c2 = collector_factory(db)
    with QueryClient(c2.grpc_address) as q:
        st = q.get_control(run)
    assert st["requested"]["apply_at_step"] == at
    assert [(r["applied_step"], r["wanted_step"], r["late"]) for r in st["ranks"]] == [(at + 7, at, True)]
    # A rank that reconnects to the new collector gets the command with its step.
    s0b = ingest(c2).send(control_hello(r0, session_id="after-restart"))
    assert next_command(s0b).apply_at_step == at


# ---------------------------------------------------------------- the shared rules, and Layca on its own
def rc(version: int, at: int = 0) -> pb.RateCommand:
    return pb.RateCommand(version=version, alpha=0.0, schedule=pb.RhoSchedule(rho0=0.01 * version), apply_at_step=at)


def versions(cmds: list) -> list[int]:
    return [c.version for c in cmds]


def test_split_due_rules():
    due, held, res = split_due([rc(5), rc(6)], 10)
    assert versions(due) == [6] and held == [] and [(r[0], r[1]) for r in res] == [(5, False)]
    due, held, res = split_due([rc(5, 20), rc(6, 30)], 10)  # both ahead: both wait, in order
    assert due == [] and versions(held) == [5, 6] and res == []
    due, held, res = split_due(held, 20)
    assert versions(due) == [5] and versions(held) == [6]
    due, held, res = split_due([rc(5, 30), rc(6, 20)], 10)  # newer and sooner: replaces the older
    assert due == [] and versions(held) == [6] and res[0][:2] == (5, False) and "version 6" in res[0][2]
    due, held, res = split_due([rc(5, 3), rc(6, 30)], 10)  # late one now, the newer one later
    assert versions(due) == [5] and versions(held) == [6] and res == []
    due, held, res = split_due([rc(6, 30), rc(5)], 10)  # arrival order does not matter
    assert versions(due) == [5] and versions(held) == [6]
    due, held, res = split_due([rc(5, 30), rc(6)], 10)  # a newer one due now replaces a held older
    assert versions(due) == [6] and held == [] and res[0][:2] == (5, False)
    due, held, res = split_due([rc(5, 12), rc(5, 12)], 12)  # a re-sent copy counts once
    assert versions(due) == [5] and res == []


def test_step_rate_and_lead():
    rows = [(s, 100.0 + 0.01 * s) for s in range(1, 41)]  # 100 steps/s
    rows += [(s, 100.0 + 0.01 * s + 30.0) for s in range(41, 61)]  # after a 30 s pause, same speed
    assert ctl.step_rate(rows) == pytest.approx(100.0)
    assert ctl.step_rate([(5, 1.0)]) is None and ctl.step_rate([]) is None
    assert ctl.command_lead(100.0, 0.2, 1) == ctl.MIN_LEAD_STEPS + 1 + math.ceil(100.0 * (0.2 + ctl.DELIVERY_SECONDS))
    # A report from the future (clock skew) counts as fresh; a very old one is capped.
    assert ctl.command_lead(10.0, -5.0, 4) == ctl.MIN_LEAD_STEPS + 4 + math.ceil(10.0 * ctl.DELIVERY_SECONDS)
    assert ctl.command_lead(10.0, 1e6, 4) == ctl.command_lead(10.0, ctl.MAX_REPORT_AGE, 4)
    assert ctl.command_lead(None, 0.0, 1) == ctl.command_lead(ctl.FALLBACK_STEP_RATE, 0.0, 1)


def test_two_laycas_switch_together_whenever_the_commands_arrive():
    """Rank A gets both commands early, rank B the second one late in its hold: same steps, same rates."""
    import torch

    import layrot

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
        return model, layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)

    results: dict[str, list] = {"a": [], "b": []}
    (ma, a), (mb, b) = make(), make()
    a.add_command_listener(lambda *r: results["a"].append(r))
    b.add_command_listener(lambda *r: results["b"].append(r))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    seen: dict[str, list] = {"a": [], "b": []}
    a.submit_command(rc(1, 8))
    a.submit_command(rc(2, 15))
    b.submit_command(rc(1, 8))
    for t in range(1, 21):
        if t == 12:
            b.submit_command(rc(2, 15))
        for key, m, o in (("a", ma, a), ("b", mb, b)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
            seen[key].append((o.command_version, o.current_rates()[0]))
    assert seen["a"] == seen["b"]
    assert [v for v, _ in seen["a"]] == [0] * 7 + [1] * 7 + [2] * 6
    assert results["a"] == results["b"] == [(1, True, "", 8), (2, True, "", 15)]
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)
