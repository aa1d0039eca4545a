"""Step time of Layca(SGD momentum) vs plain SGD momentum, side by side in one run.

ResNet-18 (CIFAR-style, 11.2 M parameters, 21 Layca layers) from ``models.py``,
batch 32 of 3x32x32 inputs, CPU. Runs alternate between the optimizers in
blocks so machine drift hits both equally; prints medians and ratios for the
whole training step (forward + backward + optimizer) and the optimizer step alone.

    python benchmarks/layca_overhead.py [--steps 12] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from models import ResNet18  # benchmarks/models.py (run this file as a script)
from torch import nn

from layrot.hooks.layca_torch import Layca


def make(kind: str):
    torch.manual_seed(0)
    model = ResNet18()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "sgd":
        return model, base
    return model, Layca(base, rho=3**-3, foreach=(kind == "layca-foreach"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per optimizer")
    ap.add_argument("--block", type=int, default=3, help="steps per block before switching optimizer")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = ["sgd", "layca", "layca-foreach"]
    setups = {k: make(k) for k in kinds}
    nparams = sum(p.numel() for p in setups["sgd"][0].parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    total = {k: [] for k in kinds}
    opt_only = {k: [] for k in kinds}

    def one_step(kind: str, record: bool) -> None:
        model, opt = setups[kind]
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if record:
            total[kind].append(t2 - t0)
            opt_only[kind].append(t2 - t1)

    for k in kinds:  # warm-up: allocator, momentum buffers, Layca snapshot
        for _ in range(2):
            one_step(k, record=False)
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for k in kinds:
            for _ in range(n):
                one_step(k, record=True)
        done += n

    med = {k: statistics.median(total[k]) for k in kinds}
    med_opt = {k: statistics.median(opt_only[k]) for k in kinds}
    print(
        f"ResNet-18, {nparams / 1e6:.1f} M parameters, {setups['layca'][1].num_layers} Layca layers, "
        f"batch 32, CPU, {torch.get_num_threads()} threads, {args.steps} timed steps each (median)"
    )
    print(f"{'optimizer':<26}{'train step ms':>14}{'ratio':>8}{'opt.step ms':>13}{'ratio':>8}")
    for k in kinds:
        label = {"sgd": "SGD momentum", "layca": "Layca(SGD) loop", "layca-foreach": "Layca(SGD) foreach"}[k]
        print(
            f"{label:<26}{med[k] * 1e3:>14.1f}{med[k] / med['sgd']:>8.3f}"
            f"{med_opt[k] * 1e3:>13.2f}{med_opt[k] / med_opt['sgd']:>8.2f}"
        )


if __name__ == "__main__":
    main()
