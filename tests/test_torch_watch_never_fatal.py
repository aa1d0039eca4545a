"""layrot.watch never takes a training job down, and takes the optimizers real stacks hand it.

* Optimizer wrappers: Accelerate's ``AcceleratedOptimizer`` and Lightning's
  ``LightningOptimizer`` are unwrapped by ``watch`` itself (real reports, exact);
  anything that is not a torch optimizer is a TypeError at ``watch()`` time.
* Failures injected (monkeypatched internals that raise) at every stage after
  ``watch()`` returned: the forward pre-hook, the gradient hook, the step pre-hook
  (first-step setup), the measurement in the step post-hook, the prev copy of an
  unreported step, the hand-off to the reporter, the exporter thread,
  ``observe_loss``, ``flush`` and ``close``. Training runs to the end with weights
  bitwise equal to the same run without layrot; the error is logged once and
  counted in ``handle.stats``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from reference import angle, cosine_distance, rel_err
from torch import nn

import layrot
from layrot.agent.reporter import Reporter
from layrot.client.query import QueryClient
from layrot.hooks.torch_distances import LayerDistances
from layrot.hooks.torch_layers import ForwardOrderRecorder
from layrot.hooks.torch_watch import WatchHandle

torch.set_num_threads(1)
STEPS = 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 32)
        self.l2 = nn.Linear(32, 32)
        self.l3 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)


def run(watch_kwargs: dict | None, loss_value=None, wrap=None):
    """Train STEPS steps (optionally watched); returns (model, handle, w0, saved weights per step)."""
    torch.manual_seed(11)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = None
    if watch_kwargs is not None:
        handle = layrot.watch(model, wrap(opt) if wrap else opt, **watch_kwargs)
    names = ["l1.weight", "l2.weight", "l3.weight"]
    w0 = [dict(model.named_parameters())[n].detach().double().numpy().copy() for n in names]
    x, y = batch()
    saved = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if handle is not None:
            handle.observe_loss(loss if loss_value is None else loss_value)
        opt.step()
        saved.append([dict(model.named_parameters())[n].detach().double().numpy().copy() for n in names])
    return model, handle, w0, saved


def check_exact(address: str, run_name: str, w0, saved, steps: list[int]) -> float:
    hist = QueryClient(address).history(run_name)
    assert list(hist.steps) == steps
    rot = np.array([[cosine_distance(w0[i], saved[t - 1][i]) for i in range(3)] for t in steps])
    ang = np.array([[angle(w0[i] if t == 1 else saved[t - 2][i], saved[t - 1][i]) for i in range(3)] for t in steps])
    err = max(rel_err(hist.rotation, rot).max(), rel_err(hist.step_angle, ang).max())
    assert err <= 1e-6, err
    return float(err)


@pytest.fixture(scope="module")
def plain_weights():
    model, _, _, _ = run(None)
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_accelerate_and_lightning_wrappers_are_unwrapped_by_watch(collector):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from lightning.pytorch.core.optimizer import LightningOptimizer

    accelerator = Accelerator(cpu=True)
    wrappers = {
        "accelerate": accelerator.prepare_optimizer,
        "lightning": LightningOptimizer,
    }
    for name, wrap in wrappers.items():
        _, handle, w0, saved = run({"run": f"wrapped-{name}", "collector": collector.grpc_address}, wrap=wrap)
        assert handle.step == STEPS and handle.stats.hook_errors == 0
        assert handle.flush(10.0)
        handle.close()
        check_exact(collector.grpc_address, f"wrapped-{name}", w0, saved, list(range(1, STEPS + 1)))
    # a Layca below the wrapper is the optimizer watched (its rates are reported)
    model = Net()
    layca = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1))
    wrapped = accelerator.prepare_optimizer(layca)
    assert isinstance(wrapped, AcceleratedOptimizer)
    h = layrot.watch(model, wrapped, collector="offline")
    assert h._layca is layca
    h.close(0.0)


@pytest.mark.parametrize("bad", [object(), "sgd", nn.Linear(2, 2)])
def test_watch_refuses_what_is_not_an_optimizer_at_watch_time(bad):
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        layrot.watch(Net(), bad, collector="offline")


def _raise(*args, **kwargs):
    raise RuntimeError("injected failure")


STAGES = {
    # stage: (class, attribute, watch kwargs, steps the collector stores)
    "forward_pre_hook": (ForwardOrderRecorder, "_hook", {}, []),
    "grad_hook": (ForwardOrderRecorder, "_grad_hook", {}, []),
    "step_pre_hook": (WatchHandle, "_finalize", {}, []),
    "measure": (LayerDistances, "measure", {}, []),
    "copy_prev": (LayerDistances, "copy_prev", {"every": 3}, []),
    "submit": (Reporter, "submit", {}, [1, 2]),
    "exporter": (Reporter, "_emit", {}, []),
    "flush": (Reporter, "flush", {}, None),
    "close": (Reporter, "close", {}, None),
}


@pytest.mark.parametrize("stage", [*STAGES, "observe_loss"])
def test_injected_failure_training_goes_on_with_the_same_weights(stage, collector, monkeypatch, caplog, plain_weights):
    loss_value = None
    stored: list[int] | None = []
    kwargs: dict = {}
    if stage == "observe_loss":

        class NoFloat:
            def __float__(self) -> float:
                raise RuntimeError("injected failure")

        loss_value = NoFloat()
    else:
        cls, attr, kwargs, stored = STAGES[stage]
        if stage == "submit":  # the first two steps go through
            original = Reporter.submit
            calls = {"n": 0}

            def submit(self, record):
                calls["n"] += 1
                if calls["n"] >= 3:
                    raise RuntimeError("injected failure")
                return original(self, record)

            monkeypatch.setattr(Reporter, "submit", submit)
        elif stage in ("flush", "close"):
            monkeypatch.setattr(cls, attr, _raise)
        else:
            monkeypatch.setattr(cls, attr, _raise)
    name = f"fail-{stage}"
    with caplog.at_level(logging.WARNING, logger="layrot"):
        model, handle, w0, saved = run({"run": name, "collector": collector.grpc_address, **kwargs}, loss_value)
        flushed = handle.flush(3.0)
        handle.close(3.0)
    # training ran to the end with the weights of a run without layrot
    assert len(saved) == STEPS
    for n, p in model.state_dict().items():
        assert torch.equal(p, plain_weights[n]), n
    injected = [r for r in caplog.records if "injected" in r.getMessage()]
    assert len(injected) == 1, [r.getMessage() for r in injected]  # logged once
    if stage == "exporter":  # the exporter thread's own guard: the batch is dropped and counted
        assert handle.stats.export_errors >= 1 and handle.stats.dropped_bad_values >= 1
        assert handle.stats.hook_errors == 0
        return
    assert handle.stats.hook_errors >= 1 and handle.failed
    if stage in ("flush", "close"):
        assert not flushed if stage == "flush" else True
        monkeypatch.undo()  # the reporter's threads would outlive the test (and its collector)
        assert handle.reporter is not None
        handle.reporter.close(1.0)
        return
    assert handle.stats.hook_errors == 1  # the handle stopped at the first error
    # what was handed over before the failure is stored and exact; nothing after it
    if stored:
        check_exact(collector.grpc_address, name, w0, saved, stored)
    else:
        runs = [r["run"] for r in QueryClient(collector.grpc_address).list_runs()]
        assert name not in runs or list(QueryClient(collector.grpc_address).history(name).steps) == []


def test_on_error_replaces_the_handles_own_warning(collector, monkeypatch, caplog):
    monkeypatch.setattr(LayerDistances, "measure", _raise)
    torch.manual_seed(11)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = layrot.watch(model, opt, run="fail-on-error", collector=collector.grpc_address)
    seen: list[tuple[str, str]] = []
    handle.on_error = lambda where, exc: seen.append((where, str(exc)))
    x, y = batch()
    with caplog.at_level(logging.WARNING, logger="layrot"):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    handle.close(1.0)
    assert seen == [("watch hook (optimizer step post-hook)", "injected failure")]
    assert not [r for r in caplog.records if "injected" in r.getMessage()]


def test_a_release_run_by_the_garbage_collector_inside_the_lock_does_not_hang():
    """A handle's finalizer releases its eager stance when the GC runs, which may be while the same thread holds
    the stance lock (an allocation inside set_stance): CI once hung a training thread there for 300 s."""
    import threading

    from layrot.hooks.torch_layers import EagerUntilOrdered

    first, second = EagerUntilOrdered(), EagerUntilOrdered()
    done = threading.Event()

    def gc_inside_the_lock() -> None:
        with EagerUntilOrdered._lock:  # what __init__ / release hold when the collector runs a finalizer
            second.release()
        done.set()

    t = threading.Thread(target=gc_inside_the_lock, daemon=True)
    t.start()
    t.join(5)
    assert done.is_set(), "release() deadlocked inside the stance lock"
    first.release()
    assert EagerUntilOrdered._holders == 0
