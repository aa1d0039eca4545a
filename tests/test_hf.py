"""layrot.hf.RotationCallback on a real Hugging Face ``Trainer``, against a real collector on loopback.

GPT-2 built from a tiny ``GPT2Config`` (random init, tied embeddings, no download) trains
on random token ids with ``Trainer(max_steps=..., use_cpu=True, report_to=[])``. A second
callback saves every layer's weights (float64 copies) at ``on_step_end`` and counts the
real optimizer's steps with its own step hook; the rotations, step angles and losses the
collector stores are checked against float64 numpy from those weights and against the
loss Trainer logs. Covered: the ``AcceleratedOptimizer`` Trainer passes (which
``layrot.watch`` cannot take as it is), gradient accumulation, resume from the run's own
Trainer checkpoint (curves continue relative to the first run's w(0)), and failures
injected into the hook and the callback (training always runs to the end).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from history_check import check_history
from reference import rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import layrot  # noqa: E402
import layrot.hf  # noqa: E402
from layrot.agent.reporter import Reporter  # noqa: E402
from layrot.client.query import QueryClient  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB, SEQ = 96, 16
# close() at on_train_end waits up to close_timeout for the collector's last acks, then leaves what is
# unacknowledged in the spool (by design). It returns as soon as everything is acked; the default 5 s is
# a budget a loaded machine can exhaust, so the tests that read the history back give it more.
CLOSE_TIMEOUT = 60.0


def gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, **no_dropout))


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def snap(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


class SaveWeights(TrainerCallback):
    """w(0) at train begin, the weights after every optimizer step, the real optimizer's step count, logged losses."""

    def __init__(self) -> None:
        self.w0: dict[str, torch.Tensor] | None = None
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.losses: dict[int, float] = {}
        self.optimizer_steps = 0
        self.optimizer_type = ""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.optimizer_type = type(optimizer).__name__
        optimizer.optimizer.register_step_post_hook(self._count)
        if self.w0 is None:
            self.w0 = snap(model)

    def _count(self, optimizer, args, kwargs) -> None:
        self.optimizer_steps += 1

    def on_step_end(self, args, state, control, model=None, **kw):
        self.saved[state.global_step] = snap(model)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


class KeepHandle(TrainerCallback):
    """Keeps the RotationCallback's watch handle (the callback lets go of it at on_train_end)."""

    def __init__(self, cb: layrot.hf.RotationCallback) -> None:
        self.cb = cb
        self.handle = None

    def on_step_end(self, args, state, control, **kw):
        self.handle = self.handle or self.cb.handle


def make_trainer(model, out, callbacks, max_steps: int, accumulate: int = 1, save_steps: int = 0) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=callbacks)


def gpt2_layers(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}


def test_trainer_accumulation_exact_rotations_and_loss(collector, tmp_path):
    model = gpt2(seed=1)
    cb = layrot.hf.RotationCallback("hf-accum", collector=collector.grpc_address, close_timeout=CLOSE_TIMEOUT)
    ref = SaveWeights()
    trainer = make_trainer(model, tmp_path / "out", [cb, ref], max_steps=6, accumulate=2)
    trainer.train()
    assert ref.optimizer_type == "AcceleratedOptimizer"  # what layrot.watch alone cannot take
    assert trainer.state.global_step == 6 and ref.optimizer_steps == 6 and sorted(ref.saved) == list(range(1, 7))
    assert cb.failures == 0, cb.errors
    assert cb.handle is None  # closed at on_train_end
    hist = check_history(collector.grpc_address, "hf-accum", ref.w0, ref.saved, list(range(1, 7)))
    # GPT-2's tied lm_head is transformer.wte.weight: reported once, under that name.
    assert set(hist.layer_names) == gpt2_layers(model)
    assert "transformer.wte.weight" in hist.layer_names and "lm_head.weight" not in hist.layer_names
    # The loss of each step (two micro-batches) is the one Trainer logs for it.
    want = np.array([ref.losses[t] for t in range(1, 7)])
    if all(round(v, 4) == v for v in want):  # transformers 4.x logs the loss rounded to 4 decimals
        assert np.abs(hist.loss - want).max() <= 5e-5
    else:
        assert rel_err(hist.loss, want).max() <= 1e-6


