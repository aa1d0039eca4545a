"""Retention in a real collector: an old run leaves the history and the state, counted in /metrics."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
from click.testing import CliRunner

from layrot.cli.serve_options import serve_retention_options
from layrot.server.app import Collector
from layrot.server.retention import RetentionPolicy
from layrot.server.store_api import LayerRecord, RunRecord, open_store


def _old_history(path: str, now: float) -> None:
    store = open_store(path)
    try:
        for rid, name, age in ((1, "old", 200 * 86400.0), (2, "recent", 86400.0)):
            lay = [LayerRecord(0, "w", [2], 1.0, 2, "Linear")]
            store.create_run(
                RunRecord(rid, name, "pytorch", "2", "h", 1, 1, {}, {}, now - age, now - age, None, 0, lay)
            )
            v = np.ones(1).tobytes()
            rows = [(rid, 0, s, now - age, 0.1, None, v, v, v, None, v, v, v, None, None) for s in (1, 2, 3)]
            store.submit_batch(rows, rid, now - age, 0)
        assert store.flush()
    finally:
        store.close()


def test_serve_retention_deletes_an_old_run_and_counts_it(tmp_path):
    db = str(tmp_path / "h.db")
    _old_history(db, time.time())
    with Collector(db_path=db, retention=RetentionPolicy(retention=90 * 86400.0), retention_interval=3600) as c:
        deadline = time.time() + 10
        while time.time() < deadline and "old" in c.state.runs:
            time.sleep(0.05)
        assert sorted(c.state.runs) == ["recent"]
        text = urllib.request.urlopen(c.metrics_url, timeout=5).read().decode()
        assert "layrot_history_deleted_runs_total 1.0" in text
        assert "layrot_history_deleted_steps_total 3.0" in text
    store = open_store(db)
    try:
        assert [r.run for r in store.load_runs()] == ["recent"]
    finally:
        store.close()


def test_retention_options_parse_ages():
    import click

    seen = {}

    @click.command()
    @serve_retention_options
    def cmd(retention_options):
        seen.update(retention_options)

    r = CliRunner().invoke(cmd, ["--retention", "90d", "--downsample-after", "7d", "--downsample-every", "10"])
    assert r.exit_code == 0, r.output
    p = seen["retention"]
    assert (p.retention, p.downsample_after, p.downsample_every) == (90 * 86400.0, 7 * 86400.0, 10)
    r = CliRunner().invoke(cmd, ["--downsample-after", "7d"])
    assert r.exit_code != 0 and "go together" in r.output
    r = CliRunner().invoke(cmd, ["--retention", "soon"])
    assert r.exit_code != 0
