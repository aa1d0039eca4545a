"""Prometheus exposition of the collector state (``/metrics``).

Rendered at scrape time from the in-memory state, so ingest pays nothing per
sample for metrics: the per-run series (per layer and per run) as text cached
per reported batch (server/metrics_render.py), the collector's own families
through a ``prometheus_client`` custom collector on a ``CollectorRegistry`` of
each collector instance (several collectors can share a test process), with
the process, platform and ``layrot_build_info`` series.

The collector's HTTP listeners are here too: ``HttpPort`` (one threaded WSGI server, HTTP or
HTTPS), ``MetricsServer`` (the metrics port) and ``Routes``, which of the router's path groups
(``/metrics``, health, ``/api/v1``, the web view) a port serves: all of them on the metrics
port, or with ``serve --ui-port`` the web view and the API on a port of their own.

Labels: ``run``, ``layer``, ``index``, ``reason``, ``framework``, ``host``;
never ``job`` (Prometheus attaches its own ``job`` and ``instance``).
Per-run numbers come from the lowest reporting rank (rank 0).
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CONTENT_TYPE_LATEST, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry

from layrot.core.indicator import IndicatorSettings
from layrot.server.http_api import API_PREFIX
from layrot.server.metrics_render import LAYER_FAMILIES, RunSeries, series_budget
from layrot.server.state import CollectorState, RunState
from layrot.server.store_api import HistoryStore
from layrot.server.web import WebUI

if TYPE_CHECKING:
    from layrot.server.alerts import AlertEngine

log = logging.getLogger(__name__)

LAYER_LABELS = ["run", "layer", "index"]


def control_families(runs: list[RunState]) -> Iterator[Metric]:
    """Control plane metrics: command versions and late applications (server/control.py).

    The per-layer ``layrot_layer_rho_requested`` (the current command evaluated at the
    run's newest step) is rendered with the other per-layer series (server/metrics_render.py).
    """
    version = GaugeMetricFamily(
        "layrot_run_command_version_requested",
        "Version of the run's current control command (0 = none)",
        labels=["run"],
    )
    applied = GaugeMetricFamily(
        "layrot_run_command_version_applied",
        "Newest control command version the job acknowledged as applied (0 = none)",
        labels=["run"],
    )
    late = CounterMetricFamily(
        "layrot_control_late",
        "Control commands a rank applied after their apply_at_step (they arrived too late:"
        " the replicas of a data-parallel job switched at different steps and now differ)",
        labels=["run"],
    )
    for rs in runs:
        rc = getattr(rs, "control", None)
        if rc is None or rc.current is None:
            continue
        version.add_metric([rs.run], rc.version)
        applied.add_metric([rs.run], rc.applied_state()[0])
        late.add_metric([rs.run], rc.late_total)
    yield from (version, applied, late)


class _Scrape(NamedTuple):
    """What one scrape exports: the runs, those exported as aggregates only, the per-layer series count."""

    runs: list[RunState]
    aggregate: set[str]
    layer_series: int


class LayrotCollector(Collector):
    """Metric families over a ``CollectorState`` (see module docstring for names).

    Runs on the metrics HTTP thread while the loop ingests: per run it reads
    the published ``RunState.view`` once, so every number of a run in one
    scrape comes from the same batch.
    """

    def __init__(
        self,
        state: CollectorState,
        store: HistoryStore | None = None,
        run_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
        alerts: AlertEngine | None = None,
        max_series: int = 0,
        aggregate_layers: int = 0,
        indicator: IndicatorSettings | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.run_ttl = run_ttl
        self.clock = clock
        self.alerts = alerts
        self.max_series = max_series
        self.aggregate_layers = aggregate_layers
        self.run_series = RunSeries(indicator)
        self._scrape_lock = threading.Lock()
        self._scrape: _Scrape | None = None

    def visible_runs(self) -> list[RunState]:
        """Runs that are connected or reported within ``run_ttl`` seconds (and not exported by another collector)."""
        now = self.clock()
        out = []
        for rs in self.state.snapshot_runs():
            if rs.held_elsewhere:  # another collector of the database exports it (server/cluster.py)
                continue
            last_report = rs.view.last_report
            last = last_report if last_report is not None else rs.created
            if rs.connected or (now - last) <= self.run_ttl:
                out.append(rs)
        return out

    def exposition(self, registry: CollectorRegistry) -> bytes:
        """The whole ``/metrics`` text: per-layer series (cached, server/metrics_render.py) and ``registry``'s.

        Each run's ``view`` is read once for both parts, so every number of a run in one
        scrape is of the same batch.
        """
        with self._scrape_lock:
            runs = self.visible_runs()
            views = {rs.run: rs.view for rs in runs}  # one read per run for the whole scrape
            full, aggregate = series_budget(runs, self.max_series, self.aggregate_layers)
            self._scrape = _Scrape(
                runs, {rs.run for rs in aggregate}, len(LAYER_FAMILIES) * sum(rs.num_layers for rs in full)
            )
            try:
                per_layer = {rs.run for rs in full}
                run_text = self.run_series.render((rs, views[rs.run], rs.run in per_layer) for rs in runs)
                rest = generate_latest(registry)
            finally:
                self._scrape = None
        return run_text.encode() + rest

    def _current_scrape(self) -> _Scrape:
        if self._scrape is not None:
            return self._scrape
        runs = self.visible_runs()  # collect() called on its own (not through exposition)
        full, aggregate = series_budget(runs, self.max_series, self.aggregate_layers)
        return _Scrape(runs, {rs.run for rs in aggregate}, len(LAYER_FAMILIES) * sum(rs.num_layers for rs in full))

    def collect(self) -> Iterator[Metric]:
        """The collector-level families (the per-run ones are rendered by :meth:`exposition`)."""
        scrape = self._current_scrape()
        runs = scrape.runs
        yield GaugeMetricFamily(
            "layrot_layer_series",
            "Per-layer series in this scrape (families x layers of the runs exported per layer)",
            value=scrape.layer_series,
        )
        if self.max_series > 0:
            yield GaugeMetricFamily(
                "layrot_layer_series_limit", "Cap on the per-layer series (serve --max-series)", value=self.max_series
            )
        yield from control_families(runs)

        st = self.state
        yield CounterMetricFamily(
            "layrot_samples_ingested", "Layer samples (steps x layers) stored in the history", value=st.samples_ingested
        )
        yield CounterMetricFamily(
            "layrot_steps_ingested", "Steps (per rank) stored in the history", value=st.steps_ingested
        )
        rejected = CounterMetricFamily("layrot_messages_rejected", "Messages rejected, by reason", labels=["reason"])
        for reason, n in sorted(dict(st.rejected).items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(
            "layrot_pipeline_passes",
            "Passes of the StepBatch pipeline (the batches read in one turn of the collector's loop go"
            " through it together)",
            value=st.pipeline_passes,
        )
        yield CounterMetricFamily(
            "layrot_pipeline_batches",
            "StepBatches through the pipeline (per pass: batches taken together)",
            value=st.pipeline_batches,
        )
        yield GaugeMetricFamily("layrot_sessions_active", "Open Ingest sessions", value=st.sessions_active)
        yield CounterMetricFamily("layrot_sessions_opened", "Ingest sessions opened", value=st.sessions_opened)
        yield CounterMetricFamily(
            "layrot_sessions_lost",
            "Ingest sessions that ended without Goodbye (job killed, network lost, client"
            " cancel, or a message over the 16 MiB limit, which gRPC refuses before the"
            " collector sees it)",
            value=st.sessions_lost,
        )
        if self.store is not None:
            yield GaugeMetricFamily(
                "layrot_store_pending_rows",
                "Rows queued for the history store, not committed",
                value=self.store.pending_rows,
            )
            yield CounterMetricFamily(
                "layrot_store_errors", "Failed history store transactions", value=self.store.errors
            )
            # Retention, downsampling and delete (server/retention.py): steps rows per rank, whole runs.
            yield CounterMetricFamily(
                "layrot_history_deleted_steps",
                "Step rows (per rank) deleted from the history by retention, downsampling or delete",
                value=getattr(self.store, "deleted_steps", 0),
            )
            yield CounterMetricFamily(
                "layrot_history_deleted_runs",
                "Runs deleted from the history by retention or delete",
                value=getattr(self.store, "deleted_runs", 0),
            )
        if self.alerts is not None:  # layrot_alerts_total{run,layer,kind,severity} etc. (server/alert_hub.py)
            yield from self.alerts.hub.metric_families(rs.run for rs in runs)


def build_labels() -> dict[str, str]:
    """Labels of ``layrot_build_info``: layrot's, Python's, grpcio's and protobuf's versions."""
    import platform

    import google.protobuf
    import grpc

    from layrot.core.version import __version__

    return {
        "version": __version__,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
    }


def metrics_app(collector: LayrotCollector, registry: CollectorRegistry) -> Callable[..., Any]:
    """WSGI app of ``/metrics``: the text exposition format, gzip when the scraper accepts it."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = collector.exposition(registry)
        headers = [("Content-Type", CONTENT_TYPE_LATEST)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            # Level 1: a few MB of repetitive text shrink ~10x at a fraction of level 9's cost.
            body = gzip.compress(body, compresslevel=1)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app


class _Server(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server, with the address family picked per instance."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper speaking plain HTTP to the TLS port, a port scan, a client that
        # hangs up: one debug line, not a traceback on stderr per connection.
        # handle_error runs inside socketserver's except block: the error is sys.exc_info().
        log.debug("HTTP request from %s failed: %r", client_address, sys.exc_info()[1])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: no access log
        pass

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        # PATH_INFO is percent-decoded, so a run name with "%2F" in it would read as two path
        # segments; the HTTP API splits the raw path and decodes each segment itself.
        env["layrot.raw_path"] = self.path.split("?", 1)[0]
        # Long answers (the alert stream) watch it to notice at once when their reader hangs up.
        env["layrot.socket"] = self.connection
        return env


# ---------------------------------------------------------------- which port serves which paths
# The paths of the collector's HTTP router (server/http_api.py HttpApi) in groups; a port serves
# some groups (Routes). One port (the default) serves them all; with ``serve --ui-port`` the web
# view moves to a port of its own, which serves the JSON API too (the page reads it from its own
# origin), while the CLI and notebooks (layrot.Client) keep reading the API on the metrics port.
METRICS = "metrics"  # /metrics
HEALTH = "health"  # /healthz, /readyz
API = "api"  # /api/v1 and below, its OpenAPI document included
WEB = "web"  # the web view's files: /, /index.html, /ui/*
EVERY_ROUTE = frozenset({METRICS, HEALTH, API, WEB})
METRICS_PORT_ROUTES = frozenset({METRICS, HEALTH, API})  # the metrics port next to a --ui-port
UI_PORT_ROUTES = frozenset({WEB, API, HEALTH})  # the --ui-port: no /metrics


def route_of(path: str) -> str | None:
    """The group of a request path (None: a path no group owns, which the router answers with a 404)."""
    if path == "/metrics":
        return METRICS
    if path in ("/healthz", "/readyz"):
        return HEALTH
    if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
        return API
    if WebUI.owns(path):
        return WEB
    return None


def not_found(environ: dict[str, Any], start_response: Callable[..., Any], message: str) -> list[bytes]:
    """A 404 with the JSON error body of the HTTP API (``{"error": {"status", "message"}}``)."""
    body = json.dumps({"error": {"status": "NOT_FOUND", "message": message}}, separators=(",", ":")).encode()
    start_response(
        "404 Not Found",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")],
    )
    return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


class Routes:
    """WSGI: ``app`` (the router) for the paths of ``groups``; a 404 for the paths of the other groups.

    Paths of no group go to ``app`` too, which answers them as it always does. ``elsewhere``
    returns the sentence a refused request reads (where that path is served instead), or None.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        groups: frozenset[str] = EVERY_ROUTE,
        elsewhere: Callable[[], str | None] | None = None,
    ) -> None:
        unknown = set(groups) - EVERY_ROUTE
        if unknown:
            raise ValueError(f"unknown route groups {sorted(unknown)}: choose from {sorted(EVERY_ROUTE)}")
        self.app = app
        self.groups = frozenset(groups)
        self.elsewhere = elsewhere

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("layrot.raw_path") or environ.get("PATH_INFO") or "/"
        group = route_of(path)
        if group is None or group in self.groups:
            return self.app(environ, start_response)
        hint = self.elsewhere() if self.elsewhere is not None else None
        message = f"{path!r} is not served on this port" + (f": {hint}" if hint else "")
        return not_found(environ, start_response, message)


class HttpPort:
    """One HTTP listener of the collector, or HTTPS with ``ssl_context``, serving ``app`` on its own thread.

    The metrics port (:class:`MetricsServer`) and the web view's port (``serve --ui-port``) are
    both one: the same server, handler and TLS, each with the app (the one router behind its
    :class:`Routes`) it is given. ``what`` names the port in the error of a failed bind.

    Same server as ``prometheus_client.start_http_server`` but with a short
    poll interval, so stopping a collector takes milliseconds, not 0.5 s. TLS
    is the stdlib's ``ssl`` module, as in ``start_http_server(certfile=...)``
    (prometheus_client 0.19), and works with any prometheus_client the cli extra allows.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        what: str = "the HTTP port",
        thread_name: str = "layrot-http",
    ) -> None:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class _LayrotHttpServer(_Server):
            address_family = family

        try:
            self._httpd = make_server(host, port, app, _LayrotHttpServer, handler_class=_QuietHandler)
        except OSError as exc:
            why = (
                f"port {port} is already in use (another collector?)"
                if exc.errno == errno.EADDRINUSE
                else (exc.strerror or str(exc))
            )
            raise RuntimeError(f"cannot bind {what} to {host or '*'}:{port}: {why}") from exc
        if ssl_context is not None:
            # The handshake runs on the first read, in the request's own thread: with the
            # default (handshake inside accept) one client that connects and sends nothing
            # would block every other scrape.
            self._httpd.socket = ssl_context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=thread_name, daemon=True
        )
        self._thread.start()
        self.host = host
        self.port: int = self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """``http(s)://host:port`` of the port (``127.0.0.1`` when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class MetricsServer(HttpPort):
    """``/metrics`` over HTTP, or HTTPS with ``ssl_context``, on its own registry and thread.

    ``wrap`` turns the ``/metrics`` WSGI app into the app the port serves (the
    collector passes the HTTP API of server/http_api.py, which routes ``/metrics``
    back to it); without it every path answers the metrics.
    """

    def __init__(
        self,
        collector: LayrotCollector,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        # The collector's own process_* / python_info series and its build, as every exporter has them.
        for own in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR):
            self.registry.register(own)
        Info("layrot_build", "The collector's version and its main libraries", registry=self.registry).info(
            build_labels()
        )
        app = metrics_app(collector, self.registry)
        if wrap is not None:
            app = wrap(app)
        super().__init__(app, host, port, ssl_context, what="the metrics port", thread_name="layrot-metrics")

    @property
    def url(self) -> str:
        return f"{self.base_url}/metrics"
