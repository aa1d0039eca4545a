"""Layer rotation curves (the paper's Section 3.1 figure) with matplotlib.

x: optimizer step (or epoch), y: cosine distance between each layer's weights
and their initialization, one line per layer coloured by depth (first layer
dark, last layer bright), with a colour bar for the layer index; optionally the
training loss on a second axis (the paper's Figures 4 and 10 overlay it), and
several runs side by side with shared axes (``layrot-agent compare``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import matplotlib.axes
    import matplotlib.figure

    from layrot.client.history import History

# Points per curve kept for a figure: far more than a figure's width in pixels.
MAX_POINTS = 4000


@dataclass
class Curves:
    """What a figure needs of a run: steps, rotation (steps x layers), loss per step, layer names."""

    run: str
    steps: np.ndarray
    rotation: np.ndarray
    loss: np.ndarray
    layer_names: list[str]

    def __len__(self) -> int:
        return int(self.steps.size)


def decimated_curves(parts: Iterable[History], max_points: int = MAX_POINTS, run: str = "") -> Curves:
    """A streamed history thinned to at most ``2 * max_points`` rows (+ the newest).

    Keeps every k-th reported step, doubling k whenever the kept rows reach
    ``2 * max_points``, so memory stays bounded for any run length (a 100k-step x
    200-layer history would take 160 MB per column whole); the newest step is
    always kept, so the curves end where the run is.
    """
    stride = 1
    index = 0  # position of the next row in the full history
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_kept = 0
    names: list[str] = []
    last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for part in parts:
        names = list(part.layer_names) or names
        run = run or part.run
        n = len(part)
        if n == 0:
            continue
        loss = part.loss if part.loss.size == n else np.full(n, np.nan)
        take = np.flatnonzero((index + np.arange(n)) % stride == 0)
        kept.append((part.steps[take].copy(), part.rotation[take].copy(), loss[take].copy()))
        n_kept += take.size
        last = (part.steps[-1:].copy(), part.rotation[-1:].copy(), loss[-1:].copy())
        index += n
        while n_kept >= 2 * max_points:  # too many: keep every other kept row, twice the stride
            s, r, lo = (np.concatenate([k[j] for k in kept]) for j in range(3))
            kept = [(s[::2], r[::2], lo[::2])]
            n_kept = kept[0][0].size
            stride *= 2
    if not kept:
        return Curves(run, np.empty(0, dtype=np.int64), np.empty((0, len(names))), np.empty(0), names)
    steps, rot, loss = (np.concatenate([k[j] for k in kept]) for j in range(3))
    if last is not None and steps[-1] != last[0][0]:
        steps, rot, loss = np.concatenate([steps, last[0]]), np.vstack([rot, last[1]]), np.concatenate([loss, last[2]])
    return Curves(run, steps, rot, loss, names)


def decimated_rotation(
    parts: Iterable[History], max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(steps, rotation, layer names) of :func:`decimated_curves`."""
    c = decimated_curves(parts, max_points)
    return c.steps, c.rotation, c.layer_names


def _draw(
    ax: matplotlib.axes.Axes,
    steps: np.ndarray,
    rotation: np.ndarray,
    layer_names: Sequence[str] | None,
    log_x: bool,
    cmap: Any,
    norm: Any,
    x_scale: float = 1.0,
) -> None:
    """One run's curves on ``ax``; x is ``steps / x_scale`` (epochs when x_scale is the steps per epoch)."""
    steps = np.asarray(steps, dtype=np.float64)
    rotation = np.asarray(rotation, dtype=np.float64).reshape(steps.size, -1)
    n_layers = rotation.shape[1]
    if not log_x and steps.size and steps[0] > 0:
        # A point at step 0 with rotation 0 (w(0) vs itself): curves start where training started.
        steps = np.concatenate([[0.0], steps])
        rotation = np.vstack([np.zeros((1, n_layers)), rotation])
    x = steps / x_scale
    for i in range(n_layers):
        label = layer_names[i] if layer_names is not None and i < len(layer_names) else str(i)
        ax.plot(x, rotation[:, i], color=cmap(norm(i)), linewidth=1.4, label=label)
    if log_x:
        ax.set_xscale("log")
    if x.size:
        ax.set_xlim(x[x > 0].min() if log_x and (x > 0).any() else 0.0, max(float(x.max()), 1.0 / x_scale))
    ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--", zorder=0)
    ax.grid(True, alpha=0.25)


