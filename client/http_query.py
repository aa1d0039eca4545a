"""Client of the collector's read-only JSON API (server/http_api.py), for programs that should not load gRPC.

>>> from layrot.client.http_query import HttpQueryClient     # doctest: +SKIP
>>> with HttpQueryClient("http://localhost:9400") as q:
...     q.list_runs()                        # the same dicts as QueryClient.list_runs()
...     q.history("resnet-a").rotation[-1]

The same methods and answers as :class:`layrot.client.query.QueryClient` for
reads (the dicts of ``layrot.proto.views``; NaN where unknown), on the stdlib's
``http.client`` alone: no grpc and no protobuf, so a CLI read command starts in
about half the time (``benchmarks/cli_startup.py``). Writes (control commands,
thresholds) go over gRPC only. HTTPS with ``ca`` (and ``cert`` / ``key`` for
mutual TLS), or ``LAYROT_TLS_CA`` / ``LAYROT_TLS_CERT`` / ``LAYROT_TLS_KEY``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from layrot.client.errors import CollectorError

if TYPE_CHECKING:  # pragma: no cover
    import ssl

    from layrot.client.history import History

__all__ = ["API_PATH", "HttpQueryClient", "is_http_address", "split_http_url"]

API_PATH = "/api/v1"

# Keys whose value is a float that JSON sends as null when it is NaN: restored to NaN so
# that both clients return the same values (the *_report times stay None = never).
_FLOAT_KEYS = frozenset(
    {
        "min_rotation",
        "mean_rotation",
        "init_norm",
        "rotation",
        "step_angle",
        "weight_norm",
        "rho",
        "angle",
        "baseline",
        "loss_before",
        "loss_after",
        "loss",
        "layers_at_target_ratio",
        "alpha",
        "requested_rho",
        "applied_rho",
    }
)
_NAN = float("nan")


def is_http_address(address: str | None) -> bool:
    """True for ``http://...`` / ``https://...`` (the collector's HTTP port) rather than gRPC's ``host:port``."""
    return bool(address) and address.split("://", 1)[0].lower() in ("http", "https")  # type: ignore[union-attr]


