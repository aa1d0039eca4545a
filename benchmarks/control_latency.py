"""Latency of remote control: SetControl call -> the job's ControlAck at the collector.

A real collector (embedded here, gRPC on loopback) and a real training job in
its own process (a CNN on random CIFAR-shaped batches, ``layrot.Layca`` around
SGD momentum, ``layrot.watch(..., control=True)``). Each trial sends a new
command through the Query service and measures the time from just before the
SetControl call to the job's ControlAck arriving at the collector (the
collector's audit time of the "applied" event; same host, same clock), and how
many optimizer steps that spanned. The bound to meet is one step + 200 ms.

Afterwards the per-step history is checked: from the step each command was
applied, the job's reported rates equal the command's, and the collector's
measured step angles equal arctan(rate).

A few trials also run the real CLI (``layrot-agent control set ... --wait``)
as a separate process; its wall time includes Python start-up.

    python benchmarks/control_latency.py [--trials 40] [--batch 32] [--cli-trials 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


# ---------------------------------------------------------------- the job (child process)
def job_main(address: str, run: str, batch: int, threads: int) -> None:
    import torch

    import layrot
    from layrot.cli.demo import conv_net

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = conv_net((32, 64, 64), hidden=128, in_channels=3, side=32, pool_from=0)
    opt = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, alpha=0.5)
    handle = layrot.watch(model, opt, run=run, collector=address, control=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    times = []
    while not stop.is_set():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        handle.observe_loss(loss)
        opt.step()
        times.append(time.perf_counter() - t0)
    handle.close()
    print(f"steps {len(times)} median_step_s {statistics.median(times):.6f}", flush=True)


# ---------------------------------------------------------------- the benchmark (parent)
def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--cli-trials", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="job batch size (sets the step time)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the job")
    ap.add_argument("--job", nargs=2, metavar=("ADDRESS", "RUN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        job_main(args.job[0], args.job[1], args.batch, args.threads)
        return

    from layrot.client.query import QueryClient
    from layrot.controllers.profile import profile_command
    from layrot.core.rates import alpha_profile
    from layrot.server.app import Collector

    run = "latency"
    with (
        tempfile.TemporaryDirectory() as tmp,
        Collector(grpc_port=0, metrics_port=None, db_path=Path(tmp) / "latency.db") as c,
    ):
        child = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--job",
                c.grpc_address,
                run,
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        q = QueryClient(c.grpc_address)
        try:
            deadline = time.monotonic() + 60
            while run not in c.state.runs or not c.state.runs[run].last:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise RuntimeError("the training job did not start")
                time.sleep(0.05)
            time.sleep(1.0)  # warm up
            L = c.state.runs[run].num_layers
            latencies, spans, commands = [], [], []
            rng = random.Random(0)
            for i in range(args.trials):
                rho0, alpha = (0.02, -0.3) if i % 2 == 0 else (0.03, 0.3)
                cmd = profile_command(alpha=alpha, rho0=rho0, reason=f"latency trial {i}")
                step_before = q.get_run(run)["step"]
                t_call = time.time()
                version = q.set_control(run, cmd)["requested_version"]
                while True:
                    st = q.get_control(run)
                    if st["applied_version"] >= version or st["rejected_reason"]:
                        break
                    time.sleep(0.002)
                if st["rejected_reason"]:
                    raise RuntimeError(f"the job rejected trial {i}: {st['rejected_reason']}")
                t_ack = next(a["time"] for a in st["audit"] if a["event"] == "applied" and a["version"] == version)
                latencies.append(t_ack - t_call)
                spans.append(st["applied_step"] - step_before)
                commands.append((st["applied_step"], rho0 * alpha_profile(alpha, L)))
                time.sleep(rng.uniform(0.05, 0.25))
            cli_times = []
            for _ in range(args.cli_trials):
                t0 = time.time()
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "layrot.cli.main",
                        "control",
                        "set",
                        run,
                        "--rho0",
                        "0.01",
                        "--alpha",
                        "0",
                        "--wait",
                        "10",
                        "--collector",
                        c.grpc_address,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                cli_times.append(time.time() - t0)
                if out.returncode != 0 or "applied by the job" not in out.stdout:
                    raise RuntimeError(f"CLI trial failed: {out.stdout} {out.stderr}")
                commands.append((q.get_control(run)["applied_step"], np.full(L, 0.01)))
            time.sleep(0.5)
        finally:
            out, _ = child.communicate(input="", timeout=60)
            q_hist = q.history(run)
            q.close()
    parts = out.split()
    step_s = float(parts[parts.index("median_step_s") + 1])

    # From each applied step to the next command: reported rates and measured angles follow the command.
    steps = q_hist.steps
    worst_rate, worst_angle, checked = 0.0, 0.0, 0
    bounds = [s for s, _ in commands] + [int(steps.max()) + 1]
    for (first, rates), end in zip(commands, bounds[1:]):
        sel = (steps >= first) & (steps < min(end, first + 1000))
        if not sel.any():
            continue
        worst_rate = max(worst_rate, float(np.max(np.abs(q_hist.rho[sel] - rates) / rates)))
        worst_angle = max(
            worst_angle, float(np.max(np.abs(q_hist.step_angle[sel] - np.arctan(rates)) / np.arctan(rates)))
        )
        checked += int(sel.sum())

    ms = [x * 1e3 for x in latencies]
    bound = step_s + 0.2
    print(
        f"job: CNN (3 conv + 2 linear, {L} layers), batch {args.batch}, torch threads {args.threads}; "
        f"median step {step_s * 1e3:.1f} ms"
    )
    print(
        f"SetControl call -> ControlAck at the collector, {len(ms)} trials: median {statistics.median(ms):.1f} ms, "
        f"p95 {percentile(ms, 95):.1f} ms, max {max(ms):.1f} ms"
    )
    print(
        f"steps between the call and the first governed step: median {statistics.median(spans):.0f}, max {max(spans)}"
    )
    print(
        f"bound one step + 200 ms = {bound * 1e3:.1f} ms: "
        f"p95 {'within' if percentile(ms, 95) <= bound * 1e3 else 'ABOVE'}"
        f", max {'within' if max(ms) <= bound * 1e3 else 'ABOVE'}"
    )
    if cli_times:
        print(
            f"full CLI process 'layrot-agent control set --wait' (Python start-up included): "
            f"median {statistics.median(cli_times) * 1e3:.0f} ms over {len(cli_times)} runs"
        )
    print(
        f"after each ack ({checked} steps checked): reported rho vs command max rel {worst_rate:.1e}; "
        f"measured step angle vs arctan(rho) max rel {worst_angle:.1e}"
    )


if __name__ == "__main__":
    main()
