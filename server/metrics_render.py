"""The per-run series of ``/metrics`` (per layer and per run), rendered straight to text and cached per run.

Through ``prometheus_client``'s metric families every sample costs a few Python
objects and a format call per scrape: 100 runs of 200 layers took over a
second to scrape, 1,000 small runs as long. Here each run's lines are rendered
once per reported batch: the label part of every line (run, layer, index,
escaped) is built once per layer table, and a scrape re-renders only the runs
whose ``RunView`` changed since the previous scrape (a view is immutable and
replaced whole per batch, so identity says "changed"). What can change without
a batch (connected, the series budget) is a line per run, written each scrape.
The collector-level families stay with ``prometheus_client`` (server/metrics.py).

Series budget (``serve --max-series``, ``--aggregate-layers``): a run whose
per-layer series do not fit is exported through its run-level families only
(min / mean / max / quantiles of rotation, largest step angle, the generalization
indicator of core/indicator.py), with
``layrot_run_aggregate_only{run} 1``. Runs are served in order: connected
first, then by newest report, so a new job is not starved by old runs that
wait for their TTL.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from layrot.core.indicator import IndicatorSettings

if TYPE_CHECKING:  # pragma: no cover
    from layrot.server.state import RunState, RunView

__all__ = [
    "LAYER_FAMILIES",
    "QUANTILES",
    "RUN_FAMILIES",
    "RunSeries",
    "escape_label",
    "format_value",
    "series_budget",
]

# Runs rendered between two voluntary GIL releases of a scrape (a run of 50 layers: ~0.3 ms).
YIELD_EVERY_RUNS = 2

# (metric name, help, Snapshot attribute), in output order.
LAYER_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("layrot_layer_rotation", "Cosine distance between the layer's weights now and at initialization", "rotation"),
    (
        "layrot_layer_step_angle_radians",
        "Angle the layer's weights rotated in the last reported optimizer step",
        "step_angle",
    ),
    ("layrot_layer_weight_norm", "L2 norm of the layer's weights", "weight_norm"),
    ("layrot_layer_rho_applied", "Layca per-layer rotation rate the job applied at the last reported step", "rho"),
)
REQUESTED = (
    "layrot_layer_rho_requested",
    "Layca per-layer rate the current control command asks for at the run's newest step",
)
UNDER = (
    "layrot_layer_under_rotated",
    "1 for each layer still below the rotation target past the judged share of the run (only such layers)",
)
QUANTILES = (0.1, 0.5, 0.9)

# (exposed name, type, help), in output order. The *_total name is a counter's sample name.
RUN_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("layrot_run_step", "gauge", "Newest reported optimizer step"),
    ("layrot_run_last_report_timestamp_seconds", "gauge", "Unix time at which the newest reported step was measured"),
    ("layrot_run_layers", "gauge", "Number of monitored layers"),
    ("layrot_run_rotation_min", "gauge", "Smallest layer rotation of the run"),
    ("layrot_run_rotation_mean", "gauge", "Mean layer rotation of the run"),
    ("layrot_run_rotation_max", "gauge", "Largest layer rotation of the run"),
    ("layrot_run_rotation_quantile", "gauge", "Quantiles of the layer rotations of the run (over layers, NaN ignored)"),
    (
        "layrot_run_step_angle_max_radians",
        "gauge",
        "Largest single-step angle of any layer of the run in its newest reported step",
    ),
    (
        "layrot_run_aggregate_only",
        "gauge",
        "1 when the run's per-layer series are not exported (serve --max-series / --aggregate-layers):"
        " only its run-level families are",
    ),
    ("layrot_run_connected", "gauge", "1 while the run has an open session"),
    ("layrot_run_info", "gauge", "Run identity (value is always 1)"),
    ("layrot_run_loss", "gauge", "Newest reported training loss"),
    (
        "layrot_run_layers_at_target_ratio",
        "gauge",
        "Share of the run's layers whose rotation reached the target (serve --rotation-target; the paper's"
        " rule of thumb: every layer near 1)",
    ),
    (
        "layrot_run_layers_under_rotated",
        "gauge",
        "Layers still below the rotation target past the judged share of the announced run"
        " (serve --under-rotated-share; absent while not judged or when the run announced no length)",
    ),
    (
        "layrot_run_nonfinite_samples_total",
        "counter",
        "Layer samples with NaN/Inf norms or distances (the run diverged)",
    ),
)


def escape_label(value: str) -> str:
    """A label value as the exposition format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(x: float) -> str:
    """A sample value as Prometheus' parser reads it (``prometheus_client.utils.floatToGoString``'s spelling)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))


def _values(a: np.ndarray) -> list[str]:
    """``format_value`` of every element; the common all-finite case through C (json's float repr)."""
    if a.size == 0:
        return []
    if np.isfinite(a).all():
        # json.dumps spells each float with repr(), in C: several times faster than a Python loop.
        return json.dumps(a.tolist())[1:-1].split(", ")
    return [format_value(v) for v in a.tolist()]


def _lines(prefixes: Sequence[str], a: np.ndarray) -> str:
    """One line per element: its prefix (name and labels) then its value."""
    vals = _values(a)
    if not vals:
        return ""
    return "\n".join(map(str.__add__, prefixes, vals)) + "\n"


def _quantiles(sorted_values: np.ndarray) -> list[float]:
    """Linear-interpolation quantiles (numpy's default method) of an already sorted 1-D array."""
    n = sorted_values.shape[0]
    v = sorted_values.tolist()
    out = []
    for q in QUANTILES:
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


@dataclass
class _RunLines:
    """Cached text of one run: label parts per layer table, lines per family for one view."""

    names: Sequence[str]
    label: str  # '{run="..."}'
    run: str  # the escaped run name
    prefixes: dict[str, list[str]]  # layer family -> 'name{run="..",layer="..",index="i"} ' per layer
    view: Any = None
    text: dict[str, str] = field(default_factory=dict)
    requested_key: Any = None
    requested_text: str = ""


def series_budget(
    runs: Sequence[RunState], max_series: int = 0, aggregate_layers: int = 0
) -> tuple[list[RunState], list[RunState]]:
    """Split ``runs`` into (with per-layer series, aggregate-only) under the budget.

    ``max_series`` caps the per-layer series of all runs together (0 = no cap), counting
    each run as ``len(LAYER_FAMILIES) x layers``; ``aggregate_layers`` sends every run with
    more layers than that to aggregates (0 = never).
    """

    def order(rs: RunState) -> tuple[int, float]:
        last = rs.view.last_report
        return (0 if rs.connected else 1, -(last if last is not None else rs.created))

    full: list[RunState] = []
    aggregate: list[RunState] = []
    used = 0
    for rs in sorted(runs, key=order):
        cost = len(LAYER_FAMILIES) * rs.num_layers
        too_big = aggregate_layers > 0 and rs.num_layers > aggregate_layers
        if too_big or (max_series > 0 and used + cost > max_series):
            aggregate.append(rs)
        else:
            used += cost
            full.append(rs)
    return full, aggregate


class RunSeries:
    """Exposition text of every per-run family for a set of runs, cached per run (thread-safe)."""

    def __init__(self, indicator: IndicatorSettings | None = None) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _RunLines] = {}
        self.indicator = indicator or IndicatorSettings()

    def _entry(self, rs: RunState) -> _RunLines:
        e = self._runs.get(rs.run)
        if e is None or e.names is not rs.names:
            run = escape_label(rs.run)
            labels = [f'{{run="{run}",layer="{escape_label(n)}",index="{i}"}} ' for i, n in enumerate(rs.names)]
            families = [f for f, _, _ in LAYER_FAMILIES] + [REQUESTED[0], UNDER[0]]
            e = _RunLines(
                names=rs.names,
                label=f'{{run="{run}"}} ',
                run=run,
                prefixes={f: [f + lab for lab in labels] for f in families},
            )
            self._runs[rs.run] = e
        return e

    def _view_text(self, rs: RunState, view: RunView) -> dict[str, str]:
        """Every line of the run that depends only on its view (re-rendered once per batch)."""
        e = self._entry(rs)
        if e.view is view:
            return e.text
        snap = view.primary
        label = e.label
        text: dict[str, str] = {
            "layrot_run_layers": f"layrot_run_layers{label}{rs.num_layers}\n",
            "layrot_run_info": (
                f'layrot_run_info{{run="{e.run}",framework="{escape_label(rs.framework)}",'
                f'host="{escape_label(rs.host)}"}} 1.0\n'
            ),
            "layrot_run_nonfinite_samples_total": f"layrot_run_nonfinite_samples_total{label}{view.nonfinite}.0\n",
        }
        if snap is not None:
            text["layrot_run_step"] = f"layrot_run_step{label}{snap.step}.0\n"
            if view.last_report is not None:
                text["layrot_run_last_report_timestamp_seconds"] = (
                    f"layrot_run_last_report_timestamp_seconds{label}{format_value(view.last_report)}\n"
                )
            rot = np.sort(snap.rotation[np.isfinite(snap.rotation)])
            if rot.size:
                mn, mean, mx = float(rot[0]), float(rot.mean()), float(rot[-1])
                quant = "".join(
                    f'layrot_run_rotation_quantile{{run="{e.run}",quantile="{q!r}"}} {format_value(v)}\n'
                    for q, v in zip(QUANTILES, _quantiles(rot))
                )
            else:
                mn = mean = mx = math.nan
                quant = ""
            text["layrot_run_rotation_min"] = f"layrot_run_rotation_min{label}{format_value(mn)}\n"
            text["layrot_run_rotation_mean"] = f"layrot_run_rotation_mean{label}{format_value(mean)}\n"
            if rot.size:
                text["layrot_run_rotation_max"] = f"layrot_run_rotation_max{label}{format_value(mx)}\n"
                text["layrot_run_rotation_quantile"] = quant
            if math.isfinite(snap.loss):
                text["layrot_run_loss"] = f"layrot_run_loss{label}{format_value(snap.loss)}\n"
            ind = self.indicator.of(snap.rotation, snap.step, rs.total_steps)
            if rs.num_layers:
                text["layrot_run_layers_at_target_ratio"] = (
                    f"layrot_run_layers_at_target_ratio{label}{format_value(ind.at_target_ratio)}\n"
                )
            if ind.judged:
                under = np.flatnonzero(ind.under_rotated)
                text["layrot_run_layers_under_rotated"] = f"layrot_run_layers_under_rotated{label}{under.size}.0\n"
                pre = e.prefixes[UNDER[0]]
                text[UNDER[0]] = "".join(f"{pre[i]}1.0\n" for i in under.tolist() if i < len(pre))
            ang = snap.step_angle[np.isfinite(snap.step_angle)]
            if ang.size:
                text["layrot_run_step_angle_max_radians"] = (
                    f"layrot_run_step_angle_max_radians{label}{format_value(float(ang.max()))}\n"
                )
            for name, _, attr in LAYER_FAMILIES:
                a = getattr(snap, attr)
                if a is None:
                    continue
                pre = e.prefixes[name]
                if attr == "rho":  # absent where the job does not use Layca on a layer (NaN)
                    keep = np.flatnonzero(~np.isnan(a))
                    text[name] = _lines([pre[i] for i in keep.tolist()], a[keep])
                else:
                    text[name] = _lines(pre, a[: len(pre)])
        e.view, e.text = view, text
        return text

    def _requested_text(self, rs: RunState, step: int) -> str:
        rc = getattr(rs, "control", None)
        if rc is None or rc.current is None:
            return ""
        e = self._entry(rs)
        key = (rc.version, step)
        if e.requested_key == key:
            return e.requested_text
        rates = rc.requested_rates(step)
        text = ""
        if rates is not None:
            text = _lines(e.prefixes[REQUESTED[0]], np.asarray(rates, dtype=np.float64))
        e.requested_key, e.requested_text = key, text
        return text

    def render(self, runs: Iterable[tuple[RunState, RunView, bool]]) -> str:
        """HELP / TYPE and every line of the per-run families of ``(run, its view, per_layer)`` triples.

        The caller reads each run's view once per scrape, so all numbers of a run in one
        scrape are of one batch; ``per_layer`` False exports the run-level families only.
        """
        layer_names = [name for name, _, _ in LAYER_FAMILIES] + [REQUESTED[0], UNDER[0]]
        parts: dict[str, list[str]] = {name: [] for name in layer_names}
        parts.update({name: [] for name, _, _ in RUN_FAMILIES})
        with self._lock:
            seen = set()
            for n, (rs, view, per_layer) in enumerate(runs):
                if n % YIELD_EVERY_RUNS == YIELD_EVERY_RUNS - 1:
                    # Let the ingest threads have the GIL now, not at the next 5 ms switch: a
                    # scrape of thousands of runs otherwise convoys the store writer, whose every
                    # SQLite call releases and waits to retake the GIL (acks then took seconds).
                    time.sleep(0)
                seen.add(rs.run)
                e = self._entry(rs)
                for name, chunk in self._view_text(rs, view).items():
                    if per_layer or name not in layer_names:
                        parts[name].append(chunk)
                snap = view.primary
                if per_layer:
                    parts[REQUESTED[0]].append(self._requested_text(rs, snap.step if snap is not None else 1))
                parts["layrot_run_connected"].append(f"layrot_run_connected{e.label}{1.0 if rs.connected else 0.0}\n")
                parts["layrot_run_aggregate_only"].append(
                    f"layrot_run_aggregate_only{e.label}{0.0 if per_layer else 1.0}\n"
                )
            for gone in set(self._runs) - seen:  # runs that left /metrics: free their text
                del self._runs[gone]
        out = []
        for name, help_text, _ in LAYER_FAMILIES:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
            out.extend(parts[name])
        for name, help_text in (REQUESTED, UNDER):
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
            out.extend(parts[name])
        for name, kind, help_text in RUN_FAMILIES:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            out.extend(parts[name])
        return "".join(out)
