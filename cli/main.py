"""``layrot-agent``: run the collector, query runs, export history, draw curves, run the demo.

Commands that talk to a collector take ``--collector ADDR`` (or
``$LAYROT_COLLECTOR``, default ``localhost:50051``), ``--token`` (or
``$LAYROT_TOKEN``) and ``--tls-ca`` / ``--tls-cert`` / ``--tls-key`` (or
``$LAYROT_TLS_CA`` / ``_CERT`` / ``_KEY``). Errors print one line and exit with status 1.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from layrot.cli.cli_common import (
    CONTEXT_SETTINGS,
    check_output_folder,
    collector_options,
)
from layrot.cli.cli_common import (
    age as _age,
)
from layrot.cli.cli_common import (
    client as _client,
)
from layrot.cli.cli_common import (
    echo_json as _echo_json,
)
from layrot.cli.cli_common import (
    fmt as _fmt,
)
from layrot.cli.cli_common import (
    table as _table,
)
from layrot.cli.export_format import EXPORT_FIELDS
from layrot.cli.serve_options import (
    serve_alert_options,
    serve_limit_options,
    serve_metrics_options,
    serve_security_options,
)
from layrot.client.errors import CollectorError

# Start-up matters (every command is a new process): grpc, protobuf and numpy load
# in the commands that talk to a collector, matplotlib in `curves`, the server in
# `serve` and `demo`. tests/test_cli.py checks what a query command imports.
if TYPE_CHECKING:  # pragma: no cover
    from layrot.client.history import History

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FIELDS", "cli", "main"]


# ---------------------------------------------------------------- group
class LazyGroup(click.Group):
    """A group whose larger subcommand groups load from their modules when first asked for.

    ``lazy``: command name -> "module:attribute". ``layrot-agent runs`` then never
    executes the control and Grafana command definitions; ``--help`` loads them all.
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib

            module, attr = self.lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    context_settings=CONTEXT_SETTINGS,
    lazy={
        "alerts": "layrot.cli.alerts_cli:alerts_command",
        "compare": "layrot.cli.curves_cli:compare_command",
        "curves": "layrot.cli.curves_cli:curves_command",
        "control": "layrot.cli.control_cli:control_group",
        "grafana": "layrot.cli.grafana:grafana_group",
        "sync": "layrot.cli.sync:sync_command",
    },
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Logging level (logs go to stderr).",
)
@click.version_option(package_name="layrot", prog_name="layrot-agent")
def cli(log_level: str) -> None:
    """layrot: watch and steer layer rotation in running training jobs.

    \b
    Start a collector, point training jobs at it, then look at the runs:
      layrot-agent serve --db /var/lib/layrot/layrot.db
      layrot-agent runs
      layrot-agent show my-run
      layrot-agent export my-run --format csv -o my-run.csv
      layrot-agent curves my-run -o my-run.png
    Or see everything end to end on a small model:
      layrot-agent demo
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


# ---------------------------------------------------------------- serve
def check_db_path(db: str) -> None:
    """``--db`` is a SQLite file or a ``postgresql://`` URL; refuse any other URL (click refuses a folder)."""
    from layrot.server.store_api import is_postgres_url, is_url

    if is_url(db) and not is_postgres_url(db):
        raise click.BadParameter(
            # The URL itself is not echoed: it may carry a password.
            f"got a {db.split('://', 1)[0]}:// URL; the history is a SQLite file or a PostgreSQL database: "
            "give a file path (--db /var/lib/layrot/layrot.db) or a URL (--db postgresql://user@host/db)",
            param_hint="'--db'",
        )


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--grpc-host",
    default="127.0.0.1",
    show_default=True,
    help="Interface for gRPC (ingest + queries); 0.0.0.0 (or ::) for every interface, i.e. for jobs on other hosts.",
)
@click.option("--grpc-port", default=50051, show_default=True, type=int, help="gRPC port (0 = any free port).")
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Interface for Prometheus /metrics; 0.0.0.0 when Prometheus runs on another host or container.",
)
@click.option(
    "--metrics-port", default=9400, show_default=True, type=int, help="Port of Prometheus /metrics (0 = any free port)."
)
@click.option(
    "--db",
    "db",
    default="./layrot.db",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="History database: a SQLite file (created with its folders if missing), or a PostgreSQL URL "
    "postgresql://user[:password]@host[:port]/db (needs the postgres extra: pip install 'layrot[postgres]'). "
    "History survives restarts.",
)
@serve_security_options
@serve_metrics_options
@click.option(
    "--no-ui",
    "no_ui",
    is_flag=True,
    help="Do not serve the web view at / of the metrics port (/metrics, /healthz, /readyz and /api/v1 stay).",
)
@serve_alert_options
@serve_limit_options
def serve(
    grpc_host: str,
    grpc_port: int,
    metrics_host: str,
    metrics_port: int,
    db: str,
    no_ui: bool,
    metrics_options: dict[str, Any],
    security_options: dict[str, Any],
    alert_options: dict[str, Any],
    limit_options: dict[str, Any],
) -> None:
    """Run the collector daemon: gRPC ingest and queries, /metrics, history store.

    Stops cleanly on SIGTERM / Ctrl-C (pending history is flushed).
    What one job may send is bounded (--max-layers, --max-name-length,
    --max-steps-per-batch, --max-runs, --max-message-bytes); every refusal is
    counted in layrot_messages_rejected_total{reason}.

    It listens on 127.0.0.1 unless --grpc-host / --metrics-host say otherwise.
    Beyond this machine, use a token (writes; --read-token for queries too) and
    TLS (the token travels in clear text without it); serve warns when one is
    missing. Jobs and the CLI then set LAYROT_TOKEN and LAYROT_TLS_CA (the CA
    file that signed --tls-cert); with --tls-client-ca also LAYROT_TLS_CERT and
    LAYROT_TLS_KEY. Health checks are always open.

    A web view (runs, live layer rotation curves, step-angle heatmap, alerts,
    Layca rates, run comparison) is at http://METRICS-HOST:METRICS-PORT/ unless
    --no-ui; with --read-token it asks for the token (kept in the browser tab).

    \b
    Examples:
      layrot-agent serve                        # this machine only, no token, no TLS
      layrot-agent serve --grpc-port 50051 --metrics-port 9400 --db /data/layrot.db
      # every interface, the write token from a file, TLS:
      layrot-agent serve --grpc-host 0.0.0.0 --metrics-host 0.0.0.0 \\
          --token-file /etc/layrot/token --tls-cert server.pem --tls-key server.key
      # mutual TLS: clients need a certificate signed by clients-ca.pem
      layrot-agent serve --grpc-host 0.0.0.0 --tls-cert server.pem --tls-key server.key \\
          --tls-client-ca clients-ca.pem
      # queries need a token too (the read token or the write token)
      LAYROT_TOKEN=w LAYROT_READ_TOKEN=r layrot-agent serve --grpc-host 0.0.0.0
      layrot-agent serve --alertmanager http://alertmanager:9093 --alert-abs-angle 0.25
    """
    check_db_path(db)
    from layrot.server.app import Collector  # the daemon's dependencies only load here

    collector = Collector(
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        db_path=db,
        ui=not no_ui,
        **metrics_options,
        **security_options,
        **alert_options,
        **limit_options,
    )
    try:
        collector.start()
    except Exception as exc:
        import sqlite3

        from layrot.server.auth import TLSFileError

        if isinstance(exc, TLSFileError):
            raise click.ClickException(str(exc)) from None
        from layrot.server.store_api import StoreError, redact_url

        if isinstance(exc, sqlite3.Error):
            raise click.ClickException(f"cannot open the history database {db}: {exc}") from None
        if isinstance(exc, StoreError):  # its message names the database (a URL without its password)
            raise click.ClickException(f"cannot open the history database: {exc}") from None
        if isinstance(exc, ImportError) and exc.name in ("psycopg", "psycopg_pool"):
            raise click.ClickException(
                f"--db {redact_url(db)} needs psycopg: pip install 'layrot[postgres]' ({exc})"
            ) from None
        if isinstance(exc, OSError) and exc.filename is not None:
            raise click.ClickException(f"cannot start the collector: {exc.strerror}: {exc.filename}") from None
        raise click.ClickException(f"cannot start the collector (db {redact_url(db)}): {exc}") from None
    click.echo(
        f"layrot collector: gRPC {grpc_host}:{collector.grpc_port}, metrics {collector.metrics_url}, "
        f"{f'JSON API {collector.http_url}/api/v1, ' if getattr(collector, 'http_url', None) else ''}"
        f"db {collector.store.description if collector.store else db} ({collector.security_summary})",
        err=True,
    )
    collector.serve_forever()


