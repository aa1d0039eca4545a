"""The layrot Grafana dashboards, as code.

`python deploy/generate.py` writes them to deploy/grafana/dashboards/*.json (and
into the Kubernetes ConfigMaps); `python deploy/generate.py --check` fails when
the committed files are stale. Edit this file, not the JSON.

Every panel and query names its data source as `${DS_PROMETHEUS}`, a data source
template variable of each dashboard. It resolves to the default Prometheus data
source wherever the dashboard lands, so the same JSON works for file provisioning
(deploy/grafana/provisioning), for `layrot-agent grafana push` and for a manual
import, with no `__inputs` rewriting.

Queries use only the collector's raw metrics (no recording rules), so the
dashboards also work against a Prometheus that does not load layrot.rules.yml.
"""

from __future__ import annotations

import itertools
from typing import Any

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SCHEMA_VERSION = 39
TAGS = ["layrot"]

# Grafana substitutes these; deploy tests substitute them too (agent.grafana.panel_exprs).
RUN = 'run="$run"'
LAYERS = 'layer=~"$layer"'
COLLECTOR = 'job=~"$job", instance=~"$instance"'


def new_events(selector: str, window: str) -> str:
    """Counter increments in `window`, counting series born inside the window.

    prometheus_client creates a labelled counter on its first increment, so
    `increase()` alone misses the first alert of every (run, layer, kind): it
    needs two samples. Series that did not exist `window` ago contribute their
    raw value instead.
    """
    return f"(increase({selector}[{window}]) and {selector} offset {window} or {selector})"


# ----------------------------------------------------------------------------- building blocks


class _Ids:
    """Panel ids unique within one dashboard (Grafana keys panel state by id)."""

    def __init__(self) -> None:
        self._it = itertools.count(1)

    def __call__(self) -> int:
        return next(self._it)


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series") -> dict:
    """One Prometheus query of a panel."""
    return {
        "datasource": DS,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "format": fmt,
        "editorMode": "code",
    }


def thresholds(*steps: tuple[str, float | None]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def panel(
    ids: _Ids,
    kind: str,
    title: str,
    grid: tuple[int, int, int, int],
    targets: list[dict],
    description: str = "",
    defaults: dict | None = None,
    overrides: list | None = None,
    options: dict | None = None,
    **extra: Any,
) -> dict:
    x, y, w, h = grid
    p = {
        "id": ids(),
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": defaults or {}, "overrides": overrides or []},
        "options": options or {},
    }
    p.update(extra)
    return p


def timeseries(
    ids: _Ids,
    title: str,
    grid: tuple[int, int, int, int],
    targets: list[dict],
    description: str = "",
    unit: str = "short",
    log: bool = False,
    min_: float | None = None,
    max_: float | None = None,
    bars: bool = False,
    legend_right: bool = False,
    overrides: list | None = None,
) -> dict:
    custom = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 60 if bars else 0,
        "showPoints": "never",
        "spanNulls": False,
        "axisPlacement": "auto",
        "scaleDistribution": {"type": "log", "log": 10} if log else {"type": "linear"},
        "stacking": {"mode": "normal" if bars else "none", "group": "A"},
    }
    defaults: dict[str, Any] = {"color": {"mode": "palette-classic"}, "custom": custom, "unit": unit}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    legend = {
        "showLegend": True,
        "displayMode": "table" if legend_right else "list",
        "placement": "right" if legend_right else "bottom",
        "calcs": ["lastNotNull", "max"] if legend_right else [],
        "sortBy": "Last *" if legend_right else None,
        "sortDesc": True if legend_right else None,
    }
    legend = {k: v for k, v in legend.items() if v is not None}
    return panel(
        ids,
        "timeseries",
        title,
        grid,
        targets,
        description,
        defaults,
        overrides,
        {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}},
    )


