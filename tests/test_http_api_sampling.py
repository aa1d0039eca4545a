"""``stride`` and ``fields`` on ``GET /api/v1/runs/{run}/history`` (server/http_api.py): what the web view asks for.

Checked against the full history from the gRPC QueryClient: the rows kept are exactly the first
step of each absolute ``stride``-step window, whatever the chunking of the stream (steps reported
every 3, in batches of several sizes, more than one chunk), and following a run with
``since_step = (k + 1) * stride`` continues the same selection.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from layrot.client.query import QueryClient


def history(url: str, run: str, **args: Any) -> dict[str, Any]:
    query = "&".join(f"{k}={v}" for k, v in args.items())
    with urllib.request.urlopen(f"{url}/api/v1/runs/{run}/history?{query}", timeout=10) as r:
        return json.load(r)


def rows(doc: dict[str, Any], key: str) -> np.ndarray:
    return np.array([row for ch in doc["chunks"] for row in ch[key]], dtype=np.float64)


def steps(doc: dict[str, Any]) -> list[int]:
    return [s for ch in doc["chunks"] for s in ch["steps"]]


def first_per_window(all_steps: list[int], stride: int, since: int = 0) -> list[int]:
    kept, window = [], -1
    for s in all_steps:
        if s >= since and s // stride != window:
            kept.append(s)
            window = s // stride
    return kept


def test_stride_keeps_the_first_step_of_each_window(
    collector: Any, ingest: Any, sim_job: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import layrot.server.query

    monkeypatch.setattr(layrot.server.query, "CHUNK_STEPS", 50)  # several chunks: windows span their edges
    job = sim_job(run="strided", layer_sizes=(7, 11, 5))
    s = ingest(collector)
    s.send(job.hello())
    for n in (1, 4, 9, 2, 30, 17, 600):
        job.batch(n)  # advance the truth...
    # ...but report every third step only, in batches of uneven sizes (as `every=3` would).
    reported = [t for t in range(1, job.step + 1) if t % 3 == 0]
    seq = 0
    for part in np.array_split(np.array(reported), 9):
        seq += 1
        s.send(job.batch_for([int(t) for t in part], seq=seq))
    s.wait_ack(seq)
    with QueryClient(collector.grpc_address) as q:
        full = q.history("strided")
    assert list(full.steps) == reported
    url = collector.http_url
    for stride in (0, 1, 2, 5, 10, 64, 10_000):
        doc = history(url, "strided", stride=stride)
        assert len(doc["chunks"]) == (5 if stride <= 1 else len(doc["chunks"]))
        want = reported if stride <= 1 else first_per_window(reported, stride)
        assert steps(doc) == want
        idx = np.searchsorted(full.steps, want)
        for key in ("rotation", "step_angle", "weight_norm"):
            np.testing.assert_array_equal(rows(doc, key), getattr(full, key)[idx])
        assert [x for ch in doc["chunks"] for x in ch["loss"]] == pytest.approx(list(full.loss[idx]))
        assert [x for ch in doc["chunks"] for x in ch["times"]] == list(full.times[idx])
    # Live following: the next window's first step on, the same selection.
    since = (120 // 10 + 1) * 10
    doc = history(url, "strided", stride=10, since_step=since)
    assert steps(doc) == first_per_window(reported, 10, since)
    assert steps(doc)[0] == 132 and steps(doc)[1] == 141


def test_stride_must_be_a_count(collector: Any) -> None:
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(urllib.error.HTTPError) as e:
            history(collector.http_url, "nope", stride=bad)
        assert e.value.code == 400


def test_fields_leave_out_the_other_columns(collector: Any, ingest: Any, sim_job: Any) -> None:
    job = sim_job(run="narrow", layer_sizes=(9, 13), layca=True)
    s = ingest(collector)
    s.send(job.hello())
    s.send(job.batch(12))
    s.wait_ack(job.seq)
    with QueryClient(collector.grpc_address) as q:
        full = q.history("narrow")
    doc = history(collector.http_url, "narrow", fields="step_angle,rotation", stride=4)
    chunk = doc["chunks"][0]
    assert set(chunk) == {"steps", "times", "loss", "rotation", "step_angle"}
    idx = np.searchsorted(full.steps, steps(doc))
    np.testing.assert_array_equal(rows(doc, "step_angle"), full.step_angle[idx])
    np.testing.assert_array_equal(rows(doc, "rotation"), full.rotation[idx])
    everything = history(collector.http_url, "narrow", fields="")["chunks"][0]
    assert set(everything) == {"steps", "times", "loss", "rotation", "step_angle", "weight_norm", "rho"}
    np.testing.assert_array_equal(np.array(everything["rho"]), full.rho)
    with pytest.raises(urllib.error.HTTPError) as e:
        history(collector.http_url, "narrow", fields="rotation,secrets")
    assert e.value.code == 400 and b"secrets" in e.value.read()
