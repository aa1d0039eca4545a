"""The web view's speed and weight, in a real headless Chromium against a real ``layrot-agent serve``.

A collector in its own process gets ``--runs`` simulated runs of ``--layers`` layers and
``--steps`` steps each over gRPC (plausible rotation curves, not a model: this measures the page,
not the hook). Then, with Debian's Chromium driven by Playwright (tests/web_browser.py), in
``--rounds`` fresh page loads each:

* runs table, first paint: navigation start -> the browser's first contentful paint, and ->
  the table filled with every run (the page's ``data-ready``); target <= 1 s
* run page (``--layers`` curves, heatmap, rates): navigation start -> charts drawn
* a new report visible: one more step sent (acked by the collector) -> the page shows its
  step, without reload; target <= 2 s (the page polls once a second)
* page weight: bytes the browser downloads for the page itself (HTML, JS, CSS; as sent, gzip),
  and the run page's history download; target <= 500 KB for the page

``--screenshot PATH`` also trains a small real PyTorch CNN with ``layrot.Layca`` under remote
control on the same collector (a rate command halfway) and saves its run page as a PNG
(docs/webview.png in the README).

    python benchmarks/webview.py                       # 20 runs x 200 layers x 500 steps, 5 rounds
    python benchmarks/webview.py --screenshot docs/webview.png
"""

from __future__ import annotations

import argparse
import logging
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from layrot.proto import layrot_pb2 as pb
from layrot.proto import layrot_pb2_grpc as pb_grpc
from layrot.proto.wire import pack

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from collector_proc import free_port, start_collector  # noqa: E402
from web_browser import browser_missing, chromium  # noqa: E402

log = logging.getLogger(__name__)


class Feeder:
    """One Ingest.Session of a simulated run: per layer a rotation curve rising to its own plateau."""

    def __init__(self, address: str, run: str, layers: int, seed: int) -> None:
        self.run, self.L = run, layers
        rng = np.random.default_rng(seed)
        depth = np.linspace(0.0, 1.0, layers)
        # Angle to the initialization approaches a plateau that grows with depth (as SGD often gives).
        self.plateau = 0.4 + 0.9 * depth + 0.05 * rng.standard_normal(layers)
        self.tau = 80.0 + 40.0 * rng.random(layers)
        self.step, self.seq = 0, 0
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        self._out: queue.Queue[Any] = queue.Queue()
        self.acked = 0
        self._acks = threading.Condition()
        self.call = pb_grpc.IngestStub(self.channel).Session(self._requests())
        threading.Thread(target=self._read, daemon=True).start()
        hello = pb.Hello(
            run=run,
            world_size=1,
            framework="pytorch",
            framework_version="bench",
            host="bench",
            pid=1,
            layers=[
                pb.Layer(name=f"block{i // 2}.{'conv' if i % 2 == 0 else 'bn'}.weight", index=i, shape=[64], numel=64)
                for i in range(layers)
            ],
            capabilities=pb.Capabilities(loss=True),
            every=1,
            session_id=f"bench-{seed}",
            client_version="bench",
        )
        for lay in hello.layers:
            lay.init_norm = 1.0
        self._out.put(pb.JobMessage(hello=hello))

    def _requests(self) -> Iterator[pb.JobMessage]:
        while (msg := self._out.get()) is not None:
            yield msg

    def _read(self) -> None:
        try:
            for msg in self.call:
                if msg.WhichOneof("kind") == "ack":
                    with self._acks:
                        self.acked = max(self.acked, msg.ack.seq)
                        self._acks.notify_all()
        except grpc.RpcError:
            pass

    def angle(self, t: np.ndarray) -> np.ndarray:
        return self.plateau * (1.0 - np.exp(-t[:, None] / self.tau))

    def send(self, n: int) -> int:
        t = np.arange(self.step + 1, self.step + n + 1, dtype=np.float64)
        theta, prev = self.angle(t), self.angle(t - 1)
        ones = np.ones((n, self.L))
        self.step += n
        self.seq += 1
        batch = pb.StepBatch(
            seq=self.seq,
            steps=[int(s) for s in t],
            times=[time.time()] * n,
            num_layers=self.L,
            norm=pack(ones),
            norm_prev=pack(ones),
            dist0=pack(2 * np.sin(theta / 2)),  # unit vectors theta apart
            dstep=pack(2 * np.sin(np.maximum(theta - prev, 1e-6) / 2)),
            loss=list(2.0 * np.exp(-t / 150.0)),
        )
        self._out.put(pb.JobMessage(steps=batch))
        return self.seq

    def wait(self, seq: int, timeout: float = 60.0) -> None:
        with self._acks:
            if not self._acks.wait_for(lambda: self.acked >= seq, timeout):
                raise SystemExit(f"{self.run}: no ack for batch {seq}")

    def close(self) -> None:
        self._out.put(None)
        self.channel.close()


PAINT_JS = """() => {
  const fcp = performance.getEntriesByName('first-contentful-paint')[0];
  const res = performance.getEntriesByType('resource');
  const nav = performance.getEntriesByType('navigation')[0];
  // encodedBodySize: the bytes as sent (gzip), also when the browser's cache answered this time.
  const sum = (rs, key) => rs.reduce((a, r) => a + r[key], 0);
  const ui = [nav, ...res.filter(r => r.name.includes('/ui/'))];
  const api = res.filter(r => r.name.includes('/api/'));
  return { fcp: fcp ? fcp.startTime : null, ready: window.__ready, page: sum(ui, 'encodedBodySize'),
           pageRaw: sum(ui, 'decodedBodySize'), api: sum(api, 'encodedBodySize') };
}"""
# The moment the view says it is ready, in the page's clock (navigation start = 0).
MARK_READY = """() => new Promise(resolve => {
  const el = document.getElementById('view');
  const done = () => { window.__ready = performance.now(); resolve(); };
  if (el.dataset.ready) return done();
  new MutationObserver((_, o) => { if (el.dataset.ready) { o.disconnect(); done(); } })
    .observe(el, { attributes: true });
})"""


