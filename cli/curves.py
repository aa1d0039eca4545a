"""Layer rotation curves (the paper's Section 3.1 figure) with matplotlib.

x: optimizer step, y: cosine distance between each layer's weights and their
initialization, one line per layer coloured by depth (first layer dark,
last layer bright), with a colour bar for the layer index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import matplotlib.figure

    from layrot.client.history import History

# Points per curve kept for a figure: far more than a figure's width in pixels.
MAX_POINTS = 4000


def decimated_rotation(
    parts: Iterable[History], max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(steps, rotation (steps x layers), layer names) of a streamed history, at most ``2 * max_points`` rows.

    Keeps every k-th reported step, doubling k whenever the kept rows reach
    ``2 * max_points``, so memory stays bounded for any run length (a 100k-step x
    200-layer history would take 160 MB per column whole); the newest step is
    always kept, so the curves end where the run is.
    """
    stride = 1
    index = 0  # position of the next row in the full history
    kept_steps: list[np.ndarray] = []
    kept_rot: list[np.ndarray] = []
    n_kept = 0
    names: list[str] = []
    last: tuple[np.ndarray, np.ndarray] | None = None
    for part in parts:
        names = list(part.layer_names) or names
        n = len(part)
        if n == 0:
            continue
        take = np.flatnonzero((index + np.arange(n)) % stride == 0)
        kept_steps.append(part.steps[take].copy())
        kept_rot.append(part.rotation[take].copy())
        n_kept += take.size
        last = (part.steps[-1:].copy(), part.rotation[-1:].copy())
        index += n
        while n_kept >= 2 * max_points:  # too many: keep every other kept row, twice the stride
            steps_all, rot_all = np.concatenate(kept_steps), np.concatenate(kept_rot)
            kept_steps, kept_rot = [steps_all[::2]], [rot_all[::2]]
            n_kept = kept_steps[0].size
            stride *= 2
    if not kept_steps:
        return np.empty(0, dtype=np.int64), np.empty((0, len(names))), names
    steps, rot = np.concatenate(kept_steps), np.concatenate(kept_rot)
    if last is not None and steps[-1] != last[0][0]:
        steps, rot = np.concatenate([steps, last[0]]), np.vstack([rot, last[1]])
    return steps, rot, names


def layer_rotation_figure(
    steps: Sequence[int] | np.ndarray,
    rotation: np.ndarray,
    layer_names: Sequence[str] | None = None,
    title: str = "",
    log_x: bool = False,
    cmap: str = "viridis",
    dpi: int = 120,
) -> matplotlib.figure.Figure:
    """Build the figure of ``rotation`` (steps x layers); the caller saves and closes it.

    A point at step 0 with rotation 0 (w(0) vs itself) is added on a linear
    x axis so curves start where training started, as in the paper.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    steps = np.asarray(steps, dtype=np.float64)
    rotation = np.asarray(rotation, dtype=np.float64).reshape(steps.size, -1)
    n_layers = rotation.shape[1]
    if not log_x and steps.size and steps[0] > 0:
        steps = np.concatenate([[0.0], steps])
        rotation = np.vstack([np.zeros((1, n_layers)), rotation])

    # A bare Figure (no pyplot): no global state, safe in threads and servers.
    fig = Figure(figsize=(8.0, 5.0), dpi=dpi)
    ax = fig.add_subplot()
    colormap = matplotlib.colormaps[cmap]
    norm = colors.Normalize(vmin=0, vmax=max(1, n_layers - 1))
    for i in range(n_layers):
        label = layer_names[i] if layer_names is not None and i < len(layer_names) else str(i)
        ax.plot(steps, rotation[:, i], color=colormap(norm(i)), linewidth=1.4, label=label)
    if log_x:
        ax.set_xscale("log")
    finite = rotation[np.isfinite(rotation)]
    top = max(1.0, float(finite.max()) if finite.size else 1.0) * 1.05
    ax.set_ylim(0.0, top)
    if steps.size:
        ax.set_xlim(steps.min() if log_x else 0.0, max(steps.max(), 1.0))
    ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--", zorder=0)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine distance to initialization")
    ax.set_title(title)
    ax.grid(True, alpha=0.25)
    mappable = cm.ScalarMappable(norm=norm, cmap=colormap)
    mappable.set_array([])
    bar = fig.colorbar(mappable, ax=ax)
    bar.set_label("layer index (input → output)")
    if n_layers <= 12:
        bar.set_ticks(list(range(n_layers)))
    fig.tight_layout()
    return fig


def plot_layer_rotation_curves(
    steps: Sequence[int] | np.ndarray,
    rotation: np.ndarray,
    layer_names: Sequence[str] | None,
    path: str | Path,
    title: str = "",
    log_x: bool = False,
    cmap: str = "viridis",
    dpi: int = 120,
) -> Path:
    """Write the layer rotation curves to ``path`` (format from the suffix: .png, .svg, .pdf)."""
    fig = layer_rotation_figure(steps, rotation, layer_names, title=title, log_x=log_x, cmap=cmap, dpi=dpi)
    path = Path(path)
    fig.savefig(path)
    return path