def _top(rotations: Iterable[np.ndarray]) -> float:
    finite = [r[np.isfinite(r)] for r in rotations]
    m = max((float(f.max()) for f in finite if f.size), default=1.0)
    return max(1.0, m) * 1.05


def layer_rotation_figure(
    steps: Sequence[int] | np.ndarray,
    rotation: np.ndarray,
    layer_names: Sequence[str] | None = None,
    title: str = "",
    log_x: bool = False,
    cmap: str = "viridis",
    dpi: int = 120,
    loss: np.ndarray | None = None,
    steps_per_epoch: float | None = None,
) -> matplotlib.figure.Figure:
    """Build the figure of ``rotation`` (steps x layers); the caller saves and closes it.

    ``loss`` (one value per step, NaN where unknown) is drawn on a second y axis;
    ``steps_per_epoch`` puts epochs on the x axis instead of steps.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    rotation = np.asarray(rotation, dtype=np.float64).reshape(np.asarray(steps).size, -1)
    n_layers = rotation.shape[1]
    # A bare Figure (no pyplot): no global state, safe in threads and servers. Constrained layout
    # places the colour bar beside a twin loss axis too (tight_layout cannot).
    fig = Figure(figsize=(8.0, 5.0), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    colormap = matplotlib.colormaps[cmap]
    norm = colors.Normalize(vmin=0, vmax=max(1, n_layers - 1))
    scale = float(steps_per_epoch) if steps_per_epoch else 1.0
    _draw(ax, np.asarray(steps), rotation, layer_names, log_x, colormap, norm, scale)
    ax.set_ylim(0.0, _top([rotation]))
    ax.set_xlabel("epoch" if steps_per_epoch else "step")
    ax.set_ylabel("cosine distance to initialization")
    ax.set_title(title)
    owners: list[Any] = [ax]
    if loss is not None:
        lo = np.asarray(loss, dtype=np.float64)
        ok = np.isfinite(lo)
        if ok.any():
            ax2 = ax.twinx()
            owners.append(ax2)  # the colour bar must take its room from both axes, or it covers the loss axis
            ax2.plot(np.asarray(steps, dtype=np.float64)[ok] / scale, lo[ok], color="crimson", lw=1.0, alpha=0.8)
            ax2.set_ylabel("training loss", color="crimson")
            ax2.tick_params(axis="y", colors="crimson")
            ax2.set_ylim(bottom=0.0)
    mappable = cm.ScalarMappable(norm=norm, cmap=colormap)
    mappable.set_array([])
    bar = fig.colorbar(mappable, ax=owners, pad=0.02)
    bar.set_label("layer index (input → output)")
    if n_layers <= 12:
        bar.set_ticks(list(range(n_layers)))
    return fig


def compare_figure(
    runs: Sequence[Curves],
    log_x: bool = False,
    cmap: str = "viridis",
    dpi: int = 120,
    steps_per_epoch: float | None = None,
) -> matplotlib.figure.Figure:
    """Several runs' layer rotation curves side by side, with shared axes (up to 3 per row)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colors
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("no runs to compare")
    cols = min(3, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), dpi=dpi)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    colormap = matplotlib.colormaps[cmap]
    top = _top([c.rotation for c in runs])
    scale = float(steps_per_epoch) if steps_per_epoch else 1.0
    for k, c in enumerate(runs):
        ax = axes[k // cols][k % cols]
        norm = colors.Normalize(vmin=0, vmax=max(1, len(c.layer_names) - 1))
        _draw(ax, c.steps, c.rotation, c.layer_names, log_x, colormap, norm, scale)
        ax.set_ylim(0.0, top)
        ax.set_title(c.run, fontsize=10)
        if k % cols == 0:
            ax.set_ylabel("cosine distance to init")
        if k // cols == rows - 1:
            ax.set_xlabel("epoch" if steps_per_epoch else "step")
    for k in range(len(runs), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle("Layer rotation curves (colour: layer index, input dark → output bright)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_layer_rotation_curves(
    steps: Sequence[int] | np.ndarray,
    rotation: np.ndarray,
    layer_names: Sequence[str] | None,
    path: str | Path,
    **options: Any,
) -> Path:
    """Write the layer rotation curves to ``path`` (format from the suffix: .png, .svg, .pdf).

    ``options``: those of :func:`layer_rotation_figure` (title, log_x, cmap, dpi, loss, steps_per_epoch).
    """
    fig = layer_rotation_figure(steps, rotation, layer_names, **options)
    path = Path(path)
    fig.savefig(path)
    return path
