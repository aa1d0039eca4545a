"""Bytes on disk per layer-sample of the history store, both backends.

Step rows as ingest builds them (records.step_rows: float64 blobs of rotation,
step_angle, weight_norm, rho and the raw inputs) go through the store's own
writer (``submit_batch``); the figure is the store's size divided by the
layer-samples written. SQLite: the file after a WAL checkpoint (TRUNCATE), the
whole file (every table, free pages, the empty schema). PostgreSQL:
``pg_total_relation_size`` of ``steps`` + ``samples`` (heap, TOAST, indexes)
after a VACUUM. The values are random (incompressible): the worst case.

    python benchmarks/history_size.py                         # SQLite only
    python benchmarks/history_size.py --db temp-postgresql    # SQLite and a throwaway PostgreSQL
    python benchmarks/history_size.py --db postgresql://...   # SQLite and that database (a schema of its own)

Cases: ``runs`` runs x ``layers`` layers x ``steps`` steps without and with
Layca's rho, and a DDP case of runs/ranks runs whose ``ranks`` ranks send
byte-identical measurements (stored once: the per-rank rows are time, loss,
command version). For DDP both figures are printed: per layer-sample of
every rank (what the history answers) and per distinct one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

import numpy as np

from layrot.server.store_api import LayerRecord, RunRecord, open_store


def _rows(rng: np.random.Generator, run_id: int, rank: int, steps: range, layers: int, rho: bool, vals=None):
    """Input rows (``STEP_COLUMNS``) of one batch; ``vals`` reuses another rank's float64 blobs."""
    S = len(steps)
    if vals is None:
        vals = [rng.random((S, layers)).tobytes() for _ in range(3 + rho)] + [None] * (not rho)
        vals += [rng.random((S, layers)).tobytes() for _ in range(3)]
    stride = layers * 8
    out = []
    for i, s in enumerate(steps):
        cut = [None if v is None else v[i * stride : (i + 1) * stride] for v in vals]
        out.append((run_id, rank, s, time.time(), 0.5, None, *cut[:4], *cut[4:], None, None))
    return out, vals


def fill(db: str, runs: int, layers: int, steps: int, ranks: int, rho: bool, batch: int = 50) -> int:
    """Write the history of ``runs`` runs; the layer-samples written (every rank counted)."""
    rng = np.random.default_rng(0)
    store = open_store(db)
    try:
        for r in range(1, runs + 1):
            lays = [LayerRecord(i, f"layer{i}", [64, 64], 1.0, 4096, "Linear") for i in range(layers)]
            store.create_run(
                RunRecord(r, f"run{r}", "pytorch", "2", "h", ranks, 1, {"layca": rho}, {}, 0.0, None, None, 0, lays)
            )
        for lo in range(1, steps + 1, batch):
            span = range(lo, min(lo + batch, steps + 1))
            for r in range(1, runs + 1):
                vals = None
                for rank in range(ranks):
                    rows, vals = _rows(rng, r, rank, span, layers, rho, vals)
                    store.submit_batch(rows, r, time.time(), 0)
            if store.pending_rows > 20_000:
                store.flush(120)
        assert store.flush(600)
    finally:
        store.close()
    return runs * ranks * steps * layers


def sqlite_bytes(path: str) -> int:
    """The file's size after a WAL checkpoint."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return os.path.getsize(path) + (os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0)


def postgres_bytes(url: str) -> int:
    """pg_total_relation_size of the history tables (after VACUUM)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE steps")
        conn.execute("VACUUM ANALYZE samples")
        ((n,),) = conn.execute("SELECT pg_total_relation_size('steps') + pg_total_relation_size('samples')").fetchall()
    return int(n)


@contextlib.contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """``url`` with a schema of its own (dropped at the end), so the sizes count only this case's rows."""
    import psycopg

    name = f"layrot_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def temp_postgresql() -> contextlib.AbstractContextManager[str]:
    """A throwaway PostgreSQL cluster (tests/postgres_server.py), removed at the end; yields a database URL."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from postgres_server import temp_postgresql as make

    return make()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--ranks", type=int, default=4, help="ranks of the DDP case (byte-identical measurements)")
    ap.add_argument("--db", help="also PostgreSQL: a URL, or temp-postgresql for a throwaway server")
    args = ap.parse_args()
    cases = [
        ("no rho", args.runs, 1, False),
        ("with rho", args.runs, 1, True),
        (f"DDP {args.ranks} identical ranks, rho", max(1, args.runs // args.ranks), args.ranks, True),
    ]
    with contextlib.ExitStack() as stack:
        url = args.db
        if url == "temp-postgresql":
            url = stack.enter_context(temp_postgresql())
        for label, runs, ranks, rho in cases:
            shape = f"{runs} runs x {ranks} rank(s) x {args.layers} layers x {args.steps} steps"
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "history.db")
                n = fill(path, runs, args.layers, args.steps, ranks, rho)
                b = sqlite_bytes(path)
                _print("sqlite", label, shape, b, n, ranks)
            if url:
                with postgres_schema(url) as db:
                    n = fill(db, runs, args.layers, args.steps, ranks, rho)
                    _print("postgresql", label, shape, postgres_bytes(db), n, ranks)


def _print(backend: str, label: str, shape: str, nbytes: int, samples: int, ranks: int) -> None:
    per = nbytes / samples
    extra = f", {per * ranks:.2f} per distinct layer-sample" if ranks > 1 else ""
    print(f"{backend:10s} {label:30s} {shape}: {nbytes / 1e6:.1f} MB, {per:.2f} bytes/layer-sample{extra}")


if __name__ == "__main__":
    main()
