"""``layrot-agent sync``: upload the spools of finished or offline jobs to a collector.

A spool is a folder ``<run>.r<rank>`` holding the run's Hello and its
unacknowledged batches (:mod:`layrot.agent.spool`). Each is uploaded on its own
replay session (:func:`layrot.agent.upload.upload_spool`) with its own Hello and
run key; acknowledged records are released as the acks come, and a spool whose
every record is stored is removed. Running sync twice uploads nothing twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from layrot.cli.cli_common import CONTEXT_SETTINGS

__all__ = ["sync_command", "find_spools"]


def _is_spool(path: Path) -> bool:
    return (path / "hello.pb").is_file() or any(path.glob("*.seg"))


def find_spools(paths: list[Path]) -> list[Path]:
    """Spool folders: each PATH that is one, else the spools directly under it (a root)."""
    found: list[Path] = []
    for p in paths:
        if _is_spool(p):
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(c for c in p.iterdir() if c.is_dir() and _is_spool(c)))
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]  # type: ignore[func-returns-value]


@click.command("sync", context_settings=CONTEXT_SETTINGS)
@click.argument("paths", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--collector",
    envvar="LAYROT_COLLECTOR",
    default="localhost:50051",
    show_default=True,
    show_envvar=True,
    metavar="ADDR",
    help="Collector gRPC address host:port.",
)
@click.option("--token", envvar="LAYROT_TOKEN", default=None, show_envvar=True, help="Bearer token of the collector.")
@click.option("--tls-ca", envvar="LAYROT_TLS_CA", default=None, show_envvar=True, help="CA file: talk TLS.")
@click.option("--tls-cert", envvar="LAYROT_TLS_CERT", default=None, show_envvar=True, help="Client cert (mTLS).")
@click.option("--tls-key", envvar="LAYROT_TLS_KEY", default=None, show_envvar=True, help="Client key (mTLS).")
@click.option("--timeout", default=60.0, show_default=True, help="Give up on a spool after this many idle seconds.")
def sync_command(
    paths: tuple[Path, ...],
    collector: str,
    token: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    timeout: float,
) -> None:
    """Upload the spools of finished or offline jobs (steps not acknowledged by a collector).

    PATH is a spool folder (RUN.rRANK) or a folder of them; by default every spool under
    $LAYROT_SPOOL_DIR (else ~/.cache/layrot/spool). Spools of jobs still running are
    skipped. Exit status 0 when everything was stored, 1 when some steps were refused or
    a spool could not be uploaded.

    \b
    Examples:
      layrot-agent sync --collector collector:50051
      layrot-agent sync ~/.cache/layrot/spool/my-run.r0 --collector localhost:50051
    """
    import grpc

    from layrot.agent.spool import Spool, default_spool_root
    from layrot.agent.transport import AddressError, TLSConfig, check_address, open_channel
    from layrot.agent.upload import upload_spool

    try:
        check_address(collector)
        tls = TLSConfig.from_env(tls_ca, tls_cert, tls_key)
        if tls.enabled:
            tls.credentials()
    except (AddressError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    roots = list(paths) or [default_spool_root()]
    spools: list[tuple[Path, Spool]] = []
    busy = 0
    for path in find_spools([r for r in roots if r.exists()]):
        sp = Spool(path)
        if not sp.try_lock():
            busy += 1
            click.echo(f"skipped {path}: a running job is writing it", err=True)
            continue
        spools.append((path, sp))
    pending = [(p, sp) for p, sp in spools if not sp.is_empty()]
    for _, sp in spools:
        if sp.is_empty():
            sp.close()  # uploaded before (its acks are recorded): remove what is left of it
    if not pending:
        where = ", ".join(str(r) for r in roots)
        click.echo(f"nothing to upload: no spool with pending steps under {where} (every step is already stored)")
        return
    channel = open_channel(collector, tls)
    try:
        grpc.channel_ready_future(channel).result(timeout=min(10.0, timeout))
    except grpc.FutureTimeoutError:
        channel.close()
        for _, sp in pending:
            sp.close()
        raise click.ClickException(f"cannot reach the collector at {collector}; the spools are kept") from None
    total = sum(sp.pending_steps for _, sp in pending)
    results = []
    show_bar = sys.stderr.isatty()
    bar_cm = click.progressbar(length=total, label="uploading", file=sys.stderr) if show_bar else None
    bar = bar_cm.__enter__() if bar_cm is not None else None
    try:
        for _path, sp in pending:
            res = upload_spool(
                sp, channel, token=token, progress=bar.update if bar is not None else None, idle_timeout=timeout
            )
            sp.close()  # removes the folder when everything in it is stored
            results.append(res)
    finally:
        if bar_cm is not None:
            bar_cm.__exit__(None, None, None)
        channel.close()
    uploaded = sum(r.steps_uploaded for r in results)
    already = sum(r.steps_already for r in results)
    refused = sum(r.steps_refused for r in results)
    left = sum(r.steps_left for r in results)
    for r in results:
        status = "done" if r.complete and not r.steps_refused else (r.error or f"{r.steps_refused} steps refused")
        click.echo(
            f"  {r.run} rank {r.rank}: {r.steps_uploaded} steps uploaded"
            f"{f', {r.steps_refused} refused' if r.steps_refused else ''}"
            f"{f', {r.steps_left} left in {r.path}' if r.steps_left else ''} ({status})"
        )
    runs = len({r.run for r in results})
    click.echo(
        f"synced {runs} run{'s' if runs != 1 else ''} ({len(results)} spool{'s' if len(results) != 1 else ''}) "
        f"to {collector}: {uploaded} steps uploaded, {already} of them already stored, {refused} refused, "
        f"{left} left"
    )
    if refused or left or any(r.error for r in results):
        sys.exit(1)
