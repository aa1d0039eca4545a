"""``layrot-agent`` commands via click's CliRunner against a real embedded collector."""

from __future__ import annotations

import csv
import io
import json
import math
import socket
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from layrot.cli.main import EXPORT_FIELDS, cli


@pytest.fixture
def fed(collector, ingest, sim_job):
    """A collector with two runs: 'cnn' (Layca, 4 layers, 30 steps) and 'mlp' (plain SGD, 3 layers, 5 steps)."""
    cnn = sim_job(run="cnn", layca=True, step_angle=0.04, scale=0.998, seed=1)
    s = ingest(collector)
    s.send(cnn.hello())
    for _ in range(6):
        s.send(cnn.batch(5))
    s.wait_ack(6)
    mlp = sim_job(run="mlp", layer_sizes=(10, 20, 5), seed=2, step_angle=0.1)
    s2 = ingest(collector)
    s2.send(mlp.hello())
    s2.send(mlp.batch(5))
    s2.wait_ack(1)
    s2.goodbye()
    return collector, {"cnn": cnn, "mlp": mlp}


def run_cli(*args, env=None):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result


def test_help_texts():
    for cmd in ([], ["serve"], ["runs"], ["show"], ["export"], ["curves"], ["demo"]):
        r = run_cli(*cmd, "--help")
        assert r.exit_code == 0, r.output
        assert "Usage:" in r.output
    top = run_cli("--help").output
    for name in ("serve", "runs", "show", "export", "curves", "demo"):
        assert name in top
    assert "Examples:" in run_cli("export", "--help").output
    assert "LAYROT_COLLECTOR" in run_cli("runs", "--help").output


def test_runs_table_and_json(fed):
    c, jobs = fed
    r = run_cli("runs", "--collector", c.grpc_address)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:4] == ["RUN", "FRAMEWORK", "STEP", "LAYERS"]
    row = next(line.split() for line in lines if line.startswith("cnn"))
    assert row[1:4] == ["pytorch", "30", "4"]
    rot = jobs["cnn"].truth[30]["rotation"]
    assert float(row[4]) == pytest.approx(rot.min(), rel=1e-3)
    assert float(row[5]) == pytest.approx(rot.mean(), rel=1e-3)
    assert "AT 0.9" in lines[0] and row[6] == f"{int((rot >= 0.9).sum())}/4"  # the indicator
    assert row[7] == "yes"
    assert next(line.split() for line in lines if line.startswith("mlp"))[7] == "no"

    r = run_cli("runs", "--json", env={"LAYROT_COLLECTOR": c.grpc_address})
    assert r.exit_code == 0, r.output
    data = {d["run"]: d for d in json.loads(r.output)}
    assert set(data) == {"cnn", "mlp"}
    assert data["cnn"]["step"] == 30 and data["cnn"]["num_layers"] == 4 and data["cnn"]["connected"] is True
    assert data["cnn"]["min_rotation"] == pytest.approx(rot.min(), rel=1e-12)
    assert data["mlp"]["connected"] is False and data["cnn"]["layca"] is True


def test_show_table_and_json(fed):
    c, jobs = fed
    truth = jobs["cnn"].truth[30]
    r = run_cli("show", "cnn", "--collector", c.grpc_address)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("run cnn") and "step 30" in lines[0]
    assert lines[1].startswith("at rotation 0.9: ") and "announced no length" in lines[1]
    header = lines[2].split()
    assert header[:3] == ["INDEX", "LAYER", "SHAPE"]
    rows = [line.split() for line in lines[4:]]
    assert [row[1] for row in rows] == jobs["cnn"].names
    for i, row in enumerate(rows):
        assert float(row[3]) == pytest.approx(truth["rotation"][i], rel=1e-3)
        assert float(row[4]) == pytest.approx(truth["step_angle"][i], rel=1e-3)
        assert float(row[5]) == pytest.approx(math.degrees(truth["step_angle"][i]), rel=1e-3)
        assert float(row[6]) == pytest.approx(truth["weight_norm"][i], rel=1e-3)
        assert float(row[7]) == pytest.approx(math.tan(0.04), rel=1e-3)

    r = run_cli("show", "mlp", "--json", "--collector", c.grpc_address)
    data = json.loads(r.output)
    assert [lay["name"] for lay in data["layers"]] == jobs["mlp"].names
    assert all(lay["rho"] is None for lay in data["layers"])  # no Layca: NaN -> null
    np.testing.assert_allclose(
        [lay["rotation"] for lay in data["layers"]], jobs["mlp"].truth[5]["rotation"], rtol=1e-12
    )


