"""The collector daemon: gRPC ingest + query + health, ``/metrics``, history store.

``Collector`` runs embedded (tests, demo, benchmarks: ``with Collector(...) as c``)
or as the daemon behind ``layrot-agent serve`` (``serve_forever``). The gRPC
server is a grpc.aio server on its own asyncio loop in a background thread;
the history store has its own writer thread; ``/metrics`` its own HTTP thread.

This module is the collector's one composition root: ``Collector.start``
creates every part (store, state, control plane, alert hub and engine,
Alertmanager pushers, servicers, metrics) and hands each its collaborators as
constructor arguments; no other module creates a collaborator of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from layrot.core.indicator import DEFAULT_SHARE, DEFAULT_TARGET, IndicatorSettings
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.server.alert_lost import DEFAULT_GRACE
from layrot.server.alertmanager import AlertmanagerPusher
from layrot.server.alerts import AlertEngine, AlertHub, Thresholds
from layrot.server.auth import ServerTLS, TokenInterceptor, is_loopback
from layrot.server.cluster import DEFAULT_INTERVAL as DEFAULT_CLUSTER_INTERVAL
from layrot.server.cluster import Cluster, default_collector_id
from layrot.server.control import ControlPlane
from layrot.server.http_api import HttpApi
from layrot.server.ingest import IngestLimits, IngestServicer, add_ingest_to_server, grpc_receive_limit
from layrot.server.metrics import (
    METRICS_PORT_ROUTES,
    UI_PORT_ROUTES,
    HttpPort,
    LayrotCollector,
    MetricsServer,
    Routes,
    not_found,
)
from layrot.server.query import QueryServicer
from layrot.server.retention import Retention, RetentionPolicy
from layrot.server.state import CollectorState
from layrot.server.store_api import HistoryStore, is_postgres_url, is_url, open_store, redact_url
from layrot.server.web import WebUI

log = logging.getLogger(__name__)

# Largest message the collector accepts (16 MiB): a StepBatch of S steps x L
# layers is ~32*S*L bytes, so this allows e.g. 500 steps x 1000 layers.
# Bigger messages are refused by gRPC itself (RESOURCE_EXHAUSTED); senders
# split their batches well below this.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# New calls gRPC may queue before the handler loop picks them up (default 1000).
MAX_PENDING_CALLS = 65536
# The HTTP/2 window of one stream: a job's batch (1 MiB at most by default) fits in one window.
STREAM_WINDOW_BYTES = 1 << 20
# Seconds a new call may wait for the handler loop before gRPC core cancels it.
UNREQUESTED_CALL_WAIT_S = 600

INGEST_SERVICE = "layrot.v1.Ingest"
QUERY_SERVICE = "layrot.v1.Query"


class Collector:
    """An embeddable layrot collector.

    >>> with Collector(db_path="/tmp/layrot.db") as c:   # doctest: +SKIP
    ...     print(c.grpc_address, c.metrics_url)

    ``grpc_port=0`` / ``metrics_port=0`` pick free ports; ``metrics_port=None``
    disables ``/metrics`` (and the HTTP API and web view with it, unless ``ui_port``
    is given; ``ui=False`` turns off only the web view at ``/``). ``ui_port``
    (``serve --ui-port``; 0 = a free port) moves the web view to a port of its own on
    ``metrics_host``, with the same TLS and tokens, which serves the JSON API and
    the health checks too, never ``/metrics``; the metrics port then keeps
    ``/metrics``, ``/healthz``, ``/readyz`` and ``/api/v1``. ``token`` protects ingest and every write call
    (``authorization: Bearer <token>`` metadata); ``read_token`` protects the
    queries too (without it they stay open); health checks are always open
    (server/auth.py). ``tls_cert`` + ``tls_key`` (PEM files) serve gRPC and
    ``/metrics`` over TLS; ``tls_client_ca`` adds mutual TLS: clients of both must
    present a certificate that CA signed.
    Runs silent for more than ``run_ttl`` seconds (and not connected) leave
    ``/metrics``; their history stays. A job whose session ends without
    Goodbye and that does not come back within ``lost_grace`` seconds raises
    a ``run_lost`` alert (server/alert_lost.py).
    """

    def __init__(
        self,
        grpc_host: str = "127.0.0.1",
        grpc_port: int = 0,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 0,
        db_path: str | Path = "layrot.db",
        token: str | None = None,
        read_token: str | None = None,
        ui: bool = True,
        ui_port: int | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_client_ca: str | Path | None = None,
        run_ttl: float = 3600.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        alerts: bool = True,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        alertmanager_url: str | Sequence[str] | None = None,
        alertmanager_auth: Mapping[str, Any] | None = None,
        alert_quiet: float = 300.0,
        alert_resend: float = 60.0,
        ingest_limits: IngestLimits | None = None,
        store_busy_timeout: float = 30.0,
        lost_grace: float = DEFAULT_GRACE,
        max_series: int = 0,
        aggregate_layers: int = 0,
        rotation_target: float = DEFAULT_TARGET,
        under_rotated_share: float = DEFAULT_SHARE,
        retention: RetentionPolicy | None = None,
        retention_interval: float = 3600.0,
        collector_id: str | None = None,
        cluster_interval: float = DEFAULT_CLUSTER_INTERVAL,
    ) -> None:
        self.grpc_host = grpc_host
        self.grpc_port = grpc_port
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port
        if ui_port is not None and not ui:
            raise ValueError("ui_port serves the web view, which ui=False turns off: give one of them")
        self.ui_port = ui_port
        self.db_path = str(db_path)
        self.token = token or None
        self.read_token = read_token or None
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (tls_cert and tls_key)")
        if tls_client_ca is not None and tls_cert is None:
            raise ValueError("a client CA (mutual TLS) needs the collector's own certificate and key too")
        self.tls_files = (
            (str(tls_cert), str(tls_key), str(tls_client_ca) if tls_client_ca else None) if tls_cert else None
        )
        self.tls: ServerTLS | None = None  # loaded (and checked) by start()
        self.run_ttl = run_ttl
        # /metrics budget (server/metrics_render.py): runs beyond it are exported as aggregates only.
        if max_series < 0 or aggregate_layers < 0:
            raise ValueError("max_series and aggregate_layers must be >= 0 (0 = no limit)")
        self.max_series = max_series
        self.aggregate_layers = aggregate_layers
        # The generalization indicator (core/indicator.py) in /metrics and the Query answers.
        self.indicator = IndicatorSettings(rotation_target, under_rotated_share)
        self.max_message_bytes = max_message_bytes
        # What one job may send (server/decode.py); max_message_bytes is the one source of the message size.
        self.ingest_limits = dataclasses.replace(ingest_limits or IngestLimits(), max_message_bytes=max_message_bytes)
        self.store_busy_timeout = store_busy_timeout
        # History retention and downsampling (server/retention.py), on a thread of its own.
        self.retention_policy = retention or RetentionPolicy()
        self.retention_interval = retention_interval
        self.retention: Retention | None = None
        # Several collectors on one PostgreSQL database (server/cluster.py): always on a postgresql:// --db.
        self.collector_id = collector_id
        self.cluster_interval = cluster_interval
        self.cluster: Cluster | None = None
        # Alerts (server/alerts.py, server/alertmanager.py): see _start_alerts.
        self.alerts_enabled = alerts
        self.thresholds = thresholds if isinstance(thresholds, Thresholds) else Thresholds(**dict(thresholds or {}))
        urls = [alertmanager_url] if isinstance(alertmanager_url, str) else list(alertmanager_url or ())
        self.alertmanager_urls = [u for u in urls if u]
        # user, password_file, token_file, ca (server/alertmanager.py AlertmanagerPusher); checked here.
        self.alertmanager_auth = dict(alertmanager_auth or {})
        for u in self.alertmanager_urls:
            AlertmanagerPusher(u, **self.alertmanager_auth)
        self.alert_quiet = alert_quiet
        self.alert_resend = alert_resend
        self.lost_grace = lost_grace
        self.alert_engine: AlertEngine | None = None
        self._pushers: list[AlertmanagerPusher] = []
        self.state = CollectorState()
        self.store: HistoryStore | None = None
        self.control: ControlPlane | None = None
        self.ingest: IngestServicer | None = None
        self.query: QueryServicer | None = None
        self.health: health_aio.HealthServicer | None = None
        self.metrics: MetricsServer | None = None
        self.http_api: HttpApi | None = None
        # The web view's own port (serve --ui-port): the router of the metrics port with other routes.
        self.ui_server: HttpPort | None = None
        # The web view's files at / and /ui/ of the HTTP port (server/web.py); ui=False (serve --no-ui): 404 there.
        self.web: WebUI | None = WebUI() if ui and (metrics_port is not None or ui_port is not None) else None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._stop_future: asyncio.Future | None = None
        self._running = False

    # ------------------------------------------------------------ addresses
    @property
    def grpc_address(self) -> str:
        """``host:port`` to dial (``127.0.0.1`` when bound to all interfaces)."""
        host = self.grpc_host
        if host in ("", "0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` (None when metrics are disabled)."""
        return self.metrics.url if self.metrics is not None else None

    @property
    def http_url(self) -> str | None:
        """``http(s)://host:port`` of the HTTP port: /metrics, /healthz, /readyz, /api/v1 (None when off)."""
        return self.metrics.base_url if self.metrics is not None else None

    @property
    def ui_url(self) -> str | None:
        """``http(s)://host:port/`` of the web view: its own port (``ui_port``) or the metrics port (None when off)."""
        if self.web is None:
            return None
        port = self.ui_server or self.metrics
        return f"{port.base_url}/" if port is not None else None

    # ------------------------------------------------------------ what the HTTP API needs (server/http_api.py)
    def is_ready(self) -> bool:
        """True while the collector serves (started, loop running, not stopping)."""
        return self._running and self.loop is not None and not self.loop.is_closed()

    def count_rejection(self, reason: str) -> None:
        """Count a refused request in the rejection counters, from any thread (they belong to the loop)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.state.reject, reason)
        else:
            self.state.reject(reason)

    def _http_app(self, metrics_app: Any) -> Any:
        """The metrics port's app: the HTTP router, made here once; without the web view when ``ui_port`` is set."""
        self.http_api = HttpApi(metrics_app, self, token=self.token, read_token=self.read_token)
        if self.ui_port is None:
            return self.http_api
        return Routes(
            self.http_api, METRICS_PORT_ROUTES, lambda: f"the web view is on port {self.ui_port} (serve --ui-port)"
        )

    def _start_ui_port(self, ssl_context: Any) -> None:
        """The web view's own port: the metrics port's router (and tokens), with the web view and without /metrics."""
        if self.http_api is None:  # metrics_port=None: a router whose /metrics the UI port never reaches

            def no_metrics(environ: dict[str, Any], start_response: Any) -> list[bytes]:
                return not_found(environ, start_response, "/metrics is off on this collector")

            self.http_api = HttpApi(no_metrics, self, token=self.token, read_token=self.read_token)

        def elsewhere() -> str:
            if self.metrics is None:
                return "the metrics port is off"
            return f"it is on the metrics port {self.metrics_port}"

        self.ui_server = HttpPort(
            Routes(self.http_api, UI_PORT_ROUTES, elsewhere),
            self.metrics_host,
            self.ui_port or 0,
            ssl_context=ssl_context,
            what="the web view (--ui-port)",
            thread_name="layrot-ui",
        )
        self.ui_port = self.ui_server.port

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Collector:
        """Open the store, restore history, start serving; returns once listening."""
        if self._running:
            return self
        # Before anything else: a bad certificate file is the operator's first error, not a half-started collector.
        self.tls = ServerTLS.load(*self.tls_files) if self.tls_files else None
        self._wire()
        try:
            ssl_context = self.tls.ssl_context() if self.tls else None
            if self.metrics_port is not None:
                self.metrics = MetricsServer(
                    LayrotCollector(
                        self.state,
                        self.store,
                        self.run_ttl,
                        alerts=self.alert_engine,
                        max_series=self.max_series,
                        aggregate_layers=self.aggregate_layers,
                        indicator=self.indicator,
                    ),
                    self.metrics_host,
                    self.metrics_port,
                    ssl_context=ssl_context,
                    wrap=self._http_app,
                )
                self.metrics_port = self.metrics.port
            if self.ui_port is not None:
                self._start_ui_port(ssl_context)
            self._ready.clear()
            self._thread = threading.Thread(target=self._thread_main, name="layrot-collector", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self._error is not None:
                raise RuntimeError(f"collector failed to start: {self._error}") from self._error
        except BaseException:
            self._cleanup_side_services()
            raise
        self._running = True
        api_port = self.metrics or self.ui_server  # the JSON API is on both ports
        log.info(
            "collector listening: grpc %s (%s), metrics %s, JSON API %s, web view %s, db %s",
            self.grpc_address,
            self.security_summary,
            self.metrics_url,
            f"{api_port.base_url}/api/v1" if api_port is not None else None,
            self.ui_url,
            redact_url(self.db_path),  # a URL may carry a password
        )
        self._warn_exposed()
        return self

    @property
    def security_summary(self) -> str:
        """One line for start-up messages: TLS / mTLS, which calls need a token."""
        parts = [("mutual TLS" if self.tls.mutual else "TLS") if self.tls else "plaintext"]
        parts.append("token for writes" if self.token else "writes open")
        parts.append("token for reads" if self.read_token else "reads open")
        return ", ".join(parts)

    def _warn_exposed(self) -> None:
        """Warn when a listener reaches beyond this machine without a token or without TLS."""
        if not is_loopback(self.grpc_host):
            if not self.token:
                log.warning(
                    "gRPC listens on %s:%s without a token: anyone who reaches the port can write into any run"
                    " (serve --token / --token-file / LAYROT_TOKEN)",
                    self.grpc_host or "*",
                    self.grpc_port,
                )
            if self.tls is None:
                log.warning(
                    "gRPC listens on %s:%s without TLS: tokens and measurements travel in clear text"
                    " (serve --tls-cert FILE --tls-key FILE)",
                    self.grpc_host or "*",
                    self.grpc_port,
                )
        for what, port in (("/metrics", self.metrics), ("the web view", self.ui_server)):
            if port is not None and self.tls is None and not is_loopback(self.metrics_host):
                log.warning(
                    "%s listens on %s:%s without TLS (serve --tls-cert FILE --tls-key FILE)",
                    what,
                    self.metrics_host or "*",
                    port.port,
                )

    def _wire(self) -> None:
        """Create the collector's parts in dependency order, each restored from the store."""
        if self.db_path != ":memory:" and not is_url(self.db_path):
            Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)
        # A SQLite file, or a postgresql:// URL (server/store_api.py).
        store = self.store = open_store(self.db_path, busy_timeout=self.store_busy_timeout)
        state = self.state = CollectorState()
        clustered = is_postgres_url(self.db_path)
        # On a shared database a stored run is another collector's to export until the first cluster pass
        # (before the first scrape) says which ones this collector held last.
        state.restore(store.load_runs(), held_elsewhere=clustered)
        control = self.control = ControlPlane(state, store)
        control.restore()
        engine = self.alert_engine = self._start_alerts(store)
        # The state carries them too, for code that holds only the state.
        state.control = control
        state.alerts = engine
        # Tokens are checked by one interceptor (server/auth.py), not by the servicers.
        self.ingest = IngestServicer(state, store, control, engine, limits=self.ingest_limits)
        store.on_commit = self.ingest.on_store_commit
        store.on_failure = self.ingest.on_store_failure
        self.retention = Retention(
            store, self.retention_policy, interval=self.retention_interval, on_run_deleted=self._forget_run
        )
        self.query = QueryServicer(state, store, control, engine, indicator=self.indicator, retention=self.retention)
        if clustered:
            # Its id needs the bound gRPC port: the composition is finished in _serve.
            self.cluster = Cluster(state, store, control, "", interval=self.cluster_interval, run_ttl=self.run_ttl)
            self.ingest.cluster = self.cluster
            self.query.clustered = True
        self.retention.start()

    def _forget_run(self, run_id: int, run: str) -> None:
        """A run deleted from the history (retention, delete) leaves the in-memory state too, unless live."""
        with self.state.lock:
            rs = self.state.runs.get(run)
            if rs is not None and rs.run_id == run_id and not rs.sessions:
                del self.state.runs[run]

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        # Executor for history reads (SQLite connections are per thread).
        loop.set_default_executor(ThreadPoolExecutor(max_workers=4, thread_name_prefix="layrot-query"))
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to start()
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("collector loop crashed")
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                self._stopped.set()

    async def _serve(self) -> None:
        assert self.ingest is not None and self.query is not None
        loop = asyncio.get_running_loop()
        self.ingest.loop = loop
        self._stop_future = loop.create_future()
        server = grpc.aio.server(
            options=[
                # Above the ingest limit, so the servicer sees (refuses and counts) oversized messages.
                ("grpc.max_receive_message_length", grpc_receive_limit(self.max_message_bytes)),
                # No port sharing: a second collector on a taken port must fail, not split the jobs.
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", self.max_message_bytes),
                # Detect dead peers (killed jobs behind NAT) so sessions do not linger as "connected".
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # gRPC core cancels calls beyond 1000 not yet picked up by the
                # server; a collector restart makes every job reconnect at once,
                # so allow a large backlog of new sessions.
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
                # gRPC core cancels (uncounted, CANCELLED to the job) a new call the loop has not taken
                # up within 30 s by default: thousands of jobs arriving at once wait for their turn instead.
                ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_CALL_WAIT_S),
                # What gRPC buffers for a stream the servicer stops reading (backpressure) is its
                # flow-control window: fixed at STREAM_WINDOW_BYTES (BDP probing would grow it per
                # stream on a fast link), so 1,000 held streams cost at most ~1 GB, not more.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            ],
            interceptors=[TokenInterceptor(self.token, self.read_token, on_reject=self.state.reject)],
        )
        add_ingest_to_server(self.ingest, server)
        pb_grpc.add_QueryServicer_to_server(self.query, server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        bind = f"{self.grpc_host}:{self.grpc_port}"
        try:
            if self.tls:
                port = server.add_secure_port(bind, self.tls.grpc_credentials())
            else:
                port = server.add_insecure_port(bind)
        except RuntimeError:  # grpc >= 1.5x raises where older versions returned 0
            port = 0
        if not port:
            raise RuntimeError(
                f"cannot bind gRPC to {bind}: port {self.grpc_port} is already in use (another collector?)"
                " or the address is not one of this machine's"
            )
        self.grpc_port = port
        if self.cluster is not None:
            self.cluster.collector_id = self.collector_id = self.collector_id or default_collector_id(port)
            await self.cluster.sync()  # who exports what, runs made elsewhere: known before the first job or scrape
            self.cluster.start()
        await server.start()
        for service in ("", INGEST_SERVICE, QUERY_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        alert_timer = self._start_alert_timer()
        self._ready.set()
        grace = await self._stop_future
        if alert_timer is not None:
            alert_timer.cancel()
        await self.health.enter_graceful_shutdown()
        # End sessions ourselves first: each gets its final Ack and a clean
        # end of stream, so jobs reconnect instead of seeing an abort.
        await self.ingest.close_all(timeout=min(5.0, grace if grace is not None else 5.0))
        await server.stop(grace)
        if self.cluster is not None:
            await self.cluster.stop()

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving (``grace`` seconds for open calls), flush and close the store."""
        if not self._running:
            return
        self._running = False
        if self.http_api is not None:
            self.http_api.close()
        loop, stop_future = self.loop, self._stop_future
        if loop is not None and stop_future is not None and not loop.is_closed():

            def resolve() -> None:  # on the loop thread
                if not stop_future.done():
                    stop_future.set_result(grace)

            loop.call_soon_threadsafe(resolve)
        if self._thread is not None:
            self._thread.join((grace or 0) + 15)
        self._cleanup_side_services()
        log.info("collector stopped")

    def _cleanup_side_services(self) -> None:
        if self.retention is not None:
            self.retention.stop()
            self.retention = None
        self._stop_alerts()
        if self.ui_server is not None:
            self.ui_server.close()
            self.ui_server = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.store is not None:
            self.store.close()
            self.store = None

    # ------------------------------------------------------------ alerts
    def _start_alerts(self, store: HistoryStore) -> AlertEngine:
        """Alertmanager pushers, the alert hub (memory, store, counters, pushers) and the engine, restored."""
        self._pushers = [
            AlertmanagerPusher(u, quiet=self.alert_quiet, resend=self.alert_resend, **self.alertmanager_auth).start()
            for u in self.alertmanager_urls
        ]
        hub = AlertHub(store, self._pushers)
        hub.restore()
        engine = AlertEngine(hub, self.thresholds, enabled=self.alerts_enabled, lost_grace=self.lost_grace)
        engine.restore_thresholds()
        if self._pushers:
            log.info("pushing alerts to Alertmanager: %s", ", ".join(p.url for p in self._pushers))
        return engine

    def _start_alert_timer(self) -> asyncio.Task | None:
        """The engine's timer (late losses, stalled runs, rejection bursts) on the collector loop."""
        if self.alert_engine is None:
            return None
        return asyncio.get_running_loop().create_task(self.alert_engine.run_timer(self.state))

    def _stop_alerts(self) -> None:
        for p in self._pushers:
            p.close()
        self._pushers = []

    def serve_forever(self) -> None:
        """Start (if needed) and block until SIGTERM/SIGINT, then stop cleanly (store flushed)."""
        self.start()
        done = threading.Event()

        def _signal(signum: int, frame: Any) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            done.set()

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, _signal)
            except ValueError:  # not the main thread: rely on stop() from elsewhere
                pass
        try:
            while not done.is_set() and not self._stopped.is_set():
                done.wait(0.5)
        finally:
            self.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
