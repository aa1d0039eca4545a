"""Pieces every ``layrot-agent`` command module shares: options, tables, JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from layrot.client.errors import DEFAULT_COLLECTOR

if TYPE_CHECKING:  # pragma: no cover
    from layrot.client.query import QueryClient

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def collector_options(fn: Callable) -> Callable:
    """--collector and --token, shared by every command that talks to a collector."""
    fn = click.option(
        "--token",
        envvar="LAYROT_TOKEN",
        default=None,
        show_envvar=True,
        help="Bearer token of the collector (needed for write calls, e.g. control, when it runs with --token).",
    )(fn)
    fn = click.option(
        "--collector",
        "collector",
        envvar="LAYROT_COLLECTOR",
        default=DEFAULT_COLLECTOR,
        show_default=True,
        show_envvar=True,
        metavar="ADDR",
        help="Collector gRPC address host:port.",
    )(fn)
    return fn


def client(collector: str, token: str | None) -> QueryClient:
    """A query client; grpc and the generated code load here, on the first command that talks to a collector."""
    from layrot.client.query import QueryClient

    return QueryClient(collector, token)


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


def jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return num(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(jsonable(obj), indent=2, allow_nan=False))
