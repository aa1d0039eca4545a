"""The collector's HTTP port: ``/metrics``, ``/healthz``, ``/readyz`` and a read-only JSON API.

The JSON API is the ``Query`` service's read methods over plain HTTP, for
programs that should not load gRPC: the CLI's read commands start in half the
time through it (``benchmarks/cli_startup.py``), and browsers and notebooks
can read it directly. Each request runs the very servicer method the gRPC
call runs (server/query.py), on the collector's event loop, so validation,
errors and answers are the same; the JSON bodies are the dicts of
``layrot.proto.views``, which the gRPC client returns too. NaN and infinities
are written as ``null``.

======================================  ====================================================
``GET /api/v1/runs``                    ``{"runs": [RunSummary, ...]}`` sorted by name
``GET /api/v1/runs/{run}``              RunSummary plus ``layers`` (newest state per layer)
``GET /api/v1/runs/{run}/history``      ``since_step``, ``until_step`` (inclusive, 0 = open),
                                        ``rank``, ``stride`` (the first step of each
                                        ``stride``-step window; 0/1 = all), ``fields``
                                        (per-layer columns, comma-separated; default all):
                                        ``{"run", "layer_names", "chunks": [...]}``,
                                        each chunk columnar: ``steps``, ``times``, ``loss``,
                                        and ``rotation`` / ``step_angle`` / ``weight_norm`` /
                                        ``rho`` as lists of per-step rows; streamed
``GET /api/v1/runs/{run}/control``      requested vs applied Layca command, rates, audit
``GET /api/v1/alerts``                  ``run``, ``limit`` (newest N, 0 = all), ``since``
                                        (unix seconds): ``{"alerts": [Alert, ...]}``
``GET /api/v1/alerts/stream``           ``run``, ``since``, ``backlog``: server-sent events,
                                        one ``data: Alert`` per alert as it is raised
``GET /api/v1/openapi.json``            the OpenAPI 3.1 description of the above
======================================  ====================================================

Run names go in one path segment, percent-encoded (a ``/`` in a name is ``%2F``).
Authentication is the gRPC rule for reads (server/auth.py): with a read token
set, ``Authorization: Bearer <read or write token>``, else 401, counted in
``layrot_messages_rejected_total{reason="unauthenticated"}``. ``/metrics``,
``/healthz``, ``/readyz`` and the OpenAPI document stay open, as health checks
do on gRPC. Every other path is a 404: nothing answers a path it does not own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import select
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import numpy as np

from layrot.core.json_safe import jsonable
from layrot.proto import layrot_pb2 as pb
from layrot.proto.views import alert_dict, control_status_dict, run_detail_dict, run_summary_dict
from layrot.server.auth import REJECT_REASON, bearer_matches, token_digests

if TYPE_CHECKING:  # pragma: no cover
    from layrot.server.query import QueryServicer

log = logging.getLogger(__name__)

__all__ = ["API_PREFIX", "ApiBackend", "HttpApi"]

API_PREFIX = "/api/v1"
# A query that takes longer than this answers 504: a stuck store must not hold HTTP threads forever.
CALL_TIMEOUT = 60.0
# Server-sent events: a comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_SECONDS = 15.0

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# gRPC status (what the servicer aborts with) -> HTTP status.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class ApiBackend(Protocol):
    """What the HTTP API needs of the collector (server/app.py's ``Collector``)."""

    query: QueryServicer | None
    loop: asyncio.AbstractEventLoop | None

    def is_ready(self) -> bool: ...

    def count_rejection(self, reason: str) -> None: ...


class ApiError(Exception):
    """An answer other than 200: ``status`` is the gRPC status name, ``message`` for humans."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.status, 500)


class _Context:
    """Stands in for ``grpc.aio.ServicerContext`` in the servicer methods the API calls: an abort becomes ApiError."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise ApiError(code.name, details)

    def peer(self) -> str:
        return self._peer


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(jsonable(obj), allow_nan=False, separators=(",", ":")).encode()


def _number_json(values: Any) -> str:
    """JSON of a numeric (nested) list with non-finite values as null, without a Python-level walk."""
    text = json.dumps(values, allow_nan=True, separators=(",", ":"))
    # Only numbers are in the text, so these tokens cannot be parts of strings.
    return text.replace("-Infinity", "null").replace("Infinity", "null").replace("NaN", "null")


HISTORY_FIELDS = ("rotation", "step_angle", "weight_norm", "rho")


def _chunk_json(chunk: pb.HistoryChunk, num_layers: int, fields: tuple[str, ...] = HISTORY_FIELDS) -> str:
    S = len(chunk.steps)
    L = chunk.num_layers or num_layers

    def rows(data: bytes) -> str:
        if not S or not L:
            return "[" + ",".join("[]" for _ in range(S)) + "]"
        return _number_json(np.frombuffer(data, dtype="<f8").reshape(S, L).tolist())

    parts = [
        f'"steps":{_number_json(list(chunk.steps))}',
        f'"times":{_number_json(list(chunk.times))}',
        f'"loss":{_number_json(list(chunk.loss))}',
    ]
    parts += [f'"{key}":{rows(getattr(chunk, key))}' for key in fields]
    return "{" + ",".join(parts) + "}"


class _Stride:
    """Keeps, of the steps in each window ``[k * n, (k + 1) * n)``, only the first (a history's chunks in order).

    Windows are absolute steps, not positions: the same steps are kept whatever the chunking and
    wherever ``since_step`` starts a window, so a page can fetch a long run sparsely and then
    follow it with ``since_step = (k + 1) * n``.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.window = -1

    def __call__(self, chunk: pb.HistoryChunk) -> pb.HistoryChunk:
        keep = []
        for i, step in enumerate(chunk.steps):
            if step // self.n != self.window:
                self.window = step // self.n
                keep.append(i)
        S = len(chunk.steps)
        if len(keep) == S:
            return chunk
        out = pb.HistoryChunk(
            layer_names=chunk.layer_names,
            num_layers=chunk.num_layers,
            steps=[chunk.steps[i] for i in keep],
            times=[chunk.times[i] for i in keep] if len(chunk.times) == S else [],
            loss=[chunk.loss[i] for i in keep] if len(chunk.loss) == S else [],
        )
        L = chunk.num_layers or (len(chunk.rotation) // 8 // S if S else 0)
        for key in ("rotation", "step_angle", "weight_norm", "rho"):
            data = getattr(chunk, key)
            if data and S and L:
                setattr(out, key, np.frombuffer(data, dtype="<f8").reshape(S, L)[keep].tobytes())
        return out


def _number_arg(args: dict[str, list[str]], name: str, kind: type[int] | type[float]) -> Any:
    """Query parameter ``name`` as a non-negative int (``kind`` int) or a finite float; 0 when absent."""
    values = args.get(name)
    if not values:
        return kind(0)
    try:
        value = kind(values[-1])
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ApiError("INVALID_ARGUMENT", f"{name} must be {what}, got {values[-1]!r}") from None
    if kind is int and not 0 <= value <= 2**63 - 1:
        raise ApiError("INVALID_ARGUMENT", f"{name} {value} is out of range")
    if kind is float and not math.isfinite(value):
        raise ApiError("INVALID_ARGUMENT", f"{name} must be finite, got {values[-1]!r}")
    return value


def _int_arg(args: dict[str, list[str]], name: str) -> int:
    return int(_number_arg(args, name, int))


def _float_arg(args: dict[str, list[str]], name: str) -> float:
    return float(_number_arg(args, name, float))


def _fields_arg(args: dict[str, list[str]]) -> tuple[str, ...]:
    """``fields=rotation,step_angle``: which per-layer columns a history answer carries (default all)."""
    values = args.get("fields")
    if not values or not values[-1]:
        return HISTORY_FIELDS
    wanted = values[-1].split(",")
    unknown = [f for f in wanted if f not in HISTORY_FIELDS]
    if unknown:
        raise ApiError("INVALID_ARGUMENT", f"unknown fields {unknown}: choose from {', '.join(HISTORY_FIELDS)}")
    return tuple(f for f in HISTORY_FIELDS if f in wanted)


class HttpApi:
    """WSGI application of the collector's HTTP port (see the module docstring for the routes).

    ``metrics_app`` answers ``/metrics``; ``backend`` gives the servicer and the
    loop once the collector runs; ``token`` / ``read_token`` are the collector's
    (only the read rule applies: the API has no writes).
    """

    def __init__(
        self,
        metrics_app: WSGIApp,
        backend: ApiBackend,
        token: str | None = None,
        read_token: str | None = None,
    ) -> None:
        self.metrics_app = metrics_app
        self.backend = backend
        self._read = token_digests(read_token, token) if read_token else ()
        self._lock = threading.Lock()
        self._streams: set[Any] = set()  # futures of the open alert streams' pumps on the loop

    def close(self) -> None:
        """End every open alert stream (the collector calls this before it stops its loop)."""
        with self._lock:
            streams, self._streams = list(self._streams), set()
        for future in streams:
            future.cancel()

    # ------------------------------------------------------------ WSGI
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("layrot.raw_path") or environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            return self.metrics_app(environ, start_response)
        try:
            if method not in ("GET", "HEAD"):
                raise _MethodNotAllowed()
            if path == "/healthz":
                return self._text(start_response, 200, "ok\n")
            if path == "/readyz":
                ready = self.backend.is_ready()
                return self._text(start_response, 200 if ready else 503, "ready\n" if ready else "not ready\n")
            if path == f"{API_PREFIX}/openapi.json":
                from layrot.server.openapi import openapi_document

                return self._json(start_response, 200, openapi_document())
            if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
                self._check_token(environ)
                args = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
                peer = f"http:{environ.get('REMOTE_ADDR', '?')}"
                sock = environ.get("layrot.socket")
                return self._route(path[len(API_PREFIX) :], args, peer, start_response, sock)
            web = getattr(self.backend, "web", None)  # the web view's files (server/web.py); None: serve --no-ui
            if web is not None and web.owns(path):
                return web(environ, start_response)
            raise ApiError("NOT_FOUND", f"no such path {path!r} (see {API_PREFIX}/openapi.json)")
        except _MethodNotAllowed:
            body = _json_bytes({"error": {"status": "METHOD_NOT_ALLOWED", "message": "the HTTP API only reads: GET"}})
            start_response(
                "405 Method Not Allowed",
                [("Content-Type", "application/json"), ("Allow", "GET, HEAD"), ("Content-Length", str(len(body)))],
            )
            return [body]
        except ApiError as exc:
            return self._error(start_response, exc)
        except Exception:  # a bug must cost one request, not the server thread
            log.exception("HTTP API request %s failed", path)
            return self._error(start_response, ApiError("INTERNAL", "internal error (see the collector's log)"))

    def _route(
        self,
        rest: str,
        args: dict[str, list[str]],
        peer: str,
        start_response: Callable[..., Any],
        sock: Any = None,
    ) -> Iterable[bytes]:
        parts = [urllib.parse.unquote(p) for p in rest.strip("/").split("/")] if rest.strip("/") else []
        if parts == ["runs"]:
            resp = self._call(lambda s, c: s.ListRuns(pb.ListRunsRequest(), c), peer)
            return self._json(start_response, 200, {"runs": [run_summary_dict(r) for r in resp.runs]})
        if len(parts) == 2 and parts[0] == "runs":
            run = parts[1]
            detail = self._call(lambda s, c: s.GetRun(pb.GetRunRequest(run=run), c), peer)
            return self._json(start_response, 200, run_detail_dict(detail))
        if len(parts) == 3 and parts[0] == "runs" and parts[2] == "history":
            request = pb.HistoryRequest(
                run=parts[1],
                since_step=_int_arg(args, "since_step"),
                until_step=_int_arg(args, "until_step"),
                rank=min(_int_arg(args, "rank"), 2**32 - 1),
            )
            return self._history(request, peer, start_response, _int_arg(args, "stride"), _fields_arg(args))
        if len(parts) == 3 and parts[0] == "runs" and parts[2] == "control":
            run = parts[1]
            st = self._call(lambda s, c: s.GetControl(pb.GetControlRequest(run=run), c), peer)
            return self._json(start_response, 200, control_status_dict(st))
        if parts == ["alerts"]:
            request = pb.ListAlertsRequest(
                run=(args.get("run") or [""])[-1],
                limit=min(_int_arg(args, "limit"), 2**32 - 1),
                since=_float_arg(args, "since"),
            )
            alerts = self._call(lambda s, c: s.ListAlerts(request, c), peer)
            return self._json(start_response, 200, {"alerts": [alert_dict(a) for a in alerts.alerts]})
        if parts == ["alerts", "stream"]:
            request = pb.ListAlertsRequest(
                run=(args.get("run") or [""])[-1],
                limit=min(_int_arg(args, "backlog"), 2**32 - 1),
                since=_float_arg(args, "since"),
            )
            return self._alert_stream(request, peer, start_response, sock)
        raise ApiError("NOT_FOUND", f"no such path {API_PREFIX}{rest!r} (see {API_PREFIX}/openapi.json)")

    # ------------------------------------------------------------ calls on the collector loop
    def _loop(self) -> tuple[QueryServicer, asyncio.AbstractEventLoop]:
        servicer, loop = self.backend.query, self.backend.loop
        if servicer is None or loop is None or loop.is_closed() or not self.backend.is_ready():
            raise ApiError("UNAVAILABLE", "the collector is starting or stopping; try again")
        return servicer, loop

    def _call(self, fn: Callable[[QueryServicer, _Context], Any], peer: str) -> Any:
        """Run one servicer coroutine on the collector loop and wait for its answer."""
        servicer, loop = self._loop()
        future = asyncio.run_coroutine_threadsafe(fn(servicer, _Context(peer)), loop)
        try:
            return future.result(CALL_TIMEOUT)
        except FutureTimeout:
            future.cancel()
            raise ApiError("DEADLINE_EXCEEDED", f"the query took longer than {CALL_TIMEOUT:g} s") from None

    def _stream(self, make: Callable[[QueryServicer, _Context], Any], peer: str) -> Iterator[Any]:
        """Items of a servicer's async generator, pulled one at a time from the loop (constant memory)."""
        servicer, loop = self._loop()
        agen = make(servicer, _Context(peer))
        try:
            while True:
                future = asyncio.run_coroutine_threadsafe(agen.__anext__(), loop)
                try:
                    yield future.result(CALL_TIMEOUT)
                except StopAsyncIteration:
                    return
                except FutureTimeout:
                    future.cancel()
                    raise ApiError("DEADLINE_EXCEEDED", f"the query took longer than {CALL_TIMEOUT:g} s") from None
        finally:
            if not loop.is_closed():
                asyncio.run_coroutine_threadsafe(agen.aclose(), loop)

    def _history(
        self,
        request: pb.HistoryRequest,
        peer: str,
        start_response: Callable[..., Any],
        stride: int = 0,
        fields: tuple[str, ...] = HISTORY_FIELDS,
    ) -> Iterable[bytes]:
        chunks: Iterator[Any] = self._stream(lambda s, c: s.GetHistory(request, c), peer)
        if stride > 1:
            chunks = map(_Stride(stride), chunks)
        # The first chunk is fetched before the headers go out, so an unknown run is a clean 404.
        first = next(chunks, None)
        names = list(first.layer_names) if first is not None else []
        L = len(names)

        def body() -> Iterator[bytes]:
            head = {"run": request.run, "rank": request.rank, "layer_names": names}
            # One chunk per line (JSON allows the newlines): a client can read the answer line by
            # line and hold one chunk at a time (client/http_query.py).
            yield (json.dumps(head, separators=(",", ":"))[:-1] + ',"chunks":[').encode()
            sep = "\n"
            if first is not None and first.steps:
                yield (sep + _chunk_json(first, L, fields)).encode()
                sep = "\n,"
            try:
                for chunk in chunks:
                    if chunk.steps:
                        yield (sep + _chunk_json(chunk, L, fields)).encode()
                        sep = "\n,"
            except ApiError as exc:  # headers are gone: end the document with the error, not silently
                log.warning("history of %r over HTTP ended early: %s", request.run, exc.message)
                yield f'\n],"error":{json.dumps({"status": exc.status, "message": exc.message})}}}\n'.encode()
                return
            yield b"\n]}\n"

        start_response("200 OK", [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
        return body()

    def _alert_stream(
        self, request: pb.ListAlertsRequest, peer: str, start_response: Callable[..., Any], sock: Any = None
    ) -> Iterable[bytes]:
        servicer, loop = self._loop()
        items: queue.Queue[Any] = queue.Queue(maxsize=1000)
        done = threading.Event()
        context = _Context(peer)

        async def pump() -> None:
            try:
                async for alert in servicer.WatchAlerts(request, context):
                    if done.is_set():
                        return
                    try:
                        items.put_nowait(alert)
                    except queue.Full:  # a reader that does not read: end its stream, say why
                        items.put(ApiError("RESOURCE_EXHAUSTED", "the reader fell 1000 alerts behind"))
                        return
            except ApiError as exc:
                items.put(exc)
            finally:
                items.put(None)

        # The servicer's own checks (bad since, no alert engine) before the headers: one clean error answer.
        self._call(lambda s, c: s._check_since(request, c), peer)
        self._call(lambda s, c: s._alert_hub(c), peer)
        task = asyncio.run_coroutine_threadsafe(pump(), loop)
        with self._lock:
            self._streams.add(task)

        def events() -> Iterator[bytes]:
            try:
                yield b": layrot alert stream\n\n"
                quiet_since = time.monotonic()
                while True:
                    try:
                        item = items.get(timeout=1.0)
                    except queue.Empty:
                        if _hung_up(sock):
                            return
                        if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                            quiet_since = time.monotonic()
                            yield b": keepalive\n\n"
                        continue
                    quiet_since = time.monotonic()
                    if item is None:
                        return
                    if isinstance(item, ApiError):
                        yield b"event: error\ndata: " + _json_bytes({"status": item.status, "message": item.message})
                        yield b"\n\n"
                        return
                    yield b"data: " + _json_bytes(alert_dict(item)) + b"\n\n"
            finally:  # the reader went away (or the stream ended): stop the watcher on the loop
                done.set()
                task.cancel()
                with self._lock:
                    self._streams.discard(task)

        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")]
        start_response("200 OK", headers)
        return events()

    # ------------------------------------------------------------ answers
    def _check_token(self, environ: dict[str, Any]) -> None:
        if not self._read:
            return
        header = environ.get("HTTP_AUTHORIZATION", "")
        if bearer_matches([("authorization", header)], self._read):
            return
        self.backend.count_rejection(REJECT_REASON)
        raise ApiError(
            "UNAUTHENTICATED",
            "the HTTP API needs the collector's read token or its write token (serve --read-token / --token):"
            " missing or wrong 'Authorization: Bearer <token>'",
        )

    @staticmethod
    def _json(start_response: Callable[..., Any], status: int, obj: Any) -> list[bytes]:
        body = _json_bytes(obj)
        start_response(
            f"{status} {REASONS.get(status, '')}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")],
        )
        return [body]

    @staticmethod
    def _text(start_response: Callable[..., Any], status: int, text: str) -> list[bytes]:
        body = text.encode()
        start_response(
            f"{status} {REASONS.get(status, '')}",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def _error(self, start_response: Callable[..., Any], exc: ApiError) -> list[bytes]:
        status = exc.http_status
        body = _json_bytes({"error": {"status": exc.status, "message": exc.message}})
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="layrot"'))
        start_response(f"{status} {REASONS.get(status, '')}", headers)
        return [body]


class _MethodNotAllowed(Exception):
    pass


def _hung_up(sock: Any) -> bool:
    """True when the reader of a stream closed its side: after its request it sends nothing more, so
    any readability (EOF, a reset, a TLS close_notify) means it is gone."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):  # closed under us
        return True
    return bool(readable)