def measure(context: Any, url: str, rounds: int, runs: list[Feeder]) -> dict[str, list[float]]:
    keys = ("fcp", "table", "run_page", "visible", "page_kb", "page_raw_kb", "history_kb")
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        page = context.new_page()
        # The ready mark is installed before the page's own script runs (an init script).
        page.add_init_script("document.addEventListener('DOMContentLoaded', () => (" + MARK_READY + ")());")
        page.goto(url + "/", wait_until="commit")
        page.wait_for_selector("#view[data-ready]", timeout=30000)
        page.wait_for_function("() => window.__ready !== undefined")
        m = page.evaluate(PAINT_JS)
        out["fcp"].append(m["fcp"])
        out["table"].append(m["ready"])
        out["page_kb"].append(m["page"] / 1024)
        out["page_raw_kb"].append(m["pageRaw"] / 1024)
        assert page.locator("#runs tbody tr").count() == len(runs)
        page.close()

        feeder = runs[r % len(runs)]
        page = context.new_page()
        page.add_init_script("document.addEventListener('DOMContentLoaded', () => (" + MARK_READY + ")());")
        page.goto(f"{url}/#/run/{feeder.run}", wait_until="commit")
        page.wait_for_selector("#view[data-ready]", timeout=60000)
        page.wait_for_function("() => window.__ready !== undefined")
        m = page.evaluate(PAINT_JS)
        out["run_page"].append(m["ready"])
        out["history_kb"].append(m["api"] / 1024)
        page.wait_for_timeout(300)
        seq = feeder.send(1)
        feeder.wait(seq)
        t0 = time.perf_counter()
        page.wait_for_function(
            "(s) => document.querySelector('#summary [data-k=\"step\"]').textContent === String(s)",
            arg=feeder.step,
            polling=20,
            timeout=30000,
        )
        out["visible"].append((time.perf_counter() - t0) * 1000)
        page.close()
    return out


def screenshot(context: Any, address: str, url: str, path: Path) -> None:
    """A small real CNN trained with layrot.Layca under remote control; its run page as a PNG."""
    import torch
    from torch import nn

    import layrot
    from layrot.client.query import QueryClient

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=3**-3, alpha=0.0)
    handle = layrot.watch(model, opt, run="cnn-layca", collector=address, control=True, total_steps=400)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    for t in range(1, 401):
        if t == 200:  # halfway: the operator asks for faster rotation of the last layers
            handle.flush(10)
            with QueryClient(address) as q:
                q.set_control(
                    "cnn-layca",
                    pb.RateCommand(
                        alpha=0.6, schedule=pb.RhoSchedule(rho0=3**-3), issued_by="bench", reason="last layers"
                    ),
                )
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    handle.flush(10)
    handle.close()
    page = context.new_page()
    page.goto(f"{url}/#/run/cnn-layca")
    page.wait_for_selector("#view[data-ready]", timeout=30000)
    page.wait_for_timeout(500)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    page.close()
    print(f"screenshot: {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--screenshot", type=Path, default=None, help="also save a real job's run page as this PNG")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if why := browser_missing():
        raise SystemExit(why)
    with tempfile.TemporaryDirectory() as tmp:
        mport = free_port()
        proc, address = start_collector(tmp, metrics_port=mport)
        url = f"http://127.0.0.1:{mport}"
        feeders: list[Feeder] = []
        try:
            t0 = time.perf_counter()
            for i in range(args.runs):
                f = Feeder(address, f"run-{i:02d}", args.layers, seed=i)
                for _ in range(0, args.steps, 100):
                    f.send(min(100, args.steps - (f.step)))
                f.wait(f.seq)
                feeders.append(f)
            print(
                f"fed {args.runs} runs x {args.layers} layers x {args.steps} steps in {time.perf_counter() - t0:.1f} s"
            )
            with chromium(width=1280, height=900) as context:
                got = measure(context, url, args.rounds, feeders)
                if args.screenshot:
                    screenshot(context, address, url, args.screenshot)
        finally:
            for f in feeders:
                f.close()
            proc.terminate()
            proc.wait(10)

    def row(label: str, values: list[float], unit: str, target: str = "") -> None:
        med = statistics.median(values)
        print(f"{label:<44} median {med:8.1f} {unit:<3} (min {min(values):.1f}, max {max(values):.1f}) {target}")

    print(f"{args.runs} runs x {args.layers} layers x {args.steps} steps, {args.rounds} fresh page loads each")
    row("runs table: first contentful paint", got["fcp"], "ms", "target <= 1000 ms")
    row("runs table: filled with every run", got["table"], "ms", "target <= 1000 ms")
    row(f"run page ({args.layers} curves + heatmap): drawn", got["run_page"], "ms")
    row("new report -> visible on the run page", got["visible"], "ms", "target <= 2000 ms")
    row("page weight (HTML + JS + CSS, as sent, gzip)", got["page_kb"], "KB", "target <= 500 KB")
    row("page weight (HTML + JS + CSS, uncompressed)", got["page_raw_kb"], "KB", "target <= 500 KB")
    row("run page's history download (as sent)", got["history_kb"], "KB")


if __name__ == "__main__":
    main()
