"""`layrot-agent grafana push` against recorded Grafana HTTP exchanges.

Grafana's server cannot run here: Debian bookworm has no `grafana` package
(`apt-cache policy grafana` lists no candidate; only ceph-grafana-dashboards and Go
libraries exist) and the PyPI name `grafana` is an empty 0.0.1 placeholder wheel.
So a small real HTTP server on 127.0.0.1 replays the exchanges of
tests/data/grafana_exchange.json, shaped after Grafana's HTTP API reference: it
checks that each request is the expected next one (method, path, a subset of the
JSON body), answers with the recorded status and JSON, and records everything it
received. The client side is the real grafana-client over real HTTP.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from layrot.cli.grafana import GrafanaPushError, grafana_group, load_dashboards, push_dashboards

ROOT = Path(__file__).resolve().parents[1]
EXCHANGES = json.loads((Path(__file__).parent / "data" / "grafana_exchange.json").read_text())["scenarios"]
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
TOKEN = "glsa_test_0123456789abcdef"


def is_subset(expected, actual) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and is_subset(v, actual[k]) for k, v in expected.items())
    return expected == actual


class ReplayGrafana:
    """An HTTP server that plays recorded Grafana exchanges in order."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix.rstrip("/")
        self.expected: list[dict] = []
        self.requests: list[dict] = []
        self.mismatches: list[str] = []
        self._lock = threading.Lock()
        replay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body = replay.answer(self.command, self.path, dict(self.headers), raw)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.prefix}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def play(self, *scenarios: str) -> None:
        with self._lock:
            for name in scenarios:
                self.expected.extend(EXCHANGES[name])

    def answer(self, method: str, raw_path: str, headers: dict, raw: bytes) -> tuple[int, object]:
        path, _, query = raw_path.partition("?")
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append({"method": method, "path": path, "query": query, "headers": headers, "json": body})
            if self.prefix and path.startswith(self.prefix + "/"):
                path = path[len(self.prefix) :]
            if not self.expected:
                self.mismatches.append(f"unexpected extra request {method} {raw_path}")
                return 599, {"message": "no recorded exchange left"}
            exchange = self.expected.pop(0)
            want = exchange["request"]
            if (method, path) != (want["method"], want["path"]) or not is_subset(want.get("json", {}), body or {}):
                self.mismatches.append(
                    f"expected {want['method']} {want['path']} {want.get('json', '')}, "
                    f"got {method} {raw_path} {str(body)[:200]}"
                )
                return 599, {"message": "request does not match the recording"}
            return exchange["response"]["status"], exchange["response"]["body"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def assert_all_played(self) -> None:
        assert not self.mismatches, "\n".join(self.mismatches)
        assert not self.expected, f"{len(self.expected)} recorded exchanges never requested"


@pytest.fixture
def grafana():
    server = ReplayGrafana()
    yield server
    server.close()


def dashboard_posts(server: ReplayGrafana) -> list[dict]:
    return [r["json"] for r in server.requests if (r["method"], r["path"]) == ("POST", "/api/dashboards/db")]


def files_by_uid() -> dict[str, dict]:
    return {model["uid"]: model for _, model in load_dashboards(DASHBOARD_DIR)}


def test_first_push_creates_folder_and_every_dashboard(grafana):
    grafana.play("first_push")
    done = push_dashboards(grafana.url, TOKEN, dashboards_dir=DASHBOARD_DIR)
    grafana.assert_all_played()

    assert done[0] == {"kind": "folder", "action": "created", "uid": "layrot", "title": "layrot"}
    created = {d["uid"]: d for d in done[1:]}
    assert set(created) == {"layrot-overview", "layrot-run", "layrot-collector"}
    for uid, item in created.items():
        assert item["action"] == "created" and item["version"] == 1
        assert item["url"] == f"{grafana.url}/d/{uid}/{uid}"
    for request in grafana.requests:
        assert request["headers"].get("Authorization") == f"Bearer {TOKEN}"
    (folder_post,) = [r["json"] for r in grafana.requests if (r["method"], r["path"]) == ("POST", "/api/folders")]
    assert folder_post == {"title": "layrot", "uid": "layrot"}

    files = files_by_uid()
    posts = dashboard_posts(grafana)
    assert [p["dashboard"]["uid"] for p in posts] == sorted(files)  # file order: collector, overview, run
    for post in posts:
        assert post["folderUid"] == "layrot" and post["overwrite"] is True
        sent = post["dashboard"]
        expected = {k: v for k, v in files[sent["uid"]].items() if k != "version"}
        expected["id"] = None
        assert sent == expected, "the dashboard must be sent as in its file, with id null and no version"


def test_second_push_updates_in_place(grafana):
    grafana.play("first_push", "second_push")
    first = push_dashboards(grafana.url, TOKEN, dashboards_dir=DASHBOARD_DIR)
    n_first = len(grafana.requests)
    second = push_dashboards(grafana.url, TOKEN, dashboards_dir=DASHBOARD_DIR)
    grafana.assert_all_played()

    later = grafana.requests[n_first:]
    assert not [r for r in later if (r["method"], r["path"]) == ("POST", "/api/folders")], "folder created twice"
    assert second[0]["action"] == "exists" and second[0]["uid"] == first[0]["uid"]
    assert [d["uid"] for d in second[1:]] == [d["uid"] for d in first[1:]]
    assert all(d["action"] == "updated" and d["version"] == 2 for d in second[1:])
    # Same payload both times: the push is a pure function of the files.
    posts = dashboard_posts(grafana)
    assert posts[:3] == posts[3:]


def test_existing_folder_found_by_title(grafana):
    grafana.play("folder_made_by_hand")
    done = push_dashboards(grafana.url, TOKEN, dashboards_dir=DASHBOARD_DIR)
    grafana.assert_all_played()
    assert done[0] == {"kind": "folder", "action": "exists", "uid": "e4f0c1a2b3", "title": "layrot"}
    assert {p["folderUid"] for p in dashboard_posts(grafana)} == {"e4f0c1a2b3"}
    assert all(d["action"] == "updated" for d in done[1:])


def test_no_overwrite_leaves_existing_dashboards(grafana):
    grafana.play("no_overwrite_existing")
    done = push_dashboards(grafana.url, TOKEN, dashboards_dir=DASHBOARD_DIR, overwrite=False)
    grafana.assert_all_played()
    assert [d["action"] for d in done[1:]] == ["skipped"] * 3
    assert all(p["overwrite"] is False for p in dashboard_posts(grafana))


def test_bad_token_gives_one_clear_line(grafana):
    grafana.play("bad_token")
    with pytest.raises(GrafanaPushError) as info:
        push_dashboards(grafana.url, "wrong", dashboards_dir=DASHBOARD_DIR)
    grafana.assert_all_played()
    message = str(info.value)
    assert "\n" not in message
    assert "401" in message and "Invalid API key" in message and "LAYROT_GRAFANA_TOKEN" in message
    assert grafana.requests[0]["headers"]["Authorization"] == "Bearer wrong"


def test_cli_error_has_no_traceback(grafana):
    grafana.play("bad_token")
    result = CliRunner().invoke(
        grafana_group,
        ["push", "--url", grafana.url, "--dir", str(DASHBOARD_DIR)],
        env={"LAYROT_GRAFANA_TOKEN": "wrong"},
    )
    grafana.assert_all_played()
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "401" in lines[0], result.output
    assert "Traceback" not in result.output


def test_permission_error_names_the_missing_role(grafana):
    grafana.play("viewer_token")
    with pytest.raises(GrafanaPushError, match=r"403.*folders:create.*Editor"):
        push_dashboards(grafana.url, TOKEN, dashboards_dir=DASHBOARD_DIR)
    grafana.assert_all_played()


def test_server_error_is_reported(grafana):
    grafana.play("server_error_on_save")
    with pytest.raises(GrafanaPushError, match=r"HTTP 500.*saving dashboard 'layrot-collector'"):
        push_dashboards(grafana.url, TOKEN, dashboards_dir=DASHBOARD_DIR)
    grafana.assert_all_played()


def test_cli_json_output_and_env_url(grafana):
    grafana.play("first_push")
    result = CliRunner().invoke(
        grafana_group,
        ["push", "--json", "--dir", str(DASHBOARD_DIR)],
        env={"LAYROT_GRAFANA_URL": grafana.url, "LAYROT_GRAFANA_TOKEN": TOKEN},
    )
    grafana.assert_all_played()
    assert result.exit_code == 0, result.output
    done = json.loads(result.output)
    assert [d["kind"] for d in done] == ["folder", "dashboard", "dashboard", "dashboard"]


def test_grafana_under_a_sub_path():
    server = ReplayGrafana(prefix="/grafana")
    try:
        server.play("second_push")
        done = push_dashboards(server.url + "/", TOKEN, dashboards_dir=DASHBOARD_DIR)
        server.assert_all_played()
        assert all(r["path"].startswith("/grafana/api/") for r in server.requests)
        assert done[1]["url"].startswith(server.url + "/d/")
    finally:
        server.close()


def test_unreachable_grafana_is_one_line():
    server = ReplayGrafana()
    url = server.url
    server.close()  # nothing listens on that port any more
    with pytest.raises(GrafanaPushError, match=r"cannot reach Grafana .*: \[Errno \d+\] Connection refused$") as info:
        push_dashboards(url, TOKEN, dashboards_dir=DASHBOARD_DIR, timeout=2)
    assert "\n" not in str(info.value)


def test_bad_inputs_fail_before_any_request(tmp_path, grafana):
    with pytest.raises(GrafanaPushError, match="not found"):
        push_dashboards(grafana.url, TOKEN, dashboards_dir=tmp_path / "missing")
    with pytest.raises(GrafanaPushError, match="no \\*.json"):
        push_dashboards(grafana.url, TOKEN, dashboards_dir=tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"uid": "same", "title": "A", "panels": []}))
    (tmp_path / "b.json").write_text(json.dumps({"dashboard": {"uid": "same", "title": "B"}}))
    with pytest.raises(GrafanaPushError, match="both use dashboard uid 'same'"):
        push_dashboards(grafana.url, TOKEN, dashboards_dir=tmp_path)
    with pytest.raises(GrafanaPushError, match="bad Grafana URL"):
        push_dashboards("grafana:3000", TOKEN, dashboards_dir=DASHBOARD_DIR)
    assert grafana.requests == []


def test_default_dashboards_dir_is_the_deploy_folder():
    assert {m["uid"] for _, m in load_dashboards()} == {"layrot-overview", "layrot-run", "layrot-collector"}
