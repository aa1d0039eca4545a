"""``layrot-agent serve``: the collector daemon (its options load only for this command)."""

from __future__ import annotations

from typing import Any

import click

from layrot.cli.cli_common import CONTEXT_SETTINGS
from layrot.cli.serve_options import (
    serve_alert_options,
    serve_cluster_options,
    serve_limit_options,
    serve_metrics_options,
    serve_retention_options,
    serve_security_options,
)

__all__ = ["check_db_path", "serve", "serve_command"]


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


@click.command("serve", context_settings=CONTEXT_SETTINGS)
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
    envvar="LAYROT_DB",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="History database: a SQLite file (created with its folders if missing), or a PostgreSQL URL "
    "postgresql://user[:password]@host[:port]/db (needs the postgres extra: pip install 'layrot[postgres]'). "
    "History survives restarts. Give a URL with a password by LAYROT_DB, which keeps it out of the process list.",
)
@serve_security_options
@serve_metrics_options
@click.option(
    "--no-ui",
    "no_ui",
    is_flag=True,
    help="Do not serve the web view at / of the metrics port (/metrics, /healthz, /readyz and /api/v1 stay).",
)
@click.option(
    "--ui-port",
    "ui_port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve the web view on a port of its own (with /api/v1; on --metrics-host, same TLS and tokens), "
    "/metrics then only on --metrics-port: e.g. --ui-port 9401 (0 = any free port).",
)
@serve_alert_options
@serve_limit_options
@serve_retention_options
@serve_cluster_options
def serve_command(
    grpc_host: str,
    grpc_port: int,
    metrics_host: str,
    metrics_port: int,
    db: str,
    no_ui: bool,
    ui_port: int | None,
    metrics_options: dict[str, Any],
    security_options: dict[str, Any],
    alert_options: dict[str, Any],
    limit_options: dict[str, Any],
    retention_options: dict[str, Any],
    cluster_options: dict[str, Any],
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
    --no-ui, or at http://METRICS-HOST:UI-PORT/ with --ui-port; with --read-token
    it asks for the token (kept in the browser tab).

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
      # the web view on a port of its own: http://HOST:9401/ (/metrics stays on 9400)
      layrot-agent serve --metrics-host 0.0.0.0 --ui-port 9401 --read-token-file /etc/layrot/read
    """
    check_db_path(db)
    if ui_port is not None and no_ui:
        raise click.UsageError("--ui-port serves the web view, which --no-ui turns off: give one of them, not both")
    if ui_port and ui_port in (metrics_port, grpc_port):
        raise click.UsageError(
            f"--ui-port {ui_port} is taken by --{'metrics' if ui_port == metrics_port else 'grpc'}-port:"
            " the web view needs a port of its own"
        )
    from layrot.server.app import Collector  # the daemon's dependencies only load here

    collector = Collector(
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        db_path=db,
        ui=not no_ui,
        ui_port=ui_port,
        **metrics_options,
        **security_options,
        **alert_options,
        **limit_options,
        **retention_options,
        **cluster_options,
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
        f"{f'web view {collector.ui_url}, ' if getattr(collector, 'ui_url', None) else ''}"
        f"db {collector.store.description if collector.store else db} ({collector.security_summary})",
        err=True,
    )
    collector.serve_forever()


# The command object under its old name (``layrot.cli.main.serve`` before it moved here).
serve = serve_command
