"""Issue 13's acceptance, end to end: two collectors on one PostgreSQL behind nginx, with Prometheus.

Ten real PyTorch Layca jobs (``layrot.watch(..., control=True)``) point at nginx
(deploy/nginx/layrot-grpc.conf), which hashes each run onto one of two real
collectors sharing one real PostgreSQL database. Checked:

* the runs spread over both collectors, each run's session on exactly one;
* either collector's ``runs`` lists every run once, at the step its job reported;
* a real Prometheus scraping both collectors (deploy/prometheus/collectors.yml)
  shows every run once, at that step;
* a ``control set`` sent to the collector that does *not* hold a job's session
  reaches the job: its Layca switches rates, and the step angles measured in
  float64 from its weights equal arctan of the commanded rates from the step it
  applied the command.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from reference import eq1
from test_control import Job, answered, command
from test_nginx_grpc import nginx_in_front
from test_prometheus_collectors import prometheus_over, runs_seen_once

from layrot.client.query import QueryClient


def holder(collectors, run: str):
    (c,) = [c for c in collectors if run in c.state.runs and c.state.runs[run].sessions]
    return c


@pytest.mark.prometheus
def test_two_collectors_on_one_postgresql_behind_nginx(collector_factory, postgres_url, tmp_path):  # noqa: F811
    a, b = (
        collector_factory(postgres_url, collector_id=cid, cluster_interval=0.5, run_ttl=600.0) for cid in ("a", "b")
    )
    jobs: list[Job] = []
    with nginx_in_front(tmp_path, a.grpc_address, b.grpc_address) as front:
        try:
            for i in range(10):
                job = Job(front, f"e2e-{i}", seed=i, rho=0.04, alpha=0.3, depth=3)
                jobs.append(job)
                job.warmup(3 + i)
            runs = {j.handle.run: j for j in jobs}
            on = {run: holder((a, b), run) for run in runs}
            spread = [sum(c is x for c in on.values()) for x in (a, b)]
            print(f"sessions: a={spread[0]} b={spread[1]}")
            # Ten runs over two collectors: all on one has probability 2**-9 under a fair hash.
            assert min(spread) > 0, f"every run landed on one collector: {spread}"

            # Every run, once, from either collector, at its job's step.
            for c in (a, b):
                deadline = time.monotonic() + 15
                while True:
                    with QueryClient(c.grpc_address) as q:
                        listed = q.list_runs()
                    got = {r["run"]: r for r in listed if r["run"] in runs}
                    if len(got) == len(runs) and all(got[r]["step"] == j.t for r, j in runs.items()):
                        break
                    assert time.monotonic() < deadline, f"{c.collector_id}: {sorted(got)}"
                    time.sleep(0.2)
                assert len([r for r in listed if r["run"] in runs]) == len(runs)  # once each
                assert all(got[r]["connected"] and got[r]["sessions"] == 1 for r in runs)

            # Prometheus over both collectors: every run once.
            with prometheus_over(tmp_path, [a, b]) as url:
                seen = runs_seen_once(url, 'layrot_run_step{run=~"e2e-.*"}', set(runs))
            assert seen == {run: [float(j.t)] for run, j in runs.items()}

            # A command through the collector that does not hold the job's session.
            run = next(r for r in runs if on[r] is a)
            job, other = runs[run], b
            L = len(job.names)
            with QueryClient(other.grpc_address) as q:
                st = q.set_control(run, command(alpha=-0.2, rho0=0.01, reason="through the other collector"))
                assert st["requested_version"] == 1
                job.step_until(answered(q, run, 1))
                job.step(5)
                st = q.get_control(run)
            first = st["applied_step"]
            assert st["applied_version"] == 1 and not st["rejected_reason"]
            assert job.versions[first] == 1 and job.versions[first - 1] == 0
            job.check_angles(range(1, first), 0.04 * eq1(0.3, L))
            job.check_angles(range(first, job.t + 1), 0.01 * eq1(-0.2, L))
            events = [(e["event"], e["version"]) for e in st["audit"]]
            assert events == [("requested", 1), ("sent", 1), ("applied", 1)]
            np.testing.assert_allclose(st["requested_rho"], 0.01 * eq1(-0.2, L), rtol=1e-12)
        finally:
            for j in jobs:
                j.close()
