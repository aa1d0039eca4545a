"""Plain-Python views of the Query service's answers: the dicts the clients return and the HTTP API sends.

One mapping from message to dict, used on both sides of the wire: the gRPC
client (client/query.py) turns the messages it receives into these dicts, and
the collector's HTTP API (server/http_api.py) sends these same dicts as JSON,
so a program gets the same keys whichever transport it uses. Floats stay
floats here (NaN where unknown); the JSON encoder writes NaN as ``null``.
"""

from __future__ import annotations

from typing import Any

from layrot.proto import layrot_pb2 as pb

__all__ = [
    "alert_dict",
    "command_dict",
    "control_status_dict",
    "run_detail_dict",
    "run_summary_dict",
    "thresholds_dict",
]


def run_summary_dict(s: pb.RunSummary) -> dict[str, Any]:
    """A RunSummary: run, framework, host, world_size, step, first/last_report (unix seconds, None = never),
    num_layers, min/mean_rotation, connected, sessions, layca, control, meta, total_steps (0 = unknown),
    loss, and the generalization indicator: layers_at_target_ratio, rotation_target, indicator_judged,
    layers_under_rotated (core/indicator.py)."""
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
        "total_steps": s.total_steps,
        "loss": s.loss,
        "layers_at_target_ratio": s.layers_at_target_ratio,
        "rotation_target": s.rotation_target,
        "indicator_judged": s.indicator_judged,
        "layers_under_rotated": s.layers_under_rotated,
    }


def run_detail_dict(d: pb.RunDetail) -> dict[str, Any]:
    """A RunDetail: the summary's keys plus ``layers``, each layer's newest state in forward order."""
    out = run_summary_dict(d.summary)
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
            "under_rotated": lay.under_rotated,
        }
        for lay in d.layers
    ]
    return out


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


def thresholds_dict(t: pb.Thresholds) -> dict[str, Any]:
    """Alert thresholds, every field of ``Thresholds`` by name."""
    return {f.name: getattr(t, f.name) for f in pb.Thresholds.DESCRIPTOR.fields}


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