def stat(
    ids: _Ids,
    title: str,
    grid: tuple[int, int, int, int],
    expr: str,
    description: str = "",
    unit: str = "short",
    decimals: int | None = None,
    steps: tuple = (("green", None),),
    mappings: list | None = None,
) -> dict:
    defaults: dict[str, Any] = {"unit": unit, "thresholds": thresholds(*steps), "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if mappings:
        defaults["mappings"] = mappings
    return panel(
        ids,
        "stat",
        title,
        grid,
        [target(expr, instant=True)],
        description,
        defaults,
        None,
        {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
    )


YES_NO = [
    {
        "type": "value",
        "options": {
            "0": {"text": "no", "color": "red", "index": 0},
            "1": {"text": "yes", "color": "green", "index": 1},
        },
    }
]

# Rotation near 1 means the layer has moved far from its initialization, which the
# paper ties to good generalization; layers stuck near 0 are the warning sign.
ROTATION_STEPS = (("red", None), ("orange", 0.2), ("yellow", 0.5), ("green", 0.8))


def datasource_variable() -> dict:
    return {
        "name": "DS_PROMETHEUS",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def query_variable(
    name: str, label: str, query: str, multi: bool = False, include_all: bool = False, all_value: str | None = None
) -> dict:
    v = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {},
        "hide": 0,
        "includeAll": include_all,
        "multi": multi,
        "options": [],
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }
    if all_value is not None:
        v["allValue"] = all_value
    return v


def dashboard(
    uid: str, title: str, description: str, panels: list, variables: list, annotations: list | None = None
) -> dict:
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "links": [
            {
                "title": "layrot dashboards",
                "type": "dashboards",
                "tags": TAGS,
                "asDropdown": True,
                "includeVars": False,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
            }
        ],
        "annotations": {"list": [builtin] + (annotations or [])},
        "templating": {"list": variables},
        "panels": panels,
    }


# ----------------------------------------------------------------------------- overview


def overview() -> dict:
    ids = _Ids()
    alerts_1h = "sum by (run) " + new_events("layrot_alerts_total", "1h")
    panels = [
        stat(
            ids,
            "Runs",
            (0, 0, 4, 4),
            "count(max by (run) (layrot_run_step)) or vector(0)",
            "Runs the collector knows about (connected or not).",
        ),
        stat(
            ids,
            "Connected runs",
            (4, 0, 4, 4),
            "sum(max by (run) (layrot_run_connected)) or vector(0)",
            "Runs with an open reporting stream.",
        ),
        stat(
            ids,
            "Alerts (last hour)",
            (8, 0, 4, 4),
            f"sum({alerts_1h}) or vector(0)",
            "Alerts the collector raised in the last hour, all runs and kinds.",
            steps=(("green", None), ("orange", 1)),
        ),
        stat(
            ids,
            "Stalled runs",
            (12, 0, 4, 4),
            "count((time() - max by (run) (layrot_run_last_report_timestamp_seconds) > 900)"
            " and on (run) (max by (run) (layrot_run_connected) == 1)) or vector(0)",
            "Connected runs that have not reported for more than 15 minutes.",
            steps=(("green", None), ("orange", 1)),
        ),
        stat(
            ids,
            "Diverged runs",
            (16, 0, 4, 4),
            "count(max by (run) (layrot_run_nonfinite_samples_total) > 0) or vector(0)",
            "Runs that reported NaN or Inf weights.",
            steps=(("green", None), ("red", 1)),
        ),
        stat(
            ids,
            "Lowest min rotation",
            (20, 0, 4, 4),
            "min(layrot_run_rotation_min and on (run) (layrot_run_connected == 1))",
            "Smallest per-run minimum layer rotation among connected runs: a layer that barely moved from its "
            "initialization.",
            decimals=3,
            steps=ROTATION_STEPS,
        ),
    ]
    table_targets = [
        target("max by (run) (layrot_run_step)", ref="A", instant=True, fmt="table"),
        target("max by (run) (layrot_run_layers)", ref="B", instant=True, fmt="table"),
        target("max by (run) (layrot_run_rotation_min)", ref="C", instant=True, fmt="table"),
        target("max by (run) (layrot_run_rotation_mean)", ref="D", instant=True, fmt="table"),
        target("max by (run) (layrot_run_connected)", ref="E", instant=True, fmt="table"),
        target("time() - max by (run) (layrot_run_last_report_timestamp_seconds)", ref="F", instant=True, fmt="table"),
        target(f"{alerts_1h} or sum by (run) (layrot_run_step * 0)", ref="G", instant=True, fmt="table"),
        target("max by (run) (layrot_run_nonfinite_samples_total)", ref="H", instant=True, fmt="table"),
        target("max by (run, framework, host) (layrot_run_info)", ref="I", instant=True, fmt="table"),
    ]
    renames = {
        "run": "Run",
        "framework": "Framework",
        "host": "Host",
        "Value #A": "Step",
        "Value #B": "Layers",
        "Value #C": "Min rotation",
        "Value #D": "Mean rotation",
        "Value #E": "Connected",
        "Value #F": "Last report",
        "Value #G": "Alerts (1h)",
        "Value #H": "Non-finite samples",
    }
    order = [
        "run",
        "framework",
        "host",
        "Value #A",
        "Value #B",
        "Value #C",
        "Value #D",
        "Value #E",
        "Value #F",
        "Value #G",
        "Value #H",
    ]

    def by_name(name: str, *props: tuple[str, Any]) -> dict:
        return {"matcher": {"id": "byName", "options": name}, "properties": [{"id": k, "value": v} for k, v in props]}

    cell = lambda mode: ("custom.cellOptions", {"type": mode})  # noqa: E731
    panels.append(
        panel(
            ids,
            "table",
            "Runs",
            (0, 4, 24, 10),
            table_targets,
            "One row per run. Rotation is the cosine distance of a layer's weights to their initialization "
            "(0 = unchanged, 1 = orthogonal); runs whose every layer gets near 1 generalize best. "
            "Click a run to open its layer view.",
            {"custom": {"align": "auto", "filterable": True}, "thresholds": thresholds(("green", None))},
            [
                by_name(
                    "Run",
                    (
                        "links",
                        [
                            {
                                "title": "Open run ${__value.text}",
                                "url": "/d/layrot-run/layrot-run?var-run=${__value.text}&${__url_time_range}",
                            }
                        ],
                    ),
                ),
                by_name(
                    "Min rotation",
                    ("decimals", 3),
                    ("min", 0),
                    ("max", 1),
                    cell("color-background"),
                    ("thresholds", thresholds(*ROTATION_STEPS)),
                    ("color", {"mode": "thresholds"}),
                ),
                by_name(
                    "Mean rotation",
                    ("decimals", 3),
                    ("min", 0),
                    ("max", 1),
                    cell("gauge"),
                    ("thresholds", thresholds(*ROTATION_STEPS)),
                    ("color", {"mode": "thresholds"}),
                ),
                by_name("Connected", ("mappings", YES_NO), cell("color-text")),
                by_name("Last report", ("unit", "s"), ("decimals", 0)),
                by_name(
                    "Alerts (1h)",
                    ("decimals", 0),
                    cell("color-text"),
                    ("thresholds", thresholds(("green", None), ("orange", 1))),
                    ("color", {"mode": "thresholds"}),
                ),
                by_name(
                    "Non-finite samples",
                    ("decimals", 0),
                    cell("color-text"),
                    ("thresholds", thresholds(("green", None), ("red", 1))),
                    ("color", {"mode": "thresholds"}),
                ),
            ],
            {
                "showHeader": True,
                "cellHeight": "sm",
                "footer": {"show": False, "reducer": ["sum"], "fields": ""},
                "sortBy": [{"displayName": "Run", "desc": False}],
            },
            transformations=[
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "Value #I": True},
                        "indexByName": {name: i for i, name in enumerate(order)},
                        "renameByName": renames,
                    },
                },
            ],
        )
    )
    panels += [
        timeseries(
            ids,
            "Minimum layer rotation per run",
            (0, 14, 12, 9),
            [target("max by (run) (layrot_run_rotation_min)", "{{run}}")],
            "The least-rotated layer of each run. The paper's best runs bring every layer close to 1.",
            unit="none",
            min_=0,
            max_=1,
        ),
        timeseries(
            ids,
            "Mean layer rotation per run",
            (12, 14, 12, 9),
            [target("max by (run) (layrot_run_rotation_mean)", "{{run}}")],
            unit="none",
            min_=0,
            max_=1,
        ),
        timeseries(
            ids,
            "Alerts by run and kind",
            (0, 23, 12, 8),
            [target("sum by (run, kind) " + new_events("layrot_alerts_total", "$__rate_interval"), "{{run}} {{kind}}")],
            "Alerts raised by the collector: abrupt_rotation, divergence, stalled, rejections.",
            unit="short",
            bars=True,
        ),
        timeseries(
            ids,
            "Steps per second per run",
            (12, 23, 12, 8),
            [target("max by (run) (deriv(layrot_run_step[$__rate_interval]))", "{{run}}")],
            "Training speed as seen by the collector (reported step numbers).",
            unit="short",
            min_=0,
        ),
    ]
    return dashboard(
        "layrot-overview",
        "layrot / Overview",
        "All runs watched by layrot: progress, layer rotation, alerts.",
        panels,
        [datasource_variable()],
    )


