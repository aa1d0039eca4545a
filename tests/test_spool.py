"""The job-side spool (agent/spool.py): what is not acknowledged survives, bounded and counted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layrot.agent.spool import Spool, spool_dir_name


def payload(i: int, n: int = 100) -> bytes:
    return bytes([i % 251]) * n + i.to_bytes(8, "little")


def test_pending_survives_a_new_process_and_acks_delete_segments(tmp_path):
    sp = Spool(tmp_path / "s", segment_bytes=1000)
    ids = [sp.append(payload(i), steps=i + 1) for i in range(20)]
    assert all(ids) and ids == sorted(ids)
    for rid in ids[:15]:
        sp.ack(rid)
    # No close(): the next process finds what the first left behind.
    again = Spool(tmp_path / "s", segment_bytes=1000)
    left = list(again.pending())
    assert [r.record_id for r in left] == ids[15:]
    assert [r.payload for r in left] == [payload(i) for i in range(15, 20)]
    assert again.pending_steps == sum(range(16, 21))
    # Segments whose records were all acknowledged are gone from the disk.
    segs = sorted(p.name for p in (tmp_path / "s").glob("*.seg"))
    assert len(segs) < 20 * (100 + 8 + 24) // 1000
    # Ids keep growing across processes sharing the spool.
    assert again.append(b"x", 1) > ids[-1]


def test_torn_tail_is_cut_and_counted(tmp_path):
    sp = Spool(tmp_path / "s")
    for i in range(3):
        sp.append(payload(i), 1)
    (seg,) = (tmp_path / "s").glob("*.seg")
    with open(seg, "ab") as f:
        f.write(b"LRS1\x10\x00")  # a header cut short by a crash
    good = seg.stat().st_size - 6
    again = Spool(tmp_path / "s")
    assert [r.payload for r in again.pending()] == [payload(i) for i in range(3)]
    assert again.stats.torn_records == 1 and seg.stat().st_size == good
    # A flipped byte in a payload fails its CRC: that record and what follows are dropped.
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF
    seg.write_bytes(bytes(data))
    assert [r.payload for r in Spool(tmp_path / "s").pending()] == [payload(0), payload(1)]


def test_bound_drops_oldest_and_counts(tmp_path):
    rec = 24 + len(payload(0))
    sp = Spool(tmp_path / "s", max_bytes=10 * rec, segment_bytes=2 * rec)
    for i in range(30):
        sp.append(payload(i), steps=2)
    assert sp.stats.bytes_on_disk <= 10 * rec
    kept = [r.payload for r in sp.pending()]
    assert kept == [payload(i) for i in range(30 - len(kept), 30)]  # the newest survive
    assert sp.stats.dropped_steps == 2 * (30 - len(kept)) and sp.stats.dropped_steps > 0
    # steps in the spool + steps counted as dropped = steps written
    assert sp.pending_steps + sp.stats.dropped_steps == 60
    assert sp.append(b"z" * (11 * rec), 5) is None and sp.stats.dropped_steps == 2 * (30 - len(kept)) + 5


def test_close_removes_an_empty_spool_and_keeps_a_pending_one(tmp_path):
    sp = Spool.for_run("run/ä b", 3, root=tmp_path)
    sp.write_hello(b"hello")
    rid = sp.append(b"p", 1)
    sp.close()
    again = Spool.for_run("run/ä b", 3, root=tmp_path)
    assert again.read_hello() == b"hello" and [r.payload for r in again.pending()] == [b"p"]
    again.ack(rid)
    again.close()
    assert not (tmp_path / spool_dir_name("run/ä b", 3)).exists()
    # Names that differ only in unsafe characters get different folders.
    assert spool_dir_name("a/b", 0) != spool_dir_name("a:b", 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "ack", "reopen"]), st.integers(0, 40)), max_size=60))
def test_pending_matches_a_model(tmp_path_factory, ops):
    d = tmp_path_factory.mktemp("spool")
    sp = Spool(d, segment_bytes=300)
    model: dict[int, bytes] = {}
    for op, k in ops:
        if op == "append":
            rid = sp.append(payload(k, 20 + k), 1)
            model[rid] = payload(k, 20 + k)
        elif op == "ack" and model:
            rid = sorted(model)[k % len(model)]
            sp.ack(rid)
            del model[rid]
        elif op == "reopen":
            sp = Spool(d, segment_bytes=300)
    assert {r.record_id: r.payload for r in sp.pending()} == model
    assert sp.pending_steps == len(model)


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_a_full_disk_is_counted_never_raised(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        sp = Spool(mnt / "s", segment_bytes=16 << 10)
        results = [sp.append(payload(i, 4000), 1) for i in range(40)]
        written = [r for r in results if r is not None]
        assert written and len(written) < 40
        assert sp.stats.write_errors > 0
        assert sp.pending_steps + sp.stats.dropped_steps == 40
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
