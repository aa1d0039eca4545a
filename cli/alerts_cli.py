"""``layrot-agent alerts``: list, follow and tune the collector's alerts.

Attached to the main CLI in cli/main.py (``cli.add_command(alerts_command)``).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from typing import Any

import click

from layrot.cli.cli_common import client, collector_options_with, tls_options, write_client
from layrot.client.errors import CollectorError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

JSON_FIELDS = (
    "run",
    "layer",
    "step",
    "kind",
    "severity",
    "angle",
    "baseline",
    "time",
    "message",
    "loss_before",
    "loss_after",
    "incident",
    "layers",
    "last_step",
    "updates",
    "updated",
    "resolved",
)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _collector_options(fn: Any) -> Any:
    return collector_options_with(
        fn, "Bearer token of the collector (needed for 'thresholds' changes when it has one)."
    )


def parse_since(text: str | None, now: float | None = None) -> float:
    """'90s', '15m', '2h', '1d' ago, or absolute unix seconds; '' / None = 0 (no bound)."""
    if not text:
        return 0.0
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd])\s*", text)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use a duration such as 30s, 15m, 2h, 1d, or unix seconds") from None


def _num(x: float) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def json_record(a: dict[str, Any]) -> dict[str, Any]:
    """An alert for --json: NaN as null."""
    return {k: (_num(a[k]) if isinstance(a[k], float) else a[k]) for k in JSON_FIELDS if k in a}


def _deg(x: float) -> str:
    return f"{math.degrees(x):.3g}" if isinstance(x, float) and math.isfinite(x) else "-"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


HEADERS = ["TIME", "RUN", "LAYER", "STEP", "KIND", "SEVERITY", "ANGLE(DEG)", "BASELINE(DEG)", "MESSAGE"]


def _layers(a: dict[str, Any]) -> str:
    names = a.get("layers") or []
    if len(names) > 1:
        return f"{names[0]} +{len(names) - 1}"
    return a["layer"] or "-"


def _row(a: dict[str, Any]) -> list[str]:
    return [
        _when(a["time"]),
        a["run"],
        _layers(a),
        str(a["step"]),
        a["kind"],
        a["severity"],
        _deg(a["angle"]),
        _deg(a["baseline"]),
        ("[update] " if a.get("updates") else "") + a["message"],
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [len(h) for h in HEADERS]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    widths[-1] = 0  # message: never padded

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(HEADERS)] + [line(r) for r in rows])


@click.group("alerts", invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--run",
    default=None,
    help="Only this run (default: every run). Unknown to the collector: an error, except with --follow "
    "(which waits for the run to appear).",
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing alerts as the collector raises them (Ctrl-C stops).")
@click.option(
    "--since",
    default=None,
    metavar="WHEN",
    help="Only alerts newer than this: a duration ago (30s, 15m, 2h, 1d) or unix seconds.",
)
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="Show the newest N kept alerts (0 = all the collector keeps).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='JSON: {"alerts": [...], "truncated": bool, "limit": N}; with --follow one alert per line (JSON Lines).',
)
@_collector_options
@click.pass_context
def alerts_command(
    ctx: click.Context,
    run: str | None,
    follow: bool,
    since: str | None,
    limit: int,
    as_json: bool,
    collector: str,
    token: str | None,
) -> None:
    """Alerts raised by the collector: abrupt rotations, divergence, not learning, stalled runs, rejections, lost runs.

    An abrupt rotation is an incident: a step where several layers jump far
    above their own recent step angles together (or one layer far above its
    own and the others', or any layer above the extreme angle). It is one
    alert listing its layers (LAYER shows the largest and how many more);
    jumps in the next steps join it as updates. It is critical when the loss
    got worse across the jump or the jump is extreme. Angles print in degrees;
    --json gives radians and unix times.

    --json prints {"alerts": [...], "truncated": true|false, "limit": N}:
    truncated says that more alerts than the newest N exist (--limit 0: all
    the collector keeps). Alert fields: run, layer, step, kind, severity,
    angle, baseline, time, message, loss_before, loss_after (null when
    unknown), incident, layers, last_step, updates, updated, resolved. With
    --follow an incident prints when raised and again (same incident id,
    updates > 0, "[update]" in the table) each time it is updated or resolved.

    \b
    Examples:
      layrot-agent alerts
      layrot-agent alerts --run resnet-a --since 1h
      layrot-agent alerts --follow --json | jq -c 'select(.severity == "critical")'
      layrot-agent alerts thresholds resnet-a --k 8 --abs-angle 0.2
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"collector": collector, "token": token}
        return
    t0 = parse_since(since)
    try:
        with client(collector, token) as q:
            if not follow:
                # One more than asked: whether the listing was cut is known, not guessed.
                items = q.list_alerts(run, limit=limit + 1 if limit else 0, since=t0)
                truncated = bool(limit) and len(items) > limit
                if truncated:
                    items = items[-limit:]
                if run and not items:
                    q.get_run(run)  # an unknown run is an error (NOT_FOUND), not "no alerts"
                if as_json:
                    out = {"alerts": [json_record(a) for a in items], "truncated": truncated, "limit": limit}
                    click.echo(json.dumps(out, indent=2, allow_nan=False))
                elif not items:
                    click.echo(f"no alerts{' for run ' + run if run else ''} on {collector}")
                else:
                    click.echo(_table([_row(a) for a in items]))
                    if truncated:
                        click.echo(f"(the newest {limit} shown; more exist: --limit 0 for all)", err=True)
                return
            if not as_json:
                click.echo(_table([]))
            for a in q.watch_alerts(run, since=t0, backlog=limit):
                if as_json:
                    click.echo(json.dumps(json_record(a), allow_nan=False))
                else:
                    click.echo(_table([_row(a)]).split("\n", 1)[1])
                sys.stdout.flush()
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # --follow ends with Ctrl-C
        pass


