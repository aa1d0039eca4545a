"""The alert and security options of ``layrot-agent serve`` (apart from cli/alerts_cli.py, so a query command
need not load them)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import click


def _option_group(fn: Any, name: str, keys: Sequence[str], options: Sequence[Any], build: Callable[..., Any]) -> Any:
    """``fn`` with ``options``; the values of ``keys`` reach it as one keyword ``name``: ``build(values)``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {k: kwargs.pop(k) for k in keys}
        return fn(*args, **{name: build(values)}, **kwargs)

    for opt in reversed(options):
        wrapper = opt(wrapper)
    return wrapper


# ---------------------------------------------------------------- serve options
def _threshold(flag: str, type: Any, help: str, metavar: str | None = None) -> Any:
    """An alert threshold option: None leaves the engine's default."""
    return click.option(flag, type=type, default=None, metavar=metavar, help=help)


def _alert_options(opts: dict[str, Any]) -> dict[str, Any]:
    if not math.isfinite(opts["lost_grace"]):  # FloatRange lets NaN through
        raise click.BadParameter("must be finite seconds", param_hint="'--lost-grace'")
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
    out = {
        "alerts": not opts["no_alerts"],
        "thresholds": thresholds,
        "alertmanager_url": list(opts["alertmanager"]),
        "alertmanager_auth": {
            k: opts[o]
            for k, o in (
                ("user", "alertmanager_user"),
                ("password_file", "alertmanager_password_file"),
                ("token_file", "alertmanager_token_file"),
                ("ca", "alertmanager_ca"),
            )
            if opts[o]
        },
        "alert_quiet": opts["alert_resolve_after"],
        "lost_grace": opts["lost_grace"],
    }
    from layrot.server.alertmanager import AlertmanagerPusher

    for url in out["alertmanager_url"]:
        try:
            AlertmanagerPusher(url, **out["alertmanager_auth"])
        except ValueError as exc:
            raise click.UsageError(f"--alertmanager: {exc}") from None
    return out


def serve_alert_options(fn: Any) -> Any:
    """Alert options of ``layrot-agent serve``; the command receives them as one ``alert_options`` dict
    of ``Collector`` keyword arguments. Defaults (None) are the engine's (server/alerts.py Thresholds)."""
    keys = (
        "alertmanager",
        "alertmanager_user",
        "alertmanager_password_file",
        "alertmanager_token_file",
        "alertmanager_ca",
        "no_alerts",
        "alert_abs_angle",
        "alert_k",
        "alert_window",
        "alert_warmup",
        "alert_min_angle",
        "stall_seconds",
        "alert_resolve_after",
        "lost_grace",
    )
    options = [
        click.option(
            "--alertmanager",
            multiple=True,
            metavar="URL",
            envvar="LAYROT_ALERTMANAGER",
            show_envvar=True,
            help="Push alerts to this Alertmanager (http://host:9093; API v2). Repeat for an HA set. Basic auth "
            "may be in the URL (http://user:pw@host, percent-encoded).",
        ),
        click.option("--alertmanager-user", default=None, metavar="USER", help="Basic-auth user for Alertmanager."),
        click.option(
            "--alertmanager-password-file",
            default=None,
            metavar="FILE",
            help="File holding the basic-auth password of --alertmanager-user.",
        ),
        click.option(
            "--alertmanager-token-file",
            default=None,
            metavar="FILE",
            help="File holding a bearer token for Alertmanager (instead of basic auth).",
        ),
        click.option(
            "--alertmanager-ca",
            default=None,
            metavar="PEM",
            help="CA bundle to verify an https Alertmanager (or its proxy) with.",
        ),
        click.option("--no-alerts", is_flag=True, help="Do not evaluate alerts (stored ones stay listable)."),
        _threshold(
            "--alert-abs-angle",
            float,
            "Default extreme step angle in radians: a critical incident from the first step [default: 1.0 = 57 deg; "
            "inf disables].",
            metavar="RAD",
        ),
        _threshold(
            "--alert-k",
            float,
            "Default k: a layer jumps above median + k * spread of its recent log step angles [default: 9].",
        ),
        _threshold(
            "--alert-window",
            click.IntRange(min=3, max=10_000),
            "Default baseline window in reported steps [default: 50].",
        ),
        _threshold(
            "--alert-warmup",
            click.IntRange(min=1),
            "Default reported steps before the baseline rules arm [default: 20].",
        ),
        _threshold(
            "--alert-min-angle",
            float,
            "Default angle in radians below which a layer never jumps [default: 0.01].",
            metavar="RAD",
        ),
        _threshold(
            "--stall-seconds",
            float,
            "Default seconds a connected run may stay silent before it is stalled [default: 900].",
        ),
        click.option(
            "--lost-grace",
            type=click.FloatRange(min=0.0, max=86400.0),
            default=60.0,
            show_default=True,
            metavar="SECONDS",
            help="A job whose session ends without Goodbye (killed, host gone) and that does not come back "
            "(same run and rank) within SECONDS raises a run_lost alert; resolved when it comes back.",
        ),
        click.option(
            "--alert-resolve-after",
            type=click.FloatRange(min=1.0),
            default=300.0,
            show_default=True,
            help="Seconds without a new event after which a pushed alert is resolved in Alertmanager.",
        ),
    ]
    return _option_group(fn, "alert_options", keys, options, _alert_options)