def test_export_json_exact_keys_and_values(fed, tmp_path):
    c, jobs = fed
    out = tmp_path / "cnn.json"
    r = run_cli("export", "cnn", "--format", "json", "-o", str(out), "--collector", c.grpc_address)
    assert r.exit_code == 0, r.output
    records = json.loads(out.read_text())
    job = jobs["cnn"]
    L = len(job.names)
    assert len(records) == 30 * L
    assert all(list(rec) == list(EXPORT_FIELDS) for rec in records)
    assert set(records[0]) == {"run", "step", "layer", "layer_index", "rotation", "step_angle", "weight_norm", "rho"}
    assert records[0]["step"] == 1 and records[-1]["step"] == 30
    for rec in records:
        t = job.truth[rec["step"]]
        i = rec["layer_index"]
        assert rec["run"] == "cnn" and rec["layer"] == job.names[i]
        assert rec["rotation"] == pytest.approx(t["rotation"][i], rel=1e-7)
        assert rec["step_angle"] == pytest.approx(t["step_angle"][i], rel=1e-7)
        assert rec["weight_norm"] == pytest.approx(t["weight_norm"][i], rel=6e-8)  # float32 in the store
        assert rec["rho"] == pytest.approx(math.tan(0.04), rel=6e-8)


def test_export_csv_and_step_bounds(fed):
    c, jobs = fed
    r = run_cli(
        "export", "mlp", "--format", "csv", "--since-step", "2", "--until-step", "4", "--collector", c.grpc_address
    )
    assert r.exit_code == 0, r.output
    text = r.output
    assert text.splitlines()[0] == "run,step,layer,layer_index,rotation,step_angle,weight_norm,rho"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(x["step"]) for x in rows] == [2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert all(x["rho"] == "" for x in rows)
    job = jobs["mlp"]
    for x in rows:
        assert float(x["rotation"]) == pytest.approx(
            job.truth[int(x["step"])]["rotation"][int(x["layer_index"])], rel=1e-7
        )


def test_export_streams_long_runs_in_chunks(collector, ingest, sim_job, tmp_path):
    job = sim_job(run="long", layer_sizes=(4, 6), step_angle=1e-3)
    s = ingest(collector)
    s.send(job.hello())
    for _ in range(5):
        s.send(job.batch(1000))
    s.wait_ack(5)
    out = tmp_path / "long.csv"
    r = run_cli("export", "long", "--format", "csv", "-o", str(out), "--collector", collector.grpc_address)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5000 * 2
    assert [int(x["step"]) for x in rows[::2]] == list(range(1, 5001))
    got = np.array([float(x["rotation"]) for x in rows]).reshape(5000, 2)
    np.testing.assert_allclose(got, job.truth_array("rotation"), rtol=1e-7)
    assert "10000 records (5000 steps x 2 layers)" in r.output


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_curves_writes_the_figure(fed, tmp_path):
    c, jobs = fed
    out = tmp_path / "cnn.png"
    r = run_cli("curves", "cnn", "-o", str(out), "--collector", c.grpc_address)
    assert r.exit_code == 0, r.output
    w, h = png_size(out)
    assert (w, h) == (960, 600)
    assert out.stat().st_size > 20_000  # lines, labels and a colour bar, not a blank canvas
    import matplotlib.image

    img = matplotlib.image.imread(str(out))
    # Coloured pixels (the curves and the colour bar) exist: not a grey-only image.
    rgb = img[..., :3]
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
    assert colourful.mean() > 0.005
    out_log = tmp_path / "cnn-log.svg"
    r = run_cli("curves", "cnn", "-o", str(out_log), "--log-x", "--collector", c.grpc_address)
    assert r.exit_code == 0, r.output
    svg = out_log.read_text()
    assert "layer index (input → output)" in svg or "layer index" in svg


def test_curves_figure_carries_the_numbers():
    """The figure's lines carry the history's numbers (checked on the matplotlib objects, not the pixels)."""
    from layrot.client.figures import layer_rotation_figure

    steps = np.arange(1, 11)
    rot = np.linspace(0, 1, 10)[:, None] * np.array([[0.2, 0.5, 1.0]])
    fig = layer_rotation_figure(steps, rot, ["a", "b", "c"], title="t")
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label() in ("a", "b", "c")]
    assert [ln.get_label() for ln in lines] == ["a", "b", "c"]
    for j, ln in enumerate(lines):
        x, y = ln.get_data()
        np.testing.assert_array_equal(x, np.concatenate([[0], steps]))
        np.testing.assert_allclose(y, np.concatenate([[0], rot[:, j]]))
    colours = [tuple(ln.get_color()) for ln in lines]
    assert len(set(colours)) == 3  # coloured by depth
    assert fig.axes[1].get_ylabel() == "layer index (input → output)"
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 1.0


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("cmd", [["runs"], ["show", "x"], ["export", "x"], ["curves", "x", "-o", "x.png"]])
def test_unreachable_collector_is_one_clean_line(cmd, tmp_path):
    r = CliRunner().invoke(cli, cmd + ["--collector", _dead_address()])
    assert r.exit_code == 1
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the layrot collector" in lines[0]


