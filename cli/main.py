"""``layrot-agent``: run the collector, query runs, export history, draw curves, run the demo.

Commands that talk to a collector take ``--collector ADDR`` (or
``$LAYROT_COLLECTOR``, default ``localhost:50051``), ``--token`` (or
``$LAYROT_TOKEN``) and ``--tls-ca`` / ``--tls-cert`` / ``--tls-key`` (or
``$LAYROT_TLS_CA`` / ``_CERT`` / ``_KEY``). Errors print one line and exit with status 1.
"""

from __future__ import annotations

import itertools
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
from layrot.client.errors import CollectorError

# Start-up matters (every command is a new process): grpc, protobuf and numpy load
# in the commands that talk to a collector (none of them over the HTTP API),
# matplotlib in `curves`, the server and its options in `serve` (cli/serve_cli.py)
# and `demo`. tests/test_cli.py checks what a query command imports.
if TYPE_CHECKING:  # pragma: no cover
    from layrot.client.history import History

__all__ = ["EXPORT_FIELDS", "cli", "main"]  # noqa: F822  (EXPORT_FIELDS: module __getattr__ below)

# Read commands that log nothing at the default level (see cli()).
QUIET_COMMANDS = frozenset({"runs", "show", "export", "curves", "compare"})


def __getattr__(name: str) -> Any:
    # EXPORT_FIELDS lives with the writers; loaded on use, so a query command need not load them.
    if name == "EXPORT_FIELDS":
        from layrot.cli.export_format import EXPORT_FIELDS

        return EXPORT_FIELDS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        "serve": "layrot.cli.serve_cli:serve_command",
        "compare": "layrot.cli.curves_cli:compare_command",
        "compact": "layrot.cli.admin_cli:compact_command",
        "delete": "layrot.cli.admin_cli:delete_command",
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
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
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
    if log_level.lower() == "warning" and ctx.invoked_subcommand in QUIET_COMMANDS:
        return  # nothing of these logs at the default level: they start without the logging package
    import logging

    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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
