"""Alerts pushed to a real Alertmanager (Debian's ``prometheus-alertmanager`` binary on loopback).

The binary is required: CI installs it (.ci/run). A missing binary fails
these tests with the install command instead of skipping them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import layrot
from layrot.client.query import QueryClient
from layrot.proto import layrot_pb2 as pb
from layrot.server.alertmanager import SOURCE, AlertmanagerPusher, api_url

pytestmark = pytest.mark.prometheus

REPO = Path(__file__).resolve().parents[1]
MINIMAL_CONFIG = """\
route:
  receiver: "null"
  group_wait: 1s
receivers:
  - name: "null"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Alertmanager:
    """A real Alertmanager process with its own storage, clustering off."""

    def __init__(self, workdir: Path, config_text: str = MINIMAL_CONFIG, port: int | None = None) -> None:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            pytest.fail(
                "prometheus-alertmanager not found on PATH: install it with "
                "`apt-get install -y prometheus-alertmanager`",
                pytrace=False,
            )
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "alertmanager.yml"
        config.write_text(config_text)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "alertmanager.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    log = (workdir / "alertmanager.log").read_text()
                    pytest.fail(f"alertmanager did not start: {log[-2000:]}", pytrace=False)
                time.sleep(0.05)

    def alerts(self, **filters: str) -> list[dict]:
        """GET /api/v2/alerts (active, silenced and inhibited ones)."""
        matchers = [urllib.request.quote(f'{k}="{v}"') for k, v in filters.items()]
        q = "&".join(["silenced=true", "inhibited=true", "active=true"] + [f"filter={m}" for m in matchers])
        return json.loads(urllib.request.urlopen(f"{self.url}/api/v2/alerts?{q}", timeout=5).read())

    def post(self, alerts: list[dict]) -> None:
        req = urllib.request.Request(
            self.url + "/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=5).read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def alertmanager(tmp_path):
    am = Alertmanager(tmp_path / "am")
    yield am
    am.close()


def wait_for(fn, timeout: float, interval: float = 0.02):
    t0 = time.monotonic()
    while True:
        v = fn()
        if v:
            return v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None, timeout
        time.sleep(interval)


def an_alert(**kw) -> pb.Alert:
    base = dict(
        run="r1",
        layer="features.3.weight",
        step=120,
        kind="abrupt_rotation",
        severity="critical",
        angle=1.5,
        baseline=0.01,
        time=time.time(),
        message="rotated 86 deg in one step",
        loss_before=0.3,
        loss_after=2.5,
    )
    base.update(kw)
    return pb.Alert(**base)


# ---------------------------------------------------------------- the pusher against Alertmanager
def test_api_url_forms():
    assert api_url("http://am:9093") == "http://am:9093/api/v2/alerts"
    assert api_url("am:9093/") == "http://am:9093/api/v2/alerts"
    assert api_url("https://am.example/api/v2/alerts") == "https://am.example/api/v2/alerts"


def test_pushed_alert_labels_annotations_update_and_resolution(alertmanager):
    p = AlertmanagerPusher(alertmanager.url, quiet=1.5, resend=60.0).start()
    try:
        t0 = time.monotonic()
        p.fire(an_alert())
        got, waited = wait_for(lambda: alertmanager.alerts(run="r1"), 5.0)
        assert got, "alert not in Alertmanager"
        (a,) = got
        assert a["labels"] == {
            "alertname": "LayrotAbruptRotation",
            "run": "r1",
            "layer": "features.3.weight",
            "severity": "critical",
            "kind": "abrupt_rotation",
            "source": SOURCE,
        }
        ann = a["annotations"]
        assert ann["step"] == "120" and float(ann["angle"]) == 1.5 and float(ann["baseline"]) == 0.01
        assert float(ann["angle_degrees"]) == pytest.approx(math.degrees(1.5), rel=1e-3)
        assert float(ann["loss_before"]) == 0.3 and float(ann["loss_after"]) == 2.5
        assert ann["description"] == "rotated 86 deg in one step" and "r1" in ann["summary"]
        assert a["status"]["state"] == "active"
        assert ann["events"] == "1" and ann["last_step"] == "120"
        # Newer events of the same (run, layer, kind, severity) update the one alert, which shows
        # the episode's worst event: a smaller jump only counts, a larger one takes over.
        p.fire(an_alert(step=130, angle=1.2))
        upd, _ = wait_for(lambda: [x for x in alertmanager.alerts(run="r1") if x["annotations"]["events"] == "2"], 5.0)
        assert upd and upd[0]["annotations"]["step"] == "120" and upd[0]["annotations"]["last_step"] == "130"
        p.fire(an_alert(step=140, angle=1.8))
        upd, _ = wait_for(lambda: [x for x in alertmanager.alerts(run="r1") if x["annotations"]["events"] == "3"], 5.0)
        assert upd and upd[0]["annotations"]["step"] == "140" and float(upd[0]["annotations"]["angle"]) == 1.8
        assert len(alertmanager.alerts(run="r1")) == 1
        # Quiet for 1.5 s: re-posted with endsAt = now, so it leaves the active list.
        gone, waited = wait_for(lambda: alertmanager.alerts(run="r1") == [], 6.0, 0.1)
        assert gone, "alert not resolved after the quiet period"
        assert 1.5 <= time.monotonic() - t0
        # The pusher forgets a resolved alert once its POST returned, which may be just after
        # Alertmanager shows it resolved: its counters settle a moment later.
        settled, _ = wait_for(lambda: p.stats()["active"] == 0, 5.0)
        assert settled and p.stats()["errors"] == 0 and p.stats()["posts"] >= 3
    finally:
        p.close()


def test_held_alert_stays_until_resolved(alertmanager):
    p = AlertmanagerPusher(alertmanager.url, quiet=0.3, resend=0.5).start()
    try:
        p.fire(
            an_alert(
                run="st",
                layer="",
                kind="stalled",
                severity="warning",
                angle=math.nan,
                baseline=math.nan,
                step=7,
                message="connected but no report",
            ),
            hold=True,
        )
        got, _ = wait_for(lambda: alertmanager.alerts(run="st"), 5.0)
        assert got and got[0]["labels"]["alertname"] == "LayrotRunStalled" and "layer" not in got[0]["labels"]
        assert "angle" not in got[0]["annotations"]
        time.sleep(1.5)  # > quiet, > resend: still firing, endsAt pushed forward
        (a,) = alertmanager.alerts(run="st")
        assert a["status"]["state"] == "active"
        p.resolve("st", "", "stalled")
        gone, _ = wait_for(lambda: alertmanager.alerts(run="st") == [], 5.0, 0.1)
        assert gone
    finally:
        p.close()


def test_pusher_never_blocks_counts_drops_and_retries_until_alertmanager_is_up(tmp_path):
    port = free_port()
    p = AlertmanagerPusher(
        f"http://127.0.0.1:{port}", quiet=300, max_queue=100, max_active=50, backoff=(0.2, 1.0)
    ).start()
    am = None
    try:
        t0 = time.perf_counter()
        for i in range(2000):
            p.fire(an_alert(layer=f"l{i}.weight"))
        spent = time.perf_counter() - t0
        assert spent < 0.5, f"2000 fire() calls took {spent:.3f} s"
        time.sleep(0.5)
        s = p.stats()
        assert s["errors"] >= 1 and s["posts"] == 0 and "refused" in s["last_error"].lower()
        assert s["active"] == 50 and s["dropped"] == 2000 - 50
        am = Alertmanager(tmp_path / "late", port=port)
        got, waited = wait_for(lambda: len(alertmanager_alerts(am)) == 50, 10.0, 0.1)
        assert got, f"only {len(alertmanager_alerts(am))} of 50 alerts delivered after Alertmanager came up"
        # Counted once the pusher has read Alertmanager's answer, which may come after the alerts show there.
        assert wait_for(lambda: p.stats()["posts"] >= 1, 5.0, 0.05)[0]
    finally:
        p.close()
        if am is not None:
            am.close()


def alertmanager_alerts(am: Alertmanager) -> list[dict]:
    return am.alerts(run="r1")


def test_deploy_config_inhibits_the_prometheus_copy_of_a_pushed_alert(tmp_path):
    """deploy/alertmanager/alertmanager.yml mutes source="prometheus" alerts the collector also pushed."""
    am = Alertmanager(tmp_path / "deploy", (REPO / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    p = AlertmanagerPusher(am.url).start()
    try:
        p.fire(an_alert(run="inh"))
        assert wait_for(lambda: am.alerts(run="inh"), 5.0)[0]
        am.post(
            [
                {
                    "labels": {
                        "alertname": "LayrotAbruptRotation",
                        "run": "inh",
                        "layer": "features.3.weight",
                        "kind": "abrupt_rotation",
                        "severity": "critical",
                        "source": "prometheus",
                    }
                }
            ]
        )

        def states():
            return {a["labels"]["source"]: a["status"] for a in am.alerts(run="inh")}

        got, _ = wait_for(lambda: states().get("prometheus", {}).get("state") == "suppressed", 5.0, 0.1)
        assert got, states()
        st = states()
        assert st["prometheus"]["inhibitedBy"] and st[SOURCE]["state"] == "active"
    finally:
        p.close()
        am.close()


# ---------------------------------------------------------------- end to end: training job -> collector -> Alertmanager
def test_replaced_layer_in_real_training_reaches_alertmanager_within_5s(alertmanager, collector_factory):
    from sklearn.datasets import load_digits

    c = collector_factory(alertmanager_url=alertmanager.url, alert_quiet=600)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run, K = "am-e2e", 100
    handle = layrot.watch(model, opt, run=run, collector=c.grpc_address)
    g = torch.Generator().manual_seed(1)
    reported = None
    for t in range(1, K + 20):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        handle.observe_loss(loss)
        if t == K:
            with torch.no_grad():
                nn.init.kaiming_uniform_(model[4].weight, a=math.sqrt(5))
        opt.step()
        if t == K:
            reported = time.monotonic()
    got, _ = wait_for(
        lambda: [
            a for a in alertmanager.alerts(run=run, severity="critical") if a["annotations"].get("step") == str(K)
        ],
        10.0,
        0.02,
    )
    latency = time.monotonic() - reported
    handle.close()
    assert got, f"no alert for step {K} in Alertmanager: {alertmanager.alerts()}"
    print(f"latency to Alertmanager: {latency:.3f} s")
    assert latency < 5.0, f"alert reached Alertmanager {latency:.2f} s after step {K} was reported"
    (a,) = got
    assert a["labels"]["layer"] == "4.weight" and a["labels"]["kind"] == "abrupt_rotation"
    assert a["labels"]["source"] == SOURCE and a["labels"]["severity"] == "critical"
    with QueryClient(c.grpc_address) as q:
        (rec,) = [r for r in q.list_alerts(run) if r["step"] == K]
    assert float(a["annotations"]["angle"]) == pytest.approx(rec["angle"], rel=1e-5)
    assert float(a["annotations"]["baseline"]) == pytest.approx(rec["baseline"], rel=1e-5)
    assert float(a["annotations"]["angle"]) > 1.0
    # The collector's /metrics shows the pusher's work.
    text = urllib.request.urlopen(c.metrics_url, timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("layrot_alertmanager_posts_total"))
    assert float(line.split()[-1]) >= 1 and np.isfinite(float(line.split()[-1]))


# ---------------------------------------------------------------- Alertmanager behind nginx (basic auth, token, TLS)
NGINX_CONF = """\
{user}worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log {tmp}/access.log;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{  # basic auth
    listen 127.0.0.1:{basic};
    location / {{
      auth_basic "alertmanager";
      auth_basic_user_file {tmp}/htpasswd;
      proxy_pass http://127.0.0.1:{am};
    }}
  }}
  server {{  # bearer token
    listen 127.0.0.1:{bearer};
    location / {{
      if ($http_authorization != "Bearer {token}") {{ return 401; }}
      proxy_pass http://127.0.0.1:{am};
    }}
  }}
  server {{  # https with a private CA, basic auth
    listen 127.0.0.1:{tls} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      auth_basic "alertmanager";
      auth_basic_user_file {tmp}/htpasswd;
      proxy_pass http://127.0.0.1:{am};
    }}
  }}
}}
"""


class Nginx:
    """A real nginx (Debian's package) in the foreground with its own config, on loopback ports."""

    def __init__(self, workdir: Path, am_port: int, cert: str, key: str, user: str, password: str, token: str):
        binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
        if binary is None:
            pytest.skip("nginx not installed (scripts/test installs Debian's nginx as root)")
        workdir.mkdir(parents=True, exist_ok=True)
        # {SHA} base64 of SHA-1: a format nginx's auth_basic accepts without crypt(3).
        import base64
        import hashlib

        sha = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
        (workdir / "htpasswd").write_text(f"{user}:{{SHA}}{sha}\n")
        self.basic, self.bearer, self.tls = free_port(), free_port(), free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                # As root nginx's workers would run as nobody, who cannot read pytest's 0700 temp dirs.
                user="user root;\n" if os.geteuid() == 0 else "",
                tmp=workdir,
                basic=self.basic,
                bearer=self.bearer,
                tls=self.tls,
                am=am_port,
                cert=cert,
                key=key,
                token=token,
            )
        )
        self.log = (workdir / "nginx.out").open("w")
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.basic), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    err = (workdir / "error.log").read_text() if (workdir / "error.log").exists() else ""
                    pytest.fail(f"nginx did not start: {(workdir / 'nginx.out').read_text()} {err}", pytrace=False)
                time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def test_pusher_through_nginx_with_basic_auth_bearer_token_and_a_private_ca(alertmanager, tmp_path):
    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    user, password, token = "layrot", "s3cret:@/pw", "tok-123"
    proxy = Nginx(tmp_path / "nginx", alertmanager.port, pki.server_cert, pki.server_key, user, password, token)
    (tmp_path / "pw").write_text(password + "\n")
    (tmp_path / "token").write_text(token + "\n")
    quoted = urllib.request.quote(password, safe="")
    pushers = {
        "url": AlertmanagerPusher(f"http://{user}:{quoted}@127.0.0.1:{proxy.basic}", resend=60),
        "files": AlertmanagerPusher(
            f"http://127.0.0.1:{proxy.basic}", resend=60, user=user, password_file=str(tmp_path / "pw")
        ),
        "bearer": AlertmanagerPusher(f"http://127.0.0.1:{proxy.bearer}", resend=60, token_file=str(tmp_path / "token")),
        "tls": AlertmanagerPusher(f"https://{user}:{quoted}@127.0.0.1:{proxy.tls}", resend=60, ca=pki.ca),
        "wrong": AlertmanagerPusher(f"http://{user}:nope@127.0.0.1:{proxy.basic}", resend=60, backoff=(0.2, 0.2)),
        "untrusted": AlertmanagerPusher(
            f"https://{user}:{quoted}@127.0.0.1:{proxy.tls}", resend=60, ca=pki.other_ca, backoff=(0.2, 0.2)
        ),
    }
    try:
        assert all("@" not in p.url and password not in p.url for p in pushers.values())  # never logged
        for name, p in pushers.items():
            p.start()
            p.fire(an_alert(run=f"via-{name}", incident=f"via-{name}/abrupt_rotation/120", layers=["a", "b"]))
        for name in ("url", "files", "bearer", "tls"):
            got, _ = wait_for(lambda: alertmanager.alerts(run=f"via-{name}"), 5.0)
            assert got, f"{name}: not delivered ({pushers[name].stats()})"
            (a,) = got
            assert a["labels"]["incident"] == f"via-{name}/abrupt_rotation/120"
            assert a["annotations"]["layers"] == "a, b"
        time.sleep(0.5)
        for name, err in (("wrong", "HTTP 401"), ("untrusted", "CERTIFICATE_VERIFY_FAILED")):
            assert alertmanager.alerts(run=f"via-{name}") == []
            assert err in pushers[name].stats()["last_error"], pushers[name].stats()
    finally:
        for p in pushers.values():
            p.close(timeout=0.5)
        proxy.close()


def test_pusher_credentials_are_checked_up_front(tmp_path):
    (tmp_path / "empty").write_text("")
    for kw, msg in (
        ({"url": "http://u:p@h", "user": "v"}, "twice"),
        ({"url": "http://h", "password_file": str(tmp_path / "empty"), "user": "u"}, "empty"),
        ({"url": "http://h", "password_file": str(tmp_path / "missing"), "user": "u"}, "cannot read"),
        ({"url": "http://u:p@h", "token_file": str(tmp_path / "empty")}, "not both"),
        ({"url": "https://h", "ca": str(tmp_path / "missing")}, "CA"),
    ):
        url = kw.pop("url")
        with pytest.raises(ValueError, match=msg):
            AlertmanagerPusher(url, **kw)
