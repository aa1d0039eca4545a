"""A real PostgreSQL server for the tests: its own cluster in a temp dir, made with initdb / pg_ctl.

``postgres_server`` (session) starts one cluster that listens on a unix socket in its
temp dir only (no TCP port to collide with), and removes it at the end;
``postgres_url`` (per test) creates a fresh database on it and yields its URL, so
every test starts from an empty history. Tests that need the binaries skip, saying
why, when Debian's ``postgresql`` (or any ``initdb`` / ``pg_ctl``) is not installed.

PostgreSQL refuses to run as root: as root, the cluster belongs to the unprivileged
``postgres`` user (Debian's package creates it) and initdb / pg_ctl run as that
user through ``runuser``; the test process connects over the socket as the
cluster's superuser ``postgres`` (trust authentication: the socket is in a
private temp dir).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def find_bindir() -> str | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return os.path.dirname(on_path)

    def version(d: str) -> float:
        try:
            return float(Path(d).parent.name)
        except ValueError:
            return 0.0

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, on a unix socket; ``start`` / ``stop`` may be called again."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="layrot-pg-"))  # short: a socket path has ~100 characters
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-locale"
        )
        self._db_counter = itertools.count(1)

    def _run(self, tool: str, *args: str) -> None:
        res = subprocess.run([*self._as, os.path.join(self.bindir, tool), *args], capture_output=True, text=True)
        if res.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({res.returncode}): {res.stderr.strip()}\n{log[-2000:]}")

    def start(self) -> None:
        """Start (or restart) the server; returns once it accepts connections."""
        # listen_addresses='': the socket only. fsync off: a test cluster, not a durability test of the OS.
        opts = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off -c max_connections=100"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL of ``dbname`` over the unix socket."""
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"layrot_test_{next(self._db_counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def temp_postgresql() -> Iterator[str]:
    """A throwaway cluster, removed at the end; yields a database URL (the benchmarks' ``--db temp-postgresql``)."""
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("--db temp-postgresql: PostgreSQL's initdb / pg_ctl are not installed")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server.create_database()
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL cluster of our own (skips when the binaries or psycopg are missing)."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'layrot[postgres]')")
    pytest.importorskip("psycopg_pool", reason="psycopg_pool is not installed (pip install 'layrot[postgres]')")
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb / pg_ctl are not installed (Debian: apt-get install postgresql)")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the test cluster."""
    return postgres_server.create_database()
