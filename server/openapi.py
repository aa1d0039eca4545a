"""The OpenAPI 3.1 description of the collector's read-only JSON API (server/http_api.py).

Served at ``/api/v1/openapi.json``; tests/test_http_api.py checks that every
path it names answers and that the answers carry the properties it lists.
The schemas follow ``layrot.proto.views``, the dicts both clients return.
"""

from __future__ import annotations

from typing import Any

from layrot.core.version import __version__

__all__ = ["openapi_document"]

_NUM = {"type": ["number", "null"], "description": "null where unknown (NaN)"}
_TIME = {"type": ["number", "null"], "description": "unix seconds; null = never"}


def _obj(props: dict[str, Any], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "required": sorted(props)}
    if description:
        out["description"] = description
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _rows(what: str) -> dict[str, Any]:
    return {
        "type": "array",
        "description": f"{what}: one row per step, one value per layer (forward order), null where unknown",
        "items": {"type": "array", "items": {"type": ["number", "null"]}},
    }


_RUN_SUMMARY = {
    "run": {"type": "string"},
    "framework": {"type": "string"},
    "host": {"type": "string"},
    "world_size": {"type": "integer"},
    "step": {"type": "integer", "description": "newest reported step of rank 0"},
    "last_report": _TIME,
    "first_report": _TIME,
    "num_layers": {"type": "integer"},
    "min_rotation": _NUM,
    "mean_rotation": _NUM,
    "connected": {"type": "boolean"},
    "sessions": {"type": "integer"},
    "layca": {"type": "boolean"},
    "control": {"type": "boolean"},
    "meta": {"type": "object", "additionalProperties": {"type": "string"}},
    "total_steps": {"type": "integer", "description": "the run's announced length; 0 = unknown"},
    "loss": {**_NUM, "description": "newest reported training loss"},
    "layers_at_target_ratio": {**_NUM, "description": "share of layers whose rotation reached rotation_target"},
    "rotation_target": {"type": "number"},
    "indicator_judged": {"type": "boolean", "description": "past the share of the run where under_rotated is judged"},
    "layers_under_rotated": {"type": "integer"},
}

_LAYER_STATE = {
    "index": {"type": "integer"},
    "name": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer"}},
    "init_norm": _NUM,
    "rotation": {**_NUM, "description": "cosine distance to the initial weights"},
    "step_angle": {**_NUM, "description": "angle of the newest step, radians"},
    "weight_norm": _NUM,
    "rho": {**_NUM, "description": "Layca rate; null without Layca"},
    "step": {"type": "integer"},
    "under_rotated": {"type": "boolean", "description": "judged and still below the rotation target"},
}

_ALERT = {
    "run": {"type": "string"},
    "layer": {"type": "string", "description": "empty for run-level alerts"},
    "step": {"type": "integer"},
    "kind": {"type": "string"},
    "severity": {"type": "string", "enum": ["warning", "critical"]},
    "angle": _NUM,
    "baseline": _NUM,
    "time": {"type": "number"},
    "message": {"type": "string"},
    "loss_before": _NUM,
    "loss_after": _NUM,
    "incident": {"type": "string"},
    "layers": {"type": "array", "items": {"type": "string"}},
    "last_step": {"type": "integer"},
    "updates": {"type": "integer"},
    "updated": {"type": "number"},
    "resolved": {"type": "number", "description": "unix seconds the condition ended; 0 while on"},
}

_CHUNK = {
    "steps": {"type": "array", "items": {"type": "integer"}},
    "times": {"type": "array", "items": {"type": ["number", "null"]}},
    "loss": {"type": "array", "items": {"type": ["number", "null"]}},
    "rotation": _rows("rotation"),
    "step_angle": _rows("step angle (radians)"),
    "weight_norm": _rows("weight norm"),
    "rho": _rows("Layca rate"),
}

_CONTROL = {
    "run": {"type": "string"},
    "requested": {"type": ["object", "null"], "description": "the current command; null = none"},
    "requested_version": {"type": "integer"},
    "applied_version": {"type": "integer"},
    "applied_step": {"type": "integer"},
    "rejected_reason": {"type": "string"},
    "layer_names": {"type": "array", "items": {"type": "string"}},
    "requested_rho": {"type": "array", "items": {"type": ["number", "null"]}},
    "applied_rho": {"type": "array", "items": {"type": ["number", "null"]}},
    "audit": {"type": "array", "items": {"type": "object"}},
    "ranks": {"type": "array", "items": {"type": "object"}},
}


