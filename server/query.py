"""The ``Query`` service: runs, per-layer state and history for the CLI, dashboards and controllers.

Reads the in-memory state for current values and the history store (on
executor threads with their own SQLite connections) for history, so a large
export never stalls ingest.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import grpc
import numpy as np

from layrot.core.indicator import IndicatorSettings
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.server.control import ControlPlane, ControlRefused, check_command_args, client_who
from layrot.server.state import CollectorState, RunState
from layrot.server.store_api import HistoryStore, StoreError

if TYPE_CHECKING:
    from layrot.server.alerts import AlertEngine
    from layrot.server.retention import Retention

log = logging.getLogger(__name__)

# Steps per HistoryChunk: 2000 steps x 100 layers x 4 arrays x 8 B = 6.4 MB,
# well under the default 16 MiB message limit for models up to ~250 layers.
CHUNK_STEPS = 2000
MAX_CHUNK_BYTES = 12 * 1024 * 1024

NAN = float("nan")
DEFAULT_INDICATOR = IndicatorSettings()
# Steps in a query: what SQLite's signed 64-bit integers hold (a larger one would raise OverflowError).
MAX_STEP_ARG = 2**63 - 1


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort``, typed as what it is: it always raises (grpc ships no type hints)."""
    await context.abort(code, details)
    raise AssertionError("grpc.aio ServicerContext.abort returned")  # unreachable: abort raises AbortError


def run_summary(rs: RunState, settings: IndicatorSettings = DEFAULT_INDICATOR) -> pb.RunSummary:
    """RunSummary of a run from the in-memory state, with its generalization indicator."""
    snap = rs.primary()
    mn, mean = rs.summary_stats()
    ind = settings.of(snap.rotation, snap.step, rs.total_steps) if snap is not None else None
    return pb.RunSummary(
        run=rs.run,
        framework=rs.framework,
        host=rs.host,
        world_size=rs.world_size,
        step=snap.step if snap else 0,
        last_report=rs.last_report or 0.0,
        num_layers=rs.num_layers,
        min_rotation=mn,
        mean_rotation=mean,
        connected=rs.connected,
        sessions=len(rs.sessions) + rs.remote_sessions,
        layca=bool(rs.capabilities.get("layca")),
        control=bool(rs.capabilities.get("control")),
        first_report=rs.first_report or 0.0,
        meta=rs.meta,
        layers_at_target_ratio=ind.at_target_ratio if ind is not None else NAN,
        rotation_target=settings.target,
        indicator_judged=ind.judged if ind is not None else False,
        layers_under_rotated=int(ind.under_rotated.sum()) if ind is not None else 0,
        total_steps=rs.total_steps,
        loss=snap.loss if snap is not None else NAN,
    )