# ----------------------------------------------------------------------------- one run


def run_view() -> dict:
    ids = _Ids()
    sel = f"{RUN}, {LAYERS}"
    stats = [
        stat(ids, "Step", (0, 0, 3, 4), f"max(layrot_run_step{{{RUN}}})"),
        stat(ids, "Layers", (3, 0, 3, 4), f"max(layrot_run_layers{{{RUN}}})"),
        stat(
            ids,
            "Min rotation",
            (6, 0, 3, 4),
            f"min(layrot_run_rotation_min{{{RUN}}})",
            "Rotation of the least-rotated layer.",
            decimals=3,
            steps=ROTATION_STEPS,
        ),
        stat(
            ids,
            "Mean rotation",
            (9, 0, 3, 4),
            f"max(layrot_run_rotation_mean{{{RUN}}})",
            decimals=3,
            steps=ROTATION_STEPS,
        ),
        stat(
            ids,
            "Connected",
            (12, 0, 3, 4),
            f"max(layrot_run_connected{{{RUN}}})",
            steps=(("red", None), ("green", 1)),
            mappings=YES_NO,
        ),
        stat(
            ids,
            "Last report",
            (15, 0, 3, 4),
            f"time() - max(layrot_run_last_report_timestamp_seconds{{{RUN}}})",
            "Seconds since the run last reported a step.",
            unit="s",
            decimals=0,
            steps=(("green", None), ("orange", 300), ("red", 900)),
        ),
        stat(
            ids,
            "Non-finite samples",
            (18, 0, 3, 4),
            f"max(layrot_run_nonfinite_samples_total{{{RUN}}})",
            "Reported layer samples with NaN or Inf weights: the run diverged.",
            decimals=0,
            steps=(("green", None), ("red", 1)),
        ),
        stat(
            ids,
            "Alerts (last hour)",
            (21, 0, 3, 4),
            "sum(" + new_events(f"layrot_alerts_total{{{RUN}}}", "1h") + ") or vector(0)",
            decimals=0,
            steps=(("green", None), ("orange", 1)),
        ),
    ]
    rotation = timeseries(
        ids,
        "Layer rotation",
        (0, 4, 12, 11),
        [target(f"layrot_layer_rotation{{{sel}}}", "{{layer}}")],
        "Cosine distance between each layer's weights and their initialization (the paper's layer rotation "
        "curves). 0 = unchanged, 1 = orthogonal to the start.",
        unit="none",
        min_=0,
        max_=1,
        legend_right=True,
    )
    heatmap = panel(
        ids,
        "heatmap",
        "Layer rotation heatmap (layer index x time)",
        (12, 4, 12, 11),
        [target(f"layrot_layer_rotation{{{sel}}}", "{{index}}")],
        "One row per layer in forward order (row label = layer index), colour = rotation.",
        {
            "custom": {
                "scaleDistribution": {"type": "linear"},
                "hideFrom": {"legend": False, "tooltip": False, "viz": False},
            }
        },
        None,
        {
            "calculate": False,
            "cellGap": 1,
            "color": {
                "mode": "scheme",
                "scheme": "Viridis",
                "fill": "dark-orange",
                "scale": "linear",
                "exponent": 0.5,
                "steps": 64,
                "reverse": False,
                "min": 0,
                "max": 1,
            },
            # Series named by layer index become rows, sorted numerically; "unknown" is
            # the editor's "Middle" bucket layout: a row is centred on its index.
            "rowsFrame": {"layout": "unknown"},
            "yAxis": {"axisPlacement": "left", "reverse": False, "axisLabel": "layer index (forward order)"},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
            "legend": {"show": True},
            "cellValues": {"decimals": 3},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "showValue": "never",
        },
        maxDataPoints=200,
    )
    angles = timeseries(
        ids,
        "Step angle per layer",
        (0, 15, 12, 10),
        [target(f"layrot_layer_step_angle_radians{{{sel}}}", "{{layer}}")],
        "Angle each layer rotated in one optimizer step (log scale). Spikes are abrupt rotations; the "
        "annotations mark the collector's alerts. Under Layca the angle is arctan(rho).",
        unit="radian",
        log=True,
        legend_right=True,
    )
    rho = timeseries(
        ids,
        "Layca rate: requested vs applied",
        (12, 15, 12, 10),
        [
            target(f"layrot_layer_rho_requested{{{sel}}}", "{{layer}} requested", "A"),
            target(f"layrot_layer_rho_applied{{{sel}}}", "{{layer}} applied", "B"),
        ],
        "Per-layer Layca rate rho_l(t) the controller asked for (dashed) and what the job applied. "
        "Empty for runs not under Layca control.",
        unit="none",
        log=True,
        legend_right=True,
        overrides=[
            {
                "matcher": {"id": "byRegexp", "options": ".* requested$"},
                "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
            }
        ],
    )
    now = panel(
        ids,
        "bargauge",
        "Rotation per layer (latest)",
        (0, 25, 8, 12),
        [target(f"layrot_layer_rotation{{{sel}}}", "{{index}} {{layer}}", instant=True)],
        "Latest rotation of every layer, in forward order.",
        {
            "unit": "none",
            "min": 0,
            "max": 1,
            "decimals": 3,
            "thresholds": thresholds(*ROTATION_STEPS),
            "color": {"mode": "thresholds"},
        },
        None,
        {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "left",
            "sizing": "auto",
            "minVizHeight": 10,
            "minVizWidth": 0,
            "maxVizHeight": 300,
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    )
    norms = timeseries(
        ids,
        "Weight norm per layer",
        (8, 25, 8, 12),
        [target(f"layrot_layer_weight_norm{{{sel}}}", "{{layer}}")],
        "||w_l(t)||. Layca keeps it at ||w_l(0)||; weight decay shrinks it under SGD.",
        unit="short",
    )
    alerts = panel(
        ids,
        "table",
        "Alerts since collector start",
        (16, 25, 8, 12),
        [target(f"sum by (layer, kind, severity) (layrot_alerts_total{{{RUN}}})", instant=True, fmt="table")],
        "Alert counts for this run by layer and kind. `layrot-agent alerts --run RUN` shows each event.",
        {"custom": {"align": "auto", "filterable": True}, "thresholds": thresholds(("green", None))},
        None,
        {"showHeader": True, "cellHeight": "sm", "sortBy": [{"displayName": "Count", "desc": True}]},
        transformations=[
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {"layer": "Layer", "kind": "Kind", "severity": "Severity", "Value": "Count"},
                },
            }
        ],
    )
    # Against optimizer steps, as the paper draws them: an XY chart of each layer's rotation over
    # the run's step (both series are scraped together, so joining them by time pairs them).
    by_step = panel(
        ids,
        "xychart",
        "Layer rotation vs step",
        (0, 37, 12, 11),
        [
            target(f"max(layrot_run_step{{{RUN}}})", "step", "A"),
            target(f"layrot_layer_rotation{{{sel}}}", "{{layer}}", "B"),
        ],
        "The layer rotation curves with optimizer steps on the x axis (the other panels use wall time).",
        {"unit": "none", "min": 0, "max": 1, "custom": {"show": "lines", "lineWidth": 1}},
        None,
        {
            "dims": {"frame": 0, "x": "step"},
            "seriesMapping": "auto",
            "series": [],
            "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "single"},
        },
        transformations=[{"id": "joinByField", "options": {"byField": "Time", "mode": "outer"}}],
    )
    loss = timeseries(
        ids,
        "Training loss",
        (12, 37, 12, 11),
        [target(f"max(layrot_run_loss{{{RUN}}})", "loss")],
        "The newest training loss the job reported (handle.observe_loss, or the callbacks').",
        unit="short",
    )
    at_target = stat(
        ids,
        "Layers at rotation target",
        (0, 48, 6, 4),
        f"max(layrot_run_layers_at_target_ratio{{{RUN}}})",
        "Share of the layers whose rotation reached the collector's target (serve --rotation-target, 0.9 by "
        "default): the paper's rule of thumb is every layer near 1.",
        unit="percentunit",
        decimals=0,
        steps=(("red", None), ("orange", 0.5), ("green", 1)),
    )
    under = stat(
        ids,
        "Under-rotated layers",
        (6, 48, 6, 4),
        f"max(layrot_run_layers_under_rotated{{{RUN}}})",
        "Layers still below the target past the judged share of the announced run (serve "
        "--under-rotated-share); empty while not judged or when the job did not announce its length.",
        decimals=0,
        steps=(("green", None), ("orange", 1)),
    )
    annotation = {
        "name": "layrot alerts",
        "datasource": DS,
        "enable": True,
        "hide": False,
        "iconColor": "red",
        "expr": "sum by (layer, kind, severity) " + new_events(f"layrot_alerts_total{{{RUN}}}", "2m") + " > 0",
        "step": "1m",
        "titleFormat": "{{kind}} ({{severity}})",
        "textFormat": "layer {{layer}}",
        "tagKeys": "kind,severity,layer",
        "useValueForTime": False,
        "filter": {"exclude": False, "ids": [rotation["id"], angles["id"], rho["id"]]},
    }
    variables = [
        datasource_variable(),
        query_variable("run", "Run", "label_values(layrot_run_step, run)"),
        query_variable(
            "layer",
            "Layer",
            f"label_values(layrot_layer_rotation{{{RUN}}}, layer)",
            multi=True,
            include_all=True,
            all_value=".*",
        ),
    ]
    return dashboard(
        "layrot-run",
        "layrot / Run",
        "One run, layer by layer: rotation curves, rotation heatmap, step angles with alerts, Layca rates.",
        stats + [rotation, heatmap, angles, rho, now, norms, alerts, by_step, loss, at_target, under],
        variables,
        [annotation],
    )


