"""The README opens with exactly two commands, CI runs the second one, and scripts/test installs every extra."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    head = text.split("\n---", 1)[0]
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", head, flags=re.S)]


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds)
    assert cmds[0].endswith("layrot-agent demo")
    assert cmds[1] == "scripts/test"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert readme_commands()[1] in commands
    # The suite runs through scripts/test only: no second pytest or pip line of its own.
    assert not [c for c in commands if c != readme_commands()[1] and ("pytest" in c or "pip install" in c)], commands


def _pip_install_extras(text: str) -> set[str]:
    """The extras of the last `pip install ... -e ".[...]"` in ``text``."""
    found = re.findall(r'pip install [^\n`]*-e "\.\[([a-z,]+)\]"', text)
    assert found, text
    return set(found[-1].split(","))


def test_scripts_test_installs_every_extra_and_runs_pytest():
    script = (ROOT / "scripts" / "test").read_text()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert _pip_install_extras(script) == extras
    last = shlex.split(script.strip().splitlines()[-1])
    assert last == ["exec", "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "$@"]
    assert (ROOT / "scripts" / "test").stat().st_mode & 0o111  # executable
    # The README says what the script installs, with the same extras.
    assert _pip_install_extras((ROOT / "README.md").read_text().split("\n---", 1)[0]) == extras


def test_the_demo_command_installs_the_cli_and_what_the_demo_imports():
    extras = set(re.search(r'"\.\[([a-z,]+)\]"', readme_commands()[0]).group(1).split(","))
    assert {"cli", "torch", "demo"} <= extras


def test_the_fast_suite_is_documented():
    head = (ROOT / "README.md").read_text().split("\n---", 1)[0]
    assert 'scripts/test -m "not slow"' in head
