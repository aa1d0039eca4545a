"""layrot.lightning.RotationCallback on real Lightning training, against a real collector on loopback.

Every run trains a small module with ``lightning.Trainer``; a second callback saves
every watched layer's weights (float64 copies) after each optimizer step, and the
rotations, step angles and losses the collector stores are checked against float64
numpy from those weights (``reference.py``). Covered: gradient accumulation (a
report per optimizer step), ``layrot.Layca`` with ``control=True``, resume from the
run's own Lightning checkpoint (curves continue relative to the first run's w(0)),
two optimizers, the standalone ``pytorch_lightning`` package, and failures injected
into the watch hook and into the callback (training always runs to the end).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from history_check import check_history
from reference import rel_err
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

import layrot  # noqa: E402
import layrot.lightning  # noqa: E402
from layrot.agent.reporter import Reporter  # noqa: E402
from layrot.client.query import QueryClient  # noqa: E402

torch.set_num_threads(1)


class Net(L.LightningModule):
    """An MLP with a 1-D parameter (bias) and a norm layer that are not layers; records its training losses."""

    def __init__(self, seed: int = 0, optimizer: str = "sgd") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.l2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)
        self.kind = optimizer
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.l2(torch.relu(self.norm(self.l1(x))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.kind == "layca":
            return layrot.Layca(torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9), rho=0.02, alpha=0.0)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def loader(n: int = 96, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    ds = TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g))
    return DataLoader(ds, batch_size=batch, shuffle=False)


def layer_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}


def snap(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


class SaveWeights(L.Callback):
    """Saves w(0) at the start and the weights after every optimizer step (keyed by global step)."""

    def __init__(self) -> None:
        self.w0: dict[str, torch.Tensor] | None = None
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: dict[int, int] = {}  # global step -> micro-batches that made it

    def on_train_start(self, trainer, pl_module) -> None:
        if self.w0 is None:
            self.w0 = snap(pl_module)
        self._last = trainer.global_step
        self._micro = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._micro += 1
        step = trainer.global_step
        if step != self._last:
            self.saved[step] = snap(pl_module)
            self.batches[step] = self._micro
            self._last, self._micro = step, 0


def trainer(tmp_path, callbacks, max_steps: int, **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **kw,
    )


def test_accumulation_a_report_per_optimizer_step_exact_rotations_and_loss(collector, tmp_path):
    model = Net(seed=1)
    cb = layrot.lightning.RotationCallback("lit-accum", collector=collector.grpc_address)
    ref = SaveWeights()
    t = trainer(tmp_path, [cb, ref], 8, accumulate_grad_batches=2)
    t.fit(model, loader())
    assert t.global_step == 8 and sorted(ref.saved) == list(range(1, 9))
    assert set(ref.batches.values()) == {2}, "two micro-batches per optimizer step"
    assert cb.failures == 0, cb.errors
    assert cb.handle is None  # closed at on_fit_end; a checkpoint saved after fit still has its state
    assert cb.state_dict()["handles"][0]["step"] == 8 and cb.state_dict()["run"] == "lit-accum"
    hist = check_history(collector.grpc_address, "lit-accum", ref.w0, ref.saved, list(range(1, 9)))
    assert set(hist.layer_names) == layer_names(model) == {"l1.weight", "l2.weight", "head.weight"}
    # The loss of step t: the mean of its two micro-batch losses, forwarded as a tensor (no sync).
    want = np.array(model.losses).reshape(8, 2).mean(axis=1)
    assert rel_err(hist.loss, want).max() <= 1e-6


def test_layca_control_resume_from_own_checkpoint_continues_curves(collector, tmp_path):
    """Layca + control=True, run=None: a checkpoint at step 6, a fresh process resumes to 12 on the same run."""
    ckpts = tmp_path / "ckpt"
    model = Net(seed=2, optimizer="layca")
    cb = layrot.lightning.RotationCallback(collector=collector.grpc_address, control=True)
    ref = SaveWeights()
    every6 = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=6, save_top_k=-1)
    t = trainer(tmp_path, [cb, ref, every6], 6, enable_checkpointing=True)
    t.fit(model, loader())
    assert cb.failures == 0, cb.errors
    [ckpt] = sorted(ckpts.glob("*step=6*.ckpt"))
    [first] = QueryClient(collector.grpc_address).list_runs()
    run = first["run"]

    # A new process: another init, the callback built afresh; everything comes from the checkpoint.
    model2 = Net(seed=99, optimizer="layca")
    cb2 = layrot.lightning.RotationCallback(collector=collector.grpc_address, control=True)
    ref2 = SaveWeights()
    t2 = trainer(tmp_path, [cb2, ref2], 12)
    t2.fit(model2, loader(), ckpt_path=str(ckpt))
    assert t2.global_step == 12 and sorted(ref2.saved) == list(range(7, 13))
    assert cb2.failures == 0, cb2.errors
    assert [r["run"] for r in QueryClient(collector.grpc_address).list_runs()] == [run]  # same run, no new one
    saved = {**ref.saved, **ref2.saved}
    hist = check_history(collector.grpc_address, run, ref.w0, saved, list(range(1, 13)))
    assert set(hist.layer_names) == layer_names(model)
    # Layca: every layer turns by arctan(rho) per step (rho=0.02, alpha=0), before and after the resume.
    assert np.abs(hist.step_angle / np.arctan(0.02) - 1).max() <= 1e-4
    assert np.allclose(hist.rho, 0.02)


@pytest.mark.parametrize("where", ["reporter", "hook", "callback"])
def test_injected_failure_is_logged_once_and_training_runs_to_the_end(collector, tmp_path, monkeypatch, caplog, where):
    calls = {"n": 0}
    if where == "reporter":  # the report hand-off, inside optimizer.step(), at the third step

        def submit(self, record):
            calls["n"] += 1
            if calls["n"] >= 3:
                raise RuntimeError("injected reporter failure")
            return original(self, record)

        original = Reporter.submit
        monkeypatch.setattr(Reporter, "submit", submit)
    elif where == "hook":  # the hook's first-step setup

        def finalize(self):
            raise RuntimeError("injected hook failure")

        monkeypatch.setattr(layrot.WatchHandle, "_finalize", finalize)
    else:  # layrot.watch itself, called by the callback at on_fit_start

        def watch(*a, **k):
            raise RuntimeError("injected watch failure")

        monkeypatch.setattr(layrot, "watch", watch)
    model = Net(seed=3)
    cb = layrot.lightning.RotationCallback(f"lit-fail-{where}", collector=collector.grpc_address)
    ref = SaveWeights()
    with caplog.at_level(logging.WARNING, logger="layrot.lightning"):
        t = trainer(tmp_path, [cb, ref], 6)
        t.fit(model, loader())
    assert t.global_step == 6 and sorted(ref.saved) == list(range(1, 7))  # training ran to the end
    assert cb.failures == 1 and "injected" in cb.errors[0]
    assert len([r for r in caplog.records if "injected" in r.getMessage()]) == 1  # logged once
    if where == "reporter":  # steps handed over before the failure are stored; monitoring then stops
        check_history(collector.grpc_address, "lit-fail-reporter", ref.w0, ref.saved, [1, 2])


class TwoOptimizers(L.LightningModule):
    """Manual optimization: ``a`` steps every batch, ``b`` every other batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.automatic_optimization = False
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 5)

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.b(torch.relu(self.a(x))), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        if batch_idx % 2 == 0:
            opt_b.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=1e-2)


