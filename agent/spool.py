"""A durable, bounded, on-disk spool of report batches: the job side of *nothing lost*.

The reporter's exporter thread appends every batch it packs; the connection thread
marks a record acknowledged when the collector has stored it. What is not
acknowledged survives the process: a resumed job (same run) replays it, and
``layrot-agent sync`` uploads it after an offline run.

Layout of one spool (one run and rank)::

    <root>/<run>.r<rank>/
        hello.pb            the run's Hello (layer table), written once, atomically
        00000001.seg ...    segments of records, appended, deleted when fully acknowledged
        00000001.ack ...    ids of the segment's acknowledged records (8 bytes each), appended

A record is a 24-byte header (magic, payload length, record id, steps, CRC-32 of the
payload) followed by the payload (a serialized ``StepBatch``). Record ids grow across
processes that share the spool. A torn record at the end of a segment (the process
died mid-write) fails its length or CRC check and is cut off when the spool is opened.

The spool is bounded in bytes: when a new record does not fit, the oldest segment is
deleted and its unacknowledged steps are counted in ``dropped_steps`` (recent steps
matter most to a live view, and the bound is meant to be generous). Nothing here ever
raises into the caller for an I/O error: a full or read-only disk is counted in
``write_errors``, logged once, and the spool stops writing until it can again.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

__all__ = ["Spool", "SpoolStats", "SpoolRecord", "default_spool_root", "spool_dir_name", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_SEGMENT_BYTES = 8 << 20
_MAGIC = b"LRS1"
_HEADER = struct.Struct("<4sIQII")  # magic, payload length, record id, steps, crc32
_SEGMENT = re.compile(r"^(\d{8})\.seg$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def default_spool_root() -> Path:
    """``LAYROT_SPOOL_DIR``, else ``$XDG_CACHE_HOME/layrot/spool``, else ``~/.cache/layrot/spool``."""
    env = os.environ.get("LAYROT_SPOOL_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "layrot" / "spool"


def spool_dir_name(run: str, rank: int) -> str:
    """A file-system-safe folder name for one run and rank (distinct runs never share one)."""
    safe = _UNSAFE.sub("_", run)[:120] or "run"
    if safe != run:
        # Two run names that differ only in unsafe characters must not collide.
        safe += "-" + format(zlib.crc32(run.encode()), "08x")
    return f"{safe}.r{int(rank)}"


@dataclass(frozen=True)
class SpoolRecord:
    """One unacknowledged batch on disk."""

    record_id: int
    steps: int
    payload: bytes


@dataclass
class SpoolStats:
    """What the spool holds and what it lost (read by ``handle.stats``)."""

    bytes_on_disk: int = 0
    records_written: int = 0
    steps_written: int = 0
    dropped_steps: int = 0
    write_errors: int = 0
    torn_records: int = 0


@dataclass
class _Segment:
    number: int
    path: Path
    size: int = 0
    unacked: dict[int, int] = field(default_factory=dict)  # record id -> steps
    offsets: dict[int, int] = field(default_factory=dict)  # record id -> header position, for read()


class Spool:
    """One run's (and rank's) spool directory. Thread-safe; cheap when nothing is pending."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be > 0")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = min(int(segment_bytes), self.max_bytes)
        self.stats = SpoolStats()
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._where: dict[int, _Segment] = {}
        self._next_id = 1
        self._file: BinaryIO | None = None
        self._warned = False
        self._dropped_ids: list[int] = []  # records lost to the bound, until take_dropped()
        self._lock_file: BinaryIO | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._load()

    @classmethod
    def for_run(cls, run: str, rank: int = 0, root: str | os.PathLike[str] | None = None, **kw: int) -> Spool:
        """The spool of ``run`` / ``rank`` under ``root`` (default :func:`default_spool_root`)."""
        base = Path(root) if root is not None else default_spool_root()
        return cls(base / spool_dir_name(run, rank), **kw)

    # ------------------------------------------------------------ hello

    def write_hello(self, hello: bytes) -> None:
        """Keep the run's Hello (atomically replaced; what ``sync`` announces)."""
        tmp = self.directory / "hello.pb.tmp"
        try:
            tmp.write_bytes(hello)
            os.replace(tmp, self.directory / "hello.pb")
        except OSError as exc:
            self._io_error("writing the run's Hello", exc)

    def read_hello(self) -> bytes | None:
        """The stored Hello, or None."""
        try:
            return (self.directory / "hello.pb").read_bytes()
        except OSError:
            return None

    # ------------------------------------------------------------ records

    def append(self, payload: bytes, steps: int) -> int | None:
        """Write one record; its id, or None when it could not be written (counted)."""
        need = _HEADER.size + len(payload)
        with self._lock:
            if need > self.max_bytes:
                self.stats.dropped_steps += steps
                return None
            while self.stats.bytes_on_disk + need > self.max_bytes and self._segments:
                self._drop_oldest()
            seg = self._segments[-1] if self._segments else None
            if seg is None or (seg.size and seg.size + need > self.segment_bytes) or self._file is None:
                seg = self._new_segment()
                if seg is None:
                    self.stats.dropped_steps += steps
                    return None
            rid = self._next_id
            offset = seg.size
            header = _HEADER.pack(_MAGIC, len(payload), rid, int(steps), zlib.crc32(payload))
            try:
                assert self._file is not None
                self._file.write(header + payload)
                self._file.flush()  # into the page cache: survives the process, not the host
            except OSError as exc:
                self._io_error("writing to the spool", exc)
                self._close_file()
                self.stats.dropped_steps += steps
                return None
            self._next_id += 1
            seg.size += need
            seg.unacked[rid] = int(steps)
            seg.offsets[rid] = offset
            self._where[rid] = seg
            self.stats.bytes_on_disk += need
            self.stats.records_written += 1
            self.stats.steps_written += int(steps)
            return rid

    def ack(self, record_id: int) -> None:
        """The collector stored this record: forget it (a fully acknowledged segment is deleted)."""
        with self._lock:
            seg = self._where.pop(record_id, None)
            if seg is None:
                return
            seg.unacked.pop(record_id, None)
            seg.offsets.pop(record_id, None)
            if not seg.unacked and (seg is not self._segments[-1] or seg.size >= self.segment_bytes):
                self._remove(seg)
                return
            try:
                with open(seg.path.with_suffix(".ack"), "ab") as f:
                    f.write(record_id.to_bytes(8, "little"))
            except OSError as exc:  # the record is merely resent after a restart
                self._io_error("recording an acknowledgement", exc)

    def pending(self) -> Iterator[SpoolRecord]:
        """Unacknowledged records on disk, oldest first (read lazily, segment by segment)."""
        with self._lock:
            segments = [(s.path, dict(s.unacked)) for s in self._segments if s.unacked]
        for path, unacked in segments:
            for rid, steps, payload, _ in _read_segment(path)[0]:
                if rid in unacked:
                    yield SpoolRecord(rid, steps, payload)

    def pending_index(self) -> list[tuple[int, int]]:
        """(record id, steps) of every unacknowledged record, oldest first, without reading payloads."""
        with self._lock:
            return [(rid, steps) for s in self._segments for rid, steps in sorted(s.unacked.items())]

    def read(self, record_id: int) -> bytes | None:
        """The payload of one unacknowledged record, or None when it is gone or fails its CRC."""
        with self._lock:
            seg = self._where.get(record_id)
            offset = seg.offsets.get(record_id) if seg is not None else None
            path = seg.path if seg is not None else None
        if path is None or offset is None:
            return None
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    return None
                magic, length, rid, _, crc = _HEADER.unpack(head)
                payload = f.read(length) if magic == _MAGIC and rid == record_id else b""
        except OSError:
            return None
        return payload if len(payload) == length and zlib.crc32(payload) == crc else None

    def take_dropped(self) -> list[int]:
        """Ids of records the byte bound dropped since the last call (their steps are in ``dropped_steps``)."""
        with self._lock:
            out, self._dropped_ids = self._dropped_ids, []
            return out

    def try_lock(self) -> bool:
        """Take this spool for one process (an advisory ``flock``); False when another live process holds it.

        A running job holds its spool's lock, so ``layrot-agent sync`` and a second job with the
        same run and rank leave it alone. Without ``fcntl`` (Windows) there is no lock and this is True.
        """
        if self._lock_file is not None:
            return True
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return True
        try:
            f = open(self.directory / "lock", "ab")  # noqa: SIM115 (held until close)
        except OSError as exc:
            self._io_error("opening the spool lock", exc)
            return True  # a read-only spool cannot be shared harmfully either
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lock_file = f
        return True

    def is_empty(self) -> bool:
        """True when no unacknowledged record is left."""
        with self._lock:
            return not any(s.unacked for s in self._segments)

    @property
    def pending_steps(self) -> int:
        """Steps written and not yet acknowledged."""
        with self._lock:
            return sum(sum(s.unacked.values()) for s in self._segments)

    def close(self) -> None:
        """Close the open segment; delete the spool's folder when nothing is left in it."""
        with self._lock:
            self._close_file()
            for seg in list(self._segments):
                if not seg.unacked:
                    self._remove(seg)
            if not self._segments:
                for name in ("hello.pb", "hello.pb.tmp", "lock"):
                    try:
                        (self.directory / name).unlink()
                    except OSError:
                        pass
                try:
                    self.directory.rmdir()
                except OSError:
                    pass
            if self._lock_file is not None:
                try:
                    self._lock_file.close()  # releases the flock
                except OSError:
                    pass
                self._lock_file = None

    # ------------------------------------------------------------ internals

    def _load(self) -> None:
        for path in sorted(self.directory.iterdir()):
            m = _SEGMENT.match(path.name)
            if not m:
                continue
            records, good_size = _read_segment(path)
            try:
                actual = path.stat().st_size
                if good_size < actual:
                    self.stats.torn_records += 1
                    with open(path, "r+b") as f:
                        f.truncate(good_size)
            except OSError as exc:
                self._io_error("repairing a spool segment", exc)
            seg = _Segment(int(m.group(1)), path, good_size)
            acked = _read_acks(path.with_suffix(".ack"))
            for rid, steps, _, offset in records:
                self._next_id = max(self._next_id, rid + 1)
                if rid not in acked:
                    seg.unacked[rid] = steps
                    seg.offsets[rid] = offset
                    self._where[rid] = seg
            if seg.unacked:
                self._segments.append(seg)
                self.stats.bytes_on_disk += seg.size
            else:
                self._unlink(path)
                self._unlink(path.with_suffix(".ack"))

    def _new_segment(self) -> _Segment | None:
        self._close_file()
        number = (self._segments[-1].number + 1) if self._segments else 1
        path = self.directory / f"{number:08d}.seg"
        try:
            self._file = open(path, "ab")  # noqa: SIM115 (kept open across appends)
        except OSError as exc:
            self._io_error("opening a spool segment", exc)
            return None
        seg = _Segment(number, path)
        self._segments.append(seg)
        return seg

    def _drop_oldest(self) -> None:
        seg = self._segments[0]
        lost = sum(seg.unacked.values())
        self._dropped_ids.extend(seg.unacked)
        if lost:
            self.stats.dropped_steps += lost
            log.warning(
                "layrot: spool %s is full (%d bytes); dropped %d oldest steps", self.directory, self.max_bytes, lost
            )
        if seg is self._segments[-1]:
            self._close_file()
        self._remove(seg)

    def _remove(self, seg: _Segment) -> None:
        for rid in seg.unacked:
            self._where.pop(rid, None)
        self._segments.remove(seg)
        self.stats.bytes_on_disk -= seg.size
        if self._file is not None and getattr(self._file, "name", None) == str(seg.path):
            self._close_file()
        self._unlink(seg.path)
        self._unlink(seg.path.with_suffix(".ack"))

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._io_error("deleting a spool segment", exc)

    def _io_error(self, what: str, exc: OSError) -> None:
        self.stats.write_errors += 1
        if not self._warned:
            self._warned = True
            log.warning("layrot: %s failed (%s); training continues, steps that cannot be kept are counted", what, exc)


def _read_acks(path: Path) -> set[int]:
    try:
        data = path.read_bytes()
    except OSError:
        return set()
    n = len(data) // 8  # a torn last id is ignored: that record is only resent
    return {int.from_bytes(data[8 * i : 8 * i + 8], "little") for i in range(n)}


def _read_segment(path: Path) -> tuple[list[tuple[int, int, bytes, int]], int]:
    """(records as (id, steps, payload, header position), length of the valid prefix) of one segment file."""
    try:
        data = path.read_bytes()
    except OSError:
        return [], 0
    out: list[tuple[int, int, bytes, int]] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        magic, length, rid, steps, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if magic != _MAGIC or end > len(data):
            break
        payload = data[pos + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        out.append((rid, steps, payload, pos))
        pos = end
    return out, pos
