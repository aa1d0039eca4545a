"""A real Prometheus scrapes a real collector fed by a real training job, and every
PromQL expression of every dashboard panel returns data.

Everything here is real: the collector (gRPC + /metrics), a PyTorch job under
``layrot.watch(..., control=True)`` with a ``layrot.Layca`` optimizer that receives
a remote rate command, an abrupt single-step rotation (a layer's weights are
replaced), a rejected message, and the Debian ``prometheus`` binary scraping the
collector every second. Only Grafana itself is absent (it cannot run here); the
dashboards' queries are sent to Prometheus exactly as Grafana would send them,
template variables filled in by ``layrot.cli.grafana.panel_exprs``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from test_deploy import DASHBOARDS, promql_query, start_prometheus
from torch import nn

import layrot
from layrot.cli.grafana import interpolate, panel_exprs
from layrot.client.query import QueryClient
from layrot.controllers.profile import profile_command
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.server.app import Collector

RUN = "e2e-run"


def train(model, opt, handle, steps, x, y, replace_at=None):
    for _i in range(steps):
        if replace_at is not None and handle.step + 1 == replace_at:
            with torch.no_grad():  # an abrupt rotation: tens of degrees in one step
                model[2].weight.copy_(torch.randn_like(model[2].weight) * model[2].weight.std())
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        handle.observe_loss(loss)
        opt.step()
        time.sleep(0.02)  # a job of ~50 steps/s, so Prometheus sees the run move


@pytest.mark.prometheus
@pytest.mark.slow
def test_every_dashboard_panel_returns_data(tmp_path):
    collector = Collector(grpc_port=0, metrics_port=0, db_path=tmp_path / "e2e.db").start()
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    config = (
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: layrot\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{collector.metrics_port}']\n"
    )
    prom, proc = start_prometheus(prom_dir, config)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.01)
        # 220 steps of an announced 300: past half, so the indicator judges under-rotated layers.
        handle = layrot.watch(model, opt, run=RUN, control=True, collector=collector.grpc_address, total_steps=300)
        x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
        train(model, opt, handle, 60, x, y)
        client = QueryClient(collector.grpc_address)
        client.set_control(RUN, profile_command(alpha=0.5, rho0=0.02))
        train(model, opt, handle, 60, x, y)
        train(model, opt, handle, 100, x, y, replace_at=150)  # abrupt rotation of layer 1 at step 150
        assert handle.flush(10.0)
        # One rejected message, so the rejection series exist.
        with grpc.insecure_channel(collector.grpc_address) as ch:
            stream = pb_grpc.IngestStub(ch).Session(iter([pb.JobMessage(hello=pb.Hello(run=""))]))
            list(stream)
        layers = [lay["name"] for lay in client.get_run(RUN)["layers"]]
        alerts = client.list_alerts(run=RUN)
        assert any(a["kind"] == "abrupt_rotation" and a["step"] == 150 for a in alerts), alerts
        # Let Prometheus take enough scrapes for rate()/increase() windows, job still connected.
        time.sleep(8)

        variables = {
            "run": RUN,
            "layer": layers,
            "job": ["layrot"],
            "instance": [f"127.0.0.1:{collector.metrics_port}"],
        }
        empty, checked = [], 0
        for path in sorted(Path(DASHBOARDS).glob("*.json")):
            dashboard = json.loads(path.read_text())
            for expr in panel_exprs(dashboard, variables):
                status, body = promql_query(prom, expr)
                assert status == 200 and body["status"] == "success", f"{path.name}: {expr} -> {body}"
                checked += 1
                if not body["data"]["result"]:
                    empty.append(f"{path.name}: {expr}")
            for v in dashboard["templating"]["list"]:
                if v["type"] == "query" and v["query"]["query"].startswith("label_values("):
                    selector = interpolate(v["query"]["query"][len("label_values(") :].rsplit(",", 1)[0], variables)
                    status, body = promql_query(prom, selector)
                    assert body["data"]["result"], f"{path.name}: variable {v['name']} has no values"
        handle.close()
        assert checked >= 40
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        collector.stop()
