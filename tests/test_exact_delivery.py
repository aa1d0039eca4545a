"""Acked => in the history store, under real faults: a locked database and a full disk.

``ExactJob`` is a job written against the protocol's contract alone (not the
agent's reporter): it keeps every batch until an ``Ack`` covers it (``Ack.seq``
or ``Ack.stored``), sends a batch the collector could not store (``Nack``
with ``retry``) again under a new seq, and counts as dropped what is refused
for good. At *every* Ack it reads the history (SQLite here, PostgreSQL in
tests/test_store_postgres.py) through a connection of its own and checks that
every step the Ack covers is there. At the end: steps in the history + steps
dropped = steps trained, with 0 dropped for an innocent job.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from layrot.proto import layrot_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def _connect(db: str):
    """A connection of the test's own to the collector's history: a SQLite file or a postgresql:// URL."""
    if db.startswith("postgresql://"):
        import psycopg

        return psycopg.connect(db, autocommit=True)  # autocommit: every read sees the newest commits
    return sqlite3.connect(db, timeout=30)


class ExactJob:
    """A protocol-level job that checks the store against every Ack it gets."""

    def __init__(self, collector, ingest, sim_job, run: str, db_path: str) -> None:
        self.job = sim_job(run=run, layer_sizes=(16, 32, 8), seed=3)
        self.run = run
        self.session = ingest(collector)
        self.session.send(self.job.hello(run_key="owner-key"))
        first = self.session.recv()
        assert first.WhichOneof("kind") == "welcome", first
        self.welcome = first.welcome
        self.check = _connect(db_path)  # our own connection, never the collector's
        self.mark = "?" if isinstance(self.check, sqlite3.Connection) else "%s"
        self.seq = 0
        self.unacked: dict[int, list[int]] = {}  # seq -> steps
        self.trained = 0
        self.acked_steps: set[int] = set()
        self.dropped = 0
        self.nacked = 0
        self.acks = 0
        self.retry: list[tuple[float, list[int]]] = []  # (due, steps) of nacked batches to send again
        self.missing_at_ack: list[int] = []  # acknowledged steps not in the store (must stay empty)

    def _send(self, steps: list[int]) -> None:
        self.seq += 1
        self.unacked[self.seq] = steps
        self.session.send(self.job.batch_for(steps, seq=self.seq))

    def train(self, n_steps: int) -> None:
        b = self.job.batch(n_steps)
        self.trained += n_steps
        self._send(list(b.steps))

    def _stored(self, steps: list[int]) -> set[int]:
        m = self.mark
        marks = ",".join([m] * len(steps))
        return {
            r[0]
            for r in self.check.execute(
                "SELECT step FROM steps JOIN runs ON runs.id = steps.run_id"
                f" WHERE runs.run = {m} AND step IN ({marks})",
                (self.run, *steps),
            )
        }

    def pump(self, timeout: float = 0.0) -> None:
        """Handle what the collector sent (waiting up to ``timeout`` for the first message); resend what is due."""
        now = time.monotonic()
        due = [steps for t, steps in self.retry if t <= now]
        self.retry = [(t, steps) for t, steps in self.retry if t > now]
        for steps in due:
            self._send(steps)  # again, under a new seq, as the Nack asked
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.session.received.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                return
            kind = msg.WhichOneof("kind")
            if kind == "error":
                assert msg.error.code in ("bad_batch",), msg.error  # no other error for an innocent job
            if kind != "ack":
                continue
            ack = msg.ack
            self.acks += 1
            covered = [s for s in self.unacked if s <= ack.seq] + [s for s in ack.stored if s in self.unacked]
            steps = [st for s in covered for st in self.unacked[s]]
            if steps:
                present = self._stored(steps)
                self.missing_at_ack += [st for st in steps if st not in present]
            for s in covered:
                self.acked_steps.update(self.unacked.pop(s))
            for nack in ack.failed:
                steps = self.unacked.pop(nack.seq, None)
                if steps is None:
                    continue
                self.nacked += 1
                if nack.retry:
                    assert nack.code == "store_failed" and nack.message and nack.retry_after_s > 0
                    self.retry.append((time.monotonic() + nack.retry_after_s, steps))
                else:
                    self.dropped += len(steps)
            deadline = 0.0  # after the first message, take only what is already there

    def finish(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (self.unacked or self.retry) and time.monotonic() < deadline:
            self.pump(0.2)
        assert not self.unacked and not self.retry, f"{len(self.unacked) + len(self.retry)} batches never acknowledged"

    def history(self) -> set[int]:
        return {
            r[0]
            for r in self.check.execute(
                f"SELECT step FROM steps JOIN runs ON runs.id = steps.run_id WHERE runs.run = {self.mark}", (self.run,)
            )
        }

    def verify(self) -> None:
        """The two acceptance equations, then close our connection."""
        hist = self.history()
        assert self.missing_at_ack == []
        assert len(hist) + self.dropped == self.trained
        assert self.dropped == 0
        assert hist == set(range(1, self.trained + 1)) == self.acked_steps
        self.check.close()


def test_locked_database_never_acks_what_is_not_stored(collector_factory, ingest, sim_job, tmp_path):
    db = tmp_path / "locked.db"
    # A short busy timeout, so that the lock below makes commits fail (not just wait).
    c = collector_factory(db, store_busy_timeout=0.3)
    job = ExactJob(c, ingest, sim_job, "locked", str(db))
    assert job.welcome.stored_step == 0 and job.welcome.collector_version
    for _ in range(20):
        job.train(3)
        job.pump(0.01)
    blocker = sqlite3.connect(str(db), isolation_level=None, timeout=30)
    blocker.execute("BEGIN EXCLUSIVE")
    t_end = time.monotonic() + 3.0
    try:
        while time.monotonic() < t_end:
            job.train(2)
            job.pump(0.05)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    for _ in range(20):
        job.train(3)
        job.pump(0.01)
    job.finish()
    assert job.nacked > 0, "the lock should have made some commits fail"
    assert c.store.errors > 0
    job.verify()
    # Welcome on a new session: the highest stored step of this run and rank.
    s2 = ingest(c)
    s2.send(job.job.hello(run_key="owner-key"))
    w = s2.recv()
    assert w.WhichOneof("kind") == "welcome" and w.welcome.stored_step == job.trained


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def _fill(path: Path) -> int:
    """Write zeros into ``path`` until the file system is full; returns the bytes written."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        try:
            while True:
                n += f.write(chunk)
        except OSError:
            pass
    return n


def test_full_disk_never_acks_what_is_not_stored(collector_factory, ingest, sim_job, tmp_path):
    fs = tmp_path / "small"
    if not _mount_tmpfs(fs, "16m"):
        pytest.skip("needs root and mount -t tmpfs (a small file system that can be filled)")
    try:
        db = fs / "full.db"
        c = collector_factory(db)
        job = ExactJob(c, ingest, sim_job, "full", str(db))
        for _ in range(20):
            job.train(3)
            job.pump(0.01)
        job.finish(10)
        filler = fs / "filler"
        _fill(filler)
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            job.train(5)
            job.pump(0.02)
        assert job.nacked > 0, "the full disk should have made some commits fail"
        filler.unlink()  # space again: the resent batches go in
        for _ in range(20):
            job.train(3)
            job.pump(0.01)
        job.finish()
        job.verify()
        c.stop(grace=0.5)
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def test_poisoned_hellos_cost_an_innocent_job_nothing(collector, ingest, sim_job):
    """30 Hellos with numel = 2**64-1 beside an innocent job: refused one by one, 0 innocent steps lost, no orphans."""
    job = ExactJob(collector, ingest, sim_job, "innocent", collector.db_path)
    stop = threading.Event()
    refused = []

    def poison() -> None:
        for i in range(30):
            if stop.is_set():
                return
            s = ingest(collector)
            layer = pb.Layer(name="w", index=0, shape=[2], init_norm=1.0, numel=2**64 - 1)
            s.send(pb.Hello(run=f"poison-{i}", layers=[layer], world_size=1))
            s.send(pb.StepBatch(seq=1, steps=[1], times=[time.time()], num_layers=1))
            s.wait_end(5)
            refused.extend(m.error.code for m in s.drain(0.05) if m.WhichOneof("kind") == "error")

    t = threading.Thread(target=poison)
    t.start()
    for _ in range(60):
        job.train(2)
        job.pump(0.01)
    t.join(60)
    stop.set()
    job.finish()
    job.verify()
    assert refused == ["bad_hello"] * 30
    conn = sqlite3.connect(collector.db_path)
    try:
        orphans = conn.execute("SELECT COUNT(*) FROM steps WHERE run_id NOT IN (SELECT id FROM runs)").fetchone()[0]
        runs = [r[0] for r in conn.execute("SELECT run FROM runs")]
    finally:
        conn.close()
    assert orphans == 0 and runs == ["innocent"]


def test_orphan_rows_of_an_older_version_are_never_inherited(collector_factory, ingest, sim_job, tmp_path):
    db = tmp_path / "orphans.db"
    c = collector_factory(db)
    c.stop()
    # Rows under run id 7 without a runs row (what a poisoned transaction left before this fix).
    conn = sqlite3.connect(str(db))
    conn.executemany(
        "INSERT INTO steps (run_id, rank, step, time) VALUES (?, 0, ?, 0.0)", [(7, s) for s in range(1, 51)]
    )
    conn.commit()
    conn.close()
    c2 = collector_factory(db)
    job = sim_job(run="fresh")
    s = ingest(c2)
    s.send(job.hello())
    s.send(job.batch(1))
    s.wait_ack(1)
    conn = sqlite3.connect(str(db))
    try:
        (run_id,) = conn.execute("SELECT id FROM runs WHERE run = 'fresh'").fetchone()
        steps = [r[0] for r in conn.execute("SELECT step FROM steps WHERE run_id = ?", (run_id,))]
    finally:
        conn.close()
    assert run_id > 7 and steps == [1]
