"""``control auto`` on a small real task vs plain SGD at its best learning rate.

Task: scikit-learn's bundled 8x8 digits (1500 train / 297 test images), a CNN
with BatchNorm (5 layers: three convolutions, two linear layers).

- auto: SGD momentum 0.9 wrapped in ``layrot.Layca`` (rho0 = 3^-3, x0.2 decays at
  80/90/97 % of training), watched with ``control=True``, steered by the real
  ``layrot-agent control auto`` CLI process through an embedded collector.
- plain SGD momentum 0.9 with the same step decays, learning rates swept; the
  best is the one with the highest test accuracy (ties: the larger rotation).

2000 steps by default: the law is the same at any length, but at 1000 steps
the reference reaches the target within 200 steps, while the CLI process
sends its first command 20-40 steps into the run and then one every ~6 steps.
Measured with the CLI process: at 1000 steps the smallest layer ended at
0.885-0.981 over 16 runs (one below 0.9), at 2000 steps at 0.934-0.998 with
no loss hold or back-off at all.

Rotations are the cosine distance of each layer's weights to their
initialization, computed here in float64 from the weights (independently of
the collector). Prints per-layer rotations, the median and minimum, and test
accuracy of both; with several seeds, a table and the claim over all of them.

    python benchmarks/control_auto.py [--seeds 0-7] [--steps 2000] [--lrs 0.01,0.03,0.1,0.3]
                                      [--interval 0.1] [--step-sleep 0.02]

``--inline`` ticks the controller from the training loop instead (every 10
steps, through the collector). ``--ablation`` measures the parts of the control
law: the policy driven in-process (no collector, deterministic) with the CLI's
timing imitated (an update every 7-13 steps, applied 2-3 steps later, the first
15-30 steps late), 2 timings per seed, for the law and variants without each
part, plus fixed multipliers (first and last layer at the cap, the others at
1x-3x) that show why the coupling exists:

    python benchmarks/control_auto.py --ablation [--seeds 0-7] [--variants law,no-couple,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layrot.cli.demo import conv_net, digits

BATCH = 64
MILESTONES = (0.8, 0.9, 0.97)


def make_model(seed: int = 0) -> nn.Module:
    """Conv(1->32, 5x5) - Conv(32->32) - pool - Conv(32->32) - pool - Linear(128->64) - Linear(64->10).

    BatchNorm after the convolutions.
    """
    torch.manual_seed(seed)
    return conv_net((32, 32, 32), hidden=64, first_kernel=5)


def layer_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.ndim >= 2]


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - cos(a, b) as |a^ - b^|^2 / 2 in float64 (no cancellation)."""
    u = a.detach().double().flatten()
    v = b.detach().double().flatten()
    d = torch.linalg.vector_norm(u / u.norm() - v / v.norm())
    return float(0.5 * d * d)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    data: tuple,
    seed: int = 1,
    sched: Any = None,
    every_step: Any = None,
    observe: Any = None,
) -> None:
    xtr, ytr = data[0], data[1]
    g = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(ytr), (BATCH,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        loss.backward()
        if observe is not None:
            observe(loss)
        opt.step()
        if sched is not None:
            sched.step()
        if every_step is not None:
            every_step(t)


def run_sgd(lr: float, steps: int, data: tuple, seed: int = 0) -> dict[str, Any]:
    """Plain SGD momentum 0.9 with x0.2 decays at 80/90/97 %: final rotations and test accuracy."""
    model = make_model(seed)
    w0 = [p.detach().clone() for p in layer_params(model)]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [round(m * steps) for m in MILESTONES], 0.2)
    train(model, opt, steps, data, sched=sched)
    rot = [cosine_distance(a, b) for a, b in zip(w0, layer_params(model))]
    return {"lr": lr, "rotation": rot, "acc": accuracy(model, data[2], data[3])}


def make_auto_job(address: str, run: str, steps: int, seed: int = 0) -> tuple[nn.Module, Any, Any, list]:
    """The controlled job: Layca(SGD momentum 0.9) at 3^-3 with the step decays, watch(control=True)."""
    import layrot
    from layrot.core.rates import RhoSchedule

    model = make_model(seed)
    w0 = [p.detach().clone() for p in layer_params(model)]
    schedule = RhoSchedule(rho0=3**-3, kind="step", milestones=MILESTONES, total_steps=steps)
    # rho_max 1.0: the controller itself stays below its own --rho-max (0.5).
    opt = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), schedule=schedule, rho_max=1.0)
    handle = layrot.watch(
        model, opt, run=run, collector=address, control=True, reporter_options={"flush_interval": 0.02}
    )
    return model, opt, handle, w0


