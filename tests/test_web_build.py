"""The committed web view bundle (server/webui/dist) against its sources.

pip installs must not need npm, so the bundle esbuild makes is committed. Two checks keep it
honest: (1) always, without npm: dist/build.json records the sha256 of every input (sources,
build script, package.json, package-lock.json) and output as of the last build; the inputs must
hash the same now (a source edited without a rebuild fails here) and the outputs must be the
committed files. (2) When npm can install the lockfile's exact packages (npm ci, from its cache
or the registry): a rebuild in a temp copy gives the committed bytes (esbuild is deterministic).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

WEBUI = Path(__file__).resolve().parents[1] / "server" / "webui"
DIST = WEBUI / "dist"
OUTPUTS = ("app.js", "app.css", "index.html")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_committed_bundle_is_fresh() -> None:
    manifest = json.loads((DIST / "build.json").read_text())
    stale = [p for p, digest in manifest["inputs"].items() if sha(WEBUI / p) != digest]
    assert not stale, f"{stale} changed since the bundle was built: cd server/webui && npm ci && npm run build"
    assert {p: sha(DIST / p) for p in OUTPUTS} == manifest["outputs"]
    # Every source file is an input of the manifest (a new one must be added to build.mjs's list).
    sources = {p.relative_to(WEBUI).as_posix() for p in (WEBUI / "src").rglob("*") if p.is_file()}
    assert sources <= set(manifest["inputs"])
    lock = json.loads((WEBUI / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/esbuild"]["version"] == manifest["esbuild"]


def test_page_weight() -> None:
    """What a first visit downloads: the page, the bundle and its CSS (target: <= 500 KB)."""
    total = sum((DIST / p).stat().st_size for p in OUTPUTS)
    assert total <= 500 * 1024
    assert sum(len(gzip.compress((DIST / p).read_bytes())) for p in OUTPUTS) <= 100 * 1024
    assert "uPlot" in (DIST / "app.js").read_text()[:400]  # the license banner of the library it bundles


def test_rebuild_gives_the_same_bundle(tmp_path: Path) -> None:
    npm, node = shutil.which("npm"), shutil.which("node")
    if not npm or not node:
        pytest.skip("npm / node not installed")
    work = tmp_path / "webui"
    work.mkdir()
    for name in ("package.json", "package-lock.json", "build.mjs"):
        shutil.copy(WEBUI / name, work / name)
    shutil.copytree(WEBUI / "src", work / "src")
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false", "npm_config_audit": "false"}
    try:
        # --ignore-scripts: esbuild's postinstall only optimizes; its platform binary is a package of its own.
        subprocess.run(
            # Bounded waits: on a machine without the registry this skips in seconds, not minutes.
            [npm, "ci", "--ignore-scripts", "--prefer-offline", "--fetch-timeout=30000", "--fetch-retries=1"],
            cwd=work,
            env=env,
            check=True,
            capture_output=True,
            timeout=240,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"npm ci could not install the lockfile's packages here: {exc}")
    out = tmp_path / "out"
    subprocess.run([node, "build.mjs", str(out)], cwd=work, check=True, capture_output=True, timeout=120)
    for name in (*OUTPUTS, "build.json"):
        assert (out / name).read_bytes() == (DIST / name).read_bytes(), name
