"""Stable layer names and no recompilation: ``torch.compile``, DataParallel / DDP and plain runs agree.

* Layer names drop the wrapper components (``_orig_mod.`` of ``torch.compile``,
  ``module.`` of DDP / DataParallel): the same layers, in the same forward order,
  for a plain, a compiled, a DataParallel and a DDP (1-process gloo group) model;
  handle checkpoints load across them (and names saved by older releases with the
  prefixes load too).
* The hook causes no recompilation: the number of graphs dynamo compiled is the same
  with and without ``layrot.watch`` (backend ``aot_eager``, so the backward goes
  through AOTAutograd as with inductor); the first watched step runs eagerly.
* A compiled run's rotations and step angles match float64 numpy of saved weights.
"""

from __future__ import annotations

import gc
import socket

import numpy as np
import pytest
import torch
import torch._dynamo
from reference import angle, cosine_distance, rel_err
from torch import nn
from torch._dynamo.utils import counters

import layrot
from layrot.client.query import QueryClient

torch.set_num_threads(1)
FORWARD = ["conv1.weight", "conv2.weight", "head.weight"]


class CNN(nn.Module):
    """Registration order differs from forward order on purpose (head first)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8 * 4 * 4, 5)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 5, (16,), generator=g)


def train(model: nn.Module, inner: nn.Module, opt, steps: int, handle=None) -> list[list[np.ndarray]]:
    x, y = batch()
    saved = []
    params = dict(inner.named_parameters())
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if handle is not None:
            handle.observe_loss(loss)
        opt.step()
        saved.append([params[n].detach().double().numpy().copy() for n in FORWARD])
    return saved


def graphs_per_step(watched: bool, steps: int = 5) -> list[int]:
    # Handles of earlier tests that never stepped give the stance back when they are collected.
    gc.collect()
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    inner = CNN()
    model = torch.compile(inner, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle = layrot.watch(model, opt, collector="offline") if watched else None
    x, y = batch()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        out.append(int(counters["stats"]["unique_graphs"]))
    if handle is not None:
        assert handle.layer_names == FORWARD
        handle.close(0.0)
    return out


def test_the_hook_causes_no_recompilation():
    without = graphs_per_step(False)
    with_hook = graphs_per_step(True)
    # The first watched step runs eagerly (the order hooks are never compiled in); from the
    # second step on the same graphs as without the hook, and no recompilation.
    assert with_hook[0] == 0 and with_hook[1:] == without[1:], (with_hook, without)
    assert without[0] >= 1 and len(set(without)) == 1  # compiled once, never again
    # the stance is the job's own again: a new compiled function compiles at once
    counters.clear()
    f = torch.compile(lambda t: t * 2, backend="eager")
    f(torch.ones(2))
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_run_exact_with_plain_names(collector):
    torch._dynamo.reset()
    torch.manual_seed(1)
    inner = CNN()
    model = torch.compile(inner, backend="aot_eager")
    assert any(n.startswith("_orig_mod.") for n, _ in model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle = layrot.watch(model, opt, run="compiled", collector=collector.grpc_address)
    params = dict(inner.named_parameters())
    w0 = [params[n].detach().double().numpy().copy() for n in FORWARD]
    saved = train(model, inner, opt, 12, handle)
    assert handle.layer_names == FORWARD
    assert handle.flush(10.0)
    handle.close()
    hist = QueryClient(collector.grpc_address).history("compiled")
    assert list(hist.layer_names) == FORWARD
    steps = list(range(1, 13))
    rot = np.array([[cosine_distance(w0[i], saved[t - 1][i]) for i in range(3)] for t in steps])
    ang = np.array([[angle(w0[i] if t == 1 else saved[t - 2][i], saved[t - 1][i]) for i in range(3)] for t in steps])
    assert rel_err(hist.rotation, rot).max() <= 1e-6
    assert rel_err(hist.step_angle, ang).max() <= 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_plain_compiled_dataparallel_and_ddp_share_names_and_checkpoints(gloo_group):
    states = {}
    kinds = {
        "plain": lambda m: m,
        "compiled": lambda m: torch.compile(m, backend="aot_eager"),
        "dataparallel": nn.DataParallel,
        "ddp": nn.parallel.DistributedDataParallel,
        "ddp-compiled": lambda m: torch.compile(nn.parallel.DistributedDataParallel(m), backend="aot_eager"),
    }
    for kind, wrap in kinds.items():
        torch._dynamo.reset()
        torch.manual_seed(2)
        inner = CNN()
        model = wrap(inner)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        handle = layrot.watch(model, opt, run=f"names-{kind}", collector="offline")
        train(model, inner, opt, 2, handle)
        assert handle.layer_names == FORWARD, kind
        states[kind] = handle.state_dict()
        assert states[kind]["names"] == FORWARD
        handle.close(0.0)
    # every handle's checkpoint loads into every other kind's handle
    for wrap in kinds.values():
        torch._dynamo.reset()
        inner = CNN()
        model = wrap(inner)
        handle = layrot.watch(model, torch.optim.SGD(model.parameters(), lr=0.05), collector="offline")
        for saved in states.values():
            handle.load_state_dict(saved)
            assert handle.step == 2
        # a state saved by an older release, with the wrapper prefixes in its names
        old = {**states["plain"], "names": [f"module._orig_mod.{n}" for n in states["plain"]["names"]]}
        handle.load_state_dict(old)
        handle.close(0.0)


def test_layers_by_raw_or_stable_name():
    model = torch.compile(CNN(), backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for names in (["head.weight"], ["_orig_mod.head.weight"]):
        handle = layrot.watch(model, opt, layers=names, collector="offline")
        assert handle.layer_names == ["head.weight"]
        handle.close(0.0)