def run_auto_inline(
    address: str, run: str, steps: int, data: tuple, tick_every: int = 10, seed: int = 0, **controller: Any
) -> dict[str, Any]:
    """The auto controller ticked from the training loop every ``tick_every`` steps (deterministic timing).

    Measurements and commands still travel through the real collector: the
    controller reads rotations with GetRun and sends commands with SetControl.
    """
    from layrot.client.query import QueryClient
    from layrot.controllers.auto import AutoController

    model, opt, handle, w0 = make_auto_job(address, run, steps, seed)
    q = QueryClient(address)
    ctl = AutoController(q, run, steps, **controller)

    def every_step(t: int) -> None:
        if t % tick_every == 0 and t < steps:
            handle.flush()  # the controller sees the rotations of step t
            if ctl.tick(q.get_run(run)) is not None:
                # Deterministic timing: the command governs step t + 1 exactly.
                deadline = time.monotonic() + 5.0
                while handle.stats.commands_received < len(ctl.versions) and time.monotonic() < deadline:
                    time.sleep(0.001)

    try:
        train(model, opt, steps, data, every_step=every_step, observe=handle.observe_loss)
        handle.flush()
    finally:
        handle.close()
        q.close()
    rot = [cosine_distance(a, b) for a, b in zip(w0, layer_params(model))]
    return {
        "rotation": rot,
        "acc": accuracy(model, data[2], data[3]),
        "versions": len(ctl.versions),
        "multipliers": None if ctl.multipliers is None else ctl.multipliers.tolist(),
        "backoffs": ctl.policy.backoffs if ctl.policy is not None else 0,
    }


