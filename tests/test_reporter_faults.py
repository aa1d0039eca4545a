"""The real reporter under real store faults: a torch job with ``layrot.watch`` (every=1, spool on).

A collector whose db is locked by another connection (``BEGIN EXCLUSIVE``) for a few seconds,
and one whose db sits on a small tmpfs that fills and is freed: the store fails commits, the
collector Nacks those batches, the reporter keeps and resends them. At the end ``flush()`` is
True, ``handle.stats`` dropped 0, and the history (exported through the query client) holds
every trained step, once.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import layrot  # noqa: E402
from layrot.client.query import QueryClient  # noqa: E402

pytestmark = pytest.mark.timeout(180)


class TinyJob:
    """A small MLP trained on random data, watched every step with the spool on (the default)."""

    def __init__(self, address: str, run: str) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.x, self.y = torch.randn(64, 16), torch.randint(0, 4, (64,))
        self.handle = layrot.watch(
            self.model, self.opt, run=run, collector=address, every=1, reporter_options={"backoff_max": 0.5}
        )
        self.trained = 0
        self.run = run
        self.address = address

    def train(self, steps: int, pause: float = 0.0) -> None:
        for _ in range(steps):
            self.opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
            self.handle.observe_loss(loss)
            loss.backward()
            self.opt.step()
            self.trained += 1
            if pause:
                time.sleep(pause)

    def train_for(self, seconds: float, pause: float = 0.01) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.train(1, pause)

    def verify(self) -> dict:
        assert self.handle.flush(60.0), f"flush timed out: {self.handle.stats}"
        stats = self.handle.stats
        hist = QueryClient(self.address).history(self.run)
        self.handle.close()
        steps = [int(s) for s in hist.steps]
        assert stats.dropped == 0, stats
        assert steps == list(range(1, self.trained + 1)), (len(steps), self.trained)
        assert len(steps) + stats.dropped == self.trained
        return {"trained": self.trained, "stats": stats}


def _store_failures(c) -> int:
    return c.store.errors


def test_locked_db_real_reporter_loses_nothing(collector_factory, tmp_path):
    db = tmp_path / "locked.db"
    c = collector_factory(db, store_busy_timeout=0.3)  # short: the lock fails commits instead of stalling them
    job = TinyJob(c.grpc_address, "locked-real")
    job.train(40, 0.005)
    assert job.handle.flush(30.0)
    blocker = sqlite3.connect(str(db), isolation_level=None, timeout=30)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        job.train_for(3.0)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    job.train(40, 0.005)
    assert _store_failures(c) > 0, "the lock should have failed some commits"
    job.verify()


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass


def test_full_disk_real_reporter_loses_nothing(collector_factory, tmp_path):
    fs = tmp_path / "small"
    if not _mount_tmpfs(fs, "16m"):
        pytest.skip("needs root and mount -t tmpfs (a small file system that can be filled)")
    try:
        db = fs / "full.db"
        c = collector_factory(db)
        job = TinyJob(c.grpc_address, "full-real")  # its spool is elsewhere (tests/conftest.py: a temp dir)
        job.train(40, 0.005)
        assert job.handle.flush(30.0)
        filler = fs / "filler"
        _fill(filler)
        job.train_for(3.0)
        failed = _store_failures(c)
        filler.unlink()  # space again: the kept batches go in
        job.train(40, 0.005)
        assert failed > 0, "the full disk should have failed some commits"
        job.verify()
        c.stop(grace=0.5)
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)
