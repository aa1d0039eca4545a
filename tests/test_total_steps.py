"""The integrations announce the planned length of a run (``Hello.total_steps``) to a real collector.

The collector judges ``not_learning`` at a share of it (tests/test_alert_not_learning.py).
Each framework trains for real; the expected length is computed here from the settings
(epochs x batches / accumulation, max_steps), not read back from the framework, and the
steps the collector received must come out equal to it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import layrot
from layrot.client.query import QueryClient

torch.set_num_threads(1)


def run_of(collector, name: str) -> tuple[int, int]:
    """(the run's announced total_steps, its newest reported step) as the collector holds them."""
    with QueryClient(collector.grpc_address) as q:
        step = int(q.get_run(name)["step"])
    return collector.state.runs[name].total_steps, step


def test_watch_announces_total_steps_and_set_total_steps_changes_it(collector):
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = layrot.watch(model, opt, "watch-planned", collector=collector.grpc_address, total_steps=12)
    for _ in range(12):
        opt.zero_grad()
        model(torch.ones(4, 6)).pow(2).sum().backward()
        opt.step()
    handle.flush()
    assert run_of(collector, "watch-planned") == (12, 12)
    with pytest.raises(ValueError, match="total_steps"):
        handle.set_total_steps(-4)
    handle.close()


def test_lightning_callback_announces_the_fit_length(collector, tmp_path):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    import layrot.lightning

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.l2(torch.relu(self.l1(x))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(5)
    data = DataLoader(TensorDataset(torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g)), 6)
    epochs, batches, accumulate = 3, 60 // 6, 2
    cb = layrot.lightning.RotationCallback("lightning-planned", collector=collector.grpc_address)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[cb],
    )
    trainer.fit(Net(), data)
    planned = epochs * batches // accumulate  # 15 optimizer steps
    assert run_of(collector, "lightning-planned") == (planned, planned)


def test_hf_callback_announces_max_steps(collector, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    import layrot.hf

    torch.manual_seed(4)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    ids = torch.randint(0, 40, (24, 8), generator=torch.Generator().manual_seed(6))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=7,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    cb = layrot.hf.RotationCallback("hf-planned", collector=collector.grpc_address)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert run_of(collector, "hf-planned") == (7, 7)


def test_keras_callback_announces_epochs_times_steps(collector):
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    import layrot.keras

    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((40, 5)).astype("float32"), rng.integers(0, 3, 40)
    cb = layrot.keras.RotationCallback("keras-planned", collector=collector.grpc_address)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[cb])
    cb.handle.flush()
    assert run_of(collector, "keras-planned") == (3 * (40 // 8), 15)
