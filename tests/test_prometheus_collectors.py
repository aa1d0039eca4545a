"""deploy/prometheus/collectors.yml: a real Prometheus scraping two real collectors sees every run once.

Ten jobs choose one of two collectors by run name (``collector="a,b"``, rendezvous
hashing); Prometheus scrapes both with the deploy config (targets filled in), and
``layrot_run_step`` must show each run exactly once, at the step the job reported.
The two collectors here have their own history stores; what is checked is the scrape config
and the job-side spread (tests/test_cluster_e2e.py does the same over one shared PostgreSQL).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_deploy import promql_query, start_prometheus

from layrot.agent.reporter import Reporter
from layrot.agent.transport import collector_order
from tests.test_reporter import FAST, SPECS, record

DEPLOY_CONF = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "collectors.yml"


@contextlib.contextmanager
def prometheus_over(tmp_path: Path, collectors: list) -> Iterator[str]:
    """A real Prometheus scraping ``collectors`` with deploy/prometheus/collectors.yml (targets filled in, 1 s
    scrapes, no rules); yields its URL."""
    conf = yaml.safe_load(DEPLOY_CONF.read_text())
    conf.pop("rule_files", None)
    conf["global"]["scrape_interval"] = "1s"
    (job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "layrot"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{c.metrics_port}" for c in collectors]}]
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    url, proc = start_prometheus(prom_dir, yaml.safe_dump(conf))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def runs_seen_once(url: str, query: str, runs: set[str], timeout: float = 30.0) -> dict[str, list[float]]:
    """run -> the values of ``query`` Prometheus returns for it, once every run of ``runs`` is in the answer."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = promql_query(url, query)
        assert status == 200
        seen: dict[str, list[float]] = {}
        for s in body["data"]["result"]:
            seen.setdefault(s["metric"]["run"], []).append(float(s["value"][1]))
        if set(seen) >= runs:
            return seen
        assert time.monotonic() < deadline, f"Prometheus sees {sorted(seen)}"
        time.sleep(0.5)


@pytest.mark.prometheus
def test_prometheus_over_two_collectors_counts_every_run_once(collector_factory, tmp_path):
    a = collector_factory(tmp_path / "a.db")
    b = collector_factory(tmp_path / "b.db")
    listed = f"{a.grpc_address},{b.grpc_address}"
    runs = {f"prom-run-{i}": 3 + i for i in range(10)}  # run -> its last step
    jobs = []  # live jobs: a collector exports the runs whose session it holds
    for run, steps in runs.items():
        r = Reporter(run, SPECS, collector=listed, **FAST)
        jobs.append(r)
        for t in range(1, steps + 1):
            r.submit(record(t))
        assert r.flush(15.0)
    spread = [collector_order([a.grpc_address, b.grpc_address], run)[0] for run in runs]
    print(f"spread: a={spread.count(a.grpc_address)} b={spread.count(b.grpc_address)}")

    try:
        with prometheus_over(tmp_path, [a, b]) as url:
            seen = runs_seen_once(url, 'layrot_run_step{run=~"prom-run-.*"}', set(runs))
        assert seen == {run: [float(n)] for run, n in runs.items()}
    finally:
        for r in jobs:
            r.close(timeout=2.0)
