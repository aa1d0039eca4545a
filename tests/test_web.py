"""server/web.py over real HTTP: the web view's files on the collector's HTTP port.

Content types, caching (hash-versioned assets immutable, the page revalidated, ETag -> 304),
gzip, HEAD, no path outside the fixed set (traversal attempts are 404), ``ui=False`` /
``serve --no-ui``, and the other owners of the port keeping exactly their own paths. The bytes
served are compared with the files of server/webui/dist read directly.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import http.client
import ssl
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from layrot.server.web import WebUI, dist_dir

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "server" / "webui" / "dist"


def request(
    url: str,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any, bytes]:
    """(status, headers, body) of one request to ``url`` (``http(s)://host:port``)."""
    scheme, host_port = url.rstrip("/").split("://", 1)
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(host_port, timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection(host_port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def test_page_and_assets(collector: Any) -> None:
    url = collector.http_url
    status, headers, body = request(url, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    page = body.decode()
    assert page == request(url, "/index.html")[2].decode()
    for name, ctype in (("app.js", "text/javascript; charset=utf-8"), ("app.css", "text/css; charset=utf-8")):
        data = (DIST / name).read_bytes()
        version = hashlib.sha256(data).hexdigest()[:12]
        link = f"/ui/{name}?v={version}"
        assert f'"{link}"' in page  # the page links the asset by its hash
        status, headers, body = request(url, link)
        assert status == 200 and body == data and headers["Content-Type"] == ctype
        assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
        # Without the hash (or with an old one) the browser must revalidate.
        assert request(url, f"/ui/{name}?v=0123")[1]["Cache-Control"] == "no-cache"
        etag = headers["ETag"]
        status, headers, body = request(url, link, headers={"If-None-Match": etag})
        assert status == 304 and body == b""
        status, headers, body = request(url, link, headers={"Accept-Encoding": "gzip, deflate"})
        assert status == 200 and headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == data
        assert headers["ETag"] != etag and headers["Vary"] == "Accept-Encoding"
        status, headers, body = request(url, link, method="HEAD")
        assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))


@pytest.mark.parametrize(
    "path",
    [
        "/ui/",
        "/ui/index.html",
        "/ui/build.json",
        "/ui/../web.py",
        "/ui/%2e%2e/web.py",
        "/ui/..%2f..%2fapp.py",
        "/ui//etc/passwd",
        "/ui/app.js/",
        "/ui/APP.JS",
        "/app.js",
        "/favicon.ico",
        "/index.htm",
        "/metrics/",
        "/metrics/x",
        "/healthz/",
        "/readyz/x",
        "/api",
        "/api/v2/runs",
    ],
)
def test_everything_else_is_404(collector: Any, path: str) -> None:
    status, _, _ = request(collector.http_url, path)
    assert status == 404


def test_the_other_paths_keep_their_owners(collector: Any) -> None:
    url = collector.http_url
    status, headers, body = request(url, "/metrics")
    assert status == 200 and b"layrot_" in body and headers["Content-Type"].startswith("text/plain")
    assert request(url, "/healthz")[2] == b"ok\n"
    assert request(url, "/readyz")[0] == 200
    status, headers, body = request(url, "/api/v1/runs")
    assert status == 200 and headers["Content-Type"] == "application/json" and body == b'{"runs":[]}'
    assert request(url, "/", method="POST")[0] == 405  # the UI only reads too


def test_no_ui(collector_factory: Any, tmp_path: Path) -> None:
    c = collector_factory(db_path=tmp_path / "noui.db", ui=False)
    assert c.web is None
    for path in ("/", "/index.html", "/ui/app.js"):
        assert request(c.http_url, path)[0] == 404
    assert request(c.http_url, "/api/v1/runs")[0] == 200
    assert request(c.http_url, "/metrics")[0] == 200


def test_serve_no_ui_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --no-ui`` reaches the Collector as ui=False (the collector itself is stubbed out here)."""
    import layrot.server.app as app
    from layrot.cli.main import cli

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(app, "Collector", fake)
    for args, ui in ((["--no-ui"], False), ([], True)):
        result = CliRunner().invoke(cli, ["serve", "--db", str(ROOT / "unused.db"), *args])
        assert isinstance(result.exception, Stop), result.output
        assert seen["ui"] is ui


def test_an_unbuilt_page_says_so(tmp_path: Path) -> None:
    web = WebUI(tmp_path)
    assert not web.available
    got: list[str] = []
    body = b"".join(web({"PATH_INFO": "/", "REQUEST_METHOD": "GET"}, lambda s, h: got.append(s)))
    assert got == ["503 Service Unavailable"] and b"not built" in body


def test_the_wheel_ships_the_built_page() -> None:
    """pyproject's package-data for layrot.server covers every built file (what the wheel carries)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = conf["tool"]["setuptools"]["package-data"]["layrot.server"]
    built = sorted(p.relative_to(ROOT / "server").as_posix() for p in DIST.iterdir())
    assert {"webui/dist/app.js", "webui/dist/app.css", "webui/dist/index.html"} <= set(built)
    for name in built:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), name
    for name in ("index.html", "app.js", "app.css"):  # this install serves the tree's build
        assert (dist_dir() / name).read_bytes() == (DIST / name).read_bytes()
