"""The collector's HTTP port (server/http_api.py) and its client (client/http_query.py).

Real collectors on loopback, real jobs (a small torch model trained for real, and
simulated jobs that send real batches over gRPC). The JSON answers are checked
against the gRPC Query service's answers for the same collector (an independent
path: protobuf end to end), and the history also against float64 references from
the weights saved at every step.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch
from certs import make_pki
from click.testing import CliRunner
from history_check import check_history
from metrics_text import scrape
from torch import nn

import layrot
from layrot.cli.main import cli
from layrot.client.errors import CollectorError
from layrot.client.http_query import HttpQueryClient
from layrot.client.query import QueryClient
from layrot.server.openapi import openapi_document

torch.set_num_threads(1)


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (both clients give NaN where a value is unknown)."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def train_watched(address: str, run: str, steps: int = 25) -> tuple[dict, dict[int, dict]]:
    """A real MLP trained with SGD + momentum, every step reported; weights saved at every step."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    handle = layrot.watch(model, opt, run=run, collector=address, every=1)
    names = handle.layer_names
    params = dict(model.named_parameters())
    w0 = {n: params[n].detach().double().clone() for n in names}
    saved: dict[int, dict] = {}
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 5, (64,), generator=g)
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        saved[t] = {n: params[n].detach().double().clone() for n in names}
    assert handle.flush(10)
    handle.close()
    return w0, saved


