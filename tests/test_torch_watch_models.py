"""Real model code: parametrized weights and tied weights are reported as the layers users expect.

* ``torch.nn.utils.parametrizations.weight_norm``: the magnitude ``original0`` is never
  a layer; the effective weight ``g * v / ||v||`` is reported under the module's
  ``weight`` name, and its rotations and step angles match float64 numpy of the
  effective weight recomputed from the saved ``original0`` / ``original1``.
* GPT-2 (``transformers`` tiny config, random init, no download) ties ``lm_head.weight``
  to ``transformer.wte.weight``: one layer, ``transformer.wte.weight``, exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import angle, cosine_distance, rel_err
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import layrot
from layrot.client.query import QueryClient

torch.set_num_threads(1)


class WNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.l1 = weight_norm(nn.Linear(10, 32))
        self.l2 = weight_norm(nn.Linear(32, 32), dim=None)  # one magnitude for the whole matrix
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


def effective_np(g: np.ndarray, v: np.ndarray, dim: int | None) -> np.ndarray:
    """weight_norm's w = g * v / ||v||, in float64 (norm over all dims but ``dim``)."""
    if dim is None:
        return g * v / np.linalg.norm(v)
    return g * v / np.linalg.norm(v, axis=tuple(a for a in range(v.ndim) if a != dim), keepdims=True)


def test_weight_norm_reports_the_effective_weight_exactly(collector):
    model = WNNet()
    assert "l1.parametrizations.weight.original0" in dict(model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    handle = layrot.watch(model, opt, run="weight-norm", collector=collector.grpc_address)
    params = dict(model.named_parameters())

    def effective() -> list[np.ndarray]:
        out = []
        for mod, dim in (("l1", 0), ("l2", None)):
            g = params[f"{mod}.parametrizations.weight.original0"].detach().double().numpy()
            v = params[f"{mod}.parametrizations.weight.original1"].detach().double().numpy()
            out.append(effective_np(g, v, dim))
        out.append(params["head.weight"].detach().double().numpy().copy())
        return out

    w0 = effective()
    v0 = params["l1.parametrizations.weight.original1"].detach().double().numpy().copy()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 4, (64,), generator=g)
    saved = []
    for _ in range(15):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        saved.append(effective())
    names = ["l1.weight", "l2.weight", "head.weight"]
    assert handle.layer_names == names  # no original0 / original1, forward order
    assert handle.flush(10.0)
    handle.close()
    hist = QueryClient(collector.grpc_address).history("weight-norm")
    steps = list(range(1, 16))
    rot = np.array([[cosine_distance(w0[i], saved[t - 1][i]) for i in range(3)] for t in steps])
    ang = np.array([[angle(w0[i] if t == 1 else saved[t - 2][i], saved[t - 1][i]) for i in range(3)] for t in steps])
    # measured: 4.9e-8 (rotation), 6.6e-8 (step angle); torch computes the effective weight in float32
    assert rel_err(hist.rotation, rot).max() <= 1e-6
    assert rel_err(hist.step_angle, ang).max() <= 1e-6
    # the direction original1 alone would be another curve (per-row magnitudes move too)
    v = params["l1.parametrizations.weight.original1"].detach().double().numpy()
    assert abs(cosine_distance(v0, v) / hist.rotation[-1, 0] - 1) > 1e-3
    assert np.isfinite(hist.weight_norm).all()


def test_gpt2_tied_embeddings_reported_once_exactly(collector):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(10)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = layrot.watch(model, opt, run="gpt2-tied", collector=collector.grpc_address)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(11))
    params = dict(model.named_parameters())
    w0 = None
    saved = []
    for _ in range(6):
        if w0 is None:
            w0 = {n: p.detach().double().numpy().copy() for n, p in params.items()}
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        saved.append({n: p.detach().double().numpy().copy() for n, p in params.items()})
    names = handle.layer_names
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert handle.flush(10.0)
    handle.close()
    hist = QueryClient(collector.grpc_address).history("gpt2-tied")
    steps = list(range(1, 7))
    rot = np.array([[cosine_distance(w0[n], saved[t - 1][n]) for n in names] for t in steps])
    ang = np.array([[angle(w0[n] if t == 1 else saved[t - 2][n], saved[t - 1][n]) for n in names] for t in steps])
    # measured: 7.7e-16 / 8.6e-16
    assert rel_err(hist.rotation, rot).max() <= 1e-6
    assert rel_err(hist.step_angle, ang).max() <= 1e-6
