"""The built wheel works on its own: light base install, the CLI, package data, the C kernel.

Builds the wheel from a clean copy of the source tree (no stale build/ folder),
then:

* a venv with nothing but the wheel and its base dependencies (numpy, grpcio,
  protobuf): no click, matplotlib or prometheus-client arrive, ``import layrot``
  and the generated gRPC code work, and ``layrot-agent`` says it needs the cli
  extra in one line (exit 2);
* a venv with ``--system-site-packages`` (torch, grafana-client and the cli
  dependencies come from the test environment; the wheel goes in with --no-deps):
  every layrot module is proven to load from that venv, not from the editable
  install of the system site-packages; ``layrot-agent grafana push`` pushes the
  packaged dashboards to the recorded-exchange Grafana of tests/test_grafana.py,
  and ``layrot-agent demo --steps 20`` trains, reports and draws the curves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_grafana import TOKEN, ReplayGrafana

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
_IGNORE_ANYWHERE = shutil.ignore_patterns(
    ".git",
    "build",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    "*.so",
    ".hypothesis",
    ".pytest_cache",
    "*.db*",
    "node_modules",
)


def _ignore(folder: str, names: list[str]) -> set[str]:
    """What the clean copy leaves out; a top-level dist/ only (server/webui/dist is the web view's package data)."""
    skip = set(_IGNORE_ANYWHERE(folder, names))
    return skip | ({"dist"} & set(names) if Path(folder) == ROOT else set())


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LAYROT_COLLECTOR", "LAYROT_TOKEN")}
    return subprocess.run(cmd, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src)],
            cwd=tmp,
        )
    )
    (whl,) = tmp.glob("layrot-*.whl")
    return whl


def _venv(where: Path, system_site: bool) -> Path:
    args = [sys.executable, "-m", "venv", str(where)] + (["--system-site-packages"] if system_site else [])
    _ok(_run(args, cwd=where.parent))
    return where / "bin"


def test_wheel_carries_the_package_data_and_the_kernel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in (
        "layrot/py.typed",
        "layrot/proto/layrot.proto",
        "layrot/proto/layrot_pb2.py",
        "layrot/proto/layrot_pb2.pyi",
        "layrot/proto/layrot_pb2_grpc.py",
        "layrot/deploy/grafana/dashboards/overview.json",
        "layrot/deploy/grafana/dashboards/run.json",
        "layrot/deploy/grafana/dashboards/collector.json",
        "layrot/deploy/prometheus/rules/layrot.rules.yml",
        "layrot/cli/__main__.py",
        "layrot/server/webui/dist/index.html",
        "layrot/server/webui/dist/app.js",
        "layrot/server/webui/dist/app.css",
    ):
        assert must in names, must
    assert any(n.startswith("layrot/hooks/_fused_report") and n.endswith(".so") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "build/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(f"layrot-{wheel.name.split('-')[1]}.dist-info/METADATA").decode()
    base = [
        ln.split(": ", 1)[1] for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln
    ]
    assert sorted(d.split(">")[0].split("<")[0] for d in base) == ["grpcio", "numpy", "protobuf"], base


def test_light_install_has_no_operator_dependencies(wheel, tmp_path):
    bin_ = _venv(tmp_path / "light", system_site=False)
    _ok(_run([str(bin_ / "pip"), "install", "-q", str(wheel)], cwd=tmp_path))
    installed = {
        d["name"].lower() for d in json.loads(_ok(_run([str(bin_ / "pip"), "list", "--format", "json"], cwd=tmp_path)))
    }
    assert {"layrot", "numpy", "grpcio", "protobuf"} <= installed
    assert not installed & {"click", "matplotlib", "prometheus-client", "grpcio-health-checking", "torch"}, installed
    probe = (
        "import layrot, layrot.agent, layrot.proto.layrot_pb2 as pb, layrot.proto.layrot_pb2_grpc, sys\n"
        "assert layrot.__file__.startswith(sys.prefix), layrot.__file__\n"
        "print(pb.Hello(run='r').SerializeToString().hex())"
    )
    assert _ok(_run([str(bin_ / "python"), "-c", probe], cwd=tmp_path)).strip() == "0a0172"
    done = _run([str(bin_ / "layrot-agent"), "runs"], cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "layrot-agent needs the cli extra: pip install 'layrot[cli]' "
        "(missing: click, prometheus-client, grpcio-health-checking, matplotlib)"
    ]


@pytest.fixture(scope="module")
def full_venv(wheel, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("full") / "venv"
    bin_ = _venv(where, system_site=True)
    _ok(_run([str(bin_ / "pip"), "install", "-q", "--no-deps", str(wheel)], cwd=where.parent))
    return bin_


def test_venv_loads_layrot_from_the_wheel(full_venv, tmp_path):
    probe = """
import importlib, importlib.util, json, sys
mods = ["layrot", "layrot.core", "layrot.hooks", "layrot.agent", "layrot.proto.layrot_pb2", "layrot.server.app",
        "layrot.client.query", "layrot.controllers", "layrot.cli.main", "layrot.cli.grafana", "layrot.deploy"]
files = {m: importlib.import_module(m).__file__ for m in mods}
files["_fused_report"] = importlib.util.find_spec("layrot.hooks._fused_report").origin
from layrot.cli.grafana import default_dashboards_dir
from layrot.hooks.torch_distances import fused_kernel
files["dashboards"] = str(default_dashboards_dir())
print(json.dumps({"prefix": sys.prefix, "files": files, "kernel": fused_kernel() is not None}))
"""
    report = json.loads(_ok(_run([str(full_venv / "python"), "-c", probe], cwd=tmp_path)))
    prefix = report["prefix"]
    assert prefix == str(full_venv.parent)
    for mod, path in report["files"].items():
        assert path.startswith(prefix + os.sep), f"{mod} loaded from {path}, not from the venv"
        assert not path.startswith(str(ROOT)), mod
    assert len(list(Path(report["files"]["dashboards"]).glob("*.json"))) == 3
    assert report["kernel"], "the fused C kernel did not load from the wheel"


def test_grafana_push_from_the_wheel(full_venv, tmp_path):
    grafana = ReplayGrafana()
    try:
        grafana.play("first_push")
        done = _run(
            [str(full_venv / "layrot-agent"), "grafana", "push", "--json"],
            cwd=tmp_path,
            env={"LAYROT_GRAFANA_URL": grafana.url, "LAYROT_GRAFANA_TOKEN": TOKEN},
            timeout=120,
        )
        grafana.assert_all_played()
    finally:
        grafana.close()
    pushed = json.loads(_ok(done))
    assert [d["kind"] for d in pushed] == ["folder", "dashboard", "dashboard", "dashboard"]
    for d in pushed[1:]:  # the dashboards came from the venv's package data
        assert d["file"].startswith(str(full_venv.parent)), d["file"]


def test_demo_from_the_wheel(full_venv, tmp_path):
    out = _ok(
        _run([str(full_venv / "layrot-agent"), "demo", "--steps", "20", "--out", str(tmp_path / "demo")], cwd=tmp_path)
    )
    assert "trained 20 steps" in out and "20 reported steps stored, 0 dropped" in out, out
    (png,) = (tmp_path / "demo").glob("demo-*-curves.png")
    assert png.stat().st_size > 10_000
    assert (tmp_path / "demo" / "layrot-demo.db").exists()