def split_http_url(url: str, what: str = "URL") -> tuple[urllib.parse.SplitResult, int | None]:
    """``url`` split, and its port (None = the scheme's); ValueError naming ``what`` unless it is http(s)://HOST[:PORT]."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad {what} {url!r}: expected http(s)://HOST[:PORT][/PATH]")
    try:
        return parts, parts.port
    except ValueError:
        raise ValueError(f"bad port in the {what} {url!r}") from None


def _restore_nan(obj: Any, key: str = "") -> Any:
    if obj is None:
        return _NAN if key in _FLOAT_KEYS else None
    if isinstance(obj, dict):
        return {k: _restore_nan(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_nan(v, key) for v in obj]
    return obj


class HttpQueryClient:
    """Synchronous read-only client of ``http(s)://host:port/api/v1``; errors are :class:`CollectorError`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 10.0,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        try:
            parts, port = split_http_url(url, "collector URL")
        except ValueError as exc:
            raise CollectorError(str(exc)) from None
        self.url = url
        self.address = f"{parts.scheme}://{parts.netloc}"
        self.https = parts.scheme == "https"
        self.host: str = parts.hostname or ""  # split_http_url refused a URL without one
        self.port = port or (443 if self.https else 80)
        # "http://host:9400", "http://host:9400/" and ".../api/v1" all mean the same API.
        base = parts.path.rstrip("/")
        self.base = base if base.endswith(API_PATH) else base + API_PATH
        self.token = token or None
        self.timeout = timeout
        self.ca = ca or os.environ.get("LAYROT_TLS_CA") or None
        self.cert = cert or os.environ.get("LAYROT_TLS_CERT") or None
        self.key = key or os.environ.get("LAYROT_TLS_KEY") or None
        if self.cert and not self.key:
            raise CollectorError("a client certificate (--tls-cert) needs its key (--tls-key)")
        self._ssl: ssl.SSLContext | None = self._ssl_context() if self.https else None

    def _ssl_context(self) -> ssl.SSLContext:
        import ssl

        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise CollectorError(f"cannot use the TLS files (ca {self.ca}, cert {self.cert}): {exc}") from None
        return ctx

    def close(self) -> None:
        """Nothing to release: every request has its own connection."""

    def __enter__(self) -> HttpQueryClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ transport
    def _open(self, path: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """GET ``path`` under the API; the response when it is 200, else CollectorError with the server's reason."""
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v not in (None, "", 0, 0.0)})
        target = self.base + path + (f"?{query}" if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn: http.client.HTTPConnection
        if self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout or self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        try:
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
        except (ConnectionRefusedError, socket.gaierror) as exc:
            conn.close()
            raise CollectorError(
                f"cannot reach the layrot collector's HTTP port at {self.address} ({exc.strerror or exc}; is"
                " 'layrot-agent serve' running? its HTTP port is --metrics-port, 9400 by default)",
                status="UNAVAILABLE",
            ) from None
        except TimeoutError:
            conn.close()
            raise CollectorError(
                f"the collector at {self.address} did not answer within {timeout or self.timeout:g} s",
                status="DEADLINE_EXCEEDED",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise CollectorError(self._explain(exc), status="UNAVAILABLE") from None
        if resp.status != 200:
            body = resp.read()
            conn.close()
            raise self._refusal(resp.status, body)
        return _Response(conn, resp)

    def _explain(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        if self.https and "WRONG_VERSION_NUMBER" in text.upper():
            return f"{self.address} answers plain HTTP, not HTTPS: use http:// (or start the collector with --tls-cert)"
        if not self.https and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError)):
            return (
                f"{self.address} closed the connection: the collector may serve HTTPS (it runs with --tls-cert);"
                " use https:// and --tls-ca"
            )
        if "CERTIFICATE_VERIFY_FAILED" in text.upper():
            return f"the collector's certificate at {self.address} is not trusted ({text}): give its CA with --tls-ca"
        return f"the request to {self.address} failed: {text}"

    def _refusal(self, status: int, body: bytes) -> CollectorError:
        try:
            err = json.loads(body)["error"]
            name, message = str(err["status"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            name, message = f"HTTP_{status}", f"HTTP {status} from {self.address}: {body[:200]!r}"
        if name == "UNAUTHENTICATED":
            message = f"the collector at {self.address} refused the token: {message} (set --token or LAYROT_TOKEN)"
        return CollectorError(message, status=name)

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        with self._open(path, params) as resp:
            try:
                return _restore_nan(json.load(resp.body))
            except ValueError as exc:
                raise CollectorError(f"the collector at {self.address} sent JSON that does not parse: {exc}") from None

    @staticmethod
    def _segment(run: str) -> str:
        return urllib.parse.quote(run, safe="")

    # ------------------------------------------------------------ reads
    def list_runs(self) -> list[dict[str, Any]]:
        """Every run the collector knows, as dicts (see ``RunSummary`` in the proto)."""
        return list(self._get("/runs")["runs"])

    def get_run(self, run: str) -> dict[str, Any]:
        """Summary plus ``layers``: per-layer newest state (rotation, step_angle, weight_norm, rho, ...)."""
        return dict(self._get(f"/runs/{self._segment(run)}"))

    def get_control(self, run: str) -> dict[str, Any]:
        """Control status of ``run``: requested command, applied version/step, rejection, rates, audit."""
        return dict(self._get(f"/runs/{self._segment(run)}/control"))

    def list_alerts(self, run: str | None = None, limit: int = 0, since: float = 0.0) -> list[dict[str, Any]]:
        """Alerts the collector keeps (oldest first); ``limit`` the newest N (0 = all kept)."""
        return list(self._get("/alerts", {"run": run, "limit": limit, "since": since})["alerts"])

    def watch_alerts(self, run: str | None = None, since: float = 0.0, backlog: int = 0) -> Iterator[dict[str, Any]]:
        """Alerts as the collector raises them (server-sent events), until the caller stops or the collector goes."""
        # The server sends a keepalive every 15 s, so a read that waits 60 s means the collector is gone.
        with self._open("/alerts/stream", {"run": run, "since": since, "backlog": backlog}, timeout=60.0) as resp:
            event, data = "message", []
            try:
                for raw in resp.body:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line.startswith(":"):
                        continue
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        payload = json.loads("\n".join(data))
                        if event == "error":
                            raise CollectorError(str(payload.get("message")), status=str(payload.get("status")))
                        yield _restore_nan(payload)
                        event, data = "message", []
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                raise CollectorError(f"the alert stream from {self.address} broke: {exc}") from None

    def iter_history(self, run: str, since_step: int = 0, until_step: int = 0, rank: int = 0) -> Iterator[History]:
        """History in chunks (<= ~2000 steps each) as they stream in: one chunk in memory at a time."""
        import numpy as np

        from layrot.client.history import History

        params = {"since_step": since_step, "until_step": until_step, "rank": rank}
        # No overall deadline: a long history may take a while to stream (a read still times out).
        with self._open(f"/runs/{self._segment(run)}/history", params, timeout=max(self.timeout, 60.0)) as resp:
            head, chunks = _history_lines(resp.body, self.address)
            names = list(head["layer_names"])
            L = len(names)
            for chunk in chunks:
                S = len(chunk["steps"])

                def rows(key: str, chunk: dict[str, Any] = chunk, S: int = S) -> np.ndarray:
                    if key not in chunk:  # a column the answer left out (fields=...): unknown
                        return np.full((S, L), np.nan)
                    return np.array(chunk[key], dtype=np.float64).reshape(S, L) if S and L else np.empty((S, L))

                yield History(
                    run=run,
                    layer_names=names,
                    steps=np.asarray(chunk["steps"], dtype=np.int64),
                    times=np.array(chunk["times"], dtype=np.float64),
                    loss=np.array(chunk["loss"], dtype=np.float64),
                    rotation=rows("rotation"),
                    step_angle=rows("step_angle"),
                    weight_norm=rows("weight_norm"),
                    rho=rows("rho"),
                )

    def history(self, run: str, since_step: int = 0, until_step: int = 0, rank: int = 0) -> History:
        """Full history (inclusive step bounds; 0 = open) as numpy arrays."""
        from layrot.client.history import concat_histories

        return concat_histories(run, list(self.iter_history(run, since_step, until_step, rank)))

    # ------------------------------------------------------------ writes: gRPC only
    def _read_only(self, what: str) -> CollectorError:
        return CollectorError(
            f"{what} writes to the collector, and its HTTP API ({self.address}) only reads:"
            " give the collector's gRPC address host:port (--collector / LAYROT_COLLECTOR)",
            status="UNIMPLEMENTED",
        )

    def set_control(self, run: str, command: Any) -> dict[str, Any]:
        raise self._read_only("a control command")

    def set_thresholds(self, run: str | None = None, **values: float) -> dict[str, Any]:
        raise self._read_only("setting thresholds")


def _history_lines(body: Any, address: str) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """The head (run, rank, layer names) and the chunks of a streamed history answer, read line by line.

    The collector writes the head, then each chunk on a line of its own (server/http_api.py),
    so only one chunk is ever parsed and held; an ``error`` member at the end (the stream
    broke after it began) is raised, never taken for a complete answer.
    """

    def bad(what: str) -> CollectorError:
        return CollectorError(f"the collector at {address} sent a history answer that does not parse ({what})")

    first = body.readline().decode("utf-8").rstrip("\n")
    cut = first.rfind(',"chunks":[')
    if cut < 0:
        raise bad("no chunk list")
    try:
        head = json.loads(first[:cut] + "}")
    except ValueError as exc:
        raise bad(str(exc)) from None

    def chunks() -> Iterator[dict[str, Any]]:
        for raw in body:
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            if line.startswith("]"):
                tail = json.loads("{" + line[2:]) if line.startswith("],") else {}
                if "error" in tail:
                    err = tail["error"] or {}
                    raise CollectorError(
                        f"history of {head.get('run')!r} broke off: {err.get('message')}", status=err.get("status")
                    )
                return
            try:
                yield json.loads(line[1:] if line.startswith(",") else line)
            except ValueError as exc:
                raise bad(str(exc)) from None
        raise bad("it ended early")

    return head, chunks()


class _Response:
    """An open answer: ``body`` to read, the connection closed on exit."""

    def __init__(self, conn: http.client.HTTPConnection, body: http.client.HTTPResponse) -> None:
        self.conn = conn
        self.body = body

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.body.close()
        self.conn.close()
