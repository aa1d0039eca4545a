"""``control copy`` (AdaptCopy): replay an Adam / RMSprop run's rates in SGD + Layca.

Task: scikit-learn's digits with the CNN of ``control_auto.py``. The source run
trains with Adam (or RMSprop) under ``layrot.watch``; the target run trains
SGD momentum 0.9 wrapped in ``layrot.Layca`` with ``watch(..., control=True)``
while the real ``layrot-agent control copy --from SOURCE TARGET`` process
sends the source's per-layer, per-step rates tan(step angle) as RateTable
windows. Both runs see the same batches.

Prints: how well the target's measured step angles match the recorded ones
(relative error, over the steps the tables governed), the final per-layer
rotations of both runs (float64 from the weights), and test accuracies.

    python benchmarks/control_copy.py [--steps 1000] [--source adam|rmsprop] [--window-steps 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import control_auto as B  # noqa: E402  (digits, the CNN, training loop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--source", choices=["adam", "rmsprop"], default="adam")
    ap.add_argument("--lr", type=float, default=None, help="source learning rate (Adam 1e-3, RMSprop 1e-3)")
    ap.add_argument("--window-steps", type=int, default=200, help="steps per RateTable command (0 = one table)")
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import layrot
    from layrot.client.query import QueryClient
    from layrot.server.app import Collector

    data = B.digits()
    src_name, dst_name = f"{args.source}-src", "sgd-layca-copy"
    with (
        tempfile.TemporaryDirectory() as tmp,
        Collector(grpc_port=0, metrics_port=None, db_path=Path(tmp) / "copy.db") as c,
    ):
        # ---- source
        model = B.make_model(args.seed)
        w0s = [p.detach().clone() for p in B.layer_params(model)]
        lr = args.lr or 1e-3
        opt = (
            torch.optim.Adam(model.parameters(), lr=lr)
            if args.source == "adam"
            else torch.optim.RMSprop(model.parameters(), lr=lr)
        )
        handle = layrot.watch(model, opt, run=src_name, collector=c.grpc_address)
        B.train(model, opt, args.steps, data, observe=handle.observe_loss)
        handle.flush(30)
        handle.close()
        src_rot = [B.cosine_distance(a, b) for a, b in zip(w0s, B.layer_params(model))]
        src_acc = B.accuracy(model, data[2], data[3])

        # ---- target, steered by the CLI process
        model = B.make_model(args.seed)
        w0t = [p.detach().clone() for p in B.layer_params(model)]
        opt = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=3**-3, rho_max=1.0)
        handle = layrot.watch(model, opt, run=dst_name, collector=c.grpc_address, control=True)
        cmd = [
            sys.executable,
            "-m",
            "layrot.cli.main",
            "control",
            "copy",
            "--from",
            src_name,
            dst_name,
            "--interval",
            str(args.interval),
            "--collector",
            c.grpc_address,
        ]
        if args.window_steps:
            cmd += ["--window-steps", str(args.window_steps)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        governed: list[int] = []

        def every_step(t: int) -> None:
            if t == 1:  # start the replay cleanly: wait for the first window before step 2
                deadline = time.monotonic() + 30
                while handle.stats.commands_received == 0 and time.monotonic() < deadline:
                    time.sleep(0.005)
            if opt.rule.source(t)[0] == "table":
                governed.append(t)

        t0 = time.perf_counter()
        B.train(model, opt, args.steps, data, every_step=every_step, observe=handle.observe_loss)
        train_s = time.perf_counter() - t0
        handle.flush(30)
        out, err = proc.communicate(timeout=120)
        handle.close()
        if proc.returncode != 0:
            raise RuntimeError(f"control copy failed: {err.strip()[-2000:]}")
        dst_rot = [B.cosine_distance(a, b) for a, b in zip(w0t, B.layer_params(model))]
        dst_acc = B.accuracy(model, data[2], data[3])
        with QueryClient(c.grpc_address) as q:
            hs, ht = q.history(src_name), q.history(dst_name)
            versions = len({a["version"] for a in q.get_control(dst_name)["audit"] if a["event"] == "applied"})

    idx = np.asarray(governed) - 1
    want = hs.step_angle[idx]
    got = ht.step_angle[idx]
    rel = np.abs(got - want) / want
    names = hs.layer_names
    print(
        f"digits CNN, {args.steps} steps; source {args.source} lr {lr:g}; target SGD momentum 0.9 + Layca, "
        f"'control copy' process, windows of {args.window_steps or 'all'} steps ({versions} commands applied)"
    )
    print(
        f"steps governed by the replayed tables: {len(governed)} of {args.steps} (the first step ran before "
        f"the first window); training {train_s:.1f} s"
    )
    print(f"step angle, replay vs recorded: max rel error {rel.max():.2e}, median {np.median(rel):.2e}")
    print(f"{'layer':<10} {'source rot':>10} {'replay rot':>10} {'diff':>8}")
    for n, a, b in zip(names, src_rot, dst_rot):
        print(f"{n:<10} {a:>10.3f} {b:>10.3f} {b - a:>+8.3f}")
    diff = np.abs(np.array(dst_rot) - np.array(src_rot))
    print(f"final rotation |replay - source|: max {diff.max():.3f}, mean {diff.mean():.3f}")
    print(f"test accuracy: source {src_acc:.4f}, replay {dst_acc:.4f}")


if __name__ == "__main__":
    main()
