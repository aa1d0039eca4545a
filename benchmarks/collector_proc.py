"""A real ``layrot-agent serve`` in its own process, for the benchmarks, and the command line the
overhead benchmarks share."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_collector(
    tmp: str,
    extra_args: list[str] | tuple[str, ...] = (),
    db_name: str = "bench.db",
    metrics_port: int | None = None,
    db: str | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start the collector with its history in ``tmp`` (or in ``db``, e.g. a postgresql:// URL); (process, address)."""
    port, mport = free_port(), metrics_port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "layrot.cli.main",
            "serve",
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(mport),
            "--db",
            db or os.path.join(tmp, db_name),
            *extra_args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("collector did not start")


@contextlib.contextmanager
def running_collector(tmp: str, extra_args: list[str] | tuple[str, ...] = ()) -> Iterator[str]:
    """:func:`start_collector` for a ``with`` block: yields the gRPC address, stops the process at its end.

    The benchmark's jobs keep their spools in ``tmp`` too (unless LAYROT_SPOOL_DIR is set), so
    nothing is left in the user's cache folder.
    """
    os.environ.setdefault("LAYROT_SPOOL_DIR", os.path.join(tmp, "spool"))
    proc, address = start_collector(tmp, extra_args)
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def parse_overhead_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Add the options of every torch overhead benchmark (--threads, --quick, --json), parse, set torch's threads."""
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    return args
