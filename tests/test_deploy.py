"""Static checks of deploy/: Prometheus, Alertmanager, Grafana, docker-compose, Kubernetes, systemd.

Each stack is checked with the real tool where one exists:
- Prometheus config and rules: `promtool check config|rules`, and the rule unit tests
  with `promtool test rules` (Debian package `prometheus`).
- Alertmanager: `amtool check-config` (Debian package `prometheus-alertmanager`).
- Grafana dashboards: every panel query, variables filled in, is sent to a real
  `prometheus` server started on 127.0.0.1 with an empty database; a PromQL error
  comes back as HTTP 400.
- Kubernetes: the `kubernetes-validate` package's bundled OpenAPI schemas (strict).
- systemd: `systemd-analyze verify` and `systemd-analyze security --offline`.
- docker-compose: no Docker here; every file it, and the Dockerfile, refer to must exist.

Missing tools fail the tests with the install command: CI installs them (.ci/run).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from layrot.cli.grafana import interpolate, panel_exprs

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
RULES = PROM / "rules" / "layrot.rules.yml"
RULE_TESTS = PROM / "tests" / "layrot.rules.test.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "layrot-collector.service"
HELM_TEMPLATES = DEPLOY / "helm" / "layrot" / "templates"

EXPECTED_UIDS = {"layrot-overview", "layrot-run", "layrot-collector"}
DS_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# Values for the dashboards' template variables. The layer list has a regex
# metacharacter to exercise Grafana's escaping of multi-value selections.
VARIABLES = {
    "run": "r1",
    "layer": ["conv1", "layer1.0.conv2"],
    "job": ["layrot"],
    "instance": ["collector:9400"],
}

INSTALL_HINT = {
    "promtool": "apt-get install -y prometheus",
    "prometheus": "apt-get install -y prometheus",
    "amtool": "apt-get install -y prometheus-alertmanager",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install it with `{INSTALL_HINT[name]}`", pytrace=False)
    return path


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def load_yaml_docs(path: Path) -> list:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def all_panels(panels: list) -> list:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels") or []))
    return out


# ============================================================================ files in general


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    # Helm templates are Go templates, not YAML: tests/test_helm_chart.py renders them.
    files = [p for p in files if HELM_TEMPLATES not in p.parents]
    assert len(files) >= 10
    for path in files:
        docs = load_yaml_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_generated_files_are_up_to_date():
    result = run(sys.executable, str(DEPLOY / "generate.py"), "--check")
    assert result.returncode == 0, f"stale generated files:\n{result.stdout}{result.stderr}"


# ============================================================================ Prometheus


@pytest.mark.prometheus
def test_promtool_check_config_resolves_rule_files():
    result = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=PROM)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # rule_files is a glob relative to the config: it must find our rules file.
    assert re.search(r"SUCCESS: 1 rule files found", out), out


@pytest.mark.prometheus
def test_promtool_check_rules():
    result = run(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    n_rules = sum(len(g["rules"]) for g in load_yaml_docs(RULES)[0]["groups"])
    assert f"SUCCESS: {n_rules} rules found" in result.stdout


@pytest.mark.prometheus
def test_promtool_rule_unit_tests_pass():
    result = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_tests_cover_every_alert_firing_and_not_firing():
    alerts = {r["alert"] for g in load_yaml_docs(RULES)[0]["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "LayrotAbruptRotation",
        "LayrotRunDiverged",
        "LayrotRunStalled",
        "LayrotCollectorDown",
        "LayrotCollectorRejectingMessages",
    } <= alerts
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml_docs(RULE_TESTS)[0]["tests"]:
        for t in case.get("alert_rule_test", []):
            (fired if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested staying quiet"


def test_alert_rules_have_severity_and_annotations():
    for group in load_yaml_docs(RULES)[0]["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                assert re.fullmatch(r"[a-z_]+(:[a-z_0-9]+)+", rule["record"]), rule["record"]
                continue
            name = rule["alert"]
            assert rule["labels"]["severity"] in {"warning", "critical", "{{ $labels.severity }}"}, name
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
            if "run" in rule["expr"] or "layrot:" in rule["expr"]:
                assert "$labels.run" in rule["annotations"]["summary"], name
            assert "for" in rule, f"{name}: state the `for:` duration explicitly"


@pytest.mark.prometheus
def test_kubernetes_prometheus_config_is_valid(tmp_path):
    (cm,) = load_yaml_docs(K8S / "prometheus-config.yaml")
    config = tmp_path / "prometheus.yml"
    config.write_text(cm["data"]["prometheus.yml"])
    result = run(tool("promtool"), "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {j["job_name"] for j in yaml.safe_load(config.read_text())["scrape_configs"]}
    assert "layrot" in jobs, 'the rules match up{job="layrot"}'


@pytest.mark.prometheus
def test_kubernetes_rules_configmap_passes_promtool(tmp_path):
    (cm,) = load_yaml_docs(K8S / "prometheus-rules.yaml")
    assert set(cm["data"]) == {p.name for p in (PROM / "rules").glob("*.yml")}
    for name, text in cm["data"].items():
        assert text == (PROM / "rules" / name).read_text()
        (tmp_path / name).write_text(text)
        result = run(tool("promtool"), "check", "rules", str(tmp_path / name))
        assert result.returncode == 0, result.stdout + result.stderr


# ============================================================================ Alertmanager


@pytest.mark.prometheus
def test_amtool_check_config():
    result = run(tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.prometheus
def test_alertmanager_routes_critical_alerts_with_shorter_repeat():
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    result = run(
        tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={config}",
        "--verify.receivers=layrot-webhook",
        "severity=critical",
        "alertname=LayrotRunDiverged",
        "run=r1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    routes = yaml.safe_load(config.read_text())["route"]["routes"]
    assert any('severity="critical"' in m for r in routes for m in r["matchers"])


# ============================================================================ Grafana


def test_dashboards_have_stable_unique_uids_and_titles():
    boards = dashboards()
    uids = [d["uid"] for d in boards.values()]
    assert sorted(uids) == sorted(EXPECTED_UIDS)
    assert len({d["title"] for d in boards.values()}) == len(boards)
    for d in boards.values():
        assert d["id"] is None, "file dashboards must not pin an instance-specific id"
        assert len(d["uid"]) <= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", d["uid"])


def test_every_panel_has_a_datasource_and_queries():
    for name, d in dashboards().items():
        ids = []
        for p in all_panels(d["panels"]):
            if p["type"] == "row":
                continue
            ids.append(p["id"])
            assert p.get("datasource") == DS_REF, f"{name}: panel {p['title']!r}"
            assert p.get("targets"), f"{name}: panel {p['title']!r} has no targets"
            for t in p["targets"]:
                assert t.get("datasource") == DS_REF, f"{name}: {p['title']!r} target {t.get('refId')}"
                assert t.get("expr"), f"{name}: {p['title']!r} target {t.get('refId')} has no expr"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), f"{name}: {p['title']!r} repeats a refId"
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"


def test_dashboard_layout_has_no_overlaps():
    for name, d in dashboards().items():
        cells: dict[tuple[int, int], str] = {}
        for p in all_panels(d["panels"]):
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{name}: {p['title']!r} is wider than the grid"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: {p['title']!r} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = p["title"]


def test_datasource_and_template_variables():
    boards = {d["uid"]: d for d in dashboards().values()}
    for d in boards.values():
        variables = {v["name"]: v for v in d["templating"]["list"]}
        ds = variables["DS_PROMETHEUS"]
        assert ds["type"] == "datasource" and ds["query"] == "prometheus"
        # Every ${VAR} anywhere in the model is a declared variable or a Grafana built-in.
        text = json.dumps(d)
        for name in set(re.findall(r"\$\{(\w+)", text)) | set(re.findall(r"\$(\w+)", text)):
            assert name in variables or name.startswith("__"), f"{d['uid']}: undefined variable ${name}"
    run_vars = {v["name"]: v for v in boards["layrot-run"]["templating"]["list"]}
    assert run_vars["run"]["query"]["query"] == "label_values(layrot_run_step, run)"
    assert not run_vars["run"]["multi"]
    layer = run_vars["layer"]
    assert layer["query"]["query"] == 'label_values(layrot_layer_rotation{run="$run"}, layer)'
    assert layer["multi"] and layer["includeAll"]


def test_run_dashboard_content():
    run_board = next(d for d in dashboards().values() if d["uid"] == "layrot-run")
    panels = {p["title"]: p for p in all_panels(run_board["panels"])}
    rotation = panels["Layer rotation"]
    assert rotation["targets"][0]["expr"] == 'layrot_layer_rotation{run="$run", layer=~"$layer"}'
    assert rotation["targets"][0]["legendFormat"] == "{{layer}}"
    heatmap = next(p for p in panels.values() if p["type"] == "heatmap")
    assert "layrot_layer_rotation" in heatmap["targets"][0]["expr"]
    assert heatmap["options"]["calculate"] is False  # rows are layers, not histogram buckets
    rho = panels["Layca rate: requested vs applied"]
    assert {t["expr"].split("{")[0] for t in rho["targets"]} == {
        "layrot_layer_rho_requested",
        "layrot_layer_rho_applied",
    }
    (anno,) = [a for a in run_board["annotations"]["list"] if not a.get("builtIn")]
    assert "layrot_alerts_total" in anno["expr"] and anno["datasource"] == DS_REF
    assert panels["Step angle per layer"]["id"] in anno["filter"]["ids"]
    by_step = panels["Layer rotation vs step"]  # the paper's x axis: optimizer steps, not wall time
    assert by_step["type"] == "xychart" and by_step["options"]["dims"]["x"] == "step"
    assert [t["legendFormat"] for t in by_step["targets"]] == ["step", "{{layer}}"]
    assert by_step["transformations"][0]["id"] == "joinByField"


def test_dashboards_use_only_exported_metrics():
    exported = {
        "layrot_layer_rotation",
        "layrot_layer_step_angle_radians",
        "layrot_layer_weight_norm",
        "layrot_layer_rho_applied",
        "layrot_layer_rho_requested",
        "layrot_run_step",
        "layrot_run_last_report_timestamp_seconds",
        "layrot_run_layers",
        "layrot_run_rotation_min",
        "layrot_run_rotation_mean",
        "layrot_run_connected",
        "layrot_run_info",
        "layrot_run_nonfinite_samples_total",
        "layrot_run_loss",
        "layrot_run_layers_at_target_ratio",
        "layrot_run_layers_under_rotated",
        "layrot_alerts_total",
        "layrot_samples_ingested_total",
        "layrot_steps_ingested_total",
        "layrot_messages_rejected_total",
        "layrot_sessions_active",
        "layrot_sessions_opened_total",
        "layrot_store_pending_rows",
    }
    used = set()
    for d in dashboards().values():
        for expr in panel_exprs(d, VARIABLES, include_annotations=True):
            used |= set(re.findall(r"\blayrot_[a-z_]+", expr))
    assert used <= exported, f"unknown metrics: {used - exported}"
    # Every collector metric shows up somewhere.
    assert exported - used == set(), f"metrics on no dashboard: {exported - used}"


def test_interpolate_matches_grafana_prometheus_formatting():
    # Single values stay as they are; multi-value selections are regex-escaped
    # for a PromQL string literal and joined.
    assert interpolate('x{run="$run"}', {"run": "a.b"}) == 'x{run="a.b"}'
    assert interpolate('x{l=~"$layer"}', {"layer": ["a.b", "c"]}) == 'x{l=~"(a\\\\.b|c)"}'
    assert interpolate('x{l=~"${layer}"}', {"layer": ["only"]}) == 'x{l=~"only"}'
    assert interpolate("rate(x[$__rate_interval])", {}) == "rate(x[1m])"
    assert interpolate("rate(x[$__rate_interval])", {"__rate_interval": "5m"}) == "rate(x[5m])"
    with pytest.raises(KeyError):
        interpolate('x{run="$nope"}', {})


def test_panel_exprs_reaches_collapsed_rows():
    board = {
        "panels": [
            {"type": "row", "collapsed": True, "panels": [{"targets": [{"expr": 'a{run="$run"}'}]}]},
            {"targets": [{"expr": "b"}, {"expr": "c", "hide": True}, {"refId": "no-expr"}]},
        ],
        "annotations": {"list": [{"expr": "d"}]},
    }
    assert panel_exprs(board, {"run": "r"}) == ['a{run="r"}', "b"]
    assert panel_exprs(board, {"run": "r"}, include_annotations=True) == ['a{run="r"}', "b", "d"]


# --- a real Prometheus to parse the dashboard queries


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(
    workdir: Path, config_text: str = "global:\n  scrape_interval: 15s\n"
) -> tuple[str, subprocess.Popen]:
    """Start the `prometheus` binary on 127.0.0.1 with a fresh database; return (base URL, process)."""
    binary = tool("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(config_text)
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                if r.status == 200:
                    return url, proc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("prometheus did not become ready within 60 s")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    url, proc = start_prometheus(tmp_path_factory.mktemp("prometheus"))
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def promql_query(base: str, expr: str) -> tuple[int, dict]:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.prometheus
def test_query_check_rejects_bad_promql(prometheus):
    # The check below is only worth something if a broken query fails it.
    status, body = promql_query(prometheus, "rate(layrot_layer_rotation)")
    assert status == 400 and body["status"] == "error"
    status, body = promql_query(prometheus, 'layrot_layer_rotation{layer=~"(a|b"}')
    assert status == 400 and body["status"] == "error"


@pytest.mark.prometheus
def test_every_dashboard_query_parses_in_prometheus(prometheus):
    checked = 0
    for name, d in dashboards().items():
        exprs = panel_exprs(d, VARIABLES, include_annotations=True)
        # The label_values() variable queries wrap a selector: check that too.
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"])
                assert m, f"{name}: variable {v['name']} is not a label_values() query"
                exprs.append(interpolate(m.group(1), VARIABLES))
        for expr in exprs:
            status, body = promql_query(prometheus, expr)
            assert status == 200 and body["status"] == "success", f"{name}: {expr!r} -> {body.get('error')}"
            checked += 1
    assert checked >= 40


# ============================================================================ docker-compose


def compose() -> dict:
    return load_yaml_docs(DEPLOY / "docker-compose.yml")[0]


def test_compose_files_and_volumes_exist():
    c = compose()
    assert {"collector", "prometheus", "alertmanager", "grafana"} <= set(c["services"])
    declared = set(c.get("volumes") or {})
    for name, svc in c["services"].items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (DEPLOY / svc["build"]["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / svc["build"]["dockerfile"]).is_file(), f"{name}: dockerfile"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared"


def test_dockerfile_copies_existing_paths_and_runs_the_collector():
    text = (DEPLOY / "Dockerfile").read_text()
    context = (DEPLOY / compose()["services"]["collector"]["build"]["context"]).resolve()
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", text, flags=re.M)
    sources = [s for line in copies for s in line.split()]
    assert sources
    for src in sources:
        assert (context / src).exists(), f"Dockerfile copies {src}, missing in {context}" + (
            " (pyproject.toml's readme)" if src == "README.md" else ""
        )
    # Every package directory of pyproject.toml is copied in.
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = set(re.findall(r'^"layrot(?:\.\w+)?" = "(\w+)"', pyproject, flags=re.M))
    assert package_dirs and package_dirs <= set(sources), f"not copied: {package_dirs - set(sources)}"
    assert re.search(r'^ENTRYPOINT \["layrot-agent"\]', text, flags=re.M)
    assert re.search(r"^USER (?!root)\w+", text, flags=re.M), "the collector must not run as root"


def test_compose_ports_match_prometheus_and_grafana_config():
    c = compose()
    collector = c["services"]["collector"]
    cmd = collector["command"]
    metrics_port = cmd[cmd.index("--metrics-port") + 1]
    grpc_port = cmd[cmd.index("--grpc-port") + 1]
    assert (metrics_port, grpc_port) == ("9400", "50051")
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "layrot"]
    assert job["static_configs"][0]["targets"] == [f"collector:{metrics_port}"]
    am_target = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]
    assert am_target.split(":")[0] in c["services"]
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert urllib.parse.urlparse(source["url"]).hostname in c["services"]
    # The dashboard provider reads the directory compose mounts the JSON into.
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "layrot.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in c["services"]["grafana"]["volumes"]}
    assert (DEPLOY / mounts[path]).resolve() == DASHBOARDS
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve() == DEPLOY / "grafana" / "provisioning"


# ============================================================================ Kubernetes


def k8s_resources() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load_yaml_docs(p)]


def test_kubernetes_manifests_validate_against_schemas():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate", pytrace=False)
    version = kubernetes_validate.latest_version()
    resources = k8s_resources()
    assert {d["kind"] for _, d in resources} >= {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap"}
    for path, doc in resources:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}", pytrace=False)


def test_kubernetes_manifests_are_consistent():
    resources = k8s_resources()
    by_kind: dict[str, dict[str, dict]] = {}
    for _, d in resources:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name")
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    kustomization = load_yaml_docs(K8S / "kustomization.yaml")[0]
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    deploy = by_kind["Deployment"]["layrot-collector"]
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[0] == "serve"
    db = args[args.index("--db") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    data_volume = next(n for n, p in mounts.items() if db.startswith(p + "/"))
    claim = volumes[data_volume]["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind["PersistentVolumeClaim"], "the db must live on the PVC"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": int(args[args.index("--grpc-port") + 1]),
        "metrics": int(args[args.index("--metrics-port") + 1]),
    }

    service = by_kind["Service"]["layrot-collector"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])

    dashboards_cm = by_kind["ConfigMap"]["layrot-grafana-dashboards"]
    assert dashboards_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    uids = {json.loads(text)["uid"] for text in dashboards_cm["data"].values()}
    assert uids == EXPECTED_UIDS


# ============================================================================ systemd


def test_systemd_unit(tmp_path):
    text = UNIT.read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(text)
    service = parser["Service"]
    assert service["DynamicUser"] == "yes" and service["StateDirectory"] == "layrot"
    assert service["Restart"] == "on-failure"
    exec_start = service["ExecStart"].split()
    assert exec_start[1] == "serve" and exec_start[exec_start.index("--db") + 1].startswith("/var/lib/layrot/")

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # parsed above; nothing more to run on this machine
    # verify checks that ExecStart's binary exists: point it at the installed CLI.
    agent = shutil.which("layrot-agent") or "/bin/true"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/usr/local/bin/layrot-agent", agent))
    result = run(analyze, "verify", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr
    # verify only warns about unknown keys and bad values: treat any message about our unit as a failure.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert not ours, "\n".join(ours)
    result = run(analyze, "security", "--offline=true", str(unit))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 2.0, f"exposure {m.group(1)} (0 = locked down, 10 = exposed)"


def test_readme_mentions_every_stack():
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "docker compose",
        "kubectl apply",
        "systemctl",
        "promtool test rules",
        "layrot-agent grafana push",
        "generate.py",
    ):
        assert needle in text, needle
    assert os.path.getsize(DEPLOY / "README.md") < 12000, "keep it to a few lines per stack"
