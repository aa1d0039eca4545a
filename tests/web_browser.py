"""A real headless Chromium (Debian's ``chromium``) driven by Playwright, for the web view's tests
and benchmarks/webview.py.

Playwright's own browser download is never used: ``executable_path`` is the system binary, and
the flags keep it off the network (this machine's is closed) and work as root. Each launch gets
a fresh profile directory (Playwright passes it as ``--user-data-dir``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",  # we run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browser_missing() -> str | None:
    """Why the browser cannot run here (None when it can): a skip reason."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing (apt-get install chromium; scripts/test does as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright missing (the dev extra)"
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A Playwright browser context on a fresh profile; closed (and its profile removed) on exit."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="layrot-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=ARGS,
                viewport={"width": width, "height": height},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