def test_reads_equal_the_grpc_answers_and_the_float64_truth(collector):
    run = "mlp/a b%c"  # a slash, a space and a percent sign: one percent-encoded path segment
    w0, saved = train_watched(collector.grpc_address, run)
    steps = sorted(saved)
    # The history over HTTP against float64 references from the saved weights...
    via_http = check_history(collector.http_url, run, w0, saved, steps)
    g = QueryClient(collector.grpc_address)
    h = HttpQueryClient(collector.http_url)
    # ...and bit for bit the gRPC answer (JSON floats round-trip float64 exactly).
    via_grpc = g.history(run)
    for key in ("steps", "times", "loss", "rotation", "step_angle", "weight_norm", "rho"):
        a, b = getattr(via_grpc, key), getattr(via_http, key)
        assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), key
    assert via_http.layer_names == via_grpc.layer_names
    assert np.isnan(via_http.rho).all()  # no Layca: NaN, sent as null, restored
    part = h.history(run, since_step=5, until_step=9)
    assert part.steps.tolist() == [5, 6, 7, 8, 9]
    assert np.array_equal(part.rotation, via_grpc.rotation[4:9])
    assert same(h.list_runs(), g.list_runs())
    assert same(h.get_run(run), g.get_run(run))
    assert same(h.get_control(run), g.get_control(run))
    assert same(h.list_alerts(), g.list_alerts())

    # The raw JSON: strict (no NaN tokens), nulls where the gRPC answer has NaN.
    status, headers, body = get(f"{collector.http_url}/api/v1/runs/{urllib.parse.quote(run, safe='')}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    detail = json.loads(body, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert [lay["rho"] for lay in detail["layers"]] == [None] * len(via_grpc.layer_names)
    assert detail["layers"][0]["rotation"] == pytest.approx(via_grpc.rotation[-1, 0], rel=6e-8)  # store: float32

    # An unknown run, bad arguments: the servicer's own refusals, as HTTP statuses with the same message.
    with pytest.raises(CollectorError) as e:
        h.get_run("nope")
    assert e.value.status == "NOT_FOUND" and "unknown run 'nope'" in str(e.value)
    status, _, body = get(f"{collector.http_url}/api/v1/runs/nope/history")
    assert status == 404 and json.loads(body)["error"]["status"] == "NOT_FOUND"
    for query in ("since_step=-1", "since_step=x", f"until_step={2**64}"):
        status, _, body = get(f"{collector.http_url}/api/v1/runs/{urllib.parse.quote(run, safe='')}/history?{query}")
        assert status == 400, query
    status, _, body = get(f"{collector.http_url}/api/v1/alerts?since=inf")
    assert status == 400 and "finite" in json.loads(body)["error"]["message"]


def test_each_path_answers_only_its_own(collector):
    base = collector.http_url
    assert get(f"{base}/healthz")[0] == 200
    assert get(f"{base}/readyz")[:1] == (200,)
    status, headers, body = get(f"{base}/metrics")
    assert status == 200 and b"layrot_" in body and headers["Content-Type"].startswith("text/plain")
    # ("/" is the web view's, server/web.py.)
    for path in ("/metricsx", "/metrics/x", "/healthz/x", "/api/v1/runs/a/b/c", "/api/v2/runs", "/api", "/api/v1"):
        status, _, body = get(base + path)
        assert status == 404, path
        assert b"layrot_" not in body and json.loads(body)["error"]["status"] == "NOT_FOUND"
    status, headers, _ = get(f"{base}/api/v1/runs", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    doc = json.loads(get(f"{base}/api/v1/openapi.json")[2])
    assert doc == json.loads(json.dumps(openapi_document())) and doc["openapi"].startswith("3.1")


def test_openapi_document_matches_the_answers(collector, ingest, sim_job):
    """Every documented path answers 200 for a known run, with (at least) the properties the schema requires."""
    job = sim_job(run="doc", layer_sizes=(20, 30))
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(25, angle=0.01, loss=False))
    s.send(job.batch(1, angle=1.2, loss=False))  # one abrupt-rotation incident: an alert to list
    s.wait_ack(job.seq)
    doc = openapi_document()
    schemas = doc["components"]["schemas"]

    def resolve(schema: dict) -> dict:
        return schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    def check(value: Any, schema: dict, where: str) -> None:
        schema = resolve(schema)
        if schema.get("type") == "object" and "properties" in schema:
            assert isinstance(value, dict), where
            missing = set(schema.get("required", ())) - set(value)
            assert not missing, f"{where}: missing {missing}"
            for k, sub in schema["properties"].items():
                if k in value and value[k] is not None:
                    check(value[k], sub, f"{where}.{k}")
        elif schema.get("type") == "array" and "items" in schema:
            assert isinstance(value, list), where
            for i, item in enumerate(value[:3]):
                check(item, schema["items"], f"{where}[{i}]")

    checked = 0
    for path, item in doc["paths"].items():
        if path.endswith("/stream"):
            continue  # an event stream, checked in its own test
        url = collector.http_url + "/api/v1" + path.replace("{run}", "doc")
        status, headers, body = get(url)
        assert status == 200, (path, body)
        check(json.loads(body), item["get"]["responses"]["200"]["content"]["application/json"]["schema"], path)
        checked += 1
    assert checked == 5
    # Both layers rotate by the same angle (to the last bits): either may come first.
    assert sorted(json.loads(get(collector.http_url + "/api/v1/alerts")[2])["alerts"][0]["layers"]) == [
        "layer0.weight",
        "layer1.weight",
    ]


def test_read_token_is_required_and_refusals_are_counted(collector_factory):
    c = collector_factory(token="w-secret", read_token="r-secret")
    api = f"{c.http_url}/api/v1/runs"
    status, headers, body = get(api)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "read token" in json.loads(body)["error"]["message"]
    assert get(api, {"Authorization": "Bearer wrong"})[0] == 401
    assert get(api, {"Authorization": "Bearer r-secret"})[0] == 200
    assert get(api, {"Authorization": "Bearer w-secret"})[0] == 200  # the write token reads too
    assert get(f"{c.http_url}/healthz")[0] == 200 and get(c.metrics_url)[0] == 200  # open, as on gRPC
    with pytest.raises(CollectorError) as e:
        HttpQueryClient(c.http_url).list_runs()
    assert e.value.status == "UNAUTHENTICATED" and "--token" in str(e.value)
    assert HttpQueryClient(c.http_url, token="r-secret").list_runs() == []
    deadline = time.time() + 5
    while time.time() < deadline:
        rejected = {lab["reason"]: v for lab, v in scrape(c.metrics_url).get("layrot_messages_rejected_total", [])}
        if rejected.get("unauthenticated") == 3:
            break
        time.sleep(0.05)
    assert rejected.get("unauthenticated") == 3


def test_alert_stream_delivers_new_alerts_and_ends_with_its_reader(collector, ingest, sim_job):
    job = sim_job(run="streamed", layer_sizes=(30, 30))
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(25, angle=0.01, loss=False))
    s.send(job.batch(1, angle=1.2, loss=False))  # step 26: the backlog
    s.wait_ack(job.seq)
    got: list[dict] = []
    ready = threading.Event()
    h = HttpQueryClient(collector.http_url)

    def consume() -> None:
        stream = h.watch_alerts("streamed", backlog=1)
        for a in stream:
            got.append(a)
            ready.set()
            if len(got) == 2:
                stream.close()
                return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert ready.wait(5)
    s.send(job.batch(23, angle=0.01, loss=False))
    s.send(job.batch(1, angle=1.2, loss=False))  # step 50: a new incident, pushed live
    t.join(5)
    assert not t.is_alive()
    assert [a["step"] for a in got] == [26, 50]
    with QueryClient(collector.grpc_address) as q:
        assert same(got, [a for a in q.list_alerts("streamed")])
    # The reader left: its watcher on the collector goes too (no subscriber left behind).
    hub = collector.alert_engine.hub
    deadline = time.time() + 20
    while time.time() < deadline and (collector.http_api._streams or hub.watchers):
        time.sleep(0.05)
    assert not collector.http_api._streams and not hub.watchers


