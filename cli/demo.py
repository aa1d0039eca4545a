"""``layrot-agent demo``: a real small training job, monitored end to end.

Starts an embedded collector (gRPC + /metrics + SQLite history) on free local
ports, trains a small CNN with BatchNorm on scikit-learn's bundled 8x8 digits
with the one hook line, then prints a per-layer summary, the path of the layer
rotation curves PNG and the /metrics URL.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

log = logging.getLogger(__name__)


def digits() -> tuple[Any, Any, Any, Any]:
    """scikit-learn's bundled digits as (N, 1, 8, 8) tensors in [0, 1], a fixed 1500 / 297 split."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1500], perm[1500:]
    return x[train], y[train], x[test], y[test]


def conv_net(
    widths: tuple[int, ...] = (16, 32, 32),
    hidden: int = 64,
    in_channels: int = 1,
    side: int = 8,
    first_kernel: int = 3,
    pool_from: int = 1,
) -> Any:
    """Conv-BN-ReLU blocks (a 2x2 max-pool after block ``pool_from`` and every later one), two Linear layers.

    The demo's network; the benchmarks build theirs from it too (other widths and inputs).
    """
    from torch import nn

    layers: list[Any] = []
    cin = in_channels
    for i, w in enumerate(widths):
        k = first_kernel if i == 0 else 3
        layers += [nn.Conv2d(cin, w, k, padding=k // 2), nn.BatchNorm2d(w), nn.ReLU()]
        if i >= pool_from:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        cin = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def run_demo(
    steps: int = 300, every: int = 1, out: str | None = None, serve: bool = False, lr: float = 0.1, batch_size: int = 64
) -> dict[str, Any]:
    """Run the demo; returns what it printed as a dict (paths, accuracy, per-layer rows)."""
    import torch

    import layrot
    from layrot.client.figures import plot_layer_rotation_curves
    from layrot.client.query import QueryClient
    from layrot.server.app import Collector

    out_dir = Path(out or "layrot-demo").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    model = conv_net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"

    collector = Collector(grpc_port=0, metrics_port=0, db_path=out_dir / "layrot-demo.db").start()
    click.echo(
        f"collector: grpc {collector.grpc_address}, metrics {collector.metrics_url}, "
        f"history {out_dir / 'layrot-demo.db'}"
    )
    try:
        handle = layrot.watch(model, opt, run=run, every=every, collector=collector.grpc_address)
        g = torch.Generator().manual_seed(1)
        losses: list[float] = []
        t0 = time.perf_counter()
        bar: Any
        with click.progressbar(
            length=steps,
            label="training",
            show_pos=True,
            item_show_func=lambda _: f"loss {losses[-1]:.3f}" if losses else "",
        ) as bar:
            for step in range(steps):
                idx = torch.randint(0, len(ytr), (batch_size,), generator=g)
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                handle.observe_loss(loss)
                opt.step()
                if step % 10 == 0 or step == steps - 1:
                    losses.append(float(loss.detach()))  # a host sync for the bar; the hook makes none
                bar.update(1, None)
        train_s = time.perf_counter() - t0
        handle.flush(10.0)
        handle.close()
        model.eval()
        with torch.no_grad():
            acc = float((model(xte).argmax(1) == yte).float().mean())

        client = QueryClient(collector.grpc_address)
        detail = client.get_run(run)
        hist = client.history(run)
        client.close()
        png = out_dir / f"{run}-curves.png"
        plot_layer_rotation_curves(
            hist.steps, hist.rotation, hist.layer_names, png, title=f"Layer rotation curves: {run} (SGD, digits)"
        )

        click.echo(
            f"\ntrained {handle.step} steps in {train_s:.1f}s; test accuracy {acc:.3f}; "
            f"{handle.stats.acked_steps} reported steps stored, {handle.stats.dropped} dropped\n"
        )
        header = f"{'idx':>3}  {'layer':<12} {'shape':<16} {'rotation':>9} {'step angle':>12} {'|w|':>8}"
        click.echo(header)
        click.echo("-" * len(header))
        for lay in detail["layers"]:
            shape = "x".join(str(s) for s in lay["shape"])
            click.echo(
                f"{lay['index']:>3}  {lay['name']:<12} {shape:<16} {lay['rotation']:9.4f} "
                f"{np.degrees(lay['step_angle']):10.4f}deg {lay['weight_norm']:8.3f}"
            )
        click.echo(f"\nlayer rotation curves: {png}")
        click.echo(f"metrics:               {collector.metrics_url}")
        if not serve:
            click.echo(
                "(the embedded collector stops now; rerun with --serve to keep /metrics and the "
                "query API up, e.g. for `layrot-agent show RUN --collector ADDR`)"
            )
        result = {
            "run": run,
            "png": str(png),
            "metrics_url": collector.metrics_url,
            "accuracy": acc,
            "layers": detail["layers"],
            "steps": handle.step,
            "train_seconds": train_s,
        }
        if serve:
            click.echo("\ncollector keeps serving; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return result
    finally:
        collector.stop()
