"""``layrot-agent delete RUN`` and ``layrot-agent compact``: the history's upkeep, through the collector.

Both are writes (the collector's write token, ``serve --token``) and both go over gRPC:
the collector owns its database, so nothing here opens the file or the URL itself.
"""

from __future__ import annotations

from typing import Any

import click

from layrot.cli.cli_common import collector_options_with, write_client
from layrot.client.errors import CollectorError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_TOKEN_HELP = "The collector's write token (serve --token), when it has one."


def _collector_options(fn: Any) -> Any:
    return collector_options_with(fn, _TOKEN_HELP)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@click.command("delete", context_settings=CONTEXT_SETTINGS)
@click.argument("run")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_collector_options
def delete_command(run: str, yes: bool, collector: str, token: str | None) -> None:
    """Delete RUN's whole history: its steps of every rank, layers, alerts, control commands and audit.

    Refused while a job of the run is connected (stop it first). There is no undo;
    `layrot-agent export RUN -o RUN.csv` first keeps a copy.

    \b
      layrot-agent delete old-sweep-17
      layrot-agent delete old-sweep-17 --yes --collector collector:50051
    """
    if not yes:
        click.confirm(f"Delete run {run!r} and all its history on {collector}?", abort=True)
    try:
        with write_client(collector, token) as q:
            steps = q.delete_run(run)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"deleted run {run} ({steps} steps rows)")


@click.command("compact", context_settings=CONTEXT_SETTINGS)
@_collector_options
def compact_command(collector: str, token: str | None) -> None:
    """Apply the collector's retention now (serve --retention / --downsample-after) and reclaim the space.

    SQLite: the file shrinks to what it holds (VACUUM; ingest waits meanwhile, so run it at
    a quiet time). PostgreSQL: plain VACUUM, the space is reused rather than returned.

    \b
      layrot-agent compact --collector collector:50051
    """
    try:
        with write_client(collector, token) as q:
            out = q.compact()
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"retention deleted {out['steps']} steps rows and {out['runs']} runs, {out['orphan_samples']} orphan samples;"
        f" history {_size(out['bytes_before'])} -> {_size(out['bytes_after'])}"
    )
