"""The alert options of ``layrot-agent serve`` (apart from cli/alerts_cli.py, so a query command need not load it)."""

from __future__ import annotations

from typing import Any

import click


# ---------------------------------------------------------------- serve options
def serve_alert_options(fn: Any) -> Any:
    """Alert options of ``layrot-agent serve``; the command receives them as one ``alert_options`` dict
    of ``Collector`` keyword arguments. Defaults (None) are the engine's (server/alerts.py Thresholds)."""
    import functools

    keys = (
        "alertmanager",
        "no_alerts",
        "alert_abs_angle",
        "alert_k",
        "alert_window",
        "alert_warmup",
        "alert_min_angle",
        "stall_seconds",
        "alert_resolve_after",
    )

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opts = {k: kwargs.pop(k) for k in keys}
        thresholds = {
            name: opts[key]
            for name, key in (
                ("abs_angle", "alert_abs_angle"),
                ("k", "alert_k"),
                ("window", "alert_window"),
                ("warmup", "alert_warmup"),
                ("min_angle", "alert_min_angle"),
                ("stall_seconds", "stall_seconds"),
            )
            if opts[key] is not None
        }
        from layrot.server.alerts import Thresholds  # serve loads the server anyway

        try:
            Thresholds(**thresholds)
        except ValueError as exc:
            raise click.UsageError(f"bad alert threshold: {exc}") from None
        alert_options = {
            "alerts": not opts["no_alerts"],
            "thresholds": thresholds,
            "alertmanager_url": list(opts["alertmanager"]),
            "alert_quiet": opts["alert_resolve_after"],
        }
        return fn(*args, alert_options=alert_options, **kwargs)

    options = [
        click.option(
            "--alertmanager",
            multiple=True,
            metavar="URL",
            envvar="LAYROT_ALERTMANAGER",
            show_envvar=True,
            help="Push alerts to this Alertmanager (http://host:9093; API v2). Repeat for an HA set.",
        ),
        click.option("--no-alerts", is_flag=True, help="Do not evaluate alerts (stored ones stay listable)."),
        click.option(
            "--alert-abs-angle",
            type=float,
            default=None,
            metavar="RAD",
            help="Default absolute step-angle limit in radians [default: 0.3 = 17 deg; inf disables].",
        ),
        click.option(
            "--alert-k",
            type=float,
            default=None,
            help="Default k: fire above median + k * spread of a layer's recent angles [default: 10].",
        ),
        click.option(
            "--alert-window",
            type=click.IntRange(min=3, max=10_000),
            default=None,
            help="Default baseline window in reported steps [default: 50].",
        ),
        click.option(
            "--alert-warmup",
            type=click.IntRange(min=1),
            default=None,
            help="Default reported steps before the baseline rule arms [default: 20].",
        ),
        click.option(
            "--alert-min-angle",
            type=float,
            default=None,
            metavar="RAD",
            help="Default angle in radians below which the baseline rule never fires [default: 0.01].",
        ),
        click.option(
            "--stall-seconds",
            type=float,
            default=None,
            help="Default seconds a connected run may stay silent before it is stalled [default: 900].",
        ),
        click.option(
            "--alert-resolve-after",
            type=click.FloatRange(min=1.0),
            default=300.0,
            show_default=True,
            help="Seconds without a new event after which a pushed alert is resolved in Alertmanager.",
        ),
    ]
    for opt in reversed(options):
        wrapper = opt(wrapper)
    return wrapper
