"""``serve --ui-port``: the web view (and the JSON API) on a port of its own (server/metrics.py Routes).

Real collectors on loopback over real HTTP(S): which paths each port answers (the web view and
the API on the UI port, never ``/metrics``; ``/metrics``, health and the API on the metrics
port, not the web view), the same read token and the same TLS certificate on both, the UI port
without a metrics port, a taken port refused by its number, and the ``serve`` option parsing.
The page's bytes are compared with server/webui/dist read directly, the API's answers with the
gRPC Query service's for the same collector.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from certs import make_pki
from click.testing import CliRunner
from metrics_text import scrape
from test_web import request

from layrot.client.query import QueryClient
from layrot.server.app import Collector
from layrot.server.metrics import EVERY_ROUTE, METRICS_PORT_ROUTES, UI_PORT_ROUTES, Routes, route_of

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "server" / "webui" / "dist"


def ui_base(c: Any) -> str:
    assert c.ui_server is not None
    return c.ui_server.base_url


# What each port answers (status of a GET): the one port of a collector without --ui-port, and the
# two ports of one with it. "/nope" is no one's path: every port answers it 404, as before.
PATHS = {
    "/": (200, 404, 200),
    "/index.html": (200, 404, 200),
    "/ui/app.js": (200, 404, 200),
    "/ui/app.css": (200, 404, 200),
    "/metrics": (200, 200, 404),
    "/healthz": (200, 200, 200),
    "/readyz": (200, 200, 200),
    "/api/v1/runs": (200, 200, 200),
    "/api/v1/openapi.json": (200, 200, 200),
    "/nope": (404, 404, 404),
    "/ui/nope.js": (404, 404, 404),
}


def test_each_port_answers_its_own_paths(collector_factory: Any, tmp_path: Path) -> None:
    one = collector_factory(db_path=tmp_path / "one.db")
    two = collector_factory(db_path=tmp_path / "two.db", ui_port=0)
    assert one.ui_server is None and one.ui_url == f"{one.http_url}/"
    assert two.ui_port == two.ui_server.port != two.metrics_port and two.ui_url == f"{ui_base(two)}/"
    got = {
        path: (request(one.http_url, path)[0], request(two.http_url, path)[0], request(ui_base(two), path)[0])
        for path in PATHS
    }
    assert got == PATHS
    # A refused path says where it is served instead.
    status, headers, body = request(two.http_url, "/")
    assert headers["Content-Type"] == "application/json"
    assert f"the web view is on port {two.ui_port}" in json.loads(body)["error"]["message"]
    status, _, body = request(ui_base(two), "/metrics")
    assert f"metrics port {two.metrics_port}" in json.loads(body)["error"]["message"]
    status, _, body = request(ui_base(two), "/metrics", method="HEAD")
    assert status == 404 and body == b""
    assert b"layrot_" in request(two.http_url, "/metrics")[2]


def test_the_ui_port_serves_the_built_page_and_the_api_it_reads(
    collector_factory: Any, ingest: Any, sim_job: Any
) -> None:
    c = collector_factory(ui_port=0)
    ui = ui_base(c)
    status, headers, body = request(ui, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in headers["Content-Security-Policy"]  # the page talks to its own origin only
    page = body.decode()
    for name in ("app.js", "app.css"):
        data = (DIST / name).read_bytes()
        link = f"/ui/{name}?v={hashlib.sha256(data).hexdigest()[:12]}"
        assert f'"{link}"' in page
        status, headers, got = request(ui, link)
        assert status == 200 and got == data and headers["Cache-Control"] == "public, max-age=31536000, immutable"
    # The bundle fetches the API by an origin-relative path, so on this port it reads this port's API.
    assert b'"/api/v1"' in (DIST / "app.js").read_bytes()

    job = sim_job(run="ui/port", layer_sizes=(20, 30))
    s = ingest(c)
    s.send(job.hello())
    s.send(job.batch(12))
    s.wait_ack(job.seq)
    with QueryClient(c.grpc_address) as q:
        names = [r["run"] for r in q.list_runs()]
        detail = q.get_run("ui/port")
    status, _, body = request(ui, "/api/v1/runs")
    assert status == 200 and [r["run"] for r in json.loads(body)["runs"]] == names == ["ui/port"]
    # One router behind both ports: the same answer byte for byte.
    assert body == request(c.http_url, "/api/v1/runs")[2]
    status, _, body = request(ui, "/api/v1/runs/ui%2Fport")
    got = json.loads(body)
    assert status == 200 and got["step"] == detail["step"] > 0
    assert [lay["name"] for lay in got["layers"]] == [lay["name"] for lay in detail["layers"]] == job.names
    status, _, body = request(ui, "/api/v1/runs/ui%2Fport/history?fields=rotation")
    assert status == 200 and json.loads(body)["chunks"][-1]["steps"][-1] == detail["step"]
    assert request(ui, "/api/v1/runs", method="POST")[0] == 405  # it only reads, as on the metrics port


def test_the_read_token_guards_the_ui_port(collector_factory: Any) -> None:
    c = collector_factory(token="w-secret", read_token="r-secret", ui_port=0)
    ui = ui_base(c)
    status, headers, body = request(ui, "/api/v1/runs")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "read token" in json.loads(body)["error"]["message"]
    assert request(ui, "/api/v1/runs", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request(ui, "/api/v1/runs", headers={"Authorization": "Bearer r-secret"})[0] == 200
    assert request(ui, "/api/v1/runs", headers={"Authorization": "Bearer w-secret"})[0] == 200
    # The files hold no data and stay open (the page asks for the token), as on the metrics port.
    assert request(ui, "/")[0] == 200 and request(ui, "/healthz")[0] == 200
    assert request(c.http_url, "/api/v1/runs")[0] == 401  # and the metrics port's API keeps the rule
    deadline = time.time() + 5
    rejected: dict[str, float] = {}
    while time.time() < deadline:  # refusals on either port are counted where /metrics is
        rejected = {lab["reason"]: v for lab, v in scrape(c.metrics_url).get("layrot_messages_rejected_total", [])}
        if rejected.get("unauthenticated") == 3:
            break
        time.sleep(0.05)
    assert rejected.get("unauthenticated") == 3


def test_the_ui_port_speaks_tls_with_the_collectors_certificate(collector_factory: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    c = collector_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, ui_port=0)
    assert c.ui_url.startswith("https://") and c.http_url.startswith("https://")
    trusted = ssl.create_default_context(cafile=pki.ca)
    ui = ui_base(c)
    assert request(ui, "/", context=trusted)[0] == 200
    assert request(ui, "/api/v1/runs", context=trusted)[2] == b'{"runs":[]}'
    with pytest.raises(ssl.SSLCertVerificationError):
        request(ui, "/", context=ssl.create_default_context(cafile=pki.other_ca))
    with pytest.raises((http.client.HTTPException, ConnectionError)):  # plain HTTP at the TLS port
        request(ui.replace("https://", "http://"), "/")


def test_the_ui_port_without_a_metrics_port(collector_factory: Any) -> None:
    c = collector_factory(metrics_port=None, ui_port=0)
    assert c.metrics is None and c.metrics_url is None and c.ui_url == f"{ui_base(c)}/"
    ui = ui_base(c)
    assert request(ui, "/")[0] == 200
    assert request(ui, "/api/v1/runs")[2] == b'{"runs":[]}'
    status, _, body = request(ui, "/metrics")
    assert status == 404 and "the metrics port is off" in json.loads(body)["error"]["message"]


def test_a_taken_ui_port_is_refused_by_its_number(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        c = Collector(db_path=tmp_path / "x.db", grpc_port=0, metrics_port=0, ui_port=port)
        with pytest.raises(RuntimeError) as e:
            c.start()
        assert f"port {port} is already in use" in str(e.value) and "--ui-port" in str(e.value)
        # The metrics port it had bound is given back.
        assert c.metrics is None and c.ui_server is None
        with socket.socket() as again:
            again.bind(("127.0.0.1", c.metrics_port))
        # The CLI says the same in one line.
        args = ["serve", "--db", str(tmp_path / "y.db"), "--grpc-port", "0", "--metrics-port", "0"]
        from layrot.cli.main import cli

        r = CliRunner().invoke(cli, [*args, "--ui-port", str(port)])
        assert r.exit_code == 1 and f"port {port} is already in use" in r.output, r.output


def test_ui_port_and_no_ui_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ui=False"):
        Collector(db_path=tmp_path / "x.db", ui=False, ui_port=0)


def test_serve_ui_port_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``serve --ui-port`` reaches the Collector; with --no-ui, a port of another listener or out of range it is a
    usage error (the collector itself is stubbed out here)."""
    import layrot.server.app as app
    from layrot.cli.main import cli

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake(**kwargs: Any) -> Any:
        seen.clear()
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(app, "Collector", fake)
    db = ["serve", "--db", str(tmp_path / "unused.db")]
    for args, ui_port in (([], None), (["--ui-port", "9401"], 9401), (["--ui-port", "0"], 0)):
        result = CliRunner().invoke(cli, [*db, *args])
        assert isinstance(result.exception, Stop), result.output
        assert seen["ui_port"] == ui_port and seen["ui"] is True
    for args, says in (
        (["--no-ui", "--ui-port", "9401"], "--no-ui"),
        (["--ui-port", "9400"], "--metrics-port"),  # the default metrics port
        (["--metrics-port", "9500", "--ui-port", "9500"], "--metrics-port"),
        (["--ui-port", "50051"], "--grpc-port"),
        (["--ui-port", "70000"], "70000"),
        (["--ui-port", "-1"], "-1"),
    ):
        seen.clear()
        result = CliRunner().invoke(cli, [*db, *args])
        assert result.exit_code == 2 and not seen, (args, result.output)
        assert "Usage:" in result.output and says in result.output, (args, result.output)
    out = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    assert "--ui-port PORT Serve the web view on a port of its own" in out and "e.g. --ui-port 9401" in out


def test_routes_of_paths() -> None:
    """The groups a port may serve: the router's paths, each in one group (unit)."""
    assert {route_of(p) for p in ("/", "/index.html", "/ui/app.js", "/ui/x")} == {"web"}
    assert route_of("/metrics") == "metrics" and route_of("/metrics/") is None
    assert route_of("/healthz") == route_of("/readyz") == "health"
    assert route_of("/api/v1") == route_of("/api/v1/runs/a%2Fb/history") == "api"
    assert route_of("/api/v2/runs") is None and route_of("/app.js") is None
    assert UI_PORT_ROUTES | METRICS_PORT_ROUTES == EVERY_ROUTE
    assert "metrics" not in UI_PORT_ROUTES and "web" not in METRICS_PORT_ROUTES
    with pytest.raises(ValueError, match="unknown route groups"):
        Routes(lambda e, s: [], frozenset({"grafana"}))
