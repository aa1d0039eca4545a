"""Nothing lost: real torch jobs with no collector, an offline run, a resumed job, and a sync afterwards.

Every test trains a real small model with the hook line and checks the
invariant *steps in the history + steps counted as dropped = steps trained*
against a real collector's history store.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import layrot
from layrot.agent.spool import spool_dir_name
from layrot.cli.sync import sync_command
from layrot.client.query import QueryClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 32)
        self.l2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def job(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    return model, opt, torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g)


def train(model, opt, x, y, handle, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        handle.observe_loss(loss)
        opt.step()


def sync(root: Path, address: str, *paths: Path) -> tuple[int, str]:
    res = CliRunner().invoke(sync_command, [*map(str, paths or [root]), "--collector", address])
    return res.exit_code, res.output


def test_offline_run_then_sync_equals_a_run_with_a_collector(collector, _spool_in_tmp, caplog):
    addr = collector.grpc_address
    model, opt, x, y = job(1)
    live = layrot.watch(model, opt, run="live", collector=addr)
    train(model, opt, x, y, live, 60)
    assert live.flush(20.0)
    live.close()

    model, opt, x, y = job(1)  # the very same job, offline
    with caplog.at_level(logging.INFO, logger="layrot"):
        off = layrot.watch(model, opt, run="off", collector="offline")
        train(model, opt, x, y, off, 60)
        assert off.reporter is not None and off.reporter._conn is None  # no connection attempts at all
        off.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if "offline mode" in r.getMessage()]
    assert len(infos) == 1 and str(_spool_in_tmp) in infos[0]
    assert off.stats.dropped == 0 and off.stats.spool_pending_steps == 60

    code, out = sync(_spool_in_tmp, addr)
    assert code == 0, out
    assert "60 steps uploaded" in out and "0 refused" in out
    assert not (_spool_in_tmp / spool_dir_name("off", 0)).exists()  # fully uploaded: removed
    code, out = sync(_spool_in_tmp, addr)
    assert code == 0 and "nothing to upload" in out  # idempotent

    q = QueryClient(addr)
    a, b = q.history("live"), q.history("off")
    assert list(a.steps) == list(b.steps) == list(range(1, 61))
    for key in ("rotation", "step_angle", "weight_norm", "loss"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def test_collector_absent_for_the_whole_run_then_started_and_synced(collector_factory, _spool_in_tmp, tmp_path):
    port = free_port()
    model, opt, x, y = job(2)
    handle = layrot.watch(model, opt, run="absent", collector=f"127.0.0.1:{port}")
    train(model, opt, x, y, handle, 200)
    handle.close(timeout=1.0)
    assert handle.stats.acked_steps == 0 and handle.stats.sent_steps == 0
    assert handle.stats.dropped == 0 and handle.stats.spool_pending_steps == 200

    c = collector_factory(tmp_path / "later.db", grpc_port=port)
    code, out = sync(_spool_in_tmp, c.grpc_address)
    assert code == 0, out
    hist = QueryClient(c.grpc_address).history("absent")
    # steps in the history + steps counted as dropped = steps trained
    assert list(hist.steps) == list(range(1, 201)) and len(hist.steps) + handle.stats.dropped == 200


def test_close_before_the_first_connect_delivers_everything(collector_factory, tmp_path, caplog):
    port = free_port()
    model, opt, x, y = job(3)
    with caplog.at_level(logging.WARNING, logger="layrot"):
        handle = layrot.watch(model, opt, run="short", collector=f"127.0.0.1:{port}")
        train(model, opt, x, y, handle, 20)  # ends before the collector is up
        c = collector_factory(tmp_path / "short.db", grpc_port=port)
        handle.close(timeout=15.0)
    assert handle.stats.acked_steps == 20 and handle.stats.dropped == 0
    assert not [r for r in caplog.records if "not acknowledged" in r.getMessage()]
    assert list(QueryClient(c.grpc_address).history("short").steps) == list(range(1, 21))


def test_resumed_job_replays_what_the_previous_process_left(collector_factory, tmp_path):
    port = free_port()
    model, opt, x, y = job(4)
    first = layrot.watch(model, opt, run="resumed", collector=f"127.0.0.1:{port}")
    train(model, opt, x, y, first, 30)
    state = first.state_dict()
    first.close(timeout=0.5)  # no collector: the 30 steps stay in the spool
    assert first.stats.spool_pending_steps == 30 and state["run_key"] == first.run_key

    c = collector_factory(tmp_path / "resume.db", grpc_port=port)
    model2, opt2, _, _ = job(99)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    second = layrot.watch(model2, opt2, run="resumed", collector=c.grpc_address)
    second.load_state_dict(state)
    train(model2, opt2, x, y, second, 30)
    assert second.flush(20.0)
    second.close()
    assert second.run_key == first.run_key
    assert list(QueryClient(c.grpc_address).history("resumed").steps) == list(range(1, 61))
    assert second.stats.acked_steps == 60 and second.stats.dropped == 0


def test_run_owned_refusal_then_resume_with_the_state_dict(collector, caplog):
    addr = collector.grpc_address
    model, opt, x, y = job(5)
    owner = layrot.watch(model, opt, run="owned", collector=addr)
    train(model, opt, x, y, owner, 10)
    assert owner.flush(20.0)
    state = owner.state_dict()
    owner.close()

    model2, opt2, _, _ = job(6)  # another job, same run name, no state_dict
    with caplog.at_level(logging.WARNING, logger="layrot"):
        other = layrot.watch(model2, opt2, run="owned", collector=addr)
        train(model2, opt2, x, y, other, 10)
        assert not other.flush(10.0)
        other.close(timeout=1.0)
    msgs = [r.getMessage() for r in caplog.records if "belongs to another job" in r.getMessage()]
    assert len(msgs) == 1 and "state_dict" in msgs[0]
    assert other.stats.refused == "run_owned" and other.stats.dropped == 0 and other.stats.spool_pending_steps == 10
    assert list(QueryClient(addr).history("owned").steps) == list(range(1, 11))  # no foreign step

    model3, opt3, _, _ = job(7)
    model3.load_state_dict(model.state_dict())
    resumed = layrot.watch(model3, opt3, run="owned", collector=addr)
    resumed.load_state_dict(state)
    train(model3, opt3, x, y, resumed, 10)
    assert resumed.flush(20.0)
    resumed.close()
    assert list(QueryClient(addr).history("owned").steps) == list(range(1, 21))


@pytest.mark.slow
def test_collector_sigkill_and_sigstop_mid_run_lose_nothing(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    db = tmp_path / "faults.db"

    def serve() -> subprocess.Popen:
        cmd = [sys.executable, "-m", "layrot.cli.main", "serve", "--grpc-host", "127.0.0.1"]
        cmd += ["--grpc-port", str(port), "--metrics-port", "0", "--db", str(db)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return proc
            time.sleep(0.1)
        proc.kill()
        raise AssertionError("collector did not start")

    proc = serve()
    model, opt, x, y = job(8)
    handle = layrot.watch(
        model, opt, run="faults", collector=f"127.0.0.1:{port}", reporter_options={"backoff_max": 0.5}
    )
    trained = 0
    try:
        for phase in range(5):
            for _ in range(100):
                train(model, opt, x, y, handle, 1)
                trained += 1
                time.sleep(0.01)
            if phase == 1:
                proc.send_signal(signal.SIGKILL)  # no Goodbye, no final acks
                proc.wait()
            elif phase == 2:
                proc = serve()  # same db
            elif phase == 3:
                os.kill(proc.pid, signal.SIGSTOP)
                time.sleep(3.0)
                os.kill(proc.pid, signal.SIGCONT)
        assert handle.flush(60.0)
        hist = QueryClient(f"127.0.0.1:{port}").history("faults")
        handle.close()
    finally:
        proc.kill()
    assert list(hist.steps) == list(range(1, trained + 1))
    assert len(hist.steps) + handle.stats.dropped == trained and handle.stats.dropped == 0
