"""The history store's interface: what the collector's parts may call, whichever backend holds the rows.

Two backends implement ``HistoryStore``: SQLite (server/store.py, the default, one embedded
file) and PostgreSQL (server/store_postgres.py, ``serve --db postgresql://user@host/db``).
``open_store`` picks one from the ``--db`` value; the PostgreSQL module (and psycopg) is
imported only when a ``postgresql://`` URL is given, so the default install needs neither.

Both keep the invariant ingest relies on, **acked => stored**: a queued item's token
reaches ``on_commit(tokens, new_rows)`` only after the transaction holding it has
committed, and ``on_failure(tokens, reason)`` when it did not, never both, never neither.
Both make at-least-once delivery idempotent (one row per (run, rank, step), a resend
replaces it and is not counted as new), check every value before it is queued
(``check_params``), version their schema (``SCHEMA_VERSION``, checked at open: an older
one is migrated, a newer one refused with a ``StoreError`` naming the database).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# 2: runs.key_hash (run ownership). 3: steps split into steps (per rank) + samples (float32 values,
# once per identical content: DDP dedup), raw inputs no longer stored.
# Tables added later use CREATE TABLE IF NOT EXISTS;
# bump SCHEMA_VERSION for any change an older layrot must not open, and add its
# migration to both backends.
SCHEMA_VERSION = 3

# Bounds of every value that goes into SQL (check_params). SQLite integers and
# PostgreSQL BIGINTs are signed 64-bit: a Python int beyond them fails the whole batch.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_TEXT = 1 << 20  # characters of one TEXT value
MAX_BLOB = 256 << 20  # bytes of one BLOB / BYTEA value


@dataclass
class LayerRecord:
    """One row of the ``layers`` table."""

    index: int
    name: str
    shape: list[int]
    init_norm: float
    numel: int
    module_type: str
    sharded: bool = False


@dataclass
class RunRecord:
    """A run as stored, with its layer table and newest row (lowest rank)."""

    run_id: int
    run: str
    framework: str
    framework_version: str
    host: str
    world_size: int
    every: int
    capabilities: dict[str, bool]
    meta: dict[str, str]
    created: float
    last_seen: float | None
    first_report: float | None
    nonfinite: int
    layers: list[LayerRecord] = field(default_factory=list)
    last_rank: int | None = None
    last_row: tuple | None = None  # (step, time, loss, rotation, step_angle, weight_norm, rho)
    key_hash: str | None = None  # hash_run_key of the run's owner; None: not bound (older clients)
    stored_steps: dict[int, int] = field(default_factory=dict)  # rank -> highest stored step


def hash_run_key(key: str) -> str | None:
    """What the store keeps of a ``Hello.run_key`` (sha256 hex); None for an empty key.

    The key is a random secret of the job, not a password: a plain hash is
    enough to keep it out of the database and its backups.
    """
    return hashlib.sha256(key.encode()).hexdigest() if key else None


class StoreValueError(ValueError):
    """A value that the database would refuse (or that is absurdly large): refused before it is queued."""


class StoreError(RuntimeError):
    """The history database cannot be opened (e.g. a schema newer than this layrot) or read."""


def check_params(params: Sequence[Any]) -> None:
    """Raise StoreValueError unless every value binds to SQL and is within the store's bounds.

    Integers must fit signed 64 bits; text and blobs are bounded; only None,
    int, float, str and bytes are accepted (a numpy scalar or an object would
    fail the whole transaction at bind time).
    """
    for v in params:
        if v is None or isinstance(v, float):
            continue
        if isinstance(v, int):
            if not INT64_MIN <= v <= INT64_MAX:
                raise StoreValueError(f"integer {v} does not fit signed 64 bits")
        elif isinstance(v, str):
            if len(v) > MAX_TEXT:
                raise StoreValueError(f"text of {len(v)} characters (at most {MAX_TEXT})")
            if "\0" in v:  # PostgreSQL TEXT cannot hold NUL: refuse it on both backends alike
                raise StoreValueError("text with a NUL character")
        elif isinstance(v, (bytes, bytearray, memoryview)):
            if len(v) > MAX_BLOB:
                raise StoreValueError(f"blob of {len(v)} bytes (at most {MAX_BLOB})")
        else:
            raise StoreValueError(f"cannot store a {type(v).__name__}")


class HistoryStore(Protocol):
    """What the collector's parts call on the history store (ingest, queries, control, alerts, restore).

    ``submit*`` / ``create_run`` / ``insert_*`` / ``set_*`` queue writes (thread-safe,
    never blocking on the database); the reads run on the calling thread.
    """

    on_commit: Callable[[list[Any], list[int]], None] | None
    on_failure: Callable[[list[Any], str], None] | None
    errors: int  # failed transactions
    commits: int
    failed_items: int

    @property
    def description(self) -> str:
        """Where the history is, for logs (a file path, or a URL without its password)."""
        ...

    @property
    def pending_rows(self) -> int:
        """Rows (plus statements) queued but not yet committed."""
        ...

    # writes (queued)
    def submit_rows(self, rows: Sequence[Sequence[Any]], token: Any = None) -> None: ...
    def submit_batch(
        self,
        rows: Sequence[Sequence[Any]],
        run_id: int,
        last_seen: float | None,
        nonfinite: int,
        first_report: float | None = None,
        token: Any = None,
        urgent: bool = False,
    ) -> None: ...
    def create_run(self, rec: RunRecord, token: Any = None) -> None: ...
    def insert_run(self, rec: RunRecord) -> None: ...
    def set_world_size(self, run_id: int, world_size: int) -> None: ...
    def set_first_report(self, run_id: int, t: float) -> None: ...
    def update_progress(self, run_id: int, last_seen: float | None, nonfinite: int, token: Any = None) -> None: ...
    def insert_control_ack(self, params: Sequence[Any]) -> None: ...
    def insert_command(self, params: Sequence[Any]) -> None: ...
    def insert_audit(self, params: Sequence[Any]) -> None: ...
    def insert_alert(self, params: Sequence[Any]) -> None: ...
    def save_thresholds(self, run: str, overrides: str, updated: float) -> None: ...
    def barrier(self, token: Any) -> None: ...
    def flush(self, timeout: float | None = 30.0) -> bool: ...
    def close(self, timeout: float = 30.0) -> None: ...

    # maintenance (server/retention.py, the DeleteRun / Compact calls)
    def delete_run(self, run_id: int, run: str) -> int: ...
    def begin_delete_run(self, run_id: int, run: str) -> Callable[[], int]: ...
    def history_bytes(self) -> int: ...

    # reads
    def load_runs(
        self, after_id: int = 0, run_ids: Sequence[int] | None = None, names: Sequence[str] | None = None
    ) -> list[RunRecord]: ...
    def run_ids(self) -> list[int]: ...
    def runs_seen_since(self, since: float) -> list[int]: ...
    def history_page(self, run_id: int, rank: int, after_step: int, until_step: int, limit: int) -> list[tuple]: ...
    def ranks(self, run_id: int) -> list[int]: ...
    def highest_run_id(self) -> int: ...
    def stored_steps(self, run_id: int, rank: int, steps: Sequence[int]) -> list[int]: ...
    def current_commands(self, run_ids: Sequence[int] | None = None) -> list[tuple[int, int, bytes]]: ...
    def command_versions(self, run_ids: Sequence[int]) -> dict[int, int]: ...
    def last_applied(self, run_ids: Sequence[int] | None = None) -> list[tuple]: ...
    def last_rejected(self, run_ids: Sequence[int] | None = None) -> list[tuple]: ...

    # several collectors on one database (server/cluster.py)
    def allocate_run_id(self) -> int | None: ...
    def heartbeat(self, collector: str, changed: Mapping[int, int], now: float, start: bool = False) -> None: ...
    def holders(self, since: float, alive_since: float) -> list[tuple[int, str, int, float, bool]]: ...
    def recent_audit(self, run_id: int, limit: int) -> list[tuple]: ...
    def recent_steps(self, run_id: int, rank: int, limit: int) -> list[tuple[int, float]]: ...
    def alert_counts(self) -> dict[tuple[str, str, str, str], int]: ...
    def alert_runs(self) -> list[str]: ...
    def alerts_after(self, after_id: int, limit: int) -> list[tuple]: ...
    def recent_alerts(self, run: str, limit: int) -> list[tuple]: ...
    def load_thresholds(self) -> list[tuple[str, str]]: ...


_POSTGRES_URL = re.compile(r"^postgres(ql)?://", re.IGNORECASE)  # what libpq accepts
_ANY_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_postgres_url(db: str) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) connection URL."""
    return bool(_POSTGRES_URL.match(db))