@pytest.mark.parametrize("cmd", [["show", "ghost"], ["export", "ghost"], ["curves", "ghost", "-o", "g.png"]])
def test_unknown_run_is_one_clean_line(collector, cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if cmd[0] == "export":
        cmd = cmd + ["-o", "ghost.json"]
    r = CliRunner().invoke(cli, cmd + ["--collector", collector.grpc_address])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown run 'ghost'" in lines[0]
    assert not list(tmp_path.glob("ghost*"))  # no empty or partial output file left behind


def test_demo_passes_options_through(monkeypatch, tmp_path):
    """Option plumbing only; the demo itself (real training) is tested with the demo module."""
    import layrot.cli.demo

    seen = {}
    monkeypatch.setattr(layrot.cli.demo, "run_demo", lambda **kw: seen.update(kw))
    monkeypatch.chdir(tmp_path)
    r = run_cli("demo", "--steps", "7", "--every", "2", "--out", "somewhere", "--serve")
    assert r.exit_code == 0, r.output
    assert seen == {"steps": 7, "every": 2, "out": "somewhere", "serve": True}


def test_serve_daemon_runs_and_stops_cleanly_on_sigterm(tmp_path, ingest, sim_job):
    """The real ``layrot-agent serve`` in its own process: listens, ingests, flushes on SIGTERM, exit 0."""
    import os
    import signal
    import subprocess
    import sys

    db = tmp_path / "daemon" / "layrot.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from layrot.cli.main import main; main()",
            "serve",
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--db",
            str(db),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LAYROT_TOKEN": ""},
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith("layrot collector: gRPC 127.0.0.1:"), line
        addr = line.split("gRPC ")[1].split(",")[0]
        job = sim_job(run="daemon")
        s = ingest(addr)
        s.send(job.hello())
        s.send(job.batch(3))
        s.wait_ack(1)
        r = run_cli("runs", "--json", "--collector", addr)
        assert json.loads(r.output)[0]["step"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert s.wait_end(5) and s.status is None  # sessions ended cleanly, not cut
    finally:
        if proc.poll() is None:
            proc.kill()
    import sqlite3

    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 3
    conn.close()


# ---------------------------------------------------------------- edges of the command line
def _clean_error(r, exit_code: int) -> str:
    assert r.exit_code == exit_code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output
    return r.output


def test_export_and_curves_into_a_missing_folder_is_a_clear_error(fed, tmp_path):
    """-o into a folder that does not exist: exit 2 naming the folder, nothing fetched or created."""
    c, _ = fed
    missing = tmp_path / "no" / "such"
    for cmd in (["export", "cnn", "-o", str(missing / "cnn.json")], ["curves", "cnn", "-o", str(missing / "c.png")]):
        out = _clean_error(CliRunner().invoke(cli, cmd + ["--collector", c.grpc_address]), 2)
        assert f"folder {missing} does not exist" in out
    assert not (tmp_path / "no").exists()
    # An existing folder still works, relative paths too.
    r = CliRunner().invoke(cli, ["export", "cnn", "-o", str(tmp_path / "cnn.json"), "--collector", c.grpc_address])
    assert r.exit_code == 0, r.output


def test_alerts_for_an_unknown_run_is_an_error(fed):
    c, _ = fed
    r = CliRunner().invoke(cli, ["alerts", "--run", "NOSUCH", "--collector", c.grpc_address])
    out = _clean_error(r, 1)
    assert "unknown run 'NOSUCH'" in out and "no alerts" not in out
    r = CliRunner().invoke(cli, ["alerts", "--run", "mlp", "--collector", c.grpc_address])
    assert r.exit_code == 0 and "no alerts for run mlp" in r.output  # a known run without alerts


def test_grafana_help_has_examples():
    for cmd in (["grafana"], ["grafana", "push"]):
        for flag in ("--help", "-h"):
            r = run_cli(*cmd, flag)
            assert r.exit_code == 0 and "Examples:" in r.output and "layrot-agent grafana push --url" in r.output


@pytest.mark.parametrize("url", ["mysql://layrot:secret@db:5432/layrot", "sqlite:///tmp/x.db"])
def test_serve_refuses_a_database_url_of_another_backend(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _clean_error(CliRunner().invoke(cli, ["serve", "--db", url]), 2)
    assert "--db" in out and "SQLite file or a PostgreSQL database" in out
    assert "secret" not in out  # a URL's password is not echoed
    assert not list(tmp_path.iterdir())  # no SQLite file named after the URL


def test_serve_says_why_a_postgresql_database_cannot_be_opened(tmp_path, monkeypatch):
    pytest.importorskip("psycopg")
    with socket.socket() as s:  # a loopback port with nobody listening: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    url = f"postgresql://layrot:secret@127.0.0.1:{port}/layrot"
    out = _clean_error(CliRunner().invoke(cli, ["serve", "--db", url, "--grpc-port", "0", "--metrics-port", "0"]), 1)
    assert "cannot open the history database" in out and f"layrot:***@127.0.0.1:{port}/layrot" in out
    assert "secret" not in out
    assert not list(tmp_path.iterdir())


def test_serve_db_errors_name_the_file(tmp_path):
    bad = tmp_path / "not-a-db.txt"
    bad.write_text("this is not SQLite\n" * 100)
    args = ["serve", "--grpc-host", "127.0.0.1", "--grpc-port", "0", "--metrics-host", "127.0.0.1"]
    out = _clean_error(CliRunner().invoke(cli, args + ["--metrics-port", "0", "--db", str(bad)]), 1)
    assert f"cannot open the history database {bad}" in out
    out = _clean_error(CliRunner().invoke(cli, args + ["--metrics-port", "0", "--db", str(tmp_path)]), 2)
    assert str(tmp_path) in out and "directory" in out


# ---------------------------------------------------------------- entry point and start-up
def _python(code: str, *args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_entry_point_without_the_cli_extra_is_one_line():
    """`layrot-agent` in a training image installed without [cli]: one line, exit 2, no traceback."""
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["layrot-agent"] == "layrot.cli:console_main"
    base = " ".join(pyproject["project"]["dependencies"])
    for dist in ("click", "prometheus-client", "grpcio-health-checking", "matplotlib"):
        assert dist not in base
        assert any(d.startswith(dist) for d in pyproject["project"]["optional-dependencies"]["cli"])
    for blocked in ("click", "matplotlib"):
        # sys.modules[name] = None makes the module unfindable, as if not installed.
        done = _python(
            f"import sys; sys.modules[{blocked!r}] = None; from layrot.cli import console_main; console_main()",
            "runs",
        )
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert done.stderr.splitlines() == [
            f"layrot-agent needs the cli extra: pip install 'layrot[cli]' (missing: {blocked})"
        ]


_PROBE = """
import json, sys
from layrot.cli import console_main
try:
    console_main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""

_HEAVY_PREFIXES = ("matplotlib", "numpy", "torch", "tensorflow", "keras", "layrot.server", "layrot.controllers")


def _loaded(*args: str) -> tuple[set[str], str]:
    done = _python(_PROBE, *args)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), done
    return set(report["modules"]), done.stdout


def test_query_commands_load_no_heavy_modules(fed):
    """`runs` / `show` need click, grpc and the generated code, not numpy, matplotlib, the server or a framework."""
    c, _ = fed
    for args in (["runs", "--json"], ["show", "cnn"], ["alerts"], ["runs"]):
        modules, out = _loaded(*args, "--collector", c.grpc_address)
        assert "cnn" in out or args == ["alerts"], out
        heavy = sorted(m for m in modules if m.startswith(_HEAVY_PREFIXES) or m == "prometheus_client")
        assert not heavy, f"{args} loaded {heavy[:10]}"
        assert {"grpc", "click", "layrot.proto.layrot_pb2"} <= modules
        assert "layrot.cli.control_cli" not in modules and "layrot.cli.grafana" not in modules
    modules, out = _loaded("--help")
    assert "Commands:" in out
    assert "grpc" not in modules and "google.protobuf" not in modules and "numpy" not in modules