def run_auto_cli(
    address: str, run: str, steps: int, data: tuple, interval: float, seed: int = 0, step_sleep: float = 0.0
) -> dict[str, Any]:
    """The real ``layrot-agent control auto`` process steering a job trained here."""
    model, opt, handle, w0 = make_auto_job(address, run, steps, seed)
    cmd = [
        sys.executable,
        "-m",
        "layrot.cli.main",
        "control",
        "auto",
        run,
        "--target",
        "1.0",
        "--total-steps",
        str(steps),
        "--interval",
        str(interval),
        "--collector",
        address,
        "--json",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.perf_counter()

        def every_step(t: int) -> None:
            if step_sleep:
                time.sleep(step_sleep)

        train(model, opt, steps, data, every_step=every_step, observe=handle.observe_loss)
        handle.flush()
        train_s = time.perf_counter() - t0
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        handle.close()
    if proc.returncode != 0:
        raise RuntimeError(f"control auto failed ({proc.returncode}): {err.strip()[-2000:]}")
    summary = json.loads(out)
    rot = [cosine_distance(a, b) for a, b in zip(w0, layer_params(model))]
    from layrot.client.query import QueryClient

    with QueryClient(address) as q:
        loss = q.history(run).loss
    return {
        "rotation": rot,
        "acc": accuracy(model, data[2], data[3]),
        "versions": len(summary["versions"]),
        "multipliers": summary["multipliers"],
        "stopped": summary["reason"],
        "train_s": train_s,
        "backoffs": summary["backoffs"],
        "holds": summary.get("holds", 0),
        "collector_rotation": summary["rotation"],
        "loss_by_tenth": [float(np.nanmean(x)) for x in np.array_split(loss, 10)],
    }


def best_sgd(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest test accuracy; ties go to the larger median rotation (the stronger baseline)."""
    return max(results, key=lambda r: (round(r["acc"], 6), float(np.median(r["rotation"]))))


#: CLI-like controller timings for the in-process loop: (update every, +-jitter, lag, first update at, rng seed).
TIMINGS = ((10, 3, 2, 15, 1), (10, 3, 3, 30, 2))
RHO0 = 3**-3


def run_auto_local(
    steps: int,
    data: tuple,
    seed: int = 0,
    timing: tuple = TIMINGS[0],
    rho_max: float = 0.4,
    fixed: list[float] | None = None,
    **policy: Any,
) -> dict[str, Any]:
    """The auto law (:class:`~layrot.controllers.auto.AutoPolicy`) driven in-process, deterministically.

    No collector: rotations come from the weights in float64 at each update, the
    loss guard reads the losses of the steps since the previous update, and the
    multipliers are installed with ``Layca.set_rule`` ``lag`` steps after the
    update that chose them. ``fixed`` replaces the law by constant multipliers.
    """
    import layrot
    from layrot.controllers.auto import INITIAL_LOSSES, AutoPolicy
    from layrot.core.rates import RhoSchedule

    every, jitter, lag, start, rng_seed = timing
    model = make_model(seed)
    params = layer_params(model)
    w0 = [p.detach().clone() for p in params]
    schedule = RhoSchedule(rho0=RHO0, kind="step", milestones=MILESTONES, total_steps=steps)
    opt = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), schedule=schedule, rho_max=1.0)
    if fixed is not None:
        opt.set_rule(multipliers=list(fixed))
    policy = {"settle_from": MILESTONES[0], **policy}
    law = (
        None
        if fixed is not None
        else AutoPolicy(num_layers=len(params), total_steps=steps, max_mult=rho_max / RHO0, **policy)
    )
    rng = np.random.default_rng(rng_seed)
    pending: list[tuple[int, np.ndarray]] = []
    losses: list[torch.Tensor] = []
    state = {"next": max(start, every + int(rng.integers(-jitter, jitter + 1))), "from": 0}

    def observe(loss: torch.Tensor) -> None:
        losses.append(loss.detach())

    def every_step(t: int) -> None:
        while pending and pending[0][0] <= t + 1:  # governs step t + 1
            opt.set_rule(multipliers=pending.pop(0)[1].tolist())
        if law is None or t < state["next"] or t >= steps:
            return
        if math.isnan(law.first_loss):
            law.set_initial_loss(float(torch.stack(losses[:INITIAL_LOSSES]).double().mean()))
        law.observe_loss(float(torch.stack(losses[state["from"] : t]).double().mean()), t)
        state["from"] = t
        rot = np.array([cosine_distance(a, b) for a, b in zip(w0, params)])
        pending.append((t + 1 + lag, law.update(t, rot)))
        state["next"] = t + every + int(rng.integers(-jitter, jitter + 1))

    train(model, opt, steps, data, every_step=every_step, observe=observe)
    rot = [cosine_distance(a, b) for a, b in zip(w0, params)]
    return {"rotation": rot, "acc": accuracy(model, data[2], data[3]), "backoffs": 0 if law is None else law.backoffs}


#: name -> (AutoPolicy keyword arguments, controller rho_max, fixed multipliers or None).
VARIANTS: dict[str, tuple[dict[str, Any], float, Any]] = {
    "law": ({}, 0.4, None),
    "no-couple": ({"couple": 0.0}, 0.4, None),
    "slow-leaders": ({"min_mult": 0.25}, 0.4, None),
    "no-hold": ({"loss_hold": 0.0}, 0.4, None),
    "guard-every-update": ({"backoff_every": 0.0}, 0.4, None),
    "no-settle": ({"settle_tol": 0.0}, 0.4, None),
    "ki80": ({"ki": 80.0}, 0.4, None),
    "rho_max0.5": ({}, 0.5, None),
    **{f"fixed-{k:g}x": ({}, 0.4, k) for k in (1.0, 1.5, 2.0, 2.5, 3.0)},
}


def ablation(args: argparse.Namespace, seeds: list[int], data: tuple) -> None:
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    print(
        f"ablation: digits CNN, {args.steps} steps, seeds {seeds}; law variants x {len(TIMINGS)} CLI-like timings,"
        f" fixed multipliers once per seed (first/last layer at the cap 0.4/rho0, the others at k)"
    )
    print(
        f"{'variant':<20} {'runs':>4} {'mean-min':>8} {'worst':>6} {'<0.92':>5} {'<0.90':>5} {'acc mean':>8}"
        f" {'acc worst':>9} {'back-offs':>9}"
    )
    for name in names:
        kw, rho_max, k = VARIANTS[name]
        runs = []
        for seed in seeds:
            if k is not None:
                cap = 0.4 / RHO0
                fixed = [cap] + [k] * (len(layer_params(make_model(seed))) - 2) + [cap]
                runs.append(run_auto_local(args.steps, data, seed, fixed=fixed))
            else:
                runs += [run_auto_local(args.steps, data, seed, timing, rho_max, **kw) for timing in TIMINGS]
        mins = np.array([min(r["rotation"]) for r in runs])
        accs = np.array([r["acc"] for r in runs])
        print(
            f"{name:<20} {len(runs):>4} {mins.mean():>8.3f} {mins.min():>6.3f} {(mins < 0.92).sum():>5}"
            f" {(mins < 0.9).sum():>5} {accs.mean():>8.4f} {accs.min():>9.4f} {sum(r['backoffs'] for r in runs):>9}",
            flush=True,
        )


def parse_seeds(text: str) -> list[int]:
    """ "0-7" or "0,2,5" (or a mix)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=2000,
        help="training steps of each run (the digits CNN reaches 99 %% test accuracy in 1000; at 1000"
        " the CLI's reaction time is a larger part of the early push, see the module docstring)",
    )
    ap.add_argument("--lrs", default="0.01,0.03,0.1,0.3")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between controller updates")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per training step (slower job)")
    ap.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    ap.add_argument("--seeds", default="0", help="seeds, e.g. 0-7 or 0,3,5")
    ap.add_argument(
        "--inline", action="store_true", help="tick the controller from the training loop instead of the CLI process"
    )
    ap.add_argument("--ablation", action="store_true", help="measure the parts of the law (in-process, no CLI)")
    ap.add_argument("--variants", default="", help=f"with --ablation: a subset of {','.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [args.seed] if args.seed is not None else parse_seeds(args.seeds)
    data = digits()
    if args.ablation:
        ablation(args, seeds, data)
        return
    from layrot.server.app import Collector

    table = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            with Collector(grpc_port=0, metrics_port=None, db_path=Path(tmp) / "auto.db") as c:
                t0 = time.perf_counter()
                if args.inline:
                    auto = run_auto_inline(c.grpc_address, "auto", args.steps, data, seed=seed)
                else:
                    auto = run_auto_cli(
                        c.grpc_address, "auto", args.steps, data, args.interval, seed=seed, step_sleep=args.step_sleep
                    )
                auto_s = time.perf_counter() - t0
        sgd = [run_sgd(float(lr), args.steps, data, seed=seed) for lr in args.lrs.split(",")]
        best = best_sgd(sgd)
        table.append((seed, auto, best))

        def row(name: str, r: dict[str, Any]) -> str:
            rot = np.asarray(r["rotation"])
            return (
                f"{name:<22} acc {r['acc']:.4f}  median {np.median(rot):.3f}  min {rot.min():.3f}  "
                f"[{', '.join(f'{x:.3f}' for x in rot)}]"
            )

        print(
            f"digits CNN, {args.steps} steps, batch {BATCH}, torch threads {args.threads}, seed {seed}"
            + (f", step sleep {args.step_sleep:g} s" if args.step_sleep else "")
        )
        print(row("Layca + control auto", auto))
        print(
            f"{'':<22} {auto['versions']} commands, {auto.get('backoffs', 0)} loss-guard back-offs"
            + (f", {auto['holds']} updates on hold" if "holds" in auto else "")
            + (f", stopped: {auto['stopped']}; training {auto['train_s']:.1f} s" if "stopped" in auto else "")
            + f"; total {auto_s:.1f} s"
        )
        if "loss_by_tenth" in auto:
            print(
                f"{'':<22} training loss by tenth of training [{', '.join(f'{x:.3f}' for x in auto['loss_by_tenth'])}]"
            )
        if auto.get("multipliers"):
            print(f"{'':<22} final multipliers [{', '.join(f'{m:.2f}' for m in auto['multipliers'])}]")
        for r in sgd:
            print(row(f"SGD lr={r['lr']:g}" + (" (best)" if r is best else ""), r), flush=True)
    print()
    print(
        f"{'seed':>4} | {'auto min':>8} {'median':>6} {'acc':>6} | "
        f"{'best SGD lr':>11} {'median':>6} {'min':>6} {'acc':>6}"
    )
    claim = True
    for seed, auto, best in table:
        ok = min(auto["rotation"]) >= 0.9 and float(np.median(best["rotation"])) < float(np.median(auto["rotation"]))
        claim = claim and ok
        print(
            f"{seed:>4} | {min(auto['rotation']):>8.3f} {np.median(auto['rotation']):>6.3f} {auto['acc']:>6.4f} | "
            f"{best['lr']:>11g} {np.median(best['rotation']):>6.3f} {min(best['rotation']):>6.3f} {best['acc']:>6.4f}"
            + ("" if ok else "  <- claim fails")
        )
    mins = [min(a["rotation"]) for _, a, _ in table]
    print(
        f"every auto layer >= 0.9 in {sum(m >= 0.9 for m in mins)} of {len(table)} seeds (>= 0.92 in "
        f"{sum(m >= 0.92 for m in mins)}); auto acc {min(a['acc'] for _, a, _ in table):.4f}-"
        f"{max(a['acc'] for _, a, _ in table):.4f}, best SGD acc {min(b['acc'] for _, _, b in table):.4f}-"
        f"{max(b['acc'] for _, _, b in table):.4f}"
    )
    print(f"claim (every auto layer >= 0.9, best SGD median lower): {'holds' if claim else 'DOES NOT HOLD'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
