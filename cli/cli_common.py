"""Pieces every ``layrot-agent`` command module shares: options, tables, JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from layrot.client.errors import DEFAULT_COLLECTOR
from layrot.core.json_safe import jsonable

if TYPE_CHECKING:  # pragma: no cover
    from layrot.client.query import QueryClient
    from layrot.client.reader import ReadClient

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


TLS_META = "layrot.tls"  # click context meta key: {"ca": ..., "cert": ..., "key": ...}


def _remember_tls(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Stored in ctx.meta (shared by a group and its subcommands) rather than passed to every
    # command function: each command then keeps its signature, and `alerts thresholds`
    # inherits what `alerts` was given unless it is given its own.
    if not value or param.name is None:
        return
    given = ctx.meta.setdefault(TLS_META, {})
    key = param.name.removeprefix("tls_")
    # The environment never overrides a value the parent command was given explicitly.
    if key in given and ctx.get_parameter_source(param.name) is click.core.ParameterSource.ENVIRONMENT:
        return
    given[key] = value


def tls_options(fn: Callable) -> Callable:
    """--tls-ca, --tls-cert, --tls-key (LAYROT_TLS_CA / _CERT / _KEY): TLS and mutual TLS to the collector."""
    for name, env, text in reversed(
        (
            (
                "--tls-ca",
                "LAYROT_TLS_CA",
                "CA certificate (PEM) that signed the collector's certificate; turns TLS on. "
                "Needed when the collector runs with --tls-cert.",
            ),
            (
                "--tls-cert",
                "LAYROT_TLS_CERT",
                "Client certificate (PEM) for mutual TLS, when the collector runs with --tls-client-ca.",
            ),
            ("--tls-key", "LAYROT_TLS_KEY", "Private key (PEM) of --tls-cert."),
        )
    ):
        fn = click.option(
            name,
            envvar=env,
            show_envvar=True,
            default=None,
            metavar="FILE",
            expose_value=False,
            callback=_remember_tls,
            help=text,
        )(fn)
    return fn


def collector_options(fn: Callable) -> Callable:
    """--collector, --token and the TLS options, shared by every command that talks to a collector."""
    return collector_options_with(
        fn,
        "Bearer token of the collector: its write token for control and other writes (serve --token); "
        "its read token or write token for queries when it runs with --read-token.",
    )


def collector_options_with(fn: Callable, token_help: str) -> Callable:
    """:func:`collector_options` with ``token_help`` as the help of --token."""
    fn = tls_options(fn)
    fn = click.option("--token", envvar="LAYROT_TOKEN", default=None, show_envvar=True, help=token_help)(fn)
    fn = click.option(
        "--collector",
        "collector",
        envvar="LAYROT_COLLECTOR",
        default=DEFAULT_COLLECTOR,
        show_default=True,
        show_envvar=True,
        metavar="ADDR",
        help="Collector address: its gRPC port host:port, or its HTTP port http(s)://host:port "
        "(serve --metrics-port; read commands only, and they start twice as fast).",
    )(fn)
    return fn


def _tls_given() -> dict[str, str]:
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(TLS_META, {}) if ctx is not None else {}


def client(collector: str, token: str | None) -> ReadClient:
    """A read client with the command's TLS options: the HTTP API for an ``http(s)://`` address, else gRPC.

    The HTTP client loads neither grpc nor protobuf; grpc and the generated code load
    here, on first use, and only for a gRPC address.
    """
    from layrot.client.http_query import HttpQueryClient, is_http_address

    if is_http_address(collector):
        given = _tls_given()
        return HttpQueryClient(collector, token, ca=given.get("ca"), cert=given.get("cert"), key=given.get("key"))
    return write_client(collector, token)


def write_client(collector: str, token: str | None) -> QueryClient:
    """A gRPC client for commands that write (control, thresholds); an ``http(s)://`` address is a usage error."""
    from layrot.client.http_query import is_http_address
    from layrot.client.query import QueryClient, TLSConfig

    if is_http_address(collector):
        raise click.UsageError(
            f"{collector} is the collector's HTTP port, which only reads; this command writes:"
            " give its gRPC address host:port (--collector / LAYROT_COLLECTOR)"
        )
    given = _tls_given()
    return QueryClient(collector, token, tls=TLSConfig.from_env(given.get("ca"), given.get("cert"), given.get("key")))


def check_output_folder(output: str) -> None:
    """``-o`` into a folder that does not exist: one clear error before anything is fetched."""
    if output == "-":
        return
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise click.BadParameter(
            f"cannot write {output}: folder {os.path.dirname(output) or folder} does not exist (create it first)",
            param_hint="'-o' / '--output'",
        )


def num(x: float | None) -> float | None:
    """JSON-safe number: NaN/Inf become null."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def fmt(x: float | None, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def age(t: float | None, now: float) -> str:
    if not t:
        return "never"
    d = max(0.0, now - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= size:
            return f"{d / size:.0f}{unit} ago"
    return f"{d:.0f}s ago"


def table(headers: list[str], rows: list[list[str]], right: set[int] | frozenset[int] = frozenset()) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(jsonable(obj), indent=2, allow_nan=False))
