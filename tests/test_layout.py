"""The import graph reads like the data flow, with no package cycles.

In the job: hooks -> agent -> proto; on the collector: server -> proto; on the
operator's side: cli -> controllers -> client -> proto; core (the pure math) is
imported by all and imports none of them. Every ``import`` in the source is read
with ``ast`` (function-level lazy imports included), so a lazy import cannot
hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the layrot packages it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "proto": {"core"},
    "agent": {"proto", "core"},
    "hooks": {"agent", "core"},
    "server": {"proto", "core"},
    # The query client opens its channel with the job's transport (agent/transport.py): one TLS rule.
    "client": {"agent", "proto", "core"},
    "controllers": {"client", "proto", "core"},
    # The demo trains a real job next to an embedded collector.
    "cli": {"controllers", "client", "server", "agent", "proto", "core", "deploy", "facade", "hooks"},
    "deploy": set(),
    # layrot/__init__.py, layrot/keras.py, layrot/tf.py: the public names (layrot.Client: the notebook's reader).
    "facade": {"hooks", "client", "core"},
}
FOLDERS = {name: ROOT / ("layrot" if name == "facade" else name) for name in ALLOWED}
# Modules that must stay light: a training image loads them.
IN_JOB = ("core", "agent", "proto")
HEAVY = {"matplotlib", "click", "prometheus_client", "grafana_client", "torch", "tensorflow", "keras"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "layrot":
        return None
    if len(parts) == 1 or parts[1] in ("keras", "tf", "lightning", "hf", "__version__"):
        return "facade"
    return parts[1] if parts[1] in ALLOWED else None


def _edges() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = {p: {} for p in ALLOWED}
    for pkg, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            if pkg == "facade" and path.parent != folder:
                continue
            for mod in _imports(path):
                target = _package_of(mod)
                if target and target != pkg:
                    edges[pkg].setdefault(target, []).append(f"{path.relative_to(ROOT)}: {mod}")
    return edges


def test_every_import_goes_down_the_data_flow():
    bad = [
        f"{pkg} -> {target} ({where[0]})"
        for pkg, targets in _edges().items()
        for target, where in targets.items()
        if target not in ALLOWED[pkg]
    ]
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_no_package_cycles():
    edges = {p: set(t) for p, t in _edges().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(p: str) -> None:
        state[p] = 1
        stack.append(p)
        for q in sorted(edges[p]):
            if state.get(q) == 1:
                pytest.fail("package cycle: " + " -> ".join(stack[stack.index(q) :] + [q]))
            if q not in state:
                visit(q)
        stack.pop()
        state[p] = 2

    for p in sorted(edges):
        if p not in state:
            visit(p)


@pytest.mark.parametrize("pkg", IN_JOB)
def test_in_job_packages_import_nothing_heavy(pkg):
    heavy = [
        f"{path.relative_to(ROOT)}: {mod}"
        for path in sorted(FOLDERS[pkg].rglob("*.py"))
        for mod in _imports(path)
        if mod.split(".")[0] in HEAVY
    ]
    assert not heavy, heavy


def test_core_has_no_protocol_code():
    wire = [
        f"{path.relative_to(ROOT)}: {mod}"
        for path in sorted(FOLDERS["core"].rglob("*.py"))
        for mod in _imports(path)
        if mod.split(".")[0] in ("grpc", "google") or "_pb2" in mod
    ]
    assert not wire, wire


def test_the_graph_test_sees_a_violation(tmp_path):
    # A check that can fail: a back edge written in source is found.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from layrot.cli.main import cli\n")
    assert "layrot.cli.main" in _imports(probe)
    assert _package_of("layrot.cli.main") == "cli" not in ALLOWED["agent"]