def _json_answer(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


_RUN_PARAM = _param("run", "path", {"type": "string"}, "run name, percent-encoded", required=True)
_STEP = {"type": "integer", "minimum": 0}
_ERRORS = {
    "400": {"$ref": "#/components/responses/Error"},
    "401": {"$ref": "#/components/responses/Error"},
    "404": {"$ref": "#/components/responses/Error"},
    "503": {"$ref": "#/components/responses/Error"},
}


_ALERTS_RUN = _param("run", "query", {"type": "string"}, "one run (default: every run)")


def _since(what: str) -> dict[str, Any]:
    return _param("since", "query", {"type": "number"}, f"{what} from this time on (unix seconds)")


def _get(summary: str, operation: str, parameters: list[dict[str, Any]], ok: dict[str, Any]) -> dict[str, Any]:
    """A path's GET: its summary, operationId, parameters, the 200 answer and the shared error answers."""
    return {
        "get": {
            "summary": summary,
            "operationId": operation,
            "parameters": parameters,
            "responses": {"200": ok, **_ERRORS},
        }
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``/api/v1``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "layrot collector API",
            "version": __version__,
            "description": (
                "Read-only JSON view of a layrot collector: runs, per-layer state, history, alerts and"
                " control status. The same answers as the gRPC Query service. With a read token set"
                " (serve --read-token), send 'Authorization: Bearer <read or write token>'."
            ),
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{}, {"bearer": []}],
        "paths": {
            "/runs": _get(
                "Every run the collector knows, sorted by name",
                "listRuns",
                [],
                _json_answer(_obj({"runs": {"type": "array", "items": _ref("RunSummary")}})),
            ),
            "/runs/{run}": _get(
                "A run's summary and each layer's newest state", "getRun", [_RUN_PARAM], _json_answer(_ref("RunDetail"))
            ),
            "/runs/{run}/history": _get(
                "Per-step history of one rank, in columnar chunks (streamed)",
                "getHistory",
                [
                    _RUN_PARAM,
                    _param("since_step", "query", _STEP, "first step (inclusive); 0 = from the start"),
                    _param("until_step", "query", _STEP, "last step (inclusive); 0 = to the end"),
                    _param("rank", "query", _STEP, "which rank's rows (default 0)"),
                    _param(
                        "stride",
                        "query",
                        _STEP,
                        "downsampling: of the steps in each window [k*stride, (k+1)*stride), only the first"
                        " (0 or 1 = every step); windows are absolute, so since_step = (k+1)*stride continues",
                    ),
                    _param(
                        "fields",
                        "query",
                        {"type": "string", "example": "rotation,step_angle"},
                        "per-layer columns to send, comma-separated, of rotation, step_angle, weight_norm, rho"
                        " (default all; steps, times and loss always come)",
                    ),
                ],
                _json_answer(_ref("History")),
            ),
            "/runs/{run}/control": _get(
                "Requested vs applied Layca command, per-layer rates, audit trail",
                "getControl",
                [_RUN_PARAM],
                _json_answer(_ref("ControlStatus")),
            ),
            "/alerts": _get(
                "Kept alerts, oldest first",
                "listAlerts",
                [_ALERTS_RUN, _param("limit", "query", _STEP, "the newest N (0 = all kept)"), _since("only alerts")],
                _json_answer(_obj({"alerts": {"type": "array", "items": _ref("Alert")}})),
            ),
            "/alerts/stream": _get(
                "Alerts as they are raised (server-sent events: one 'data: <Alert JSON>' each)",
                "watchAlerts",
                [_ALERTS_RUN, _param("backlog", "query", _STEP, "first the newest N kept alerts"), _since("backlog")],
                {"description": "event stream", "content": {"text/event-stream": {}}},
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Error": _json_answer(
                    _obj(
                        {
                            "error": _obj(
                                {
                                    "status": {"type": "string", "description": "gRPC status name, e.g. NOT_FOUND"},
                                    "message": {"type": "string"},
                                }
                            )
                        }
                    ),
                    "the request was refused; the message says why",
                )
            },
            "schemas": {
                "RunSummary": _obj(_RUN_SUMMARY),
                "LayerState": _obj(_LAYER_STATE),
                "RunDetail": _obj(
                    {**_RUN_SUMMARY, "layers": {"type": "array", "items": _ref("LayerState")}},
                    "RunSummary plus each layer's newest state, in forward order",
                ),
                # The per-layer columns are there unless the request's `fields` left them out.
                "HistoryChunk": {**_obj(_CHUNK), "required": ["loss", "steps", "times"]},
                "History": _obj(
                    {
                        "run": {"type": "string"},
                        "rank": {"type": "integer"},
                        "layer_names": {"type": "array", "items": {"type": "string"}},
                        "chunks": {"type": "array", "items": _ref("HistoryChunk")},
                    },
                    "consecutive chunks of at most ~2000 steps; an 'error' member at the end when the"
                    " stream broke after it had started",
                ),
                "Alert": _obj(_ALERT),
                "ControlStatus": _obj(_CONTROL),
            },
        },
    }