def is_url(db: str) -> bool:
    """True for anything shaped like a URL (``scheme://...``), as opposed to a file path."""
    return bool(_ANY_URL.match(db))


def redact_url(db: str) -> str:
    """``db`` without the password of a URL (``postgresql://user:***@host/db``, ``?password=***``), for logs."""
    db = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", db)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", db) if is_url(db) else db


def open_store(
    db: str,
    on_commit: Callable[[list[Any], list[int]], None] | None = None,
    on_failure: Callable[[list[Any], str], None] | None = None,
    busy_timeout: float = 30.0,
) -> HistoryStore:
    """The history store for ``db``: a ``postgresql://`` URL or a SQLite file path (``:memory:`` too).

    ``busy_timeout``: how long a write waits for a lock (SQLite's busy timeout,
    PostgreSQL's lock_timeout and the wait for a pooled connection) before it
    fails, and its items are refused (Nacks) instead of acknowledged.
    A URL of another scheme is a ``StoreError``.
    """
    if is_postgres_url(db):
        from layrot.server.store_postgres import PostgresStore  # psycopg loads only here

        return PostgresStore(db, on_commit=on_commit, on_failure=on_failure, busy_timeout=busy_timeout)
    if is_url(db):
        raise StoreError(
            f"{redact_url(db).split('://', 1)[0]}:// is not a history backend: give a SQLite file path"
            " or a postgresql://user@host/db URL"
        )
    from layrot.server.store import Store

    return Store(db, on_commit=on_commit, on_failure=on_failure, busy_timeout=busy_timeout)
