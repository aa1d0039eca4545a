"""``layrot.Client``: a collector from a notebook or a script, with tables that render themselves.

>>> import layrot                                          # doctest: +SKIP
>>> c = layrot.Client("http://localhost:9400")             # or the gRPC address "localhost:50051"
>>> c.runs()                                               # an HTML table in Jupyter
>>> df = c.history("resnet-a")                             # a pandas DataFrame (numpy arrays without pandas)
>>> c.alerts("resnet-a")
>>> c.curves("resnet-a", overlay_loss=True)                # a matplotlib Figure

Reads go through the collector's HTTP API for an ``http(s)://`` address (no grpc
needed) and through gRPC otherwise; the answers are the same dicts either way
(``layrot.proto.views``). ``history`` is long-form, one row per step and layer,
the columns of ``layrot-agent export`` plus ``time`` and ``loss``.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from layrot.client.errors import default_address
from layrot.client.history import History
from layrot.client.http_query import HttpQueryClient, is_http_address

if TYPE_CHECKING:  # pragma: no cover
    import matplotlib.figure

    from layrot.client.reader import ReadClient

__all__ = ["Client", "Table"]

# Columns of history(): the export's, with the step's time and loss.
HISTORY_COLUMNS = (
    "step",
    "time",
    "loss",
    "layer",
    "layer_index",
    "rotation",
    "step_angle",
    "weight_norm",
    "rho",
)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(str(v) for v in value))
    if isinstance(value, dict):
        return html.escape(", ".join(f"{k}={v}" for k, v in value.items()))
    return html.escape("" if value is None else str(value))


class Table(Sequence[dict[str, Any]]):
    """A list of records (dicts) that shows itself as an HTML table in Jupyter and converts to pandas."""

    def __init__(self, records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
        self._records = list(records)
        self.columns = list(columns) if columns else (list(self._records[0]) if self._records else [])

    def __getitem__(self, i: Any) -> Any:
        return self._records[i]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._records)

    def __repr__(self) -> str:
        return f"Table({len(self)} rows: {', '.join(self.columns)})"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in self.columns) + "</tr>" for r in self._records
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_pandas(self) -> Any:
        """A pandas DataFrame of the records (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self._records, columns=self.columns)


RUN_COLUMNS = (
    "run",
    "framework",
    "step",
    "num_layers",
    "min_rotation",
    "mean_rotation",
    "layers_at_target_ratio",
    "layers_under_rotated",
    "loss",
    "connected",
    "last_report",
)
ALERT_COLUMNS = ("time", "run", "kind", "severity", "step", "layer", "layers", "angle", "message", "incident")
LAYER_COLUMNS = ("index", "name", "shape", "rotation", "step_angle", "weight_norm", "rho", "under_rotated")


class Client:
    """Read a collector: ``runs()``, ``run(name)``, ``history(name)``, ``alerts()``, ``curves(name)``.

    ``collector``: its HTTP port ``http(s)://host:port`` or its gRPC address
    ``host:port`` (default ``$LAYROT_COLLECTOR`` or ``localhost:50051``); ``token``
    the read (or write) token when the collector has one (``$LAYROT_TOKEN``);
    ``tls_ca`` / ``tls_cert`` / ``tls_key`` as for the CLI.
    """

    def __init__(
        self,
        collector: str | None = None,
        token: str | None = None,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.collector = collector or default_address()
        token = token or os.environ.get("LAYROT_TOKEN") or None
        self._client: ReadClient
        if is_http_address(self.collector):
            self._client = HttpQueryClient(self.collector, token, timeout, ca=tls_ca, cert=tls_cert, key=tls_key)
        else:
            from layrot.client.query import QueryClient, TLSConfig

            tls = TLSConfig.from_env(tls_ca, tls_cert, tls_key)
            self._client = QueryClient(self.collector, token, timeout, tls=tls)

    def __repr__(self) -> str:
        return f"layrot.Client({self.collector!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ reads
    def runs(self) -> Table:
        """Every run the collector knows (the keys of ``layrot-agent runs --json``)."""
        return Table(self._client.list_runs(), RUN_COLUMNS)

    def run(self, run: str) -> dict[str, Any]:
        """One run's summary and ``layers`` (a :class:`Table` of each layer's newest state)."""
        detail = self._client.get_run(run)
        detail["layers"] = Table(detail["layers"], LAYER_COLUMNS)
        return detail

    def alerts(self, run: str | None = None, limit: int = 0) -> Table:
        """Kept alerts, oldest first (of one run, or every run); ``limit`` the newest N (0 = all)."""
        return Table(self._client.list_alerts(run, limit=limit), ALERT_COLUMNS)

    def history_arrays(self, run: str, since_step: int = 0, until_step: int = 0, rank: int = 0) -> History:
        """The history as numpy arrays, (steps, layers) for the per-layer columns."""
        return self._client.history(run, since_step, until_step, rank)

    def history(self, run: str, since_step: int = 0, until_step: int = 0, rank: int = 0) -> Any:
        """One row per step and layer (:data:`HISTORY_COLUMNS`): a pandas DataFrame, or without pandas
        the :class:`~layrot.client.history.History` arrays (:meth:`history_arrays`)."""
        h = self.history_arrays(run, since_step, until_step, rank)
        try:
            import pandas as pd
        except ImportError:
            return h
        import numpy as np

        S, L = len(h), h.num_layers
        return pd.DataFrame(
            {
                "step": np.repeat(h.steps, L),
                "time": np.repeat(h.times, L),
                "loss": np.repeat(h.loss, L),
                "layer": pd.Categorical(np.tile(np.asarray(h.layer_names, dtype=object), S), h.layer_names),
                "layer_index": np.tile(np.arange(L), S),
                "rotation": h.rotation.ravel(),
                "step_angle": h.step_angle.ravel(),
                "weight_norm": h.weight_norm.ravel(),
                "rho": h.rho.ravel(),
            },
            columns=list(HISTORY_COLUMNS),
        )

    def curves(
        self,
        run: str,
        *,
        overlay_loss: bool = False,
        steps_per_epoch: float | None = None,
        log_x: bool = False,
        rank: int = 0,
    ) -> matplotlib.figure.Figure:
        """The paper's layer rotation curves of ``run`` as a matplotlib Figure (Jupyter shows it)."""
        from layrot.client.figures import decimated_curves, layer_rotation_figure

        c = decimated_curves(self._client.iter_history(run, rank=rank), run=run)
        return layer_rotation_figure(
            c.steps,
            c.rotation,
            c.layer_names,
            title=f"Layer rotation curves: {run}",
            log_x=log_x,
            loss=c.loss if overlay_loss else None,
            steps_per_epoch=steps_per_epoch,
        )
