"""``layrot-agent export`` and ``curves`` on long runs: time against numpy, and peak memory.

A real ``layrot-agent serve`` (its own process, SQLite history) receives a run of
S steps x L layers over one real gRPC session (batches of 1,000 steps). Then, in
interleaved rounds:

* ``layrot-agent export RUN --format csv -o FILE`` (the whole process: start-up,
  fetch over gRPC, formatting, writing) against ``numpy.savetxt`` writing the same
  numbers (step, layer index and the four values per record, ``%.17g``) from memory;
* ``layrot-agent curves RUN -o FILE.png`` of a second, longer run: its peak RSS
  (``ru_maxrss`` of the child process).

    python benchmarks/export.py                          # 20k x 200 export, 100k x 200 curves
    python benchmarks/export.py --steps 2000 --curve-steps 10000 --rounds 1   # quick

Targets (issue 13): export within 2x of numpy; curves <= 300 MB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collector_proc import start_collector  # noqa: E402

from layrot.proto import layrot_pb2 as pb  # noqa: E402
from layrot.proto import layrot_pb2_grpc as pb_grpc  # noqa: E402
from layrot.proto.wire import pack  # noqa: E402

BATCH = 1000


def feed(address: str, run: str, steps: int, layers: int) -> None:
    """One real Ingest session: Hello, then ``steps`` steps in batches; returns once all are acked."""
    rng = np.random.default_rng(0)
    msgs: list[pb.JobMessage] = [
        pb.JobMessage(
            hello=pb.Hello(
                run=run,
                framework="pytorch",
                host="bench",
                layers=[
                    pb.Layer(name=f"blocks.{i}.weight", index=i, shape=[64, 64], init_norm=8.0, numel=4096)
                    for i in range(layers)
                ],
                capabilities=pb.Capabilities(loss=True),
                client_version="bench",
                every=1,
                world_size=1,
            )
        )
    ]
    seq = 0
    for a in range(1, steps + 1, BATCH):
        n = min(BATCH, steps + 1 - a)
        seq += 1
        dist0 = np.abs(rng.normal(1.0, 0.2, (n, layers)))
        dstep = np.abs(rng.normal(0.05, 0.01, (n, layers)))
        norm = 8.0 + rng.normal(0, 0.01, (n, layers))
        msgs.append(
            pb.JobMessage(
                steps=pb.StepBatch(
                    seq=seq,
                    steps=list(range(a, a + n)),
                    times=[time.time()] * n,
                    num_layers=layers,
                    norm=pack(norm),
                    dist0=pack(dist0),
                    dstep=pack(dstep),
                    norm_prev=pack(norm),
                    loss=list(1.0 / np.arange(a, a + n)),
                )
            )
        )
    msgs.append(pb.JobMessage(goodbye=pb.Goodbye(last_seq=seq)))
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
        for reply in pb_grpc.IngestStub(ch).Session(iter(msgs)):
            if reply.WhichOneof("kind") == "error":
                raise SystemExit(f"refused: {reply.error.message}")
            if reply.WhichOneof("kind") == "ack" and reply.ack.seq >= seq:
                break


_WRAP = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL);"
    " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process, measured by a wrapper of its own (peaks do not mix)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return dt, int(done.stdout.strip().splitlines()[-1]) / 1024.0  # ru_maxrss is in KiB on Linux


def numpy_write(steps: int, layers: int, path: str) -> float:
    rng = np.random.default_rng(1)
    S, L = steps, layers
    data = np.empty((S * L, 6))
    data[:, 0] = np.repeat(np.arange(1, S + 1), L)
    data[:, 1] = np.tile(np.arange(L), S)
    data[:, 2:] = rng.random((S * L, 4))
    t0 = time.perf_counter()
    np.savetxt(path, data, fmt="%.17g", delimiter=",")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--curve-steps", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    agent = [sys.executable, "-m", "layrot.cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_collector(tmp, ["--no-alerts"])
        try:
            t0 = time.perf_counter()
            feed(address, "export-run", args.steps, args.layers)
            feed(address, "curves-run", args.curve_steps, args.layers)
            fed = args.steps + args.curve_steps
            print(f"fed {fed} steps x {args.layers} layers in {time.perf_counter() - t0:.1f} s")
            out = os.path.join(tmp, "out.csv")
            export_cmd = [*agent, "export", "export-run", "--format", "csv", "-o", out, "--collector", address]
            curves_cmd = [*agent, "curves", "curves-run", "-o", os.path.join(tmp, "c.png"), "--collector", address]
            exp, npy, rss = [], [], []
            for _ in range(args.rounds):  # interleaved: load from elsewhere hits both alike
                exp.append(run_child(export_cmd)[0])
                npy.append(numpy_write(args.steps, args.layers, os.path.join(tmp, "np.csv")))
            lines = sum(1 for _ in open(out)) - 1
            assert lines == args.steps * args.layers, lines
            for _ in range(max(1, args.rounds // 2)):
                rss.append(run_child(curves_cmd)[1])
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def row(name: str, xs: list[float], unit: str) -> str:
        return f"{name:44} {min(xs):8.2f} {statistics.median(xs):8.2f} {max(xs):8.2f} {unit}"

    print(f"{'':44} {'min':>8} {'median':>8} {'max':>8}")
    print(row(f"export --format csv {args.steps} x {args.layers} (process)", exp, "s"))
    print(row("numpy.savetxt of the same numbers", npy, "s"))
    print(f"ratio export / numpy (medians): {statistics.median(exp) / statistics.median(npy):.2f}  (target <= 2)")
    print(row(f"curves {args.curve_steps} x {args.layers}: peak RSS", rss, "MB") + "  (target <= 300)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