@alerts_command.command("thresholds", context_settings=CONTEXT_SETTINGS)
@click.argument("run", required=False, default="")
@click.option(
    "--abs-angle", type=float, default=None, help="Radians: an extreme step angle (critical, from the first step)."
)
@click.option(
    "--k", type=float, default=None, help="A layer jumps above median + k * spread of its recent log step angles..."
)
@click.option("--ratio", type=float, default=None, help="...and at >= ratio x its median angle.")
@click.option("--group", type=float, default=None, help="Share of the layers jumping together that is an incident.")
@click.option(
    "--single-ratio",
    type=float,
    default=None,
    help="One layer alone is an incident at >= this x its median and x the other layers' angles.",
)
@click.option(
    "--refractory",
    type=click.IntRange(min=1),
    default=None,
    help="Reported steps after an incident's last jump in which new jumps update it.",
)
@click.option(
    "--not-learning-steps", type=float, default=None, help="Reported steps after which not_learning is judged."
)
@click.option(
    "--not-learning-drop", type=float, default=None, help="Relative loss drop below which the run is not learning."
)
@click.option(
    "--not-learning-share",
    type=float,
    default=None,
    help="Share (0-1] of the run's announced total_steps at which not_learning is judged.",
)
@click.option("--window", type=click.IntRange(min=3), default=None, help="Baseline window (reported steps).")
@click.option(
    "--warmup", type=click.IntRange(min=1), default=None, help="Reported steps before the baseline rule arms."
)
@click.option("--stall-seconds", type=float, default=None, help="A connected run silent this long is stalled.")
@click.option("--min-angle", type=float, default=None, help="Radians: the baseline rule never fires below this.")
@click.option("--reset", is_flag=True, help="Back to the collector defaults (before applying other options).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--token", default=None, help="Bearer token (as for 'alerts'; $LAYROT_TOKEN).")
@click.option(
    "--collector",
    "collector",
    default=None,
    metavar="ADDR",
    help="Collector gRPC address (as for 'alerts'; $LAYROT_COLLECTOR).",
)
@tls_options
@click.pass_obj
def thresholds_command(
    obj: dict[str, Any],
    run: str,
    abs_angle: float | None,
    k: float | None,
    window: int | None,
    warmup: int | None,
    stall_seconds: float | None,
    min_angle: float | None,
    ratio: float | None,
    group: float | None,
    single_ratio: float | None,
    refractory: int | None,
    not_learning_steps: float | None,
    not_learning_drop: float | None,
    not_learning_share: float | None,
    reset: bool,
    as_json: bool,
    token: str | None,
    collector: str | None,
) -> None:
    """Show or change the alert thresholds of RUN (no RUN: the collector defaults).

    Without options it prints the effective thresholds. Changes need the
    collector's token when it has one; per-run values survive restarts,
    default changes last until the collector restarts (then the serve flags apply).
    'inf' disables --abs-angle, --k, --ratio, --single-ratio, --stall-seconds or
    --not-learning-steps.

    \b
    Examples:
      layrot-agent alerts thresholds resnet-a
      layrot-agent alerts thresholds resnet-a --k 8 --warmup 100
      layrot-agent alerts thresholds resnet-a --not-learning-steps 2000
      layrot-agent alerts thresholds resnet-a --not-learning-share 0.1
      layrot-agent alerts thresholds resnet-a --reset
    """
    values: dict[str, float] = {}
    try:
        with write_client(collector or obj["collector"], token or obj["token"]) as q:
            if reset:
                defaults = q.set_thresholds("")
                q.set_thresholds(
                    run,
                    abs_angle=-1,
                    k=-1,
                    stall_seconds=-1,
                    min_angle=-1,
                    ratio=-1,
                    group=-1,
                    single_ratio=-1,
                    not_learning_steps=-1,
                    not_learning_drop=-1,
                    not_learning_share=-1,
                    window=defaults["window"],
                    warmup=defaults["warmup"],
                    refractory=defaults["refractory"],
                )
            for name, v in (
                ("abs_angle", abs_angle),
                ("k", k),
                ("window", window),
                ("warmup", warmup),
                ("stall_seconds", stall_seconds),
                ("min_angle", min_angle),
                ("ratio", ratio),
                ("group", group),
                ("single_ratio", single_ratio),
                ("refractory", refractory),
                ("not_learning_steps", not_learning_steps),
                ("not_learning_drop", not_learning_drop),
                ("not_learning_share", not_learning_share),
            ):
                if v is not None:
                    if isinstance(v, float) and (math.isnan(v) or v <= 0) and name != "min_angle":
                        raise click.BadParameter(f"--{name.replace('_', '-')} must be > 0, got {v}")
                    values[name] = v
            result = q.set_thresholds(run, **values)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "run": run or None,
                    **{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in result.items()},
                },
                indent=2,
            )
        )
        return
    click.echo(f"thresholds of {'run ' + run if run else 'the collector (defaults)'}:")
    for name, v in result.items():
        extra = f"  ({math.degrees(v):.3g} deg)" if name in ("abs_angle", "min_angle") and math.isfinite(v) else ""
        click.echo(f"  {name:18} {v:g}{extra}")
