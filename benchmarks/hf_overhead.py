"""Hugging Face ``Trainer`` step time with ``layrot.hf.RotationCallback`` over without, GPT-2-sized, side by side.

Each round trains a fresh GPT-2 (random init, same seed) with ``Trainer`` twice, once with
the callback (every=1, loss forwarded, a real ``layrot-agent serve`` in another process)
and once without, in alternating order, so drift in machine load hits both alike. A step
is timed from ``on_step_begin`` to ``on_step_end`` (forward, backward, AdamW step and the
hook; not data loading, logging or saving); the first ``--warmup`` steps of each run are
dropped. Printed: the per-round ratio of median step times (min / median / max over the
rounds), the ratio of all steps' medians and that of the fastest steps (the least
sensitive to other load on a shared machine), and the time the layrot hooks take inside
each step of the same run (robust to load that changes between runs).

    python benchmarks/hf_overhead.py               # reduced GPT-2 (4 layers, 256 wide, full vocab), ~4 min here
    python benchmarks/hf_overhead.py --full        # the 124 M GPT-2 config (12 layers, 768 wide)
    python benchmarks/hf_overhead.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collector_proc import free_port, parse_overhead_args, running_collector  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import layrot.hf  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (on_step_begin to on_step_end) and, inside it, of the layrot hooks.

    The hook time is measured in the same run: step hooks of our own on the real optimizer,
    registered before the callback's (at on_train_begin, listed first) and after them (at
    the first on_step_begin), bracket the watch handle's pre- and post-step hooks.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self._t0 = 0.0
        self._marks: dict[str, float] = {}
        self._opt = None

    def _mark(self, name: str):
        def hook(*a) -> None:
            self._marks[name] = time.perf_counter()

        return hook

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self._opt = layrot.hf.real_optimizer(optimizer)
        self._opt.register_step_pre_hook(self._mark("pre0"))
        self._opt.register_step_post_hook(self._mark("post0"))
        self._late = False

    def on_step_begin(self, args, state, control, **kw):
        if not self._late:
            self._opt.register_step_pre_hook(self._mark("pre1"))
            self._opt.register_step_post_hook(self._mark("post1"))
            self._late = True
        self._marks.clear()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t0)
        m = self._marks
        self.hook_times.append((m["pre1"] - m["pre0"]) + (m["post1"] - m["post0"]))


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_once(config: GPT2Config, data, out: str, steps: int, batch: int, callback) -> StepTimer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = [timer] + ([callback] if callback is not None else [])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the final metrics line
    trainer.train()
    if callback is not None and callback.failures:
        raise SystemExit(f"the callback failed: {callback.errors}")
    return timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--full", action="store_true", help="the 124 M GPT-2 config (n_layer=12, n_embd=768)")
    ap.add_argument("--down", action="store_true", help="also with no collector listening")
    args = parse_overhead_args(ap)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    hf_logging.set_verbosity_error()
    logging.getLogger("layrot").setLevel(logging.ERROR)  # the "collector down" warning

    if args.full:
        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=max(1024, args.seq))
    else:
        config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=max(128, args.seq))
    data = RandomTokens(args.batch * (args.steps + args.warmup), args.seq, config.vocab_size)
    n_params = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, running_collector(tmp) as up:
        targets = [("collector up", up)] + ([("collector down", f"127.0.0.1:{free_port()}")] if args.down else [])
        for label, address in targets:
            ratios, all_off, all_on, hooks, fractions = [], [], [], [], []
            for r in range(args.rounds):
                order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
                med: dict[str, float] = {}
                for cfg in order:
                    cb = None
                    if cfg == "on":
                        cb = layrot.hf.RotationCallback(
                            f"bench-hf-{label.split()[1]}-{r}", collector=address, close_timeout=2.0
                        )
                    out = os.path.join(tmp, "out")
                    timer = run_once(config, data, out, args.steps + args.warmup, args.batch, cb)
                    kept = timer.times[args.warmup :]
                    (all_on if cfg == "on" else all_off).extend(kept)
                    med[cfg] = statistics.median(kept)
                    if cfg == "on":
                        hook = timer.hook_times[args.warmup :]
                        hooks.extend(hook)
                        fractions.extend(h / t for h, t in zip(hook, kept))
                ratios.append(med["on"] / med["off"])
                if not args.json:
                    print(f"  {label} round {r + 1}: off {med['off'] * 1e3:.0f} ms, on {med['on'] * 1e3:.0f} ms")
            results[label] = {
                "step_s_off": statistics.median(all_off),
                "step_s_on": statistics.median(all_on),
                "ratio_min": min(ratios),
                "ratio_median": statistics.median(ratios),
                "ratio_max": max(ratios),
                "ratio_of_medians": statistics.median(all_on) / statistics.median(all_off),
                "ratio_of_minima": min(all_on) / min(all_off),
                "hook_s": statistics.median(hooks),
                "hook_fraction": statistics.median(fractions),
            }

    if args.json:
        print(json.dumps({"params": n_params, "threads": torch.get_num_threads(), "results": results}, indent=2))
        return
    print(
        f"GPT-2 {'124M' if args.full else 'reduced'} config: {n_params / 1e6:.1f} M parameters, batch {args.batch} x "
        f"{args.seq} tokens, AdamW, CPU, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps"
    )
    for label, r in results.items():
        print(
            f"{label:15} step off {r['step_s_off'] * 1e3:.0f} ms, on {r['step_s_on'] * 1e3:.0f} ms; "
            f"with/without per round min {r['ratio_min']:.3f} / median {r['ratio_median']:.3f} / "
            f"max {r['ratio_max']:.3f}; of all steps' medians {r['ratio_of_medians']:.3f}, "
            f"of the fastest steps {r['ratio_of_minima']:.3f}"
        )
        print(
            f"{'':15} in-run: the layrot hooks take {r['hook_s'] * 1e3:.1f} ms per step, "
            f"{r['hook_fraction'] * 100:.2f} % of the step (median)"
        )


if __name__ == "__main__":
    main()
