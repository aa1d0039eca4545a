"""Forward order whatever the model code does: functional use of parameters, forwards inside a closure.

* ``nn.MultiheadAttention`` reads ``out_proj.weight`` in functional code without
  calling ``out_proj``: it comes right after ``in_proj_weight``, not last after the head.
* A ``transformers`` BERT (tiny config, random init, no download) trained with
  ``optimizer.step(closure)`` (the forward runs inside the step, as in Lightning's
  automatic optimization): embeddings word, token_type, position, then the encoder.
  The same through ``lightning.Trainer``.
* LBFGS (several closure calls per step) on a model registered head first: forward
  order, and rotations and step angles exact against float64 numpy of saved weights.
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


class Attention(nn.Module):
    """Head registered first; attention's output projection read functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ff = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.ff(h)).mean(1))


def test_multihead_attention_out_proj_right_after_in_proj():
    torch.manual_seed(0)
    model = Attention()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = layrot.watch(model, opt, collector="offline")
    ids = torch.randint(0, 20, (4, 6))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    forward = ["emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "ff.weight", "head.weight"]
    assert handle.layer_names == forward
    handle.close(0.0)


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


def bert_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (4, 8), generator=g)
    return {"input_ids": ids, "token_type_ids": (ids % 2), "labels": torch.tensor([0, 1, 2, 1])}


EMBEDDINGS = [
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
]


def test_bert_trained_inside_a_closure_embeddings_in_forward_order():
    model = tiny_bert()
    # registration order puts position before token_type: the hook must not fall back to it
    registered = [n for n, p in model.named_parameters() if "embeddings" in n and p.ndim >= 2]
    assert registered[1] == "bert.embeddings.position_embeddings.weight"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = layrot.watch(model, opt, collector="offline")
    batch = bert_batch()

    def closure():
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    names = handle.layer_names
    assert names[:3] == EMBEDDINGS
    assert names[3].startswith("bert.encoder.layer.0.attention.self.query")
    assert names.index("bert.pooler.dense.weight") < names.index("classifier.weight") == len(names) - 1
    handle.close(0.0)


def test_bert_through_lightning_automatic_optimization(tmp_path):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader

    import layrot.lightning

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_bert()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    b = bert_batch()
    data = [{k: v[i] for k, v in b.items()} for i in range(4)]
    cb = layrot.lightning.RotationCallback("lit-bert-order", collector="offline")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[cb],
    )
    seen = {}

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["names"] = cb.handle.layer_names

    trainer.callbacks.append(Grab())
    trainer.fit(Module(), DataLoader(data, batch_size=2))
    assert cb.failures == 0, cb.errors
    assert seen["names"][:3] == [f"model.{n}" for n in EMBEDDINGS]


class HeadFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.l1 = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l1(x)))


def test_lbfgs_closure_forward_order_and_exact(collector):
    torch.manual_seed(3)
    model = HeadFirst()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    handle = layrot.watch(model, opt, run="lbfgs", collector=collector.grpc_address)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    names = ["l1.weight", "head.weight"]
    params = dict(model.named_parameters())
    w0 = [params[n].detach().double().numpy().copy() for n in names]
    saved = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(6):
        opt.step(closure)
        saved.append([params[n].detach().double().numpy().copy() for n in names])
    assert handle.layer_names == names
    assert handle.flush(10.0)
    handle.close()
    hist = QueryClient(collector.grpc_address).history("lbfgs")
    steps = list(range(1, 7))
    assert list(hist.steps) == steps
    rot = np.array([[cosine_distance(w0[i], saved[t - 1][i]) for i in range(2)] for t in steps])
    ang = np.array([[angle(w0[i] if t == 1 else saved[t - 2][i], saved[t - 1][i]) for i in range(2)] for t in steps])
    assert rel_err(hist.rotation, rot).max() <= 1e-6
    assert rel_err(hist.step_angle, ang).max() <= 1e-6


def test_order_override_puts_the_named_layers_first():
    torch.manual_seed(5)
    model = Attention()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = layrot.watch(model, opt, order=["head.weight", "ff.weight"], collector="offline")
    ids = torch.randint(0, 20, (4, 6))
    opt.zero_grad()
    nn.functional.cross_entropy(model(ids), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    # the listed ones first, the others in recorded forward order
    assert handle.layer_names == [
        "head.weight",
        "ff.weight",
        "emb.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    ]
    handle.close(0.0)
    with pytest.raises(ValueError, match="names no layer"):
        layrot.watch(model, opt, order=["head.bias"], collector="offline")
    with pytest.raises(ValueError, match="twice"):
        layrot.watch(model, opt, order=["head.weight", "head.weight"], collector="offline")