def test_two_optimizers_one_run_each_with_its_own_layers(collector, tmp_path):
    model = TwoOptimizers()
    cb = layrot.lightning.RotationCallback("lit-two", collector=collector.grpc_address)
    t = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    t.fit(model, loader())
    assert cb.failures == 0, cb.errors
    q = QueryClient(collector.grpc_address)
    a, b = q.history("lit-two"), q.history("lit-two-opt1")
    assert (a.layer_names, list(a.steps)) == (["a.weight"], [1, 2, 3, 4, 5, 6])
    assert (b.layer_names, list(b.steps)) == (["b.weight"], [1, 2, 3])
    assert np.isfinite(a.loss).all()  # the loss goes with the first optimizer stepping after the backward


def test_standalone_pytorch_lightning_package(collector, tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class PlainNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.l1 = nn.Linear(16, 8)
            self.l2 = nn.Linear(8, 5)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.l2(torch.relu(self.l1(x))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = layrot.lightning.PLRotationCallback("pl-plain", collector=collector.grpc_address)
    t = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    t.fit(PlainNet(), loader())
    assert cb.failures == 0, cb.errors
    assert list(QueryClient(collector.grpc_address).history("pl-plain").steps) == [1, 2, 3, 4]


@pytest.mark.slow
def test_ddp_two_ranks_share_one_run(collector, tmp_path):
    """DDP on 2 CPU processes (gloo), run=None: rank 0's name is broadcast; each rank reports every step."""
    cb = layrot.lightning.RotationCallback(collector=collector.grpc_address)
    t = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[cb],
    )
    t.fit(Net(seed=6), loader())
    q = QueryClient(collector.grpc_address)
    [run] = q.list_runs()
    h0, h1 = q.history(run["run"], rank=0), q.history(run["run"], rank=1)
    assert list(h0.steps) == list(range(1, 6)) == list(h1.steps)
    assert set(h0.layer_names) == {"l1.weight", "l2.weight", "head.weight"}
    # DDP keeps the replicas identical: both ranks measure the same rotations.
    assert rel_err(h1.rotation, h0.rotation).max() <= 1e-12


class Fp16Net(Net):
    """Sets an infinite gradient at batch ``skip``, so the GradScaler skips that optimizer step."""

    skip = 1

    def on_after_backward(self) -> None:  # before the scaler unscales and checks the gradients
        if len(self.losses) - 1 == self.skip:
            self.l2.weight.grad[0, 0] = float("inf")


def test_fp16_grad_scaler_loss_unscaled_and_skipped_step_not_a_step(collector, tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    model = Fp16Net(seed=8)
    cb = layrot.lightning.RotationCallback("lit-fp16", collector=collector.grpc_address)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # fp16 autocast on CPU, a real scaler
    t = trainer(tmp_path, [cb], 5, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(model, loader())
    assert cb.failures == 0, cb.errors
    hist = QueryClient(collector.grpc_address).history("lit-fp16")
    assert list(hist.steps) == [1, 2, 3, 4]  # 5 batches, one step skipped by the scaler
    # Each reported step carries its own batch's loss, divided back by the scale (2**10, then 2**9).
    want = np.array(model.losses)[[0, 2, 3, 4]]
    assert rel_err(hist.loss, want).max() <= 1e-6