# ---------------------------------------------------------------- security options
def _token(value: str | None, file: str | None, flag: str, env: str) -> str | None:
    """The token from --X-file or from --X / $ENV; both at once is an error (which one would win is not obvious)."""
    if file is None:
        return value or None
    if value:
        raise click.UsageError(f"give {flag} (or ${env}) or {flag}-file, not both")
    from layrot.server.auth import read_token_file

    try:
        return read_token_file(file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{flag}-file'") from None


def _security_options(o: dict[str, Any]) -> dict[str, Any]:
    if (o["tls_cert"] is None) != (o["tls_key"] is None):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key")
    if o["tls_client_ca"] and not o["tls_cert"]:
        raise click.UsageError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    token = _token(o["token"], o["token_file"], "--token", "LAYROT_TOKEN")
    read_token = _token(o["read_token"], o["read_token_file"], "--read-token", "LAYROT_READ_TOKEN")
    if read_token and token and read_token == token:
        raise click.UsageError("--read-token must differ from --token (the write token already allows reads)")
    return {
        "token": token,
        "read_token": read_token,
        "tls_cert": o["tls_cert"],
        "tls_key": o["tls_key"],
        "tls_client_ca": o["tls_client_ca"],
    }


def _token_options(flag: str, env: str, help: str, file_help: str) -> list[Any]:
    """``flag`` (also from ``$env``) and ``flag-file``, which reads it from a file (see :func:`_token`)."""
    return [
        click.option(flag, envvar=env, default=None, show_envvar=True, help=help),
        click.option(f"{flag}-file", type=click.Path(dir_okay=False), default=None, metavar="FILE", help=file_help),
    ]


def _pem_option(flag: str, env: str, help: str) -> Any:
    # Read by the collector, which names the file in its error.
    return click.option(
        flag, type=click.Path(dir_okay=False), default=None, metavar="FILE", envvar=env, show_envvar=True, help=help
    )


def serve_security_options(fn: Any) -> Any:
    """Token and TLS options of ``layrot-agent serve``; the command receives them as one ``security_options``
    dict of ``Collector`` keyword arguments (token, read_token, tls_cert, tls_key, tls_client_ca)."""
    keys = ("token", "token_file", "read_token", "read_token_file", "tls_cert", "tls_key", "tls_client_ca")
    options = [
        *_token_options(
            "--token",
            "LAYROT_TOKEN",
            "Write token: ingest (training jobs), control, thresholds and every other write call need "
            "'authorization: Bearer TOKEN'. Queries stay open unless --read-token is set.",
            "Read the write token from FILE (keeps it out of 'ps' and shell history).",
        ),
        *_token_options(
            "--read-token",
            "LAYROT_READ_TOKEN",
            "Read token: queries (runs, show, export, alerts, control status) need it or the write token. "
            "Health checks stay open.",
            "Read the read token from FILE.",
        ),
        _pem_option(
            "--tls-cert",
            "LAYROT_SERVE_TLS_CERT",
            "Serve gRPC and /metrics over TLS with this certificate (PEM, with its chain).",
        ),
        _pem_option("--tls-key", "LAYROT_SERVE_TLS_KEY", "Private key (PEM) of --tls-cert."),
        _pem_option(
            "--tls-client-ca",
            "LAYROT_SERVE_TLS_CLIENT_CA",
            "Mutual TLS: every gRPC and /metrics client must present a certificate this CA signed.",
        ),
    ]
    return _option_group(fn, "security_options", keys, options, _security_options)


# ---------------------------------------------------------------- ingest limits
# The defaults of server/decode.py IngestLimits and server/app.py, written out so that a query command
# need not load the server to build its --help (tests/test_cli.py checks that they agree).
LIMIT_DEFAULTS = {
    "max_layers": 10_000,
    "max_name_length": 1024,
    "max_steps_per_batch": 10_000,
    "max_runs": 50_000,
    "max_sessions": 20_000,
    "max_message_bytes": 16 * 1024 * 1024,
}
STORE_BUSY_TIMEOUT = 30.0


def _limit_options(o: dict[str, Any]) -> dict[str, Any]:
    if not math.isfinite(o["store_busy_timeout"]):  # FloatRange lets NaN through
        raise click.BadParameter("must be finite seconds", param_hint="'--store-busy-timeout'")
    from layrot.server.decode import IngestLimits  # serve loads the server anyway

    limits = IngestLimits(
        max_layers=o["max_layers"],
        max_name_length=o["max_name_length"],
        max_steps_per_batch=o["max_steps_per_batch"],
        max_runs=o["max_runs"],
        max_sessions=o["max_sessions"],
        max_message_bytes=o["max_message_bytes"],
    )
    return {
        "ingest_limits": limits,
        "max_message_bytes": o["max_message_bytes"],
        "store_busy_timeout": o["store_busy_timeout"],
    }


def serve_limit_options(fn: Any) -> Any:
    """Ingest limits of ``layrot-agent serve``; the command receives them as one ``limit_options`` dict of
    ``Collector`` keyword arguments (ingest_limits, max_message_bytes, store_busy_timeout)."""
    keys = (*LIMIT_DEFAULTS, "store_busy_timeout")

    def positive(name: str, help: str, minimum: int = 1, maximum: int | None = None) -> Any:
        return click.option(
            "--" + name.replace("_", "-"),
            name,
            type=click.IntRange(min=minimum, max=maximum),
            default=LIMIT_DEFAULTS[name],
            show_default=True,
            metavar="N",
            help=help,
        )

    options = [
        positive(
            "max_layers",
            "Layers one job may declare in its Hello; more are refused (reason too_many_layers).",
        ),
        positive(
            "max_name_length",
            "Characters of a layer name and of the other Hello strings (host, meta, ...) (reason name_too_long).",
        ),
        positive(
            "max_steps_per_batch",
            "Steps in one StepBatch; a longer batch is refused (reason too_many_steps).",
        ),
        positive(
            "max_runs",
            "Runs this collector keeps, restored ones included; a Hello for a new run beyond it is refused "
            "(reason too_many_runs).",
        ),
        positive(
            "max_sessions",
            "Open ingest sessions (one per training process); one more is refused with RESOURCE_EXHAUSTED and a "
            "retry hint (reason too_many_sessions): the job keeps its steps and comes back.",
        ),
        positive(
            "max_message_bytes",
            "Bytes of one message from a job (reason too_large; gRPC itself cuts off messages 4x larger).",
            minimum=65536,  # query answers share the limit
            maximum=(2**31 - 1) // 4,
        ),
        click.option(
            "--store-busy-timeout",
            "store_busy_timeout",
            type=click.FloatRange(min=0.0, max=3600.0),
            default=STORE_BUSY_TIMEOUT,
            show_default=True,
            metavar="SECONDS",
            help="How long a history write waits for a lock held by another connection before it fails "
            "(the job's batch is then nacked and resent).",
        ),
    ]
    return _option_group(fn, "limit_options", keys, options, _limit_options)


def serve_metrics_options(fn: Any) -> Any:
    """What ``/metrics`` exports and the generalization indicator; the command receives them as one
    ``metrics_options`` dict of ``Collector`` keyword arguments."""
    specs = (
        (
            "--run-ttl",
            3600.0,
            click.FloatRange(min=0.0),
            "SECONDS",
            "Seconds after its last report that a disconnected run leaves /metrics (its history is kept).",
        ),
        (
            "--max-series",
            0,
            click.IntRange(min=0),
            "N",
            "Cap on the per-layer series of /metrics (4 per layer: rotation, step angle, norm, rho). Runs beyond "
            "it, connected and newest first, are exported as run-level aggregates only (min / mean / max / "
            "quantiles; layrot_run_aggregate_only 1). 0 = no cap.",
        ),
        (
            "--aggregate-layers",
            0,
            click.IntRange(min=0),
            "N",
            "Export runs with more than N layers as run-level aggregates only (for huge models). 0 = never.",
        ),
        (
            "--rotation-target",
            0.9,
            click.FloatRange(min=0.0, max=2.0, min_open=True),
            "X",
            "Generalization indicator: a layer is 'at target' once its rotation (cosine distance to its init) "
            "reaches X (the paper's rule of thumb: every layer near 1). Shown by runs, show, /metrics, the web view.",
        ),
        (
            "--under-rotated-share",
            0.5,
            click.FloatRange(min=0.0, max=1.0),
            "S",
            "Flag layers still below --rotation-target as under-rotated once a run is past this share of its "
            "announced steps (watch(total_steps=...) and the Lightning / HF / Keras callbacks announce them).",
        ),
    )
    keys = [flag[2:].replace("-", "_") for flag, *_ in specs]
    options = [
        click.option(flag, key, default=default, show_default=True, type=kind, metavar=metavar, help=text)
        for key, (flag, default, kind, metavar, text) in zip(keys, specs)
    ]
    return _option_group(fn, "metrics_options", keys, options, dict)


def _age(ctx: Any, param: Any, value: str | None) -> float | None:
    """A click callback: '90d' / '12h' / seconds as seconds (None stays None)."""
    if value is None:
        return None
    from layrot.server.retention import parse_age

    try:
        return parse_age(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _retention_options(o: dict[str, Any]) -> dict[str, Any]:
    from layrot.server.retention import RetentionPolicy

    if (o["downsample_after"] is None) != (o["downsample_every"] is None):
        raise click.UsageError("--downsample-after and --downsample-every go together")
    policy = RetentionPolicy(o["retention"], o["downsample_after"], o["downsample_every"] or 0)
    return {"retention": policy, "retention_interval": o["retention_interval"]}


def serve_retention_options(fn: Any) -> Any:
    """History retention and downsampling of ``layrot-agent serve``; the command receives them as one
    ``retention_options`` dict of ``Collector`` keyword arguments (retention, retention_interval)."""
    options = [
        click.option(
            "--retention",
            "retention",
            default=None,
            callback=_age,
            metavar="AGE",
            help="Delete history older than AGE (e.g. 90d, 12h, or seconds); a run whose last report is older "
            "goes entirely (steps, layers, alerts, commands). Off by default: everything is kept.",
        ),
        click.option(
            "--downsample-after",
            "downsample_after",
            default=None,
            callback=_age,
            metavar="AGE",
            help="Of the steps reported more than AGE ago keep only every --downsample-every-th step "
            "(multiples of it); newer steps stay whole. Alerts keep their own table.",
        ),
        click.option(
            "--downsample-every",
            "downsample_every",
            default=None,
            type=click.IntRange(min=2),
            metavar="K",
            help="With --downsample-after: the step interval kept in old history.",
        ),
        click.option(
            "--retention-interval",
            "retention_interval",
            default=3600.0,
            show_default=True,
            type=click.FloatRange(min=1.0),
            metavar="SECONDS",
            help="How often retention and downsampling run (their own thread, bounded transactions of 1000 "
            "steps, counted in layrot_history_deleted_steps_total / _runs_total).",
        ),
    ]
    keys = ("retention", "downsample_after", "downsample_every", "retention_interval")
    return _option_group(fn, "retention_options", keys, options, _retention_options)


def serve_cluster_options(fn: Any) -> Any:
    """Several collectors on one PostgreSQL database (server/cluster.py); the command receives them as one
    ``cluster_options`` dict of ``Collector`` keyword arguments (collector_id, cluster_interval)."""
    options = [
        click.option(
            "--collector-id",
            "collector_id",
            default=None,
            envvar="LAYROT_COLLECTOR_ID",
            show_envvar=True,
            metavar="ID",
            help="This collector's name among those on one postgresql:// --db (default: HOSTNAME:GRPC-PORT, "
            "a pod's name under Kubernetes). Each collector exports to /metrics only the runs it holds; all "
            "see every run. Must differ between collectors.",
        ),
        click.option(
            "--cluster-interval",
            "cluster_interval",
            default=2.0,
            show_default=True,
            type=click.FloatRange(min=0.1),
            metavar="SECONDS",
            help="With a postgresql:// --db: how often this collector tells the others which runs it holds, and "
            "learns the runs, reports and control commands that reached them.",
        ),
    ]
    return _option_group(fn, "cluster_options", ("collector_id", "cluster_interval"), options, dict)
