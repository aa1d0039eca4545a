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
from typing import TYPE_CHECKING, Any

import grpc

from layrot.agent.transport import DEFAULT_OPTIONS, AddressError, TLSConfig, explain_connection_error, open_channel
from layrot.client.errors import DEFAULT_COLLECTOR, CollectorError, default_address
from layrot.client.history import History, concat_histories
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.views import (
    alert_dict,
    command_dict,
    control_status_dict,
    run_detail_dict,
    run_summary_dict,
    thresholds_dict,
)

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
    "alert_dict",
    "command_dict",
    "control_status_dict",
    "default_address",
]


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
        min_angle, ratio, group, single_ratio, refractory, not_learning_steps, not_learning_drop,
        not_learning_share).
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
        return thresholds_dict(resp)

    def delete_run(self, run: str) -> int:
        """Delete ``run``'s whole history on the collector (write token); the steps rows deleted.

        Refused (FAILED_PRECONDITION) while a job of the run is connected.
        """
        try:
            resp = self._stub.DeleteRun(
                pb.DeleteRunRequest(run=run), timeout=max(self.timeout, 600.0), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return int(resp.steps)

    def compact(self) -> dict[str, int]:
        """Apply the collector's retention now and reclaim the space (write token).

        Returns {"steps", "runs", "orphan_samples", "bytes_before", "bytes_after"}.
        """
        try:
            resp = self._stub.Compact(pb.CompactRequest(), timeout=max(self.timeout, 3600.0), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return {f.name: int(getattr(resp, f.name)) for f in resp.DESCRIPTOR.fields}

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run the collector knows, as dicts (see ``RunSummary`` in the proto)."""
        try:
            resp = self._stub.ListRuns(pb.ListRunsRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return [run_summary_dict(s) for s in resp.runs]

    def get_run(self, run: str) -> dict[str, Any]:
        """Summary plus ``layers``: per-layer newest state (rotation, step_angle, weight_norm, rho, ...)."""
        try:
            resp = self._stub.GetRun(pb.GetRunRequest(run=run), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return run_detail_dict(resp)

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
        return concat_histories(run, list(self.iter_history(run, since_step, until_step, rank)))

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
