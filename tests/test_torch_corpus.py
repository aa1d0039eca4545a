"""Real model code through ``layrot.watch`` and a real collector: ViT, ``nn.Transformer``, LSTM, a conv net.

Each model is built from library code with random init (``transformers.ViTConfig``, no
download; ``torch.nn``), trained a few steps with SGD or Adam, every step reported, and
checked against float64 numpy of the weights saved at every step: rotation and step
angle at every step and layer (<= 1e-6 relative), the layer set (every weight-like
parameter of ndim >= 2 that is not a bias or a normalization parameter), layers in the
order the forward uses them, and steps reported == optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from history_check import check_history
from torch import nn
from torch.overrides import TorchFunctionMode

import layrot

torch.set_num_threads(1)


class _FirstUse(TorchFunctionMode):
    """Records, op by op, the parameters each torch function receives: the order the forward uses them."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params
        self.order: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        for a in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            name = self.params.get(id(a))
            if name is not None and name not in self.order:
                self.order.append(name)
        return func(*args, **(kwargs or {}))


def first_use_order(model: nn.Module, run: Callable[[], torch.Tensor], names: list[str]) -> list[str]:
    """``names`` in the order the forward first hands each to a torch function: an independent forward order,
    which also sees parameters read by functional code (attention's out_proj, an LSTM's flat weights)."""
    params = dict(model.named_parameters())
    mode = _FirstUse({id(params[n]): n for n in names})
    with torch.no_grad(), mode:
        run()
    return mode.order


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(ids))
        return self.out(h[:, -1])


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.src = nn.Embedding(25, 16)
        self.tgt = nn.Embedding(25, 16)
        self.core = nn.Transformer(
            16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.out = nn.Linear(16, 25)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.out(self.core(self.src(src), self.tgt(tgt)))


def vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg)


def cases():
    g = torch.Generator().manual_seed(1)
    img, cls = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    ids, tags = torch.randint(0, 30, (6, 7), generator=g), torch.randint(0, 4, (6,), generator=g)
    src, tgt = torch.randint(0, 25, (4, 6), generator=g), torch.randint(0, 25, (4, 5), generator=g)
    ce = nn.functional.cross_entropy
    return {
        "convnet": (ConvNet, lambda m: ce(m(img), cls), torch.optim.SGD, {"lr": 0.2, "momentum": 0.9}),
        "lstm": (LSTMTagger, lambda m: ce(m(ids), tags), torch.optim.Adam, {"lr": 1e-2}),
        "transformer": (
            Seq2Seq,
            lambda m: ce(m(src, tgt).reshape(-1, 25), tgt.reshape(-1)),
            torch.optim.Adam,
            {"lr": 1e-2},
        ),
        "vit": (vit, lambda m: m(pixel_values=img, labels=cls).loss, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    }


def expected_layers(model: nn.Module) -> list[str]:
    norm = (nn.LayerNorm, nn.BatchNorm2d)
    norm_params = {
        f"{mn}.{pn}" if mn else pn
        for mn, m in model.named_modules()
        if isinstance(m, norm)
        for pn, _ in m.named_parameters(recurse=False)
    }
    return [
        n
        for n, p in model.named_parameters()
        if p.ndim >= 2 and n not in norm_params and "bias" not in n.split(".")[-1]
    ]


@pytest.mark.parametrize("name", ["convnet", "lstm", "transformer", "vit"])
def test_real_model_code_exact_in_forward_order(collector, name):
    build, loss_fn, opt_cls, kw = cases()[name]
    torch.manual_seed(0)
    model = build()
    opt = opt_cls(model.parameters(), **kw)
    want = expected_layers(model)
    order = first_use_order(model, lambda: loss_fn(model), want)
    assert sorted(order) == sorted(want)
    run = f"corpus-{name}"
    handle = layrot.watch(model, opt, run=run, collector=collector.grpc_address, every=1)
    params = dict(model.named_parameters())
    w0 = {n: params[n].detach().double().clone() for n in want}
    saved = {}
    steps = 6
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        handle.observe_loss(loss)
        saved[t] = {n: params[n].detach().double().clone() for n in want}
    assert handle.flush(10)
    handle.close()
    assert handle.layer_names == order  # the layers autograd saw, in the order the forward used them
    hist = check_history(collector.grpc_address, run, w0, saved, list(range(1, steps + 1)))
    assert hist.layer_names == order
