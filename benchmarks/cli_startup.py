"""Start-up cost of ``layrot-agent``: Python's bare start-up vs ``--help`` vs a query command.

Every CLI call is a new process, so its import time is paid on each call. In
interleaved rounds (so that load from other processes hits all three alike) this
times, as wall time of the whole process:

* ``python -c pass``                       Python's own start-up (site, .pth files)
* ``layrot-agent --help``                  click and the command definitions
* ``layrot-agent runs --json`` (HTTP)      the same query through the collector's HTTP API
                                           (``--collector http://...``): http.client, no grpc
* ``layrot-agent runs --json`` (gRPC)      plus grpc, protobuf and the query over gRPC
* ``import click, grpc, layrot_pb2``        for scale: what any click + gRPC command loads

against a real collector (``layrot-agent serve`` in its own process), and with
``python -X importtime`` the import time beyond Python's start-up: the sum of the
top-level imports' cumulative times of the command minus that of ``python -c pass``.
The console script is run by its interpreter directly (no shell shims).

    python benchmarks/cli_startup.py              # 15 rounds
    python benchmarks/cli_startup.py --rounds 40
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collector_proc import free_port, start_collector  # noqa: E402

log = logging.getLogger(__name__)


def agent_script() -> str:
    """The ``layrot-agent`` console script next to this interpreter (a pyenv shim would add its own start-up)."""
    here = Path(sys.executable).parent / "layrot-agent"
    found = str(here) if here.exists() else shutil.which("layrot-agent")
    if not found:
        raise SystemExit("layrot-agent is not installed: pip install -e '.[cli]'")
    return found


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return dt


def import_us(cmd: list[str]) -> int:
    """Sum of the cumulative times (us) of the top-level imports of ``python -X importtime`` + cmd."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    total = 0
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line.split("|")
        cumulative, name = parts[1], parts[2]
        if name.startswith("  "):  # nested import: already counted in its parent's cumulative time
            continue
        total += int(cumulative.strip())
    return total


def fmt(xs: list[float]) -> str:
    ms = [1000 * x for x in xs]
    return f"{min(ms):7.1f} {statistics.median(ms):7.1f} {max(ms):7.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds of wall-time measurement")
    ap.add_argument("--import-rounds", type=int, default=7, help="rounds of -X importtime measurement")
    args = ap.parse_args(argv)

    script = agent_script()
    with tempfile.TemporaryDirectory() as tmp:
        http_port = free_port()
        proc, addr = start_collector(tmp, metrics_port=http_port)
        http_addr = f"http://127.0.0.1:{http_port}"
        try:
            os.chdir(tmp)  # no project folder as sys.path[0]
            cases = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "layrot-agent --help": [sys.executable, script, "--help"],
                "runs --json (HTTP API)": [sys.executable, script, "runs", "--json", "--collector", http_addr],
                "runs --json (gRPC)": [sys.executable, script, "runs", "--json", "--collector", addr],
                # What any click + gRPC query command must load, for scale:
                "(floor: click grpc pb2)": [
                    sys.executable,
                    "-c",
                    "import click, grpc, layrot.proto.layrot_pb2, layrot.proto.layrot_pb2_grpc",
                ],
            }
            for cmd in cases.values():  # warm the page cache and the .pyc files
                wall(cmd)
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(args.rounds):
                for name, cmd in cases.items():
                    times[name].append(wall(cmd))
            imports: dict[str, list[int]] = {k: [] for k in cases}
            for _ in range(args.import_rounds):
                for name, cmd in cases.items():
                    imports[name].append(import_us(cmd[1:]))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    bare_wall = statistics.median(times["python -c pass"])
    bare_imp = statistics.median(imports["python -c pass"])
    print(f"{args.rounds} interleaved rounds, wall time of the whole process (ms); {os.cpu_count()} CPUs")
    print(f"{'command':28} {'min':>7} {'median':>7} {'max':>7}   {'+median':>8}   {'imports beyond start-up':>24}")
    for name in cases:
        extra = 1000 * (statistics.median(times[name]) - bare_wall)
        imp = (statistics.median(imports[name]) - bare_imp) / 1000
        imp_txt = "-" if name == "python -c pass" else f"{imp:.1f} ms"
        print(f"{name:28} {fmt(times[name])}   {extra:+8.1f}   {imp_txt:>24}")
    print(
        f"(imports: median of {args.import_rounds} runs of python -X importtime; "
        f"Python's start-up alone imports for {bare_imp / 1000:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