# ---------------------------------------------------------------- runs / show
@cli.command(context_settings=CONTEXT_SETTINGS)
@collector_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def runs(collector: str, token: str | None, as_json: bool) -> None:
    """List the runs the collector knows.

    \b
    Examples:
      layrot-agent runs
      layrot-agent runs --collector collector.internal:50051 --json
      layrot-agent runs --collector collector.internal:50051 --tls-ca ca.pem   # a TLS collector
    """
    try:
        with _client(collector, token) as q:
            items = q.list_runs()
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _echo_json(items)
        return
    if not items:
        click.echo(f"no runs yet on {collector}")
        return
    now = time.time()
    rows = [
        [
            r["run"],
            r["framework"] or "-",
            str(r["step"]),
            str(r["num_layers"]),
            _fmt(r["min_rotation"]),
            _fmt(r["mean_rotation"]),
            _at_target(r),
            "yes" if r["connected"] else "no",
            _age(r["last_report"], now),
        ]
        for r in items
    ]
    target = items[0].get("rotation_target") or 0.9
    click.echo(
        _table(
            ["RUN", "FRAMEWORK", "STEP", "LAYERS", "MIN ROT", "MEAN ROT", f"AT {target:g}", "CONNECTED", "LAST REPORT"],
            rows,
            right={2, 3, 4, 5, 6},
        )
    )


