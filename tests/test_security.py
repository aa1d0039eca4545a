"""Tokens (server/auth.py): one interceptor for every service, against a real collector on loopback.

Writes (Ingest.Session, SetControl, SetThresholds) need the write token; queries need the
read token or the write token once a read token is set, and stay open otherwise; health
checks are always open; every refused call is UNAUTHENTICATED, says which token it lacks
and is counted under reason="unauthenticated". Also: tokens from files and the
environment for ``serve``, the loopback default and the start-up warnings.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_text import scrape

from layrot.cli.main import cli
from layrot.cli.serve_options import serve_security_options
from layrot.client.query import CollectorError, QueryClient
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.server.auth import TokenInterceptor, bearer_matches, is_loopback, method_kind, read_token_file

WRITE, READ = "w-token-1", "r-token-2"


def bearer(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token else None


def rejected(c) -> float:
    """``layrot_messages_rejected_total{reason="unauthenticated"}`` as /metrics shows it."""
    for labels, v in scrape(c).get("layrot_messages_rejected_total", []):
        if labels.get("reason") == "unauthenticated":
            return v
    return 0.0


def query_codes(address: str, token: str | None) -> dict[str, grpc.StatusCode]:
    """Status of each read call with ``token`` (OK, or the refusal)."""
    stub = pb_grpc.QueryStub(grpc.insecure_channel(address))
    md = bearer(token)
    calls = {
        "ListRuns": lambda: stub.ListRuns(pb.ListRunsRequest(), metadata=md, timeout=5),
        "GetRun": lambda: stub.GetRun(pb.GetRunRequest(run="tok-run"), metadata=md, timeout=5),
        "GetHistory": lambda: list(stub.GetHistory(pb.HistoryRequest(run="tok-run"), metadata=md, timeout=5)),
        "GetControl": lambda: stub.GetControl(pb.GetControlRequest(run="tok-run"), metadata=md, timeout=5),
        "ListAlerts": lambda: stub.ListAlerts(pb.ListAlertsRequest(), metadata=md, timeout=5),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            out[name] = exc.code()
    return out


def health_ok(address: str) -> bool:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def store_one_step(ingest, c, sim_job, token: str | None) -> None:
    job = sim_job(run="tok-run")
    s = ingest(c, token=token)
    s.send(job.hello())
    s.send(job.batch(1))
    s.wait_ack(1)
    s.goodbye(last_seq=1)


# ---------------------------------------------------------------- the rule, unit by unit
@pytest.mark.parametrize(
    "method, kind",
    [
        ("/grpc.health.v1.Health/Check", "open"),
        ("/grpc.health.v1.Health/Watch", "open"),
        ("/layrot.v1.Query/ListRuns", "read"),
        ("/layrot.v1.Query/GetHistory", "read"),
        ("/layrot.v1.Query/WatchAlerts", "read"),
        ("/layrot.v1.Query/SetControl", "write"),
        ("/layrot.v1.Query/SetThresholds", "write"),
        ("/layrot.v1.Query/DeleteRun", "write"),  # a future call is a write until named like a read
        ("/layrot.v1.Ingest/Session", "write"),
        ("/layrot.v1.Ingest/GetSomething", "write"),  # reads are Query calls only
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "write"),
    ],
)
def test_method_kinds(method, kind):
    assert method_kind(method) == kind


def test_bearer_matching():
    import hashlib

    d = (hashlib.sha256(b"abc").digest(),)
    assert bearer_matches([("authorization", "Bearer abc")], d)
    assert bearer_matches([("x", "y"), ("authorization", "bearer abc")], d)  # the scheme is case-insensitive
    assert not bearer_matches([("authorization", "Bearer abcd")], d)
    assert not bearer_matches([("authorization", "Basic abc")], d)
    assert not bearer_matches([("authorization", "abc")], d)
    assert not bearer_matches((), d)
    assert not bearer_matches(None, d)
    assert not TokenInterceptor().enabled and TokenInterceptor(read_token="r").enabled


# ---------------------------------------------------------------- a real collector
def test_no_token_everything_open(collector, ingest, sim_job):
    store_one_step(ingest, collector, sim_job, token=None)
    assert set(query_codes(collector.grpc_address, None).values()) == {grpc.StatusCode.OK}
    assert health_ok(collector.grpc_address) and rejected(collector) == 0


def test_write_token_protects_every_write_reads_stay_open(collector_factory, ingest, sim_job):
    c = collector_factory(token=WRITE)
    job = sim_job(run="tok-run")
    for token in (None, "wrong", READ):
        s = ingest(c, token=token)
        s.send(job.hello())
        assert s.wait_end(5)
        assert s.status.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "write token" in s.status.details() and "serve --token" in s.status.details()
    assert c.state.runs == {}, "a refused session must not create a run"
    stub = pb_grpc.QueryStub(grpc.insecure_channel(c.grpc_address))
    for call in (
        lambda md: stub.SetControl(pb.SetControlRequest(run="tok-run"), metadata=md, timeout=5),
        lambda md: stub.SetThresholds(pb.SetThresholdsRequest(run=""), metadata=md, timeout=5),
    ):
        for token in (None, "wrong"):
            with pytest.raises(grpc.RpcError) as e:
                call(bearer(token))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rejected(c) == 3 + 4
    store_one_step(ingest, c, sim_job, token=WRITE)
    stub.SetThresholds(pb.SetThresholdsRequest(run=""), metadata=bearer(WRITE), timeout=5)  # past the check
    # Reads stay open without a read token, and health checks always are.
    assert set(query_codes(c.grpc_address, None).values()) == {grpc.StatusCode.OK}
    assert health_ok(c.grpc_address)
    assert rejected(c) == 7


def test_read_token_protects_queries(collector_factory, ingest, sim_job):
    c = collector_factory(token=WRITE, read_token=READ)
    store_one_step(ingest, c, sim_job, token=WRITE)
    for token in (None, "wrong"):
        codes = query_codes(c.grpc_address, token)
        assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    assert rejected(c) == 10
    for token in (READ, WRITE):  # the write token may read too
        assert set(query_codes(c.grpc_address, token).values()) == {grpc.StatusCode.OK}
    # The read token writes nothing.
    s = ingest(c, token=READ)
    assert s.wait_end(5) and s.status.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health_ok(c.grpc_address)
    with QueryClient(c.grpc_address) as q, pytest.raises(CollectorError, match="read token") as e:
        q.list_runs()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "LAYROT_TOKEN" in str(e.value)
    with QueryClient(c.grpc_address, token=READ) as q:
        assert [r["run"] for r in q.list_runs()] == ["tok-run"]


def test_watch_alerts_stream_refused_without_read_token(collector_factory):
    c = collector_factory(read_token=READ)
    stub = pb_grpc.QueryStub(grpc.insecure_channel(c.grpc_address))
    with pytest.raises(grpc.RpcError) as e:
        next(iter(stub.WatchAlerts(pb.ListAlertsRequest(), timeout=5)))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_read_token(collector_factory, ingest, sim_job):
    c = collector_factory(token=WRITE, read_token=READ)
    store_one_step(ingest, c, sim_job, token=WRITE)
    runner = CliRunner()
    out = runner.invoke(cli, ["runs", "--collector", c.grpc_address], env={"LAYROT_TOKEN": ""})
    assert out.exit_code == 1 and "read token" in out.output, out.output
    out = runner.invoke(cli, ["runs", "--collector", c.grpc_address, "--json"], env={"LAYROT_TOKEN": READ})
    assert out.exit_code == 0 and "tok-run" in out.output, out.output
    out = runner.invoke(cli, ["alerts", "--collector", c.grpc_address, "--token", READ])
    assert out.exit_code == 0, out.output


# ---------------------------------------------------------------- serve: token sources, defaults, warnings
def _security(args: list[str], env: dict[str, str] | None = None) -> dict:
    """The security_options dict ``serve`` would hand the Collector for ``args``."""
    import click

    got: dict = {}

    @click.command()
    @serve_security_options
    def probe(security_options):
        got.update(security_options)

    result = CliRunner().invoke(probe, args, env=env or {})
    if result.exit_code != 0:
        raise AssertionError(result.output)
    return got


def test_serve_token_from_file_env_and_flag(tmp_path):
    f = tmp_path / "token"
    f.write_text(WRITE + "\n")
    r = tmp_path / "read"
    r.write_text(READ)
    opts = _security(["--token-file", str(f), "--read-token-file", str(r)])
    assert (opts["token"], opts["read_token"]) == (WRITE, READ)
    opts = _security([], env={"LAYROT_TOKEN": WRITE, "LAYROT_READ_TOKEN": READ})
    assert (opts["token"], opts["read_token"]) == (WRITE, READ)
    assert _security(["--token", "x"])["token"] == "x"
    with pytest.raises(AssertionError, match="not both"):
        _security(["--token", "x", "--token-file", str(f)])
    with pytest.raises(AssertionError, match="must differ"):
        _security(["--token", "x", "--read-token", "x"])
    with pytest.raises(AssertionError, match="missing"):
        _security(["--token-file", str(tmp_path / "missing")])


def test_token_file_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(str(empty))
    two = tmp_path / "two"
    two.write_text("a b\n")
    with pytest.raises(ValueError, match="more than one word"):
        read_token_file(str(two))
    with pytest.raises(ValueError, match="nope"):
        read_token_file(str(tmp_path / "nope"))


def test_serve_listens_on_loopback_by_default():
    from layrot.cli.serve_cli import serve

    defaults = {p.name: p.default for p in serve.params}
    assert defaults["grpc_host"] == "127.0.0.1" and defaults["metrics_host"] == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("::")


def test_warning_beyond_loopback_without_token_or_tls(collector_factory, caplog):
    caplog.set_level(logging.WARNING, logger="layrot.server.app")
    collector_factory()  # loopback: quiet
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    collector_factory(grpc_host="0.0.0.0", metrics_host="0.0.0.0")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "without a token" in text and "without TLS" in text and "/metrics" in text
    caplog.clear()
    collector_factory(grpc_host="0.0.0.0", token=WRITE)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "without a token" not in text and "gRPC listens on 0.0.0.0" in text and "without TLS" in text
