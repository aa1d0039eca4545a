"""``layrot-agent curves`` and ``layrot-agent compare``: the paper's layer rotation figures from a collector.

The history is streamed and thinned (client/figures.py), so a figure of any run
length takes bounded memory; matplotlib loads only here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from layrot.cli.cli_common import CONTEXT_SETTINGS, check_output_folder, client, collector_options
from layrot.client.errors import CollectorError

if TYPE_CHECKING:  # pragma: no cover
    from layrot.client.figures import Curves
    from layrot.client.reader import ReadClient

__all__ = ["compare_command", "curves_command"]

_OUTPUT = click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="Image file to write (.png, .svg, .pdf).",
)
_LOG_X = click.option("--log-x", is_flag=True, help="Logarithmic x axis (shows the first steps better).")
_RANK = click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True, help="Which rank's rows.")
_X = click.option(
    "--x",
    "x_axis",
    type=click.Choice(["step", "epoch"]),
    default="step",
    show_default=True,
    help="x axis: optimizer steps, or epochs (needs --steps-per-epoch, or a run that announced it).",
)
_SPE = click.option(
    "--steps-per-epoch",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    metavar="N",
    help="Optimizer steps per epoch, for --x epoch.",
)


def _steps_per_epoch(x_axis: str, given: float | None, meta: dict[str, str]) -> float | None:
    if x_axis == "step":
        return None
    if given:
        return given
    try:
        announced = float(meta.get("steps_per_epoch", ""))
    except ValueError:
        announced = 0.0
    if announced > 0:
        return announced
    raise click.UsageError("--x epoch needs --steps-per-epoch N (the run did not announce its steps per epoch)")


def _fetch(q: ReadClient, run: str, rank: int) -> Curves:
    from layrot.client.figures import decimated_curves

    curves = decimated_curves(q.iter_history(run, rank=rank), run=run)
    if len(curves) == 0:
        raise click.ClickException(f"run {run!r} has no reported steps yet")
    return curves


@click.command("curves", context_settings=CONTEXT_SETTINGS)
@click.argument("run")
@_OUTPUT
@_LOG_X
@_X
@_SPE
@click.option(
    "--overlay",
    type=click.Choice(["none", "loss"]),
    default="none",
    show_default=True,
    help="Also draw the training loss (from the history) on a second y axis, as the paper's Figures 4 and 10.",
)
@_RANK
@collector_options
def curves_command(
    run: str,
    output: str,
    log_x: bool,
    x_axis: str,
    steps_per_epoch: float | None,
    overlay: str,
    rank: int,
    collector: str,
    token: str | None,
) -> None:
    """Draw the layer rotation curves of RUN (the paper's figure).

    x: optimizer step (or epoch); y: cosine distance between each layer's
    weights and their initialization; one line per layer coloured from the
    input side (dark) to the output side (bright). The best-generalizing runs
    in the paper bring every layer close to 1.

    \b
    Examples:
      layrot-agent curves resnet-a -o resnet-a.png
      layrot-agent curves resnet-a -o resnet-a.svg --log-x
      layrot-agent curves resnet-a -o a.png --x epoch --steps-per-epoch 391 --overlay loss
    """
    check_output_folder(output)
    from layrot.client.figures import plot_layer_rotation_curves

    try:
        with client(collector, token) as q:
            meta = q.get_run(run).get("meta", {}) if x_axis == "epoch" and not steps_per_epoch else {}
            spe = _steps_per_epoch(x_axis, steps_per_epoch, meta)
            c = _fetch(q, run, rank)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        plot_layer_rotation_curves(
            c.steps,
            c.rotation,
            c.layer_names,
            output,
            title=f"Layer rotation curves: {run}",
            log_x=log_x,
            loss=c.loss if overlay == "loss" else None,
            steps_per_epoch=spe,
        )
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot write {output}: {exc}") from None
    click.echo(f"wrote {output} ({len(c.layer_names)} layers, up to step {int(c.steps[-1])})", err=True)


@click.command("compare", context_settings=CONTEXT_SETTINGS)
@click.argument("runs", nargs=-1, required=True)
@_OUTPUT
@_LOG_X
@_X
@_SPE
@_RANK
@collector_options
def compare_command(
    runs: tuple[str, ...],
    output: str,
    log_x: bool,
    x_axis: str,
    steps_per_epoch: float | None,
    rank: int,
    collector: str,
    token: str | None,
) -> None:
    """Draw the layer rotation curves of several RUNS side by side, on shared axes.

    One panel per run (three per row), the same y range for all, so the runs
    that bring their layers further from their initialization stand out.

    \b
    Examples:
      layrot-agent compare sgd-lr0.1 layca-rho0.04 adam -o compare.png
      layrot-agent compare a b --x epoch --steps-per-epoch 391 -o ab.png
    """
    check_output_folder(output)
    if len(set(runs)) != len(runs):
        raise click.UsageError("a run is named twice")
    from layrot.client.figures import compare_figure

    try:
        with client(collector, token) as q:
            spe = _steps_per_epoch(
                x_axis, steps_per_epoch, q.get_run(runs[0]).get("meta", {}) if x_axis == "epoch" else {}
            )
            all_curves = [_fetch(q, run, rank) for run in runs]
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        compare_figure(all_curves, log_x=log_x, steps_per_epoch=spe).savefig(output)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot write {output}: {exc}") from None
    click.echo(f"wrote {output} ({len(runs)} runs)", err=True)