def _at_target(r: dict[str, Any]) -> str:
    """The indicator for a table: "k/L" layers at the rotation target, and the under-rotated once judged."""
    ratio, layers = r.get("layers_at_target_ratio"), r.get("num_layers") or 0
    if ratio is None or not math.isfinite(ratio) or not layers:
        return "-"
    text = f"{round(ratio * layers)}/{layers}"
    if r.get("indicator_judged") and r.get("layers_under_rotated"):
        text += f" ({r['layers_under_rotated']} under)"
    return text


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("run")
@collector_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show(run: str, collector: str, token: str | None, as_json: bool) -> None:
    """Show the newest per-layer state of RUN.

    Rotation is the cosine distance of each layer's weights to their
    initialization (0 = unchanged, 1 = orthogonal); the step angle is the
    rotation within the last reported optimizer step.

    \b
    Examples:
      layrot-agent show resnet-a
      layrot-agent show resnet-a --json | jq '.layers[] | .rotation'
    """
    try:
        with _client(collector, token) as q:
            detail = q.get_run(run)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _echo_json(detail)
        return
    now = time.time()
    click.echo(
        f"run {detail['run']}  framework {detail['framework'] or '-'}  host {detail['host'] or '-'}  "
        f"step {detail['step']}  layers {detail['num_layers']}  "
        f"{'connected' if detail['connected'] else 'disconnected'}  "
        f"last report {_age(detail['last_report'], now)}"
    )
    if detail["layers"]:
        if detail.get("indicator_judged"):
            when = "under-rotated layers (still below it) are marked *"
        elif detail.get("total_steps"):
            when = f"under-rotation is judged later in the run (of {detail['total_steps']} steps)"
        else:
            when = "the run announced no length, so under-rotation is not judged (watch(..., total_steps=N))"
        click.echo(f"at rotation {detail.get('rotation_target', 0.9):g}: {_at_target(detail)} layers; {when}")
    rows = []
    for lay in detail["layers"]:
        ang = lay["step_angle"]
        rows.append(
            [
                str(lay["index"]),
                lay["name"] + (" *" if lay.get("under_rotated") else ""),
                "x".join(str(s) for s in lay["shape"]) or "-",
                _fmt(lay["rotation"]),
                _fmt(ang),
                _fmt(math.degrees(ang) if math.isfinite(ang) else None),
                _fmt(lay["weight_norm"]),
                _fmt(lay["rho"]),
            ]
        )
    click.echo(
        _table(
            ["INDEX", "LAYER", "SHAPE", "ROTATION", "STEP ANGLE (RAD)", "(DEG)", "WEIGHT NORM", "RHO"],
            rows,
            right={0, 3, 4, 5, 6, 7},
        )
    )