class QueryServicer(pb_grpc.QueryServicer):
    """Read queries, control commands (``SetControl``/``GetControl``) and alerts.

    Collaborators come from the composition root (server/app.py); ``alerts``
    None answers the alert calls with UNIMPLEMENTED.
    """

    def __init__(
        self,
        state: CollectorState,
        store: HistoryStore,
        control: ControlPlane,
        alerts: AlertEngine | None = None,
        indicator: IndicatorSettings = DEFAULT_INDICATOR,
        retention: Retention | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.control = control
        self.alerts = alerts
        self.indicator = indicator
        self.retention = retention
        # Several collectors on one database (server/cluster.py): other collectors may hold a run's sessions.
        self.clustered = False

    async def _run(self, name: str, context: grpc.aio.ServicerContext) -> RunState:
        rs = self.state.runs.get(name)
        if rs is None:
            known = len(self.state.runs)
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"unknown run {name!r} (the collector knows {known} run{'s' if known != 1 else ''};"
                " list them with 'layrot-agent runs')",
            )
        return rs

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        runs = sorted(self.state.snapshot_runs(), key=lambda r: r.run)
        return pb.ListRunsResponse(runs=[run_summary(rs, self.indicator) for rs in runs])

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.RunDetail:
        rs = await self._run(request.run, context)
        snap = rs.primary()
        under = self.indicator.of(snap.rotation, snap.step, rs.total_steps).under_rotated if snap is not None else None
        layers = []
        for i, lay in enumerate(rs.layers):
            state = pb.LayerState(name=lay.name, index=lay.index, shape=lay.shape, init_norm=lay.init_norm)
            if snap is not None:
                state.rotation = float(snap.rotation[i])
                state.step_angle = float(snap.step_angle[i])
                state.weight_norm = float(snap.weight_norm[i])
                state.rho = NAN if snap.rho is None else float(snap.rho[i])
                state.step = snap.step
                state.under_rotated = bool(under is not None and i < under.size and under[i])
            else:
                state.rotation = state.step_angle = state.weight_norm = state.rho = NAN
            layers.append(state)
        return pb.RunDetail(summary=run_summary(rs, self.indicator), layers=layers)

    async def GetHistory(
        self, request: pb.HistoryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.HistoryChunk]:
        for name in ("since_step", "until_step"):
            if getattr(request, name) > MAX_STEP_ARG:
                await _abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, f"{name} {getattr(request, name)} is out of range"
                )
        rs = await self._run(request.run, context)
        loop = asyncio.get_running_loop()
        L = max(1, rs.num_layers)
        limit = max(1, min(CHUNK_STEPS, MAX_CHUNK_BYTES // (4 * 8 * L)))
        after = int(request.since_step) - 1 if request.since_step > 0 else -1
        until = int(request.until_step) if request.until_step > 0 else 2**63 - 1
        nan_row = np.full(L, np.nan).tobytes()
        first = True
        while True:
            rows = await loop.run_in_executor(
                None, self.store.history_page, rs.run_id, request.rank, after, until, limit
            )
            if not rows and not first:
                return
            chunk = pb.HistoryChunk(
                num_layers=rs.num_layers,
                steps=[r[0] for r in rows],
                times=[r[1] if r[1] is not None else NAN for r in rows],
                loss=[r[2] if r[2] is not None else NAN for r in rows],
                rotation=b"".join(r[3] for r in rows),
                step_angle=b"".join(r[4] for r in rows),
                weight_norm=b"".join(r[5] for r in rows),
                rho=b"".join(r[6] if r[6] is not None else nan_row for r in rows),
            )
            if first:
                chunk.layer_names.extend(rs.names)
                first = False
            yield chunk
            if len(rows) < limit:
                return
            after = rows[-1][0]

    async def _unimplemented(self, context: grpc.aio.ServicerContext, what: str, write: bool = False) -> None:
        # A write's token was checked before this ran (server/auth.py); ``write`` only documents the call.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not implemented by this collector version yet")

    # ------------------------------------------------------------ control (server/control.py)
    async def SetControl(self, request: pb.SetControlRequest, context: grpc.aio.ServicerContext) -> pb.ControlStatus:
        """Version, store and push a RateCommand to the run's live sessions; returns the new status."""
        why = check_command_args(request.command)
        if why is not None:
            self.state.reject("bad_command")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad command: {why}")
        rs = await self._run(request.run, context)
        plane = self.control
        await self._reload_control(rs, context)
        who = client_who(request.command.issued_by, context.peer())
        try:
            plane.set_command(rs, request.command, who)
        except ControlRefused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return plane.status(rs)

    async def GetControl(self, request: pb.GetControlRequest, context: grpc.aio.ServicerContext) -> pb.ControlStatus:
        """Requested vs applied command of a run, per-layer rates, audit trail."""
        rs = await self._run(request.run, context)
        await self._reload_control(rs, context)
        return self.control.status(rs)

    async def _reload_control(self, rs: RunState, context: grpc.aio.ServicerContext) -> None:
        """A run whose sessions are on another collector of the database: its control state as stored there
        (its current version, the jobs' answers), so a command set here continues its versions."""
        if self.clustered and not rs.sessions:
            ids = [rs.run_id]
            try:
                stored = await asyncio.get_running_loop().run_in_executor(None, self.control.read_stored, ids, ids)
            except StoreError as exc:
                await _abort(context, grpc.StatusCode.UNAVAILABLE, f"cannot read the run's control state: {exc}")
            self.control.apply_stored([rs], stored, replace=True)

    # ------------------------------------------------------------ alerts (server/alerts.py)
    async def _alert_hub(self, context: grpc.aio.ServicerContext) -> AlertEngine:
        engine = self.alerts
        if engine is None:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "this collector has no alert engine")
        return engine

    @staticmethod
    async def _check_since(request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext) -> None:
        if not math.isfinite(request.since):
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"since must be finite unix seconds, got {request.since}"
            )

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        """Kept alerts (oldest first) of one run or all, newer than ``since``, the newest ``limit`` (0 = all)."""
        await self._check_since(request, context)
        engine = await self._alert_hub(context)
        return pb.ListAlertsResponse(alerts=engine.hub.list(request.run, request.limit, request.since))

    async def WatchAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Alert]:
        """The newest ``limit`` kept alerts newer than ``since`` (none if limit is 0), then each new alert live."""
        await self._check_since(request, context)
        engine = await self._alert_hub(context)
        try:
            async for alert in engine.hub.watch(request.run, request.limit, request.since):
                yield alert
        except OverflowError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def DeleteRun(self, request: pb.DeleteRunRequest, context: grpc.aio.ServicerContext) -> pb.DeleteRunResponse:
        """Delete a run's whole history and forget it; refused while a job of the run is connected."""
        rs = await self._run(request.run, context)
        live = len(rs.sessions) + rs.remote_sessions  # open here or on another collector of the database
        if live:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {rs.run!r} has {live} live session{'s' if live > 1 else ''}: stop the job first"
                " (a deleted run would come back with its next report)",
            )
        with self.state.lock:
            if self.state.runs.get(rs.run) is rs:
                del self.state.runs[rs.run]
        if self.alerts is not None:
            self.alerts.runs.pop(rs.run, None)
        # Queued here, on the loop, before any Hello of a new run of that name can queue its creation.
        wait = self.store.begin_delete_run(rs.run_id, rs.run)
        steps = await asyncio.get_running_loop().run_in_executor(None, wait)
        log.warning("run %s deleted (%d steps rows) by %s", rs.run, steps, context.peer())
        return pb.DeleteRunResponse(run=rs.run, steps=steps)

    async def Compact(self, request: pb.CompactRequest, context: grpc.aio.ServicerContext) -> pb.CompactResponse:
        """Apply retention and downsampling now, drop orphan samples, reclaim the space (VACUUM)."""
        if self.retention is None:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "this collector runs no retention (no store)")
        retention = self.retention

        def compact() -> tuple[dict[str, int], int, int]:
            before = self.store.history_bytes()
            out = retention.compact()
            return out, before, self.store.history_bytes()

        out, before, after = await asyncio.get_running_loop().run_in_executor(None, compact)
        log.info("compacted the history: %s, %d -> %d bytes", out, before, after)
        return pb.CompactResponse(
            steps=out["steps"],
            runs=out["runs"],
            orphan_samples=out.get("orphan_samples", 0),
            bytes_before=before,
            bytes_after=after,
        )

    async def SetThresholds(self, request: pb.SetThresholdsRequest, context: grpc.aio.ServicerContext) -> pb.Thresholds:
        """Change a run's thresholds (run "" = collector defaults); returns the effective ones.

        Per field: 0 keeps the current value (all zero = just read them), a
        negative value goes back to the default, anything else sets it.
        """
        engine = await self._alert_hub(context)
        if not engine.enabled:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "alerts are disabled on this collector (it runs with --no-alerts)"
            )
        try:
            return engine.set_thresholds(request.run, request.thresholds).to_pb()
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad thresholds: {exc}")
