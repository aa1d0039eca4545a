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

from layrot.cli.cli_common import client, collector_options_with, tls_options
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
    return {k: (_num(a[k]) if isinstance(a[k], float) else a[k]) for k in JSON_FIELDS}


def _deg(x: float) -> str:
    return f"{math.degrees(x):.3g}" if isinstance(x, float) and math.isfinite(x) else "-"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


HEADERS = ["TIME", "RUN", "LAYER", "STEP", "KIND", "SEVERITY", "ANGLE(DEG)", "BASELINE(DEG)", "MESSAGE"]


def _row(a: dict[str, Any]) -> list[str]:
    return [
        _when(a["time"]),
        a["run"],
        a["layer"] or "-",
        str(a["step"]),
        a["kind"],
        a["severity"],
        _deg(a["angle"]),
        _deg(a["baseline"]),
        a["message"],
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
    "--json", "as_json", is_flag=True, help="JSON: one array; with --follow one object per line (JSON Lines)."
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
    """Alerts raised by the collector: abrupt rotations, divergence, stalled runs, rejections.

    An abrupt rotation is a layer rotating a large angle within one optimizer
    step (above the absolute limit, or far above the layer's own recent
    baseline); it is critical when the loss did not improve across it. Angles
    print in degrees; --json gives radians and unix times. JSON fields: run,
    layer, step, kind, severity, angle, baseline, time, message, loss_before,
    loss_after (null when unknown).

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
                items = q.list_alerts(run, limit=limit, since=t0)
                if run and not items:
                    q.get_run(run)  # an unknown run is an error (NOT_FOUND), not "no alerts"
                if as_json:
                    click.echo(json.dumps([json_record(a) for a in items], indent=2, allow_nan=False))
                elif not items:
                    click.echo(f"no alerts{' for run ' + run if run else ''} on {collector}")
                else:
                    click.echo(_table([_row(a) for a in items]))
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
@click.option("--abs-angle", type=float, default=None, help="Radians: fire above this whatever the baseline.")
@click.option("--k", type=float, default=None, help="Fire above median + k * spread of the layer's recent angles.")
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
    reset: bool,
    as_json: bool,
    token: str | None,
    collector: str | None,
) -> None:
    """Show or change the alert thresholds of RUN (no RUN: the collector defaults).

    Without options it prints the effective thresholds. Changes need the
    collector's token when it has one; per-run values survive restarts,
    default changes last until the collector restarts (then the serve flags apply).
    'inf' disables --abs-angle, --k or --stall-seconds.

    \b
    Examples:
      layrot-agent alerts thresholds resnet-a
      layrot-agent alerts thresholds resnet-a --k 8 --warmup 100
      layrot-agent alerts thresholds resnet-a --reset
    """
    values: dict[str, float] = {}
    try:
        with client(collector or obj["collector"], token or obj["token"]) as q:
            if reset:
                defaults = q.set_thresholds("")
                q.set_thresholds(
                    run,
                    abs_angle=-1,
                    k=-1,
                    stall_seconds=-1,
                    min_angle=-1,
                    window=defaults["window"],
                    warmup=defaults["warmup"],
                )
            for name, v in (
                ("abs_angle", abs_angle),
                ("k", k),
                ("window", window),
                ("warmup", warmup),
                ("stall_seconds", stall_seconds),
                ("min_angle", min_angle),
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
        click.echo(f"  {name:14} {v:g}{extra}")
