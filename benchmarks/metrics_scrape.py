"""``/metrics`` render time of a real collector with many runs.

A real ``layrot-agent serve`` runs in its own process (history in SQLite, alerts
on). This process opens one real gRPC Ingest session per run (all on one channel,
as asyncio streams), sends a Hello and a first batch, then measures wall time of
``GET /metrics`` (whole body read) in interleaved rounds of two kinds:

* ``idle``: nothing arrived since the previous scrape (a dashboard refreshing);
* ``all new``: every run sent a new batch since the previous scrape (the worst
  case: every run's text must be rendered again).

    python benchmarks/metrics_scrape.py                      # 100 x 200 and 1,000 x 50
    python benchmarks/metrics_scrape.py --cases 20x2000 --rounds 5

The targets (issue 13): <= 0.3 s for 100 runs x 200 layers, <= 0.5 s for 1,000 runs x 50 layers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import urllib.request

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collector_proc import free_port, start_collector  # noqa: E402

from layrot.proto import layrot_pb2 as pb  # noqa: E402
from layrot.proto import layrot_pb2_grpc as pb_grpc  # noqa: E402
from layrot.proto.wire import pack  # noqa: E402


class Job:
    """One run's session: a Hello, then one batch of one step per call of :meth:`step`."""

    def __init__(self, stub: pb_grpc.IngestStub, run: str, layers: int, rng: np.random.Generator) -> None:
        self.run, self.layers, self.rng = run, layers, rng
        self.queue: asyncio.Queue[pb.JobMessage | None] = asyncio.Queue()
        self.call = stub.Session(self._requests())
        self.seq = 0
        self.t = 0
        self.init = np.full(layers, 8.0)

    async def _requests(self):  # type: ignore[no-untyped-def]
        while True:
            msg = await self.queue.get()
            if msg is None:
                return
            yield msg

    async def hello(self) -> None:
        layers = [
            pb.Layer(
                name=f"blocks.{i}.weight", index=i, shape=[64, 64], init_norm=8.0, numel=4096, module_type="Linear"
            )
            for i in range(self.layers)
        ]
        await self.queue.put(
            pb.JobMessage(
                hello=pb.Hello(
                    run=self.run,
                    framework="pytorch",
                    host="bench",
                    layers=layers,
                    capabilities=pb.Capabilities(loss=True),
                    client_version="bench",
                    every=1,
                    world_size=1,
                )
            )
        )
        while True:  # the Welcome
            msg = await self.call.read()
            if msg.WhichOneof("kind") == "welcome":
                return
            if msg.WhichOneof("kind") == "error":
                raise SystemExit(f"{self.run}: {msg.error.message}")

    async def step(self) -> None:
        """Send one step and wait until the collector acknowledges it."""
        self.seq += 1
        self.t += 1
        dist0 = np.abs(self.rng.normal(1.0, 0.2, self.layers))
        dstep = np.abs(self.rng.normal(0.05, 0.01, self.layers))
        norm = np.full(self.layers, 8.0) + self.rng.normal(0, 0.01, self.layers)
        batch = pb.StepBatch(
            seq=self.seq,
            steps=[self.t],
            times=[time.time()],
            num_layers=self.layers,
            norm=pack(norm[None]),
            dist0=pack(dist0[None]),
            dstep=pack(dstep[None]),
            norm_prev=pack(norm[None]),
            loss=[2.0 / self.t],
        )
        await self.queue.put(pb.JobMessage(steps=batch))
        while True:
            msg = await self.call.read()
            kind = msg.WhichOneof("kind")
            if kind == "ack" and msg.ack.seq >= self.seq:
                return
            if kind in ("nack", "error"):
                raise SystemExit(f"{self.run}: refused: {msg}")


def scrape(url: str) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    body = urllib.request.urlopen(url, timeout=120).read()
    return time.perf_counter() - t0, len(body), body.count(b"\n")


async def measure(address: str, url: str, runs: int, layers: int, rounds: int) -> dict[str, list[float]]:
    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    stub = pb_grpc.IngestStub(channel)
    rng = np.random.default_rng(0)
    jobs = [Job(stub, f"run-{i:05d}", layers, rng) for i in range(runs)]
    for k in range(0, runs, 200):  # a few hundred Hellos at a time: a 1,000-job start is a burst, not a wall
        await asyncio.gather(*(j.hello() for j in jobs[k : k + 200]))
    await asyncio.gather(*(j.step() for j in jobs))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, scrape, url)  # the first render of every run
    times: dict[str, list[float]] = {"idle": [], "all new": []}
    size = lines = 0
    for _ in range(rounds):  # interleaved, so load from elsewhere hits both kinds alike
        dt, size, lines = await loop.run_in_executor(None, scrape, url)
        times["idle"].append(dt)
        await asyncio.gather(*(j.step() for j in jobs))
        dt, size, lines = await loop.run_in_executor(None, scrape, url)
        times["all new"].append(dt)
    for j in jobs:
        await j.queue.put(None)
    await channel.close()
    times["_size"] = [float(size)]
    times["_lines"] = [float(lines)]
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["100x200", "1000x50"], help="RUNSxLAYERS")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    targets = {"100x200": 0.3, "1000x50": 0.5}
    print(f"/metrics wall time (s), {args.rounds} interleaved rounds per case; {os.cpu_count()} CPUs")
    print(f"{'case':>10} {'scrape':>8} {'min':>7} {'median':>7} {'max':>7} {'target':>7}  size")
    for case in args.cases:
        runs, layers = (int(x) for x in case.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            mport = free_port()
            proc, address = start_collector(tmp, ["--max-runs", str(max(50_000, runs))], metrics_port=mport)
            try:
                t = asyncio.run(measure(address, f"http://127.0.0.1:{mport}/metrics", runs, layers, args.rounds))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        target = targets.get(case)
        for kind in ("idle", "all new"):
            xs = t[kind]
            print(
                f"{case:>10} {kind:>8} {min(xs):7.3f} {statistics.median(xs):7.3f} {max(xs):7.3f} "
                f"{(f'{target:.1f}' if target else '-'):>7}  {t['_size'][0] / 1e6:.1f} MB, {int(t['_lines'][0])} lines"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
