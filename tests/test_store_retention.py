"""Retention, downsampling, delete and compact of the history store, both backends (server/retention.py)."""

from __future__ import annotations

import numpy as np
import pytest
from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from test_store import backend as backend  # noqa: F401
from test_store import run_record

from layrot.server.retention import Retention, RetentionPolicy, parse_age

DAY = 86400.0
NOW = 1_000 * DAY


def row(run_id: int, rank: int, step: int, t: float, vals: bytes) -> tuple:
    return (run_id, rank, step, t, 0.5, None, vals, vals, vals, None, vals, vals, vals, None, None)


def fill(store, run_id: int, name: str, times: dict[int, float], ranks: int = 2) -> None:
    store.create_run(run_record(run_id, name))
    rng = np.random.default_rng(run_id)
    for s, t in times.items():
        v = rng.random(3).tobytes()  # ranks identical: one shared sample per step
        store.submit_batch([row(run_id, rk, s, t, v) for rk in range(ranks)], run_id, max(times.values()), 0)
    assert store.flush()


def test_parse_age():
    assert parse_age("90d") == 90 * DAY and parse_age("12h") == 43200 and parse_age("30") == 30
    for bad in ("", "-1d", "0", "xd", "nan"):
        with pytest.raises(ValueError):
            parse_age(bad)


def test_retention_and_downsampling_delete_what_the_policy_says(backend):  # noqa: F811
    store = backend.open()
    try:
        # run 1: steps 1..100, one per day-ish, the newest 10 days old; run 2: last report 200 days ago.
        times1 = {s: NOW - (110 - s) * DAY for s in range(1, 101)}
        fill(store, 1, "live", times1)
        fill(store, 2, "old", {s: NOW - (300 - s) * DAY for s in range(1, 11)})
        store.insert_alert(("old", "w", 3, "divergence", "critical", None, 0.1, 1.0, "m", None, None))
        policy = RetentionPolicy(retention=90 * DAY, downsample_after=30 * DAY, downsample_every=10)
        ret = Retention(store, policy, batch_steps=7, clock=lambda: NOW)
        gone = []
        ret.on_run_deleted = lambda rid, name: gone.append((rid, name))
        out = ret.run_once()
        # Independent expectation: run 1 keeps steps reported within 90 days; those older than 30 days
        # only at multiples of 10.
        keep = [s for s, t in times1.items() if t >= NOW - 90 * DAY and (t >= NOW - 30 * DAY or s % 10 == 0)]
        for rank in (0, 1):
            assert [r[0] for r in store.history_page(1, rank, 0, 1000, 1000)] == keep
        assert gone == [(2, "old")] and [r.run for r in store.load_runs()] == ["live"]
        assert out == {"runs": 1, "steps": 2 * 10 + 2 * (100 - len(keep))}
        assert ret.deleted_steps == out["steps"] and ret.deleted_runs == 1
        assert backend.query("SELECT COUNT(*) FROM samples") == [(len(keep),)]
        assert backend.query("SELECT COUNT(*) FROM alerts") == [(0,)]
        assert backend.query("SELECT COUNT(*) FROM layers") == [(1,)]
        assert ret.run_once() == {"runs": 0, "steps": 0}  # a second pass finds nothing more
        res = ret.compact()
        assert res["steps"] == 0 and res["orphan_samples"] == 0
        assert [r[0] for r in store.history_page(1, 0, 0, 1000, 1000)] == keep
    finally:
        store.close()


def test_delete_run_removes_everything_of_that_run_only(backend):  # noqa: F811
    store = backend.open()
    try:
        fill(store, 1, "a", {s: 10.0 * s for s in range(1, 21)})
        fill(store, 2, "b", {s: 10.0 * s for s in range(1, 6)})
        store.insert_command((1, 1, 1.0, "me", "manual", b"x"))
        store.insert_audit((1, 1, 1.0, "me", "set", "applied", 1, "", 0))
        assert store.flush()
        assert store.delete_run(1, "a") == 40
        assert [r.run for r in store.load_runs()] == ["b"] and store.ranks(1) == []
        for table in ("steps", "samples", "layers", "commands", "audit"):
            assert backend.query(f"SELECT COUNT(*) FROM {table} WHERE run_id = 1") == [(0,)], table
        assert len(store.history_page(2, 1, 0, 100, 100)) == 5
        store.reclaim()
        assert len(store.history_page(2, 0, 0, 100, 100)) == 5
    finally:
        store.close()
