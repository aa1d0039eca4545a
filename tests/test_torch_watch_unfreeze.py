"""Gradual unfreezing: layers frozen at ``watch()`` are in the run from the first step and rotate once unfrozen.

A ``transformers`` BERT (tiny config, random init, no download) starts with its
embeddings frozen (``requires_grad_(False)``, the usual fine-tuning recipe) and
unfreezes them after ``UNFREEZE`` optimizer steps. The embeddings are layers from
step 1: while frozen their rotation and step angle are exactly 0; after unfreezing
the reported rotations and step angles of every layer match float64 numpy of the
weights saved at every step. With ``layrot.Layca`` the frozen embeddings are Layca
layers too: bitwise unchanged while frozen, turned by exactly arctan(rho) per step
once unfrozen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import angle, cosine_distance, rel_err
from torch import nn

import layrot
from layrot.client.query import QueryClient

torch.set_num_threads(1)
UNFREEZE, STEPS = 4, 10
EMBEDDINGS = [
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
]


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=2,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def run(collector, name: str, make_opt):
    model = tiny_bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    opt = make_opt(model)
    handle = layrot.watch(model, opt, run=name, collector=collector.grpc_address)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (8, 8), generator=g)
    batch = {"input_ids": ids, "token_type_ids": ids % 2, "labels": torch.randint(0, 3, (8,), generator=g)}
    w0 = {n: p.detach().double().numpy().copy() for n, p in params.items()}
    saved = []
    for t in range(1, STEPS + 1):
        if t == UNFREEZE + 1:
            for p in model.bert.embeddings.parameters():
                p.requires_grad_(True)
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        handle.observe_loss(loss)
        opt.step()
        saved.append({n: p.detach().double().numpy().copy() for n, p in params.items()})
    names = handle.layer_names
    assert handle.step == STEPS and handle.flush(10.0)
    handle.close()
    hist = QueryClient(collector.grpc_address).history(name)
    assert list(hist.steps) == list(range(1, STEPS + 1))  # steps reported == optimizer steps
    assert list(hist.layer_names) == names and names[:3] == EMBEDDINGS  # in the run from step 1, forward order
    steps = list(range(1, STEPS + 1))
    rot = np.array([[cosine_distance(w0[n], saved[t - 1][n]) for n in names] for t in steps])
    ang = np.array([[angle(w0[n] if t == 1 else saved[t - 2][n], saved[t - 1][n]) for n in names] for t in steps])
    return hist, rot, ang


def check(hist, rot, ang) -> float:
    frozen, after = slice(0, UNFREEZE), slice(UNFREEZE, STEPS)
    # frozen: exactly zero (the weights did not move)
    assert np.all(rot[frozen, :3] == 0) and np.all(hist.rotation[frozen, :3] == 0)
    assert np.all(hist.step_angle[frozen, :3] == 0)
    # unfrozen: they turn, and every layer at every step matches float64
    assert rot[-1, :3].min() > 1e-4
    err_frozen_rest = max(rel_err(hist.rotation[frozen, 3:], rot[frozen, 3:]).max(), 0.0)
    err = max(
        rel_err(hist.rotation[after], rot[after]).max(),
        rel_err(hist.step_angle[after], ang[after]).max(),
        err_frozen_rest,
        rel_err(hist.step_angle[frozen, 3:], ang[frozen, 3:]).max(),
    )
    assert err <= 1e-6, err
    return float(err)


def test_bert_frozen_embeddings_join_when_unfrozen(collector):
    hist, rot, ang = run(collector, "bert-unfreeze", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    check(hist, rot, ang)


def test_layca_learns_the_unfrozen_embeddings(collector):
    rho = 0.02

    def make(m):
        names = [n for n, _ in m.named_parameters()]
        base = torch.optim.SGD([{"params": list(m.parameters()), "param_names": names}], lr=0.1, momentum=0.9)
        opt = layrot.Layca(base, rho=rho, alpha=0.0)
        assert set(EMBEDDINGS) <= set(opt.layer_names)  # frozen at construction, still Layca layers
        return opt

    hist, rot, ang = run(collector, "bert-unfreeze-layca", make)
    check(hist, rot, ang)
    # Layca: zero steps while frozen, arctan(rho) per step once unfrozen (first 3 columns: the embeddings)
    assert np.abs(ang[UNFREEZE:, :3] / np.arctan(rho) - 1).max() <= 1e-5


class Probe(nn.Module):
    """A 'backbone' (l1, l2) and a head; the backbone starts frozen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.l1 = nn.Linear(10, 24)
        self.l2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


NAMES = ["l1.weight", "l2.weight", "head.weight"]


def probe_steps(model, opt, handle, steps: int, unfreeze_at: int | None, saved: list) -> None:
    g = torch.Generator().manual_seed(13 + len(saved))
    params = dict(model.named_parameters())
    for t in range(1, steps + 1):
        if unfreeze_at is not None and t == unfreeze_at:
            for p in [*model.l1.parameters(), *model.l2.parameters()]:
                p.requires_grad_(True)
        x, y = torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        saved.append([params[n].detach().double().numpy().copy() for n in NAMES])


def frozen_probe() -> nn.Module:
    model = Probe()
    for p in [*model.l1.parameters(), *model.l2.parameters()]:
        p.requires_grad_(False)
    return model


def test_frozen_layers_cost_no_copies_and_resume_then_unfreeze_is_exact(collector, tmp_path):
    model = frozen_probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    handle = layrot.watch(model, opt, run="probe-resume", every=2, collector=collector.grpc_address)
    params = dict(model.named_parameters())
    w0 = [params[n].detach().double().numpy().copy() for n in NAMES]
    saved: list = []
    probe_steps(model, opt, handle, 4, None, saved)
    assert handle.layer_names == NAMES
    # still frozen: w(0) is the parameter itself (no copy), and only the head is measured
    assert handle._w0[0].data_ptr() == model.l1.weight.data_ptr()
    assert handle._distances is not None and handle._distances.num_layers == 1
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "layrot": handle.state_dict()}
    assert handle.flush(10.0)
    handle.close()

    model2 = frozen_probe()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.2, momentum=0.9)
    handle2 = layrot.watch(model2, opt2, run="probe-resume", every=2, collector=collector.grpc_address)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    handle2.load_state_dict(ckpt["layrot"])
    assert handle2._w0[0].data_ptr() == model2.l1.weight.data_ptr()  # resumed lazy, no copy
    probe_steps(model2, opt2, handle2, 8, 3, saved)  # unfrozen at the 7th step overall: an unreported one
    assert handle2.step == 12 and handle2.flush(10.0)
    handle2.close()
    hist = QueryClient(collector.grpc_address).history("probe-resume")
    steps = [2, 4, 6, 8, 10, 12]
    assert list(hist.steps) == steps
    rot = np.array([[cosine_distance(w0[i], saved[t - 1][i]) for i in range(3)] for t in steps])
    ang = np.array([[angle(saved[t - 2][i], saved[t - 1][i]) for i in range(3)] for t in steps])
    assert np.all(hist.rotation[:3, :2] == 0) and np.all(rot[:3, :2] == 0)  # frozen through step 6
    assert rot[-1, :2].min() > 1e-4
    moving = rot > 0
    assert rel_err(hist.rotation[moving], rot[moving]).max() <= 1e-6
    assert rel_err(hist.step_angle[ang > 0], ang[ang > 0]).max() <= 1e-6
    assert np.all(hist.step_angle[ang == 0] == 0)