def test_https_with_the_collectors_certificate(collector_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    c = collector_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)
    assert c.http_url.startswith("https://")
    assert HttpQueryClient(c.http_url, ca=pki.ca).list_runs() == []
    with pytest.raises(CollectorError) as e:
        HttpQueryClient(c.http_url.replace("https://", "http://")).list_runs()
    assert "https://" in str(e.value)
    with pytest.raises(CollectorError) as e:
        HttpQueryClient(c.http_url, ca=pki.other_ca).list_runs()
    assert "--tls-ca" in str(e.value)


def test_cli_read_commands_over_http_match_grpc(collector, ingest, sim_job, tmp_path):
    job = sim_job(run="cli-http", layer_sizes=(20, 30, 40))
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(40))
    s.wait_ack(job.seq)
    runner = CliRunner()
    for args in (["runs", "--json"], ["show", "cli-http", "--json"], ["alerts", "--json"]):
        a = runner.invoke(cli, [*args, "--collector", collector.grpc_address])
        b = runner.invoke(cli, [*args, "--collector", collector.http_url])
        assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
        assert json.loads(a.output) == json.loads(b.output), args
    out_g, out_h = tmp_path / "g.csv", tmp_path / "h.csv"
    for target, out in ((collector.grpc_address, out_g), (collector.http_url, out_h)):
        r = runner.invoke(cli, ["export", "cli-http", "--format", "csv", "-o", str(out), "--collector", target])
        assert r.exit_code == 0, r.output
    assert out_g.read_text() == out_h.read_text() and out_g.read_text().count("\n") > 40
    r = runner.invoke(cli, ["show", "nope", "--collector", collector.http_url])
    assert r.exit_code != 0 and "unknown run 'nope'" in r.output
    # Writes need gRPC: a usage error that says so, before anything is sent.
    r = runner.invoke(cli, ["control", "off", "cli-http", "--collector", collector.http_url])
    assert r.exit_code == 2 and "only reads" in r.output
    r = runner.invoke(cli, ["runs", "--collector", "http://127.0.0.1:1"])
    assert r.exit_code != 0 and "cannot reach" in r.output and "--metrics-port" in r.output


def test_history_streams_in_chunks_with_a_bounded_first_answer(collector, ingest, sim_job):
    """A history longer than one chunk arrives as several chunks, in order, equal to gRPC's."""
    job = sim_job(run="long", layer_sizes=(8, 8))
    s = ingest(collector)
    s.send(job.hello())
    for _ in range(5):
        s.send(job.batch(1000, loss=False))
    s.wait_ack(job.seq)
    host, port = urllib.parse.urlsplit(collector.http_url).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/api/v1/runs/long/history")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") is None  # streamed, not buffered
    doc = json.loads(resp.read())
    conn.close()
    assert len(doc["chunks"]) >= 3
    steps = [t for c in doc["chunks"] for t in c["steps"]]
    assert steps == list(range(1, 5001))
    g = QueryClient(collector.grpc_address).history("long")
    rot = np.array([row for c in doc["chunks"] for row in c["rotation"]], dtype=float)
    assert np.array_equal(rot, g.rotation)
