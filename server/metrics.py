"""Prometheus exposition of the collector state (``/metrics``).

A custom collector renders the in-memory state at scrape time, so ingest
pays nothing per sample for metrics, and every collector instance has its
own ``CollectorRegistry`` (several collectors can share a test process).

Labels: ``run``, ``layer``, ``index``, ``reason``, ``framework``, ``host``;
never ``job`` (Prometheus attaches its own ``job`` and ``instance``).
Per-run numbers come from the lowest reporting rank (rank 0).
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry

from layrot.server.state import CollectorState, RunState
from layrot.server.store_api import HistoryStore

if TYPE_CHECKING:
    from layrot.server.alerts import AlertEngine

log = logging.getLogger(__name__)

LAYER_LABELS = ["run", "layer", "index"]


def control_families(runs: list[RunState]) -> Iterator[Metric]:
    """Control plane metrics: requested rates, command versions, late applications (server/control.py).

    ``layrot_layer_rho_requested`` is the current command evaluated at the run's
    newest reported step; it is absent when the collector cannot know the rates
    (no command, mode "off", or a command without a schedule).
    """
    requested = GaugeMetricFamily(
        "layrot_layer_rho_requested",
        "Layca per-layer rate the current control command asks for at the run's newest step",
        labels=LAYER_LABELS,
    )
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
        snap = rs.view.primary
        rates = rc.requested_rates(snap.step if snap is not None else 1)
        if rates is None:
            continue
        for i, (name, r) in enumerate(zip(rs.names, rates.tolist())):
            requested.add_metric([rs.run, name, str(i)], r)
    yield from (requested, version, applied, late)


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
        run_ttl: float = 86400.0,
        clock: Callable[[], float] = time.time,
        alerts: AlertEngine | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.run_ttl = run_ttl
        self.clock = clock
        self.alerts = alerts

    def visible_runs(self) -> list[RunState]:
        """Runs that are connected or reported within ``run_ttl`` seconds."""
        now = self.clock()
        out = []
        for rs in self.state.snapshot_runs():
            last_report = rs.view.last_report
            last = last_report if last_report is not None else rs.created
            if rs.connected or (now - last) <= self.run_ttl:
                out.append(rs)
        return out

    def collect(self) -> Iterator[Metric]:
        rotation = GaugeMetricFamily(
            "layrot_layer_rotation",
            "Cosine distance between the layer's weights now and at initialization",
            labels=LAYER_LABELS,
        )
        angle = GaugeMetricFamily(
            "layrot_layer_step_angle_radians",
            "Angle the layer's weights rotated in the last reported optimizer step",
            labels=LAYER_LABELS,
        )
        norm = GaugeMetricFamily("layrot_layer_weight_norm", "L2 norm of the layer's weights", labels=LAYER_LABELS)
        rho = GaugeMetricFamily(
            "layrot_layer_rho_applied",
            "Layca per-layer rotation rate the job applied at the last reported step",
            labels=LAYER_LABELS,
        )
        step = GaugeMetricFamily("layrot_run_step", "Newest reported optimizer step", labels=["run"])
        last = GaugeMetricFamily(
            "layrot_run_last_report_timestamp_seconds",
            "Unix time at which the newest reported step was measured",
            labels=["run"],
        )
        nlayers = GaugeMetricFamily("layrot_run_layers", "Number of monitored layers", labels=["run"])
        rmin = GaugeMetricFamily("layrot_run_rotation_min", "Smallest layer rotation of the run", labels=["run"])
        rmean = GaugeMetricFamily("layrot_run_rotation_mean", "Mean layer rotation of the run", labels=["run"])
        connected = GaugeMetricFamily("layrot_run_connected", "1 while the run has an open session", labels=["run"])
        info = GaugeMetricFamily(
            "layrot_run_info", "Run identity (value is always 1)", labels=["run", "framework", "host"]
        )
        nonfinite = CounterMetricFamily(
            "layrot_run_nonfinite_samples",
            "Layer samples with NaN/Inf norms or distances (the run diverged)",
            labels=["run"],
        )

        runs = self.visible_runs()
        for rs in runs:
            run = rs.run
            view = rs.view  # one read: every number below is of the same batch
            snap = view.primary
            nlayers.add_metric([run], rs.num_layers)
            connected.add_metric([run], 1.0 if rs.connected else 0.0)
            info.add_metric([run, rs.framework, rs.host], 1.0)
            nonfinite.add_metric([run], view.nonfinite)
            if snap is None:
                continue
            step.add_metric([run], snap.step)
            if view.last_report is not None:
                last.add_metric([run], view.last_report)
            mn, mean = view.summary_stats()
            rmin.add_metric([run], mn)
            rmean.add_metric([run], mean)
            rot_l = snap.rotation.tolist()
            ang_l = snap.step_angle.tolist()
            norm_l = snap.weight_norm.tolist()
            rho_l = snap.rho.tolist() if snap.rho is not None else None
            for i, name in enumerate(rs.names[: len(rot_l)]):
                labels = [run, name, str(i)]
                rotation.add_metric(labels, rot_l[i])
                angle.add_metric(labels, ang_l[i])
                norm.add_metric(labels, norm_l[i])
                if rho_l is not None and not math.isnan(rho_l[i]):
                    rho.add_metric(labels, rho_l[i])
        yield from (rotation, angle, norm, rho, step, last, nlayers, rmin, rmean, connected, info, nonfinite)
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
        if self.alerts is not None:  # layrot_alerts_total{run,layer,kind,severity} etc. (server/alert_hub.py)
            yield from self.alerts.hub.metric_families(rs.run for rs in runs)


class _Server(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server, with the address family picked per instance."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper speaking plain HTTP to the TLS port, a port scan, a client that
        # hangs up: one debug line, not a traceback on stderr per connection.
        # handle_error runs inside socketserver's except block: the error is sys.exc_info().
        log.debug("/metrics request from %s failed: %r", client_address, sys.exc_info()[1])


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


class MetricsServer:
    """``/metrics`` over HTTP, or HTTPS with ``ssl_context``, on its own registry and thread.

    ``wrap`` turns the ``/metrics`` WSGI app into the app the port serves (the
    collector passes the HTTP API of server/http_api.py, which routes ``/metrics``
    back to it); without it every path answers the metrics.

    Same server as ``prometheus_client.start_http_server`` but with a short
    poll interval, so stopping a collector takes milliseconds, not 0.5 s. TLS
    is the stdlib's ``ssl`` module, as in ``start_http_server(certfile=...)``
    (prometheus_client 0.19), and works with any prometheus_client the cli extra allows.
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
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class _LayrotMetricsServer(_Server):
            address_family = family

        app = make_wsgi_app(self.registry)
        if wrap is not None:
            app = wrap(app)
        self._httpd = make_server(host, port, app, _LayrotMetricsServer, handler_class=_QuietHandler)
        if ssl_context is not None:
            # The handshake runs on the first read, in the request's own thread: with the
            # default (handshake inside accept) one client that connects and sends nothing
            # would block every other scrape.
            self._httpd.socket = ssl_context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="layrot-metrics", daemon=True
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

    @property
    def url(self) -> str:
        return f"{self.base_url}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
