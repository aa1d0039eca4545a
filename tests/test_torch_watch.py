"""layrot.watch end to end: real training, real gRPC collector, float64 reference.

Every test trains a real small PyTorch model with the hook line, lets the
collector compute rotations and step angles, and checks them against float64
numpy computed from weights the test saves after every optimizer step.
"""

from __future__ import annotations

import logging
import socket
import time

import numpy as np
import pytest
import torch
from reference import angle, cosine_distance, rel_err
from torch import nn

import layrot
from layrot.client.query import QueryClient
from layrot.server.app import Collector

TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def collector(tmp_path):
    c = Collector(grpc_port=0, metrics_port=None, db_path=tmp_path / "hook.db").start()
    yield c
    c.stop()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, 64)
        self.l2 = nn.Linear(64, 64)
        self.l3 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


class SmallCNN(nn.Module):
    """Registration order differs from forward order on purpose (head first)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16 * 4 * 4, 10)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.head(x.flatten(1))


def data(model: nn.Module, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, SmallCNN):
        return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    return torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g)


def snapshot(model: nn.Module, names: list[str]) -> list[np.ndarray]:
    params = dict(model.named_parameters())
    return [params[n].detach().double().numpy().copy() for n in names]


def train(model, opt, handle, steps: int, lr_at=None, per_step=None) -> list[list[np.ndarray]]:
    """Train and return the weights of each watched layer after every step."""
    x, y = data(model)
    saved = []
    for i in range(steps):
        if lr_at is not None:
            for g in opt.param_groups:
                g["lr"] = lr_at(i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        handle.observe_loss(loss)
        opt.step()
        saved.append(snapshot(model, handle.layer_names))
        if per_step is not None:
            per_step(i)
    return saved


def reference(w0: list[np.ndarray], saved: list[list[np.ndarray]], steps: list[int]):
    """(rotation, step_angle) float64 arrays (len(steps), L) for 1-based steps."""
    rot, ang = [], []
    for t in steps:
        cur = saved[t - 1]
        prev = w0 if t == 1 else saved[t - 2]
        rot.append([cosine_distance(w0[l], cur[l]) for l in range(len(cur))])
        ang.append([angle(prev[l], cur[l]) for l in range(len(cur))])
    return np.array(rot), np.array(ang)


def test_rotation_and_step_angles_match_float64_reference(collector):
    torch.manual_seed(1)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    handle = layrot.watch(model, opt, run="mlp-exact", collector=collector.grpc_address)
    names = [n for n, p in model.named_parameters() if p.ndim >= 2]
    w0 = snapshot(model, names)
    # 40 ordinary steps, then a tiny learning rate: step angles around 1e-4 rad.
    saved = train(model, opt, handle, 80, lr_at=lambda i: 0.05 if i < 40 else 2e-4)
    assert handle.flush(10.0)
    assert handle.layer_names == ["l1.weight", "l2.weight", "l3.weight"]
    hist = QueryClient(collector.grpc_address).history("mlp-exact")
    handle.close()
    assert list(hist.steps) == list(range(1, 81))
    rot_ref, ang_ref = reference(w0, saved, list(range(1, 81)))
    assert rel_err(hist.rotation, rot_ref).max() <= TOL
    assert rel_err(hist.step_angle, ang_ref).max() <= TOL
    tiny = ang_ref[45:]
    assert tiny.max() < 1e-3 and tiny.min() > 1e-5, "the tiny-angle phase must reach ~1e-4 rad"
    assert rel_err(hist.step_angle[45:], tiny).max() <= TOL
    # weight norms against float64 norms, loss recorded with its step
    norms = np.array([[np.linalg.norm(w) for w in s] for s in saved])
    assert rel_err(hist.weight_norm, norms).max() <= 1e-5
    assert np.isfinite(hist.loss).all() and hist.loss.shape == (80,)


def test_cnn_with_batchnorm_forward_order_and_every_10(collector):
    torch.manual_seed(2)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    handle = layrot.watch(model, opt, run="cnn-every10", every=10, collector=collector.grpc_address)
    names_forward = ["conv1.weight", "conv2.weight", "head.weight"]
    w0 = snapshot(model, names_forward)
    saved = train(model, opt, handle, 50)
    assert handle.layer_names == names_forward  # forward order, not registration order
    assert handle.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("cnn-every10")
    handle.close()
    assert list(hist.steps) == [10, 20, 30, 40, 50]
    rot_ref, ang_ref = reference(w0, saved, [10, 20, 30, 40, 50])
    assert rel_err(hist.rotation, rot_ref).max() <= TOL
    # w(t-1) is the step just before each reported step, not the previous report
    assert rel_err(hist.step_angle, ang_ref).max() <= TOL


def test_collector_absent_training_completes_and_drops_are_counted(caplog):
    torch.manual_seed(3)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    addr = f"127.0.0.1:{free_port()}"  # nothing listens here
    with caplog.at_level(logging.WARNING, logger="layrot"):
        handle = layrot.watch(model, opt, run="no-collector", collector=addr)
        saved = train(model, opt, handle, 30)
        t0 = time.monotonic()
        handle.close(timeout=5.0)
        closing = time.monotonic() - t0
    assert len(saved) == 30 and handle.step == 30
    warnings = [r for r in caplog.records if "cannot reach the collector" in r.getMessage()]
    assert len(warnings) == 1, "exactly one warning while the collector is down"
    assert handle.stats.acked_steps == 0 and handle.stats.sent_steps == 0  # nothing was ever delivered
    # The spool (on by default) keeps every step: nothing is lost, nothing is counted as dropped.
    assert handle.stats.dropped == 0 and handle.stats.spool_pending_steps == 30
    assert closing < 5.0 + 3.0  # close waits for a first connect, bounded by its timeout


def test_collector_absent_without_spool_counts_every_step_as_dropped(caplog):
    torch.manual_seed(3)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    addr = f"127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="layrot"):
        handle = layrot.watch(model, opt, run="no-collector-no-spool", collector=addr, spool=False)
        train(model, opt, handle, 30)
        handle.close(timeout=0.5)
    assert handle.stats.acked_steps == 0 and handle.stats.sent_steps == 0
    assert handle.stats.dropped == handle.stats.dropped_at_close == 30  # in memory only: lost at close
    assert any("not kept: lost" in r.getMessage() for r in caplog.records)


def test_collector_restart_mid_run_leaves_no_gap(tmp_path):
    port = free_port()
    db = tmp_path / "restart.db"
    c1 = Collector(grpc_port=port, metrics_port=None, db_path=db).start()
    torch.manual_seed(4)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle = layrot.watch(
        model, opt, run="restart", collector=f"127.0.0.1:{port}", reporter_options={"backoff_max": 0.5}
    )
    w0 = snapshot(model, [n for n, p in model.named_parameters() if p.ndim >= 2])
    saved = train(model, opt, handle, 20)
    assert handle.flush(10.0)
    c1.stop()
    saved += train(model, opt, handle, 20)  # collector down: steps 21..40 wait in the resend buffer
    c2 = Collector(grpc_port=port, metrics_port=None, db_path=db).start()
    try:
        saved += train(model, opt, handle, 20)
        assert handle.flush(15.0)
        hist = QueryClient(c2.grpc_address).history("restart")
        handle.close()
    finally:
        c2.stop()
    assert list(hist.steps) == list(range(1, 61))
    rot_ref, ang_ref = reference(w0, saved, list(range(1, 61)))
    assert rel_err(hist.rotation, rot_ref).max() <= TOL
    assert rel_err(hist.step_angle, ang_ref).max() <= TOL


def test_resume_from_checkpoint_continues_curves(collector, tmp_path):
    torch.manual_seed(5)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle = layrot.watch(model, opt, run="resume", collector=collector.grpc_address)
    names = [n for n, p in model.named_parameters() if p.ndim >= 2]
    w0 = snapshot(model, names)
    saved = train(model, opt, handle, 25)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "layrot": handle.state_dict()}, ckpt)
    assert handle.flush(10.0)
    handle.close()

    # A new process would rebuild everything from scratch: new init, then load.
    torch.manual_seed(99)
    model2 = MLP()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    handle2 = layrot.watch(model2, opt2, run="resume", collector=collector.grpc_address)
    state = torch.load(ckpt, weights_only=False)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    handle2.load_state_dict(state["layrot"])
    saved += train(model2, opt2, handle2, 25)
    assert handle2.step == 50
    assert handle2.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("resume")
    handle2.close()
    assert list(hist.steps) == list(range(1, 51))
    rot_ref, ang_ref = reference(w0, saved, list(range(1, 51)))
    assert rel_err(hist.rotation, rot_ref).max() <= TOL  # relative to the ORIGINAL w(0)
    assert rel_err(hist.step_angle, ang_ref).max() <= TOL


def test_grad_scaler_skipped_step_and_gradient_accumulation(collector):
    torch.manual_seed(6)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    handle = layrot.watch(model, opt, run="amp-accum", collector=collector.grpc_address)
    names = handle.layer_names
    w0 = snapshot(model, [n for n, p in model.named_parameters() if p.ndim >= 2])
    x, y = data(model, n=128)
    saved = []
    for it in range(12):
        opt.zero_grad()
        for micro in range(4):  # gradient accumulation: 4 backward passes per optimizer step
            loss = nn.functional.cross_entropy(model(x[micro::4]), y[micro::4]) / 4
            scaler.scale(loss).backward()
        if it == 5:
            model.l2.weight.grad[0, 0] = float("inf")  # the scaler must skip this step
        scaler.step(opt)
        scaler.update()
        if it != 5:
            saved.append(snapshot(model, names or handle.layer_names))
    assert handle.step == 11  # 12 iterations, one skipped
    assert handle.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("amp-accum")
    handle.close()
    assert list(hist.steps) == list(range(1, 12))
    rot_ref, ang_ref = reference(w0, saved, list(range(1, 12)))
    assert rel_err(hist.rotation, rot_ref).max() <= TOL
    assert rel_err(hist.step_angle, ang_ref).max() <= TOL


def test_layer_selection():
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    addr = f"127.0.0.1:{free_port()}"
    h = layrot.watch(model, opt, layers=r"^conv", collector=addr)
    assert sorted(h.layer_names) == ["conv1.weight", "conv2.weight"]
    h.close()
    h = layrot.watch(model, opt, layers=["head.weight"], collector=addr)
    assert h.layer_names == ["head.weight"]
    h.close()
    h = layrot.watch(model, opt, layers=lambda n, p: p.ndim == 4, collector=addr)
    assert sorted(h.layer_names) == ["conv1.weight", "conv2.weight"]
    h.close()
    with pytest.raises(ValueError, match="not found"):
        layrot.watch(model, opt, layers=["nope.weight"], collector=addr)
    with pytest.raises(ValueError, match="every"):
        layrot.watch(model, opt, every=0, collector=addr)
    # biases and BatchNorm parameters are never layers by default
    h = layrot.watch(model, opt, collector=addr)
    assert not any(n.endswith("bias") or n.startswith("bn") for n in h.layer_names)
    h.close()


def test_nan_weights_are_reported_not_crashing(collector):
    torch.manual_seed(7)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    handle = layrot.watch(model, opt, run="diverged", collector=collector.grpc_address)

    def poison(i: int) -> None:
        if i == 4:
            with torch.no_grad():
                model.l2.weight[0, 0] = float("nan")

    train(model, opt, handle, 8, per_step=poison)
    assert handle.flush(10.0)
    hist = QueryClient(collector.grpc_address).history("diverged")
    handle.close()
    assert list(hist.steps) == list(range(1, 9))
    assert np.isfinite(hist.rotation[:5]).all()
    assert np.isnan(hist.rotation[6:, 1]).all()  # l2 diverged and stays NaN
