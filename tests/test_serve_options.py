"""``layrot-agent serve`` ingest limits, store busy timeout and lost grace (cli/serve_options.py)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from layrot.cli.main import cli
from layrot.cli.serve_options import LIMIT_DEFAULTS, STORE_BUSY_TIMEOUT
from layrot.proto import layrot_pb2 as pb
from layrot.server.alert_lost import DEFAULT_GRACE
from layrot.server.app import Collector
from layrot.server.decode import IngestLimits
from tests.metrics_text import scrape


def _rejected(url: str) -> dict[str, float]:
    return {lab["reason"]: v for lab, v in scrape(url).get("layrot_messages_rejected_total", [])}


def test_defaults_are_the_collectors_and_shown_in_help():
    limits = IngestLimits()
    for name, value in LIMIT_DEFAULTS.items():
        assert getattr(limits, name) == value, name
    params = inspect.signature(Collector.__init__).parameters
    assert params["store_busy_timeout"].default == STORE_BUSY_TIMEOUT
    assert params["max_message_bytes"].default == LIMIT_DEFAULTS["max_message_bytes"]
    assert params["lost_grace"].default == DEFAULT_GRACE
    out = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    for flag, shown in (
        ("--max-layers", "10000"),
        ("--max-name-length", "1024"),
        ("--max-steps-per-batch", "10000"),
        ("--max-runs", "50000"),
        ("--max-message-bytes", "16777216"),
        ("--store-busy-timeout", "30.0"),
        ("--lost-grace", "60.0"),
    ):
        part = re.search(re.escape(flag) + r" [A-Z]+ (.*?)(?= --|$)", out).group(1)  # the option's own line
        assert f"[default: {shown}" in part, (flag, part)


def test_serve_passes_every_option_to_the_collector(monkeypatch, tmp_path):
    seen = {}

    class Fake:
        grpc_port = 1
        metrics_url = None
        http_url = None
        store = None
        security_summary = "plaintext"

        def __init__(self, **kwargs):
            seen.update(kwargs)

        def start(self):
            return self

        def serve_forever(self):
            return None

    monkeypatch.setattr("layrot.server.app.Collector", Fake)
    args = ["serve", "--db", str(tmp_path / "x.db"), "--max-layers", "7", "--max-name-length", "9"]
    args += ["--max-steps-per-batch", "3", "--max-runs", "2", "--max-message-bytes", "100000"]
    args += ["--store-busy-timeout", "0.5", "--lost-grace", "2.5"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen["ingest_limits"] == IngestLimits(
        max_layers=7, max_name_length=9, max_steps_per_batch=3, max_runs=2, max_message_bytes=100000
    )
    assert seen["max_message_bytes"] == 100000
    assert seen["store_busy_timeout"] == 0.5
    assert seen["lost_grace"] == 2.5


@pytest.mark.parametrize(
    "flag,value",
    [("--max-layers", "0"), ("--max-runs", "-1"), ("--max-message-bytes", "1000"), ("--store-busy-timeout", "nan")]
    + [("--lost-grace", "nan"), ("--lost-grace", "-1")],
)
def test_serve_refuses_bad_limits(flag, value, tmp_path):
    r = CliRunner().invoke(cli, ["serve", "--db", str(tmp_path / "x.db"), flag, value])
    assert r.exit_code == 2, r.output
    assert flag in r.output


def test_serve_subprocess_enforces_and_counts_its_limits(tmp_path, ingest, sim_job):
    """A real ``serve`` with small limits: each one refuses with its reason, counted in /metrics."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from layrot.cli.main import main; main()", "serve", "--grpc-port", "0"]
        + ["--metrics-port", "0", "--db", str(tmp_path / "l.db"), "--max-layers", "4", "--max-name-length", "20"]
        + ["--max-steps-per-batch", "2", "--max-runs", "1", "--max-message-bytes", "65536"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LAYROT_TOKEN": ""},
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith("layrot collector: gRPC 127.0.0.1:"), line
        addr = line.split("gRPC ")[1].split(",")[0]
        url = line.split("metrics ")[1].split(",")[0]

        def refused(hello_or_msgs, reason):
            s = ingest(addr)
            for m in hello_or_msgs:
                s.send(m)
            assert s.wait_end(5)
            return s

        refused([sim_job(run="wide", layer_sizes=(3,) * 5).hello()], "too_many_layers")
        long = sim_job(run="long").hello()
        long.host = "h" * 21
        refused([long], "name_too_long")
        big = sim_job(run="big").hello()
        big.meta["blob"] = "x" * 70_000
        refused([pb.JobMessage(hello=big)], "too_large")
        ok = sim_job(run="ok", layer_sizes=(3, 4))
        s = ingest(addr)
        s.send(ok.hello())
        s.send(ok.batch(3))  # 3 steps > 2
        s.send(ok.batch(2))
        acks = []
        while not any(2 in a.stored or a.seq >= 2 for a in acks):  # seq 2 is stored above the Nack of seq 1
            m = s.recv(5)
            if m.WhichOneof("kind") == "ack":
                acks.append(m.ack)
        assert [(n.seq, n.code, n.retry) for a in acks for n in a.failed] == [(1, "bad_batch", False)]
        refused([sim_job(run="second").hello()], "too_many_runs")  # the collector holds its 1 run
        deadline = time.monotonic() + 5
        want = {"too_many_layers": 1, "name_too_long": 1, "too_large": 1, "too_many_steps": 1, "too_many_runs": 1}
        while time.monotonic() < deadline and any(_rejected(url).get(k, 0) < v for k, v in want.items()):
            time.sleep(0.05)
        got_r = _rejected(url)
        assert {k: got_r.get(k, 0) for k in want} == want, got_r
        s.goodbye()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