# ----------------------------------------------------------------------------- collector


def collector() -> dict:
    ids = _Ids()
    panels = [
        stat(
            ids,
            "Collectors up",
            (0, 0, 4, 4),
            f"sum(up{{{COLLECTOR}}})",
            "Scrape targets of the layrot collector that answer.",
            steps=(("red", None), ("green", 1)),
        ),
        stat(
            ids,
            "Active sessions",
            (4, 0, 4, 4),
            f"sum(layrot_sessions_active{{{COLLECTOR}}})",
            "Open reporting streams (one per training process).",
        ),
        stat(
            ids,
            "Samples / s",
            (8, 0, 4, 4),
            f"sum(rate(layrot_samples_ingested_total{{{COLLECTOR}}}[$__rate_interval]))",
            unit="short",
        ),
        stat(
            ids,
            "Steps / s",
            (12, 0, 4, 4),
            f"sum(rate(layrot_steps_ingested_total{{{COLLECTOR}}}[$__rate_interval]))",
            unit="short",
        ),
        stat(
            ids,
            "Rejected / s",
            (16, 0, 4, 4),
            f"sum(rate(layrot_messages_rejected_total{{{COLLECTOR}}}[$__rate_interval])) or vector(0)",
            unit="short",
            steps=(("green", None), ("orange", 1e-9)),
        ),
        stat(
            ids,
            "Store pending rows",
            (20, 0, 4, 4),
            f"sum(layrot_store_pending_rows{{{COLLECTOR}}})",
            "Rows waiting to be written to the history store. A steady climb means the disk is too slow.",
            steps=(("green", None), ("orange", 10000), ("red", 100000)),
        ),
        timeseries(
            ids,
            "Ingest rate",
            (0, 4, 12, 9),
            [
                target(
                    f"sum by (instance) (rate(layrot_samples_ingested_total{{{COLLECTOR}}}[$__rate_interval]))",
                    "{{instance}} samples/s",
                    "A",
                ),
                target(
                    f"sum by (instance) (rate(layrot_steps_ingested_total{{{COLLECTOR}}}[$__rate_interval]))",
                    "{{instance}} steps/s",
                    "B",
                ),
            ],
            "Layer samples and steps stored per second.",
            unit="short",
            min_=0,
        ),
        timeseries(
            ids,
            "Rejected messages by reason",
            (12, 4, 12, 9),
            [
                target(
                    f"sum by (reason) (rate(layrot_messages_rejected_total{{{COLLECTOR}}}[$__rate_interval]))",
                    "{{reason}}",
                ),
            ],
            "Messages the collector refused (bad token, malformed batch, unknown run...).",
            unit="short",
            min_=0,
        ),
        timeseries(
            ids,
            "Sessions",
            (0, 13, 12, 9),
            [
                target(f"sum by (instance) (layrot_sessions_active{{{COLLECTOR}}})", "{{instance}} active", "A"),
                target(
                    f"sum by (instance) (increase(layrot_sessions_opened_total{{{COLLECTOR}}}[$__rate_interval]))",
                    "{{instance}} opened",
                    "B",
                ),
            ],
            unit="short",
            min_=0,
        ),
        timeseries(
            ids,
            "Store pending rows",
            (12, 13, 12, 9),
            [
                target(f"sum by (instance) (layrot_store_pending_rows{{{COLLECTOR}}})", "{{instance}}"),
            ],
            unit="short",
            min_=0,
        ),
        timeseries(
            ids,
            "Scrape status",
            (0, 22, 12, 8),
            [
                target(f"up{{{COLLECTOR}}}", "{{instance}}"),
            ],
            "1 = Prometheus scraped the collector, 0 = down.",
            unit="none",
            min_=0,
            max_=1,
        ),
        timeseries(
            ids,
            "Alerts raised by kind",
            (12, 22, 12, 8),
            [
                target(
                    "sum by (kind, severity) " + new_events(f"layrot_alerts_total{{{COLLECTOR}}}", "$__rate_interval"),
                    "{{kind}} ({{severity}})",
                ),
            ],
            unit="short",
            bars=True,
        ),
    ]
    variables = [
        datasource_variable(),
        query_variable("job", "Job", "label_values(layrot_sessions_active, job)", multi=True, include_all=True),
        query_variable(
            "instance",
            "Collector",
            'label_values(layrot_sessions_active{job=~"$job"}, instance)',
            multi=True,
            include_all=True,
        ),
    ]
    return dashboard(
        "layrot-collector",
        "layrot / Collector",
        "Health of the layrot collector: ingest, rejections, sessions, history store.",
        panels,
        variables,
    )


DASHBOARDS = {
    "overview.json": overview,
    "run.json": run_view,
    "collector.json": collector,
}


def build_all() -> dict[str, dict]:
    """File name -> dashboard model, for every layrot dashboard."""
    return {name: make() for name, make in DASHBOARDS.items()}
