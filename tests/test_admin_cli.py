"""`layrot-agent delete RUN` and `layrot-agent compact` against a real collector and its SQLite file."""

from __future__ import annotations

import os
import sqlite3
import time

import numpy as np
import pytest
from click.testing import CliRunner

from layrot.cli.main import cli
from layrot.client.query import QueryClient


def _stored(db: str) -> dict[str, int]:
    """Steps rows per run name, read from the file itself (not through the collector)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT r.run, COUNT(s.step) FROM runs r LEFT JOIN steps s ON s.run_id = r.id GROUP BY r.run"
        )
        return dict(rows.fetchall())


def _report(collector, ingest, sim_job, run: str, steps: int, goodbye: bool = True, token: str | None = None):
    job = sim_job(run=run, layer_sizes=(40, 60, 30))
    s = ingest(collector, token=token)
    s.send(job.hello())
    for _ in range(steps // 10):
        s.send(job.batch(10))
    s.wait_ack(job.seq)
    if goodbye:
        s.goodbye(job.seq)
    return job, s


def test_delete_removes_one_run_and_keeps_the_other_exactly(collector_factory, ingest, sim_job, tmp_path):
    db = str(tmp_path / "h.db")
    c = collector_factory(db, token="w-secret")
    keep, _ = _report(c, ingest, sim_job, "keep", 60, token="w-secret")
    _report(c, ingest, sim_job, "gone", 200, token="w-secret")
    with QueryClient(c.grpc_address, token="w-secret") as q:
        before = q.history("keep")
    c.store.flush()
    assert _stored(db) == {"keep": 60, "gone": 200}

    runner = CliRunner()
    common = ["--collector", c.grpc_address, "--token", "w-secret"]
    # Without --yes it asks; "n" keeps everything.
    r = runner.invoke(cli, ["delete", "gone", *common], input="n\n")
    assert r.exit_code == 1 and "Aborted" in r.output
    # The write token is required.
    r = runner.invoke(cli, ["delete", "gone", "--yes", "--collector", c.grpc_address])
    assert r.exit_code == 1 and "token" in r.output.lower()
    r = runner.invoke(cli, ["delete", "gone", "--yes", *common])
    assert r.exit_code == 0, r.output
    assert "deleted run gone (200 steps rows)" in r.output

    c.store.flush()
    assert _stored(db) == {"keep": 60}
    with sqlite3.connect(db) as conn:  # nothing of the run left in any table
        (gone_samples,) = conn.execute(
            "SELECT COUNT(*) FROM samples WHERE run_id NOT IN (SELECT id FROM runs)"
        ).fetchone()
        (gone_layers,) = conn.execute(
            "SELECT COUNT(*) FROM layers WHERE run_id NOT IN (SELECT id FROM runs)"
        ).fetchone()
    assert gone_samples == 0 and gone_layers == 0
    with QueryClient(c.grpc_address, token="w-secret") as q:
        assert [r["run"] for r in q.list_runs()] == ["keep"]
        after = q.history("keep")
    for field in ("rotation", "step_angle", "weight_norm"):
        np.testing.assert_array_equal(getattr(after, field), getattr(before, field))
    # The kept run is still right against the float64 truth (float32 storage).
    np.testing.assert_allclose(after.rotation, keep.truth_array("rotation"), rtol=1e-6, atol=1e-9)

    r = runner.invoke(cli, ["delete", "gone", "--yes", *common])
    assert r.exit_code == 1 and "unknown run 'gone'" in r.output


def test_delete_is_refused_while_the_job_is_connected(collector, ingest, sim_job):
    _, s = _report(collector, ingest, sim_job, "live", 20, goodbye=False)
    r = CliRunner().invoke(cli, ["delete", "live", "--yes", "--collector", collector.grpc_address])
    assert r.exit_code == 1 and "live session" in r.output
    with QueryClient(collector.grpc_address) as q:
        assert q.history("live").rotation.shape == (20, 3)
    s.close()


def test_compact_applies_retention_and_shrinks_the_file(collector_factory, ingest, sim_job, tmp_path):
    from layrot.server.retention import RetentionPolicy

    db = str(tmp_path / "c.db")
    # Downsampling of every step older than 0 s to every 5th: what compact applies at once.
    c = collector_factory(
        db, retention=RetentionPolicy(downsample_after=1e-9, downsample_every=5), retention_interval=1e9
    )
    _report(c, ingest, sim_job, "a", 400)
    # As an hour from now, so every step is "old" (the simulated job's step times run ahead of the clock).
    c.retention.run_once(now=time.time() + 3600)
    c.store.flush()
    left = _stored(db)["a"]
    assert left == 400 // 5  # steps 5, 10, ..., 400
    with QueryClient(c.grpc_address) as q:
        h = q.history("a")
    assert list(h.steps) == list(range(5, 401, 5))
    r = CliRunner().invoke(cli, ["compact", "--collector", c.grpc_address])
    assert r.exit_code == 0, r.output
    assert "history" in r.output and "->" in r.output
    size = os.path.getsize(db) + (os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0)
    with QueryClient(c.grpc_address) as q:
        out = q.compact()
    assert out["bytes_after"] == size or out["bytes_after"] <= out["bytes_before"]


@pytest.mark.parametrize("command", [["delete", "x", "--yes"], ["compact"]])
def test_admin_commands_refuse_the_http_port(command):
    r = CliRunner().invoke(cli, [*command, "--collector", "http://127.0.0.1:9400"])
    assert r.exit_code == 2 and "only reads" in r.output
