"""The web view's static files on the collector's HTTP port: ``/`` and ``/ui/*``.

That is the metrics port, or with ``serve --ui-port`` a port of their own, which serves the
JSON API the page reads too, and never ``/metrics`` (server/metrics.py ``Routes``).

The page (server/webui/src, bundled with uPlot by esbuild into server/webui/dist, which the
wheel ships as package data) reads only the JSON API (server/http_api.py), so this module
serves a handful of fixed files and nothing else:

==================  ======================================================================
``GET /``           the page (``index.html``), ``Cache-Control: no-cache`` + ETag
``GET /ui/app.js``  the bundle; with ``?v=<its hash>`` (the page links it so) cached for a
``GET /ui/app.css`` year as immutable, without it ``no-cache``; ETag / ``If-None-Match`` -> 304
==================  ======================================================================

Files are read once, at construction, into a dict keyed by their URL path: a request can only
name one of those keys, so no path (``..``, ``%2e%2e``, absolute, symlinks) reaches the file
system. Any other path under ``/ui/`` is a 404. gzip is sent when the browser accepts it.

The files are open to everyone, also when the collector has a read token: they hold no data.
The page asks for the token when the API answers 401 and keeps it in the tab's
``sessionStorage`` (sent as ``Authorization: Bearer``; gone when the tab closes).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["UI_PREFIX", "WebUI", "dist_dir"]

UI_PREFIX = "/ui/"
# The bundle's files and their content types; nothing else is served.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
IMMUTABLE = "public, max-age=31536000, immutable"
# The page loads only its own files and talks only to its own origin; uPlot and the page set
# inline style attributes (colours, sizes), hence 'unsafe-inline' for styles only.
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]


def dist_dir() -> Path:
    """Where the built page is: ``layrot/server/webui/dist`` inside the installed package."""
    return Path(str(resources.files("layrot.server") / "webui" / "dist"))


@dataclass(frozen=True)
class _File:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str
    version: str  # the first hex digits of its sha256: the ?v= that makes it immutable


def _file(body: bytes, content_type: str) -> _File:
    digest = hashlib.sha256(body).hexdigest()
    # mtime=0: the same bytes every time (a stable ETag for the gzipped form too).
    return _File(body, gzip.compress(body, 6, mtime=0), content_type, f'"{digest[:20]}"', digest[:12])


class WebUI:
    """WSGI app of the web view's files (see the module docstring), read from ``root`` once.

    ``root`` defaults to the packaged build (``dist_dir()``). Without a built page (a source
    tree whose dist/ was removed) ``/`` answers 503 saying so, and ``/ui/*`` 404.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else dist_dir()
        self.files: dict[str, _File] = {}
        try:
            for name, content_type in ASSETS.items():
                self.files[UI_PREFIX + name] = _file((self.root / name).read_bytes(), content_type)
            index = (self.root / "index.html").read_text(encoding="utf-8")
        except OSError as exc:
            log.warning("web view not available (%s): build it with npm ci && npm run build in server/webui", exc)
            self.files = {}
            return
        # Link each asset by its hash, so a browser caches it for good and a new build is fetched at once.
        for path, f in self.files.items():
            index = index.replace(f'"{path}"', f'"{path}?v={f.version}"')
        self.files["/"] = _file(index.encode(), "text/html; charset=utf-8")

    @property
    def available(self) -> bool:
        """True when the built page was found."""
        return "/" in self.files

    @staticmethod
    def owns(path: str) -> bool:
        """The paths this app answers (every other path stays with the HTTP API's dispatch)."""
        return path in ("/", "/index.html") or path.startswith(UI_PREFIX)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("layrot.raw_path") or environ.get("PATH_INFO") or "/"
        if path == "/index.html":
            path = "/"
        f = self.files.get(path)
        if f is None:
            if path == "/":
                return _plain(
                    start_response, "503 Service Unavailable", "the web view is not built into this install\n"
                )
            return _plain(start_response, "404 Not Found", f"no such file {path!r}\n")
        args = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        cache = IMMUTABLE if path != "/" and args.get("v", [""])[-1] == f.version else "no-cache"
        gz = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
        etag = f.etag[:-1] + ('-gz"' if gz else '"')
        headers = [("Cache-Control", cache), ("ETag", etag), ("Vary", "Accept-Encoding"), *SECURITY_HEADERS]
        if etag in _etags(environ.get("HTTP_IF_NONE_MATCH", "")):
            start_response("304 Not Modified", headers)
            return [b""]
        body = f.gzipped if gz else f.body
        headers += [("Content-Type", f.content_type), ("Content-Length", str(len(body)))]
        if gz:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]
