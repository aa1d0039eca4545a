"""gRPC client of the collector's Query service (used by the CLI, usable from notebooks).

>>> from layrot.client.query import QueryClient          # doctest: +SKIP
>>> with QueryClient("localhost:50051") as q:
...     runs = q.list_runs()
...     h = q.history("resnet-a")           # numpy arrays, (steps, layers)
...     h.rotation[-1]                      # rotation of every layer at the last step

Errors come out as ``CollectorError`` with a one-line, human message.

TLS: ``QueryClient(address, tls=TLSConfig(ca="ca.pem"))``, or ``LAYROT_TLS_CA`` (and
``LAYROT_TLS_CERT`` / ``LAYROT_TLS_KEY`` for mutual TLS) in the environment; the channel
comes from ``layrot.agent.transport.open_channel``, the one the training jobs use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from layrot.agent.transport import DEFAULT_OPTIONS, AddressError, TLSConfig, explain_connection_error, open_channel
from layrot.client.errors import DEFAULT_COLLECTOR, CollectorError, default_address
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# numpy loads on the first history call only: `layrot-agent runs` and the other
# table commands start faster without it (benchmarks/cli_startup.py).

__all__ = [
    "DEFAULT_COLLECTOR",
    "CollectorError",
    "History",
    "QueryClient",
    "TLSConfig",
    "command_dict",
    "control_status_dict",
    "default_address",
]


@dataclass
class History:
    """Per-step, per-layer history of one rank of a run; 2-D arrays are (steps, layers)."""

    run: str
    layer_names: list[str]
    steps: np.ndarray
    times: np.ndarray
    loss: np.ndarray
    rotation: np.ndarray
    step_angle: np.ndarray
    weight_norm: np.ndarray
    rho: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def __len__(self) -> int:
        return int(self.steps.size)


def alert_dict(a: pb.Alert) -> dict[str, Any]:
    """An Alert as plain Python: run, layer, step, kind, severity, angle and baseline (radians), time
    (unix seconds), message, loss_before, loss_after (NaN where unknown); incident (one id per
    incident: an update re-sends it), layers (every layer of the incident), last_step, updates
    (0 when first raised), updated and resolved (unix seconds; resolved 0 while on)."""
    return {
        "run": a.run,
        "layer": a.layer,
        "step": a.step,
        "kind": a.kind,
        "severity": a.severity,
        "angle": a.angle,
        "baseline": a.baseline,
        "time": a.time,
        "message": a.message,
        "loss_before": a.loss_before,
        "loss_after": a.loss_after,
        "incident": a.incident,
        "layers": list(a.layers),
        "last_step": a.last_step or a.step,
        "updates": a.updates,
        "updated": a.updated or a.time,
        "resolved": a.resolved,
    }


def _summary(s: pb.RunSummary) -> dict[str, Any]:
    return {
        "run": s.run,
        "framework": s.framework,
        "host": s.host,
        "world_size": s.world_size,
        "step": s.step,
        "last_report": s.last_report or None,
        "first_report": s.first_report or None,
        "num_layers": s.num_layers,
        "min_rotation": s.min_rotation,
        "mean_rotation": s.mean_rotation,
        "connected": s.connected,
        "sessions": s.sessions,
        "layca": s.layca,
        "control": s.control,
        "meta": dict(s.meta),
    }


class QueryClient:
    """Synchronous client of ``layrot.v1.Query``.

    ``tls`` None reads ``LAYROT_TLS_CA`` / ``LAYROT_TLS_CERT`` / ``LAYROT_TLS_KEY``; a bad
    address or an unreadable certificate file is a :class:`CollectorError` naming it.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        tls: TLSConfig | None = None,
    ) -> None:
        self.address = address or default_address()
        self.token = token or None
        self.timeout = timeout
        self.tls = tls if tls is not None else TLSConfig.from_env()
        # History answers can be large: 64 MiB in, the transport's defaults otherwise.
        options = [o for o in DEFAULT_OPTIONS if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", 64 * 1024 * 1024))
        try:
            self._channel = open_channel(self.address, self.tls, options)
        except (AddressError, ValueError) as exc:
            raise CollectorError(str(exc)) from None
        self._stub = pb_grpc.QueryStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def _metadata(self) -> list[tuple[str, str]] | None:
        return [("authorization", f"Bearer {self.token}")] if self.token else None

    def _error(self, exc: grpc.RpcError) -> CollectorError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        tls_problem = None
        if code == grpc.StatusCode.UNAVAILABLE:  # gRPC says only "Socket closed" for a TLS mismatch
            tls_problem = explain_connection_error(self.address, self.tls, details or "")
        if tls_problem is not None:
            msg = tls_problem
        elif code == grpc.StatusCode.UNAVAILABLE:
            msg = (
                f"cannot reach the layrot collector at {self.address} (is 'layrot-agent serve' running? "
                "set --collector or LAYROT_COLLECTOR)"
            )
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            msg = f"the collector at {self.address} did not answer within {self.timeout:g} s"
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            msg = f"the collector at {self.address} refused the token: {details} (set --token or LAYROT_TOKEN)"
        else:
            msg = details or (code.name if code else "query failed")
        return CollectorError(msg, code)

    # ------------------------------------------------------------ alerts
    def list_alerts(self, run: str | None = None, limit: int = 0, since: float = 0.0) -> list[dict[str, Any]]:
        """Alerts the collector keeps (oldest first), as dicts (see :func:`alert_dict`).

        ``run`` None = every run; ``since`` unix seconds; ``limit`` the newest N (0 = all kept).
        """
        try:
            resp = self._stub.ListAlerts(
                pb.ListAlertsRequest(run=run or "", limit=limit, since=since),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return [alert_dict(a) for a in resp.alerts]

    def watch_alerts(self, run: str | None = None, since: float = 0.0, backlog: int = 0) -> Iterator[dict[str, Any]]:
        """Alerts as the collector raises them, forever (until the caller stops iterating or the collector goes).

        First the newest ``backlog`` kept alerts with time >= ``since``. Close the
        generator (or break out of the loop) to end the stream.
        """
        call = self._stub.WatchAlerts(
            pb.ListAlertsRequest(run=run or "", limit=backlog, since=since), metadata=self._metadata
        )
        try:
            for a in call:
                yield alert_dict(a)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise self._error(exc) from None
        finally:
            call.cancel()

    def set_thresholds(self, run: str | None = None, **values: float) -> dict[str, Any]:
        """Set alert thresholds of ``run`` (None = collector defaults); returns the effective thresholds.

        Keyword arguments: the fields of ``Thresholds`` (abs_angle, k, window, warmup, stall_seconds,
        min_angle, ratio, group, single_ratio, refractory, not_learning_steps, not_learning_drop).
        Omitted fields keep their value, a negative value goes back to the default,
        no argument at all just reads them. Needs the token when the collector has one.
        """
        bad = set(values) - set(pb.Thresholds.DESCRIPTOR.fields_by_name)
        if bad:
            raise ValueError(
                f"unknown threshold(s) {sorted(bad)}; known: {sorted(pb.Thresholds.DESCRIPTOR.fields_by_name)}"
            )
        try:
            resp = self._stub.SetThresholds(
                pb.SetThresholdsRequest(
                    run=run or "",
                    thresholds=pb.Thresholds(**{k: v for k, v in values.items() if v is not None}),  # type: ignore[arg-type]
                ),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return {f.name: getattr(resp, f.name) for f in pb.Thresholds.DESCRIPTOR.fields}

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run the collector knows, as dicts (see ``RunSummary`` in the proto)."""
        try:
            resp = self._stub.ListRuns(pb.ListRunsRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return [_summary(s) for s in resp.runs]

    def get_run(self, run: str) -> dict[str, Any]:
        """Summary plus ``layers``: per-layer newest state (rotation, step_angle, weight_norm, rho, ...)."""
        try:
            resp = self._stub.GetRun(pb.GetRunRequest(run=run), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        out = _summary(resp.summary)
        out["layers"] = [
            {
                "index": lay.index,
                "name": lay.name,
                "shape": list(lay.shape),
                "init_norm": lay.init_norm,
                "rotation": lay.rotation,
                "step_angle": lay.step_angle,
                "weight_norm": lay.weight_norm,
                "rho": lay.rho,
                "step": lay.step,
            }
            for lay in resp.layers
        ]
        return out

    def iter_history(self, run: str, since_step: int = 0, until_step: int = 0, rank: int = 0) -> Iterator[History]:
        """History in chunks (<= ~2000 steps each) as they stream in: constant memory for any run length."""
        import numpy as np

        names: list[str] = []
        try:
            # No overall deadline: a long history may take a while to stream.
            for chunk in self._stub.GetHistory(
                pb.HistoryRequest(run=run, since_step=since_step, until_step=until_step, rank=rank),
                metadata=self._metadata,
            ):
                if chunk.layer_names:
                    names = list(chunk.layer_names)
                S, L = len(chunk.steps), chunk.num_layers or len(names)

                def arr(data: bytes, S: int = S, L: int = L) -> np.ndarray:
                    return np.frombuffer(data, dtype="<f8").reshape(S, L) if S and L else np.empty((S, L))

                yield History(
                    run=run,
                    layer_names=names,
                    steps=np.asarray(chunk.steps, dtype=np.int64),
                    times=np.asarray(chunk.times, dtype=np.float64),
                    loss=np.asarray(chunk.loss, dtype=np.float64),
                    rotation=arr(chunk.rotation),
                    step_angle=arr(chunk.step_angle),
                    weight_norm=arr(chunk.weight_norm),
                    rho=arr(chunk.rho),
                )
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def history(self, run: str, since_step: int = 0, until_step: int = 0, rank: int = 0) -> History:
        """Full history (inclusive step bounds; 0 = open) as numpy arrays."""
        import numpy as np

        parts = list(self.iter_history(run, since_step, until_step, rank))
        names = parts[0].layer_names if parts else []
        L = len(names)

        def cat(key: str, two_d: bool = True) -> np.ndarray:
            arrays = [getattr(p, key) for p in parts]
            if not arrays:
                return np.empty((0, L)) if two_d else np.empty(0)
            return np.concatenate(arrays, axis=0)

        return History(
            run=run,
            layer_names=names,
            steps=cat("steps", False).astype(np.int64),
            times=cat("times", False),
            loss=cat("loss", False),
            rotation=cat("rotation"),
            step_angle=cat("step_angle"),
            weight_norm=cat("weight_norm"),
            rho=cat("rho"),
        )

    # ------------------------------------------------------------ control plane
    def set_control(self, run: str, command: pb.RateCommand) -> dict[str, Any]:
        """Send a RateCommand for ``run`` (the collector assigns its version); returns the new status.

        Needs the collector's token when it runs with one. The job applies the
        command at its next step boundary; poll :meth:`get_control` for its answer.
        """
        try:
            resp = self._stub.SetControl(
                pb.SetControlRequest(run=run, command=command), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return control_status_dict(resp)

    def get_control(self, run: str) -> dict[str, Any]:
        """Control status of ``run``: requested command, applied version/step, rejection, rates, audit."""
        try:
            resp = self._stub.GetControl(pb.GetControlRequest(run=run), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return control_status_dict(resp)


def command_dict(cmd: pb.RateCommand) -> dict[str, Any]:
    """A RateCommand as plain Python (an AdaptCopy table as its extent, not its bytes)."""
    out: dict[str, Any] = {
        "version": cmd.version,
        "run": cmd.run,
        "mode": cmd.mode or "layca",
        "alpha": cmd.alpha,
        "schedule": None,
        "multipliers": list(cmd.multipliers),
        "layer_multipliers": dict(cmd.layer_multipliers),
        "table": None,
        "reason": cmd.reason,
        "issued_by": cmd.issued_by,
        "issued_at": cmd.issued_at or None,
        "controller": cmd.controller,
        "step_offset": cmd.step_offset,
        "apply_at_step": cmd.apply_at_step,
    }
    if cmd.HasField("schedule"):
        s = cmd.schedule
        out["schedule"] = {
            "rho0": s.rho0,
            "kind": s.kind or "constant",
            "milestones": list(s.milestones),
            "factor": s.factor,
            "total_steps": s.total_steps,
            "rho_min": s.rho_min,
        }
    if cmd.HasField("table"):
        t = cmd.table
        n = len(t.rates) // (8 * t.num_layers) if t.num_layers else 0
        out["table"] = {"start_step": t.start_step, "num_layers": t.num_layers, "num_steps": n}
    return out


def control_status_dict(st: pb.ControlStatus) -> dict[str, Any]:
    """A ControlStatus as plain Python (see the proto for the fields)."""
    return {
        "run": st.run,
        "requested": command_dict(st.requested) if st.requested.version else None,
        "requested_version": st.requested.version,
        "applied_version": st.applied_version,
        "applied_step": st.applied_step,
        "rejected_reason": st.rejected_reason,
        "layer_names": list(st.layer_names),
        "requested_rho": list(st.requested_rho),
        "applied_rho": list(st.applied_rho),
        "audit": [
            {
                "version": a.version,
                "time": a.time,
                "who": a.who,
                "what": a.what,
                "event": a.event,
                "step": a.step,
                "reason": a.reason,
            }
            for a in st.audit
        ],
        "ranks": [
            {
                "rank": r.rank,
                "applied_version": r.applied_version,
                "applied_step": r.applied_step,
                "wanted_step": r.wanted_step,
                "late": r.late,
                "rejected_version": r.rejected_version,
                "rejected_reason": r.rejected_reason,
                "step": r.step,
                "connected": r.connected,
            }
            for r in st.ranks
        ],
    }
