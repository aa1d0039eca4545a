"""deploy/nginx/layrot-grpc.conf with Debian's nginx on loopback, in front of two real gRPC collectors.

Jobs through nginx must land each run on exactly one collector (nginx hashes on the
``x-layrot-run`` metadata the reporter sends) and spread runs over both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layrot.agent.transport import RUN_METADATA_KEY
from tests.test_collector_select import _send, recording  # noqa: F401  (fixture)

CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "layrot-grpc.conf"

WRAPPER = """\
{user}worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log {tmp}/access.log;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  include {tmp}/layrot-grpc.conf;
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_deploy_conf_hashes_on_the_run_metadata():
    text = CONF.read_text()
    assert "hash $http_x_layrot_run consistent;" in text
    assert "$http_" + RUN_METADATA_KEY.replace("-", "_") in text
    assert "grpc_pass grpc://layrot_collectors;" in text


@contextlib.contextmanager
def nginx_in_front(tmp_path: Path, addr_a: str, addr_b: str) -> Iterator[str]:
    """deploy/nginx/layrot-grpc.conf with Debian's nginx in front of two collectors; yields its address."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("nginx not installed")
    port = _free_port()
    conf = (
        CONF.read_text()
        .replace("127.0.0.1:50051", addr_a)
        .replace("127.0.0.1:50052", addr_b)
        .replace("listen 50050 http2;", f"listen 127.0.0.1:{port} http2;")
    )
    (tmp_path / "layrot-grpc.conf").write_text(conf)
    main = tmp_path / "nginx.conf"
    main.write_text(WRAPPER.format(user="user root;\n" if os.geteuid() == 0 else "", tmp=tmp_path))
    log = (tmp_path / "nginx.out").open("w")
    proc = subprocess.Popen([binary, "-c", str(main), "-p", str(tmp_path), "-g", "daemon off;"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "nginx.out").read_text()
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_runs_through_nginx_land_on_one_collector_each(recording, tmp_path):  # noqa: F811
    (a, addr_a), (b, addr_b) = recording(), recording()
    with nginx_in_front(tmp_path, addr_a, addr_b) as front:
        runs = [f"nginx-run-{i}" for i in range(12)]
        for run in runs:
            _send(run, front, steps=3)
            _send(run, front, steps=3)  # a second session of the same run (a reconnect)
        on_a = {md.get(RUN_METADATA_KEY) for md in a.metadata}
        on_b = {md.get(RUN_METADATA_KEY) for md in b.metadata}
        assert on_a | on_b == set(runs)
        assert not on_a & on_b, f"runs on both collectors: {on_a & on_b}"
        assert len(a.metadata) + len(b.metadata) == 2 * len(runs)
        # 12 runs over two collectors: all on one happens with probability ~2**-11 under a fair hash.
        assert on_a and on_b, f"spread a={len(on_a)} b={len(on_b)}"
        print(f"spread over two collectors through nginx: a={len(on_a)} b={len(on_b)}")
