"""Training-step cost of an offline run (spool only) vs a live collector vs no hook, then a sync.

A small digits-sized CNN (the demo's ``conv_net``, batch 32, CPU) trains three
times side by side from the same initial weights: without the hook, with
``layrot.watch(..., collector="offline")`` (every step goes to the on-disk spool
only) and with a live collector (a real ``layrot-agent serve`` in another
process; the spool is on there too). The steps are interleaved in rounds, so
drift in machine load hits all three alike; each round gives the median step
time per configuration, and the ratios over the hook-free step are summarised
by min / median / max over rounds.

Then ``layrot-agent sync`` (the real command, in a subprocess) uploads the
offline run's spool to the collector, and the history is checked: every one of
the offline run's steps is there, and its values equal the live run's.

    python benchmarks/offline_overhead.py                 # 20,000 steps per configuration
    python benchmarks/offline_overhead.py --steps 2000    # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collector_proc import start_collector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20_000, help="training steps per configuration")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (steps are split across them)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="layrot-offline-bench-")
    os.environ["LAYROT_SPOOL_DIR"] = os.path.join(tmp, "spool")
    import numpy as np
    import torch

    import layrot
    from layrot.cli.demo import conv_net
    from layrot.client.query import QueryClient

    torch.set_num_threads(args.threads)
    proc, address = start_collector(tmp)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(512, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (512,), generator=g)
        torch.manual_seed(0)
        base = conv_net()
        models = {name: conv_net() for name in ("none", "offline", "live")}
        for m in models.values():
            m.load_state_dict(base.state_dict())
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
        handles = {
            "offline": layrot.watch(models["offline"], opts["offline"], run="bench-offline", collector="offline"),
            "live": layrot.watch(models["live"], opts["live"], run="bench-live", collector=address),
        }
        batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)]
        per_round = max(1, args.steps // args.rounds)
        done = dict.fromkeys(models, 0)
        medians: dict[str, list[float]] = {k: [] for k in models}
        order = list(models)
        for r in range(args.rounds):
            n = per_round if r < args.rounds - 1 else args.steps - per_round * (args.rounds - 1)
            for name in order[r % 3 :] + order[: r % 3]:  # rotate who goes first
                model, opt, handle = models[name], opts[name], handles.get(name)
                times = []
                for i in range(n):
                    xb, yb = batches[(done[name] + i) % len(batches)]
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
                    if handle is not None:
                        handle.observe_loss(loss)
                    opt.step()
                    times.append(time.perf_counter() - t0)
                done[name] += n
                medians[name].append(statistics.median(times))
        flushed = handles["live"].flush(120.0)
        stats = {k: h.stats for k, h in handles.items()}
        for h in handles.values():
            h.close(timeout=30.0)

        t0 = time.perf_counter()
        sync = subprocess.run(
            [sys.executable, "-m", "layrot.cli.main", "sync", "--collector", address],
            capture_output=True,
            text=True,
            env=os.environ,
        )
        sync_s = time.perf_counter() - t0
        q = QueryClient(address)
        off, live = q.history("bench-offline"), q.history("bench-live")
        same = bool(
            np.array_equal(off.steps, live.steps)
            and all(np.array_equal(getattr(off, k), getattr(live, k)) for k in ("rotation", "step_angle"))
        )
    finally:
        proc.kill()

    def summary(name: str) -> dict[str, float]:
        ratios = [a / b for a, b in zip(medians[name], medians["none"])]
        return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}

    out = {
        "steps": args.steps,
        "rounds": args.rounds,
        "step_ms_none": 1e3 * statistics.median(medians["none"]),
        "offline_over_none": summary("offline"),
        "live_over_none": summary("live"),
        "offline_over_live": {
            "median": statistics.median(a / b for a, b in zip(medians["offline"], medians["live"])),
        },
        "live_flushed": flushed,
        "offline_dropped": stats["offline"].dropped,
        "live_dropped": stats["live"].dropped,
        "sync_exit": sync.returncode,
        "sync_seconds": sync_s,
        "sync_summary": sync.stdout.strip().splitlines()[-1] if sync.stdout.strip() else sync.stderr.strip(),
        "offline_steps_in_history": len(off.steps),
        "live_steps_in_history": len(live.steps),
        "offline_history_equals_live": same,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"small CNN, batch 32, {args.threads} torch thread(s), {args.steps} steps per configuration", end="")
    print(f", {args.rounds} interleaved rounds")
    print(f"hook-free step: {out['step_ms_none']:.3f} ms (median)")
    for key in ("offline_over_none", "live_over_none"):
        s = out[key]
        print(f"{key:>18}: min {s['min']:.3f}  median {s['median']:.3f}  max {s['max']:.3f}")
    print(f"{'offline_over_live':>18}: median {out['offline_over_live']['median']:.3f}")
    print(f"dropped: offline {out['offline_dropped']}, live {out['live_dropped']}; live flush {flushed}")
    print(f"sync: exit {sync.returncode} in {sync_s:.1f} s: {out['sync_summary']}")
    print(
        f"history: offline run {len(off.steps)} of {args.steps} steps, live run {len(live.steps)}; "
        f"offline values equal live values: {same}"
    )


if __name__ == "__main__":
    main()