def test_trainer_resume_from_own_checkpoint_continues_curves(collector, tmp_path):
    out = tmp_path / "out"
    model = gpt2(seed=2)
    cb = layrot.hf.RotationCallback(collector=collector.grpc_address, close_timeout=CLOSE_TIMEOUT)  # run=None
    ref = SaveWeights()
    make_trainer(model, out, [cb, ref], max_steps=6, save_steps=3).train()
    assert cb.failures == 0, cb.errors
    assert (out / "checkpoint-6" / layrot.hf.STATE_FILE).is_file()
    [first] = QueryClient(collector.grpc_address).list_runs()

    # A new process: another init and a new callback; model, optimizer and layrot state from checkpoint-6.
    cb2 = layrot.hf.RotationCallback(collector=collector.grpc_address, close_timeout=CLOSE_TIMEOUT)
    ref2 = SaveWeights()
    trainer = make_trainer(gpt2(seed=99), out, [cb2, ref2], max_steps=10, save_steps=3)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert trainer.state.global_step == 10 and sorted(ref2.saved) == list(range(7, 11))
    assert cb2.failures == 0, cb2.errors
    assert [r["run"] for r in QueryClient(collector.grpc_address).list_runs()] == [first["run"]]
    saved = {**ref.saved, **ref2.saved}
    hist = check_history(collector.grpc_address, first["run"], ref.w0, saved, list(range(1, 11)))
    assert set(hist.layer_names) == gpt2_layers(model)


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
    else:  # layrot.watch itself, at on_train_begin

        def watch(*a, **k):
            raise RuntimeError("injected watch failure")

        monkeypatch.setattr(layrot, "watch", watch)
    cb = layrot.hf.RotationCallback(f"hf-fail-{where}", collector=collector.grpc_address, close_timeout=CLOSE_TIMEOUT)
    ref = SaveWeights()
    kept = KeepHandle(cb)
    with caplog.at_level(logging.WARNING, logger="layrot.hf"):
        trainer = make_trainer(gpt2(seed=3), tmp_path / "out", [cb, ref, kept], max_steps=5, save_steps=2)
        trainer.train()
    assert trainer.state.global_step == 5 and ref.optimizer_steps == 5  # training ran to the end
    assert cb.failures == 1 and "injected" in cb.errors[0]
    assert len([r for r in caplog.records if "injected" in r.getMessage()]) == 1  # logged once
    if where == "reporter":  # the steps handed over before the failure are stored; monitoring then stops
        check_history(collector.grpc_address, "hf-fail-reporter", ref.w0, ref.saved, [1, 2])
        stats = kept.handle.stats  # the closed handle's reporter: each step handed over is acked, none kept or lost
        assert (stats.submitted, stats.acked_steps, stats.spool_pending_steps, stats.dropped) == (2, 2, 0, 0), stats


def test_watch_on_the_accelerated_optimizer_needs_the_unwrap():
    """The wrapper Trainer passes is a torch Optimizer subclass without hook tables: the callback unwraps it."""
    from accelerate.optimizer import AcceleratedOptimizer

    model = gpt2(seed=4)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped = AcceleratedOptimizer(inner, device_placement=False)
    assert layrot.hf.real_optimizer(wrapped) is inner
    layca = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1))
    assert layrot.hf.real_optimizer(AcceleratedOptimizer(layca, device_placement=False)) is layca
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        layrot.hf.real_optimizer(object())


def _ddp_rank(rank: int, world: int, port: int, address: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    cb = layrot.hf.RotationCallback(collector=address, close_timeout=CLOSE_TIMEOUT)  # run=None: rank 0's name
    trainer = make_trainer(gpt2(seed=5), out, [cb], max_steps=4)
    trainer.train()
    assert cb.failures == 0, cb.errors


@pytest.mark.slow
def test_ddp_two_ranks_share_one_run(collector, tmp_path):
    """Trainer on 2 CPU processes (gloo) with run=None: one run, each rank reports every step."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(
        _ddp_rank, args=(2, port, collector.grpc_address, str(tmp_path / "out")), nprocs=2, join=True
    )
    q = QueryClient(collector.grpc_address)
    [run] = q.list_runs()
    h0, h1 = q.history(run["run"], rank=0), q.history(run["run"], rank=1)
    assert list(h0.steps) == [1, 2, 3, 4] == list(h1.steps)
    assert set(h0.layer_names) == gpt2_layers(gpt2(seed=5))
    assert rel_err(h1.rotation, h0.rotation).max() <= 1e-12  # DDP keeps the replicas identical
