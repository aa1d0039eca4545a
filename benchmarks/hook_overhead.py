"""Hook overhead of ``layrot.watch`` on a ResNet-18-sized CNN, side by side in one run.

Prints, for the collector up (a real ``layrot-agent serve`` in another process)
and down (nothing listening):

* training-step time with the hook over without, at every=1 and every=10;
* the hook's report cost over one ``SGD(momentum=0.9).step()`` on the same
  parameters (the device work a reported step adds, measured directly), for
  the fused C kernel the hook uses on CPU and, beside it, the ATen blocked
  pass it falls back to without a C compiler.

Configurations are interleaved in rounds and summarised by medians, so drift
in machine load hits all of them alike.

    python benchmarks/hook_overhead.py            # about 6 minutes on 2 cores
    python benchmarks/hook_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collector_proc import free_port, parse_overhead_args, running_collector  # noqa: E402
from models import ResNet18  # noqa: E402

import layrot  # noqa: E402
from layrot.hooks.torch_distances import LayerDistances  # noqa: E402


def train_steps(model, opt, x, y, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed training steps per configuration and round")
    ap.add_argument("--micro", type=int, default=30, help="repetitions of the report-cost microbenchmark")
    args = parse_overhead_args(ap)
    if args.quick:
        args.rounds, args.steps, args.micro = 1, 3, 5

    torch.manual_seed(0)
    model = ResNet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    n_params = sum(p.numel() for p in model.parameters())
    train_steps(model, opt, x, y, 3)  # warm up allocator and kernels

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, running_collector(tmp) as up_addr:
        down_addr = f"127.0.0.1:{free_port()}"
        for label, addr in (("collector up", up_addr), ("collector down", down_addr)):
            samples: dict[str, list[float]] = {"off": [], "every=1": [], "every=10": []}
            for rnd in range(args.rounds):
                for cfg in samples:
                    handle = None
                    if cfg != "off":
                        handle = layrot.watch(
                            model,
                            opt,
                            # One run per handle: a run belongs to the job (process) that made it.
                            run=f"bench-{label.split()[1]}-{cfg}-r{rnd}-{os.getpid()}",
                            every=int(cfg.split("=")[1]),
                            collector=addr,
                        )
                        train_steps(model, opt, x, y, 1)  # first step opens the session
                    samples[cfg] += train_steps(model, opt, x, y, args.steps)
                    if handle is not None:
                        handle.close(timeout=2.0)
            base = statistics.median(samples["off"])
            results[label] = {
                "step_s_off": base,
                "ratio_every1": statistics.median(samples["every=1"]) / base,
                "ratio_every10": statistics.median(samples["every=10"]) / base,
            }

            # Report cost vs one SGD(momentum=0.9).step() on the same parameters,
            # interleaved: the fused C kernel (the default on CPU) and the ATen blocked pass.
            handle = layrot.watch(model, opt, run=f"bench-micro-{label.split()[1]}-{os.getpid()}", collector=addr)
            train_steps(model, opt, x, y, 1)
            paths = {
                "fused": handle._distances,
                "aten": LayerDistances(handle._params, handle._w0, handle._prev, fused=False),
            }
            ref_opt = torch.optim.SGD(model.parameters(), lr=1e-12, momentum=0.9)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            times: dict[str, list[float]] = {"fused": [], "aten": [], "sgd": []}
            fake_step = handle.step
            for _ in range(args.micro):
                for name, dist in paths.items():
                    handle._distances = dist
                    fake_step += 1  # each report its own step: the collector refuses a step twice
                    t0 = time.perf_counter()
                    handle._report(fake_step)
                    times[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ref_opt.step()
                times["sgd"].append(time.perf_counter() - t0)
            handle._distances = paths["fused"]
            handle.close(timeout=2.0)
            med = {k: statistics.median(v) for k, v in times.items()}
            results[label].update(
                report_s=med["fused"],
                report_aten_s=med["aten"],
                sgd_step_s=med["sgd"],
                report_over_sgd=med["fused"] / med["sgd"],
                report_aten_over_sgd=med["aten"] / med["sgd"],
                report_path=paths["fused"].path,
            )

    if args.json:
        print(json.dumps({"params": n_params, "threads": torch.get_num_threads(), "results": results}, indent=2))
        return
    print(f"ResNet-18-sized CNN: {n_params / 1e6:.1f} M parameters, batch 32, CPU, {torch.get_num_threads()} threads")
    print(f"{'':16} {'step (off)':>11} {'every=1':>9} {'every=10':>9} {'report/SGD step':>16} {'(ATen pass)':>12}")
    for label, r in results.items():
        print(
            f"{label:16} {r['step_s_off'] * 1e3:9.0f}ms {r['ratio_every1']:9.3f} {r['ratio_every10']:9.3f} "
            f"{r['report_over_sgd']:16.2f} {r['report_aten_over_sgd']:12.2f}   "
            f"({r['report_path']} {r['report_s'] * 1e3:.1f} ms, ATen {r['report_aten_s'] * 1e3:.1f} ms, "
            f"SGD step {r['sgd_step_s'] * 1e3:.1f} ms)"
        )
    print("targets: every=1 <= 1.03, every=10 <= 1.01, report/SGD step <= 1.5")


if __name__ == "__main__":
    main()