# ---------------------------------------------------------------- export
@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("run")
@click.option(
    "--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True, help="Output format."
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), default="-", help="Output file (default: stdout)."
)
@click.option("--since-step", type=click.IntRange(min=0), default=0, help="First step to export (inclusive).")
@click.option("--until-step", type=click.IntRange(min=0), default=0, help="Last step to export (inclusive; 0 = end).")
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True, help="Which rank's rows.")
@collector_options
def export(
    run: str, fmt: str, output: str, since_step: int, until_step: int, rank: int, collector: str, token: str | None
) -> None:
    """Export the per-step, per-layer history of RUN as JSON or CSV.

    One record per step and layer with the fields run, step (optimizer step,
    1 after the first), layer, layer_index (0 = input side), rotation (cosine
    distance to initialization), step_angle (radians), weight_norm and rho
    (Layca rate; null/empty without Layca). Non-finite values are null
    (JSON) or empty (CSV).

    \b
    Examples:
      layrot-agent export resnet-a --format csv -o resnet-a.csv
      layrot-agent export resnet-a --since-step 1000 --until-step 2000 > part.json
    """
    check_output_folder(output)
    from layrot.cli.export_format import write_csv, write_json

    writer = write_json if fmt == "json" else write_csv
    counts = {"steps": 0, "layers": 0}

    def chunks() -> Iterator[History]:
        # Stream chunk by chunk: constant memory however long the run is.
        with _client(collector, token) as q:
            for part in q.iter_history(run, since_step=since_step, until_step=until_step, rank=rank):
                counts["steps"] += len(part)
                counts["layers"] = part.num_layers
                yield part

    stream = chunks()
    try:
        # Pull the first chunk before opening the output, so an unreachable
        # collector or unknown run leaves no empty file behind.
        head = list(itertools.islice(stream, 1))
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with click.open_file(output, "w", encoding="utf-8") as out:
            writer(itertools.chain(head, stream), out)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    if output != "-":
        click.echo(
            f"wrote {counts['steps'] * counts['layers']} records ({counts['steps']} steps x "
            f"{counts['layers']} layers) to {output}",
            err=True,
        )


# ---------------------------------------------------------------- demo
@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1), help="Training steps.")
@click.option(
    "--every", default=1, show_default=True, type=click.IntRange(min=1), help="Report every N optimizer steps."
)
@click.option(
    "--out",
    "out",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory for the demo's outputs (history db, curves); default: ./layrot-demo.",
)
@click.option(
    "--serve/--no-serve",
    default=False,
    show_default=True,
    help="Keep the embedded collector running after training (Ctrl-C to stop).",
)
def demo(steps: int, every: int, out: str | None, serve: bool) -> None:
    """Train a small real model with the hook, end to end, on an embedded collector.

    \b
    Examples:
      layrot-agent demo
      layrot-agent demo --steps 1000 --out ./demo-out --serve
    """
    try:
        from layrot.cli.demo import run_demo
    except ImportError as exc:
        raise click.ClickException(
            f"the demo needs PyTorch and scikit-learn ({exc}); pip install 'layrot[torch,demo]'"
        ) from None
    run_demo(steps=steps, every=every, out=out, serve=serve)


def main(argv: list[str] | None = None) -> None:
    """Run ``layrot-agent`` (the console entry point is ``layrot.cli.console_main``, which checks the extra)."""
    try:
        cli.main(args=argv, prog_name="layrot-agent")
    except KeyboardInterrupt:  # pragma: no cover - interactive
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
