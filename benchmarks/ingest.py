"""Collector ingest throughput: real gRPC clients over loopback.

A real ``layrot-agent serve`` (history in SQLite and /metrics on) runs in its
own process; client processes run one real ``layrot.agent.reporter.Reporter``
per training run (20 runs of 200 layers by default) and keep them saturated.
The figure is the sustained rate of layer-samples the collector stored and
acknowledged, read from its own ``layrot_samples_ingested_total`` counter and
checked against the acknowledgements the clients received.

    python benchmarks/ingest.py                  # alerts as configured by default
    python benchmarks/ingest.py --compare-alerts # alerts on vs off, one run
    python benchmarks/ingest.py --compare-spool  # the clients' spool on vs off
    python benchmarks/ingest.py --runs 300 --step-rate 20   # jobs whose batches are one step at idle
    python benchmarks/ingest.py --db postgresql://user@host/db   # PostgreSQL history
    python benchmarks/ingest.py --db postgresql://user@host/db --compare-db   # SQLite vs PostgreSQL
    python benchmarks/ingest.py --db temp-postgresql --compare-db   # a throwaway PostgreSQL server of its own

Many sessions (cheap grpc.aio clients speaking the real protocol, benchmarks/ingest_sessions.py):

    python benchmarks/ingest.py --sessions 1000 --batch-interval 1 --duration 60 --layers 50
    python benchmarks/ingest.py --sessions 5000 --batch-interval 10 --duration 60 --layers 50
    python benchmarks/ingest.py --sessions 20 --batch-interval 0 --steps-per-batch 1   # one-step batches, saturated
    python benchmarks/ingest.py --sessions 200 --batch-interval 0 --probe          # a light probe beside 200 saturated
    python benchmarks/ingest.py --sessions 300 --step-rate 20 --duration 40    # jobs whose batches are one step at idle

They print p50/p99 ack latency per kind of session, the errors the clients saw by
code beside the collector's own refusal counters, throughput, the collector's
peak RSS and its CPU time per layer-sample.

With a PostgreSQL URL every measurement gets a schema of its own in that database
(``layrot_bench_*``, dropped at its end), so the store check counts only its rows.

The reporters keep their spool on (the default, every batch written to disk by
the exporter thread) in a folder of the measurement's own, and are throttled to
what their in-memory resend buffer holds. The history must equal the
acknowledgements at the end (a fresh db and spool: nothing else is stored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collector_proc import free_port, start_collector  # noqa: E402


def scrape_labeled(url: str, name: str, label: str) -> dict[str, float]:
    """The samples of metric ``name`` by the value of ``label`` (e.g. rejections by reason)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=60).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and label in s.labels:
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_peak_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of process ``pid`` in MB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    # A long timeout: a collector holding thousands of sessions may answer /metrics slowly.
    text = urllib.request.urlopen(url, timeout=60).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def client(
    addr: str,
    runs: list[str],
    layers: int,
    seconds: float,
    spool_dir: str,
    spool: bool,
    unacked: int,
    result_q: mp.Queue,
    step_rate: float = 0.0,
    ready: mp.Queue | None = None,
    go: object = None,
) -> None:
    from layrot.agent.reporter import LayerSpec, Reporter, StepRecord

    rng = np.random.default_rng(0)
    specs = [
        LayerSpec(name=f"block{i}.weight", index=i, shape=(64, 64), init_norm=8.0, numel=4096) for i in range(layers)
    ]
    # A spool folder of this measurement only: spools left by an earlier run (same run names) would
    # be replayed into this collector and counted.
    reporters = [
        Reporter(run, specs, collector=addr, every=1, max_queue=8192, spool=spool, spool_dir=spool_dir) for run in runs
    ]
    base = np.abs(rng.normal(size=(6, layers))) + 1.0
    base[0] = 8.0
    base[3] = 8.0
    if ready is not None:
        # Every client process starts its load together, once all have their reporters: a
        # process still building 150 reporters would otherwise fall into the measured window.
        ready.put(os.getpid())
        go.wait(300)  # type: ignore[attr-defined]
    deadline = time.monotonic() + seconds
    step = [0] * len(reporters)
    if step_rate > 0:  # paced jobs: one step per reporter every 1/step_rate s, staggered
        # The schedule in numpy and a sleep until the next step is due: a Python loop over every
        # reporter each millisecond would cost this process more than its reporters do.
        t0 = time.monotonic()
        n = len(reporters)
        offset = np.arange(n) / n
        done = np.zeros(n, dtype=np.int64)
        while (now := time.monotonic()) < deadline:
            due = ((now - t0) * step_rate + offset).astype(np.int64)
            for i in np.flatnonzero(due > done).tolist():
                r = reporters[i]
                for s in range(int(done[i]) + 1, int(due[i]) + 1):
                    r.submit(StepRecord(step=s, time=time.time(), values=base))
                done[i] = step[i] = int(due[i])
            wake = t0 + float(((done + 1 - offset) / step_rate).min())
            time.sleep(max(0.001, wake - time.monotonic()))
    while step_rate <= 0 and time.monotonic() < deadline:
        busy = True
        for i, r in enumerate(reporters):
            # Keep each reporter saturated without overflowing its queue, and with no more unacknowledged
            # steps than its in-memory resend buffer holds (64 MiB): beyond that, batches are read back from
            # the spool before they are sent, which measures the job's disk instead of the collector.
            if r._queue.qsize() < 2048 and r.unacked_steps < unacked:
                busy = False
                for _ in range(64):
                    step[i] += 1
                    r.submit(StepRecord(step=step[i], time=time.time(), values=base))
        if busy:
            time.sleep(0.002)
    unacked_at_end = sum(r.unacked_steps for r in reporters)
    for r in reporters:
        r.close(timeout=30.0)
    result_q.put(
        {
            "submitted": sum(step),
            "acked_steps": sum(r.stats.acked_steps for r in reporters),
            "dropped": sum(r.stats.dropped for r in reporters),
            "unacked_at_end": unacked_at_end,
            "unacked_after_close": sum(r.unacked_steps for r in reporters),
            "messages": sum(r.stats.sent_batches for r in reporters),
        }
    )


@contextlib.contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema in the database of ``url``, dropped at the end; yields the URL that uses it."""
    import psycopg

    name = f"layrot_bench_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        # quote, not urlencode: libpq decodes %20, not + (which it would pass on as part of the option).
        yield url + ("&" if "?" in url else "?") + "options=" + urllib.parse.quote(f"-c search_path={name}")
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def stored_steps_in(db: str) -> int:
    """Step rows in the history ``db`` (a SQLite file or a PostgreSQL URL), read by a connection of our own."""
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as conn:
            row = conn.execute("SELECT COUNT(*) FROM steps").fetchone()
    else:
        import sqlite3

        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT COUNT(*) FROM steps").fetchone()
    return int(row[0]) if row else 0


def measure(
    args: argparse.Namespace, extra_serve_args: list[str], spool: bool = True, db: str | None = None
) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        db = stack.enter_context(postgres_schema(db)) if db else os.path.join(tmp, "ingest.db")
        return _measure(args, extra_serve_args, spool, tmp, db)


def _measure(args: argparse.Namespace, extra_serve_args: list[str], spool: bool, tmp: str, db: str) -> dict[str, float]:
    mport = free_port()
    serve, address = start_collector(tmp, extra_serve_args, metrics_port=mport, db=db)
    port = int(address.rsplit(":", 1)[1])
    try:
        url = f"http://127.0.0.1:{mport}/metrics"
        for _ in range(300):
            try:
                scrape(url)
                break
            except Exception:
                time.sleep(0.1)
        runs = [f"ingest-{i:02d}" for i in range(args.runs)]
        groups = [runs[i :: args.procs] for i in range(args.procs)]
        ctx = mp.get_context("spawn")
        q: mp.Queue = ctx.Queue()
        ready: mp.Queue = ctx.Queue()
        go = ctx.Event()
        spool_dir = os.path.join(tmp, "spool")
        procs = [
            ctx.Process(
                target=client,
                args=(
                    f"127.0.0.1:{port}",
                    g,
                    args.layers,
                    args.warmup + args.seconds + 1.0,
                    spool_dir,
                    spool,
                    args.max_unacked_steps,
                    q,
                    args.step_rate,
                    ready,
                    go,
                ),
            )
            for g in groups
            if g
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=300)
        go.set()
        time.sleep(args.warmup)
        m0, t0 = scrape(url), time.monotonic()
        time.sleep(args.seconds)
        m1, t1 = scrape(url), time.monotonic()
        results = [q.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        key = "layrot_samples_ingested_total"
        rate = (m1.get(key, 0) - m0.get(key, 0)) / (t1 - t0)
        # Cross-check the counter against what the history store really holds, and against the acks.
        m2 = scrape(url)
        stored_steps = stored_steps_in(db)
        out = {k: sum(r[k] for r in results) for k in results[0]}
        return {
            "samples_per_s": rate,
            **out,
            "stored_steps": stored_steps,
            "stored_samples": stored_steps * args.layers,
            "counted_samples": m2.get(key, 0),
        }
    finally:
        serve.terminate()
        serve.wait(timeout=30)


def measure_sessions(args: argparse.Namespace, db: str | None = None) -> dict[str, object]:
    """``--sessions``: many grpc.aio sessions at ``--batch-interval`` for ``--duration`` s (see ingest_sessions.py)."""
    from ingest_sessions import SessionPlan, client_process, merge

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        db = stack.enter_context(postgres_schema(db)) if db else os.path.join(tmp, "ingest.db")
        mport = free_port()
        serve, address = start_collector(tmp, args.serve_arg, metrics_port=mport, db=db)
        url = f"http://127.0.0.1:{mport}/metrics"
        try:
            for _ in range(300):
                try:
                    scrape(url)
                    break
                except Exception:
                    time.sleep(0.1)
            label = "paced" if args.step_rate > 0 else "saturated" if args.batch_interval == 0 else "light"
            runs = [f"s-{i:05d}" for i in range(args.sessions)]
            plans = []
            for k in range(args.procs):
                mine = runs[k :: args.procs]
                plans.append(
                    [
                        SessionPlan(
                            label,
                            mine,
                            args.layers,
                            args.batch_interval,
                            args.steps_per_batch,
                            # A paced job keeps as many batches in flight as its Reporter would.
                            256 if args.step_rate > 0 else args.max_inflight,
                            step_rate=args.step_rate,
                        )
                    ]
                )
            if args.probe:
                # A process of its own: its latencies are the collector's, not those of a client loop
                # busy building the saturated sessions' batches.
                plans.append([SessionPlan("probe", ["probe"], args.layers, 1.0, 1)])
            ctx = mp.get_context("spawn")
            q: mp.Queue = ctx.Queue()
            procs = [
                ctx.Process(target=client_process, args=(address, p, args.duration, args.sessions_per_channel, q))
                for p in plans
                if p[0].runs or len(p) > 1
            ]
            rej0 = scrape_labeled(url, "layrot_messages_rejected_total", "reason")
            for p in procs:
                p.start()
            # Throughput and CPU over the middle of the run: not the sessions' start nor their goodbyes.
            edge = min(5.0, args.duration / 5)
            time.sleep(edge)
            cpu0, m0, t0 = proc_cpu_s(serve.pid), scrape(url), time.monotonic()
            time.sleep(max(0.5, args.duration - 2 * edge))
            cpu1, m1, t1 = proc_cpu_s(serve.pid), scrape(url), time.monotonic()
            summaries = [q.get(timeout=args.duration + 300) for _ in procs]
            rej1 = scrape_labeled(url, "layrot_messages_rejected_total", "reason")
            m_end = scrape(url)
            rss_mb = proc_rss_peak_mb(serve.pid)
            for p in procs:
                p.join(timeout=30)
            key = "layrot_samples_ingested_total"
            samples = m1.get(key, 0) - m0.get(key, 0)
            stored = stored_steps_in(db)
        finally:
            serve.terminate()
            serve.wait(timeout=30)
    labels = merge(summaries)
    return {
        "labels": labels,
        "samples": samples,
        "samples_per_s": samples / (t1 - t0),
        "cpu_us_per_sample": (cpu1 - cpu0) / max(samples, 1) * 1e6,
        "collector_cpu_share": (cpu1 - cpu0) / (t1 - t0),
        # StepBatches the collector took together in one pipeline pass (one turn of its loop).
        "batches_per_pass": (m1.get("layrot_pipeline_batches_total", 0) - m0.get("layrot_pipeline_batches_total", 0))
        / max(1.0, m1.get("layrot_pipeline_passes_total", 0) - m0.get("layrot_pipeline_passes_total", 0)),
        "rss_peak_mb": rss_mb,
        "stored_steps": stored,
        "steps_acked": sum(m["acked_steps"] for m in labels.values()),
        "collector_rejections": {k: v - rej0.get(k, 0) for k, v in rej1.items() if v - rej0.get(k, 0)},
        # Sessions that ended without Goodbye, as the collector counted them (a client error it saw).
        "collector_sessions_lost": m_end.get("layrot_sessions_lost_total", 0) - m0.get("layrot_sessions_lost_total", 0),
    }


def print_sessions(args: argparse.Namespace, results: dict[str, dict]) -> None:
    load = os.getloadavg()
    what = (
        f"jobs of {args.step_rate:g} steps/s batched by the Reporter's rule (one step a batch while acks keep up), "
        f"offered {args.sessions * args.step_rate * args.layers:,.0f} layer-samples/s"
        if args.step_rate > 0
        else f"a batch of {args.steps_per_batch} step(s) every {args.batch_interval:g} s (0: saturated)"
    )
    print(
        f"{args.sessions} sessions x {args.layers} layers, {what}, {args.duration:g} s, {args.procs} grpc.aio "
        f"client processes; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"
    )
    for db_label, r in results.items():
        print(
            f"[{db_label}] {r['samples_per_s']:,.0f} layer-samples/s stored, collector CPU "
            f"{r['cpu_us_per_sample']:.3f} us/sample ({r['collector_cpu_share'] * 100:.0f} % of a core, "
            f"{r['batches_per_pass']:.1f} batches per pipeline pass), RSS peak {r['rss_peak_mb']:.0f} MB; "
            f"store holds {r['stored_steps']:,} steps, clients got acks for "
            f"{r['steps_acked']:,} ({'acked <= stored' if r['steps_acked'] <= r['stored_steps'] else 'MISMATCH'})"
        )
        for label, m in r["labels"].items():
            print(
                f"  {label:9} {m['served']:,}/{m['sessions']:,} sessions served, {m['acked']:,}/{m['sent']:,} "
                f"batches acked; ack latency p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms, "
                f"max {m['max_ms']:.1f} ms (p99 after each session's first batch {m['p99_later_ms']:.1f} ms); "
                f"{m['acked_steps'] / max(1, m['acked']):.2f} steps per batch; client errors {m['errors'] or 'none'}"
            )
            if m["slow_sent_s"]:
                print(f"  {'':9} acks over 1 s, by when sent (5 s bins from the first): {m['slow_sent_s']}")
        print(
            f"  collector's refusal counters over the run: {r['collector_rejections'] or 'none'}; "
            f"sessions lost (no Goodbye): {r['collector_sessions_lost']:.0f}"
        )
        client_errors = sum(sum(m["errors"].values()) for m in r["labels"].values())
        counted = sum(r["collector_rejections"].values()) + r["collector_sessions_lost"]
        print(
            f"  errors: {client_errors} seen by clients, {counted:.0f} counted by the collector"
            f"{'' if client_errors <= counted else '  (UNCOUNTED errors)'}"
        )


def temp_postgresql() -> contextlib.AbstractContextManager[str]:
    """A throwaway PostgreSQL cluster (tests/postgres_server.py), removed at the end; yields a database URL."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from postgres_server import temp_postgresql as make

    return make()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument(
        "--max-unacked-steps",
        type=int,
        default=4096,
        help="per reporter (4096 x 200 layers ~ 40 MB, within the reporter's 64 MiB resend buffer)",
    )
    ap.add_argument(
        "--step-rate",
        type=float,
        default=0.0,
        help="steps/s of each run (0: as fast as the collector takes them). At 20 a job's reporter sends "
        "one-step batches to an idle collector (50 ms flush) and bigger ones when acks lag",
    )
    ap.add_argument("--compare-alerts", action="store_true", help="also measure with --no-alerts and compare")
    ap.add_argument(
        "--compare-spool", action="store_true", help="also measure with the clients' spool off (spool=False)"
    )
    ap.add_argument(
        "--db",
        default=None,
        help="history in PostgreSQL: postgresql://user@host/db (default: a SQLite file in a temp dir)",
    )
    ap.add_argument("--compare-db", action="store_true", help="with --db: SQLite and PostgreSQL side by side")
    ap.add_argument("--sessions", type=int, default=0, help="N grpc.aio sessions instead of --runs reporters")
    ap.add_argument("--batch-interval", type=float, default=1.0, help="--sessions: s between batches (0: saturated)")
    ap.add_argument("--duration", type=float, default=60.0, help="--sessions: seconds")
    ap.add_argument("--steps-per-batch", type=int, default=1, help="--sessions: steps in each StepBatch")
    ap.add_argument(
        "--max-inflight",
        type=int,
        default=8,
        help="--sessions, saturated: unacknowledged batches per session at most (the real reporter allows 256)",
    )
    ap.add_argument("--probe", action="store_true", help="--sessions: one light session more (a batch a second)")
    ap.add_argument("--sessions-per-channel", type=int, default=50, help="--sessions: streams per gRPC connection")
    ap.add_argument("--serve-arg", action="append", default=[], help="an extra `serve` argument (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.compare_db and not args.db:
        ap.error("--compare-db needs --db postgresql://... (or --db temp-postgresql)")
    with contextlib.ExitStack() as stack:
        if args.db == "temp-postgresql":
            args.db = stack.enter_context(temp_postgresql())
        _main(args)


def _main(args: argparse.Namespace) -> None:
    if args.sessions:
        sess = {("postgresql" if args.db else "sqlite"): measure_sessions(args, args.db)}
        if args.compare_db:
            sess["sqlite"] = measure_sessions(args)
        if args.json:
            for r in sess.values():
                for m in r["labels"].values():
                    m.pop("latencies")
                    m.pop("later")
            print(json.dumps(sess, indent=2))
        else:
            print_sessions(args, sess)
        return
    results = {("postgresql" if args.db else "default"): measure(args, [], db=args.db)}
    if args.compare_db:
        results["sqlite"] = measure(args, [])
        results["postgresql 2"] = measure(args, [], db=args.db)
    if args.compare_alerts:
        results["alerts off"] = measure(args, ["--no-alerts"])
        results["alerts on"] = measure(args, [])
    if args.compare_spool:
        results["spool off"] = measure(args, [], spool=False)
        results["spool on"] = measure(args, [])
    if args.json:
        print(json.dumps(results, indent=2))
        return
    load = os.getloadavg()
    print(
        f"{args.runs} runs x {args.layers} layers, {args.procs} client processes, real gRPC over loopback, "
        f"history + metrics on; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"
    )
    for label, r in results.items():
        # acked => stored; stored but not yet acked only what close() left unacknowledged (kept in the spool).
        ok = r["stored_samples"] == r["counted_samples"] and (
            r["acked_steps"] <= r["stored_steps"] <= r["acked_steps"] + r["unacked_after_close"]
        )
        print(
            f"{label:12} {r['samples_per_s']:12,.0f} layer-samples/s   "
            f"(store holds {r['stored_samples']:,} samples, counter {r['counted_samples']:,.0f}; "
            f"clients: {r['submitted']:,} steps submitted, {r['acked_steps']:,} acked, {r['dropped']:,} dropped, "
            f"{r['unacked_after_close']:,} unacked after close, {r['submitted'] / max(1, r['messages']):.1f} steps "
            "per message; "
            f"{'store = counter, acked => stored' if ok else 'MISMATCH'})"
        )
    if args.compare_alerts:
        on, off = results["alerts on"]["samples_per_s"], results["alerts off"]["samples_per_s"]
        print(f"alert evaluation cost: {max(0.0, off / on - 1) * 100:.1f} % of ingest time (on vs off)")
    if args.compare_db:
        pg = (results["postgresql"]["samples_per_s"] + results["postgresql 2"]["samples_per_s"]) / 2
        print(
            f"PostgreSQL / SQLite: {pg / results['sqlite']['samples_per_s']:.3f} (PostgreSQL measured before and after)"
        )
    if args.compare_spool:
        on, off = results["spool on"]["samples_per_s"], results["spool off"]["samples_per_s"]
        print(f"spool on / off: {on / off:.3f} (the clients' disk writes; the collector is the same)")
    if args.step_rate > 0:
        offered = args.runs * args.step_rate * args.layers
        print(
            f"offered: {args.runs} runs x {args.step_rate:g} steps/s x {args.layers} layers = {offered:,.0f} samples/s"
        )
    print(
        "targets (issue 13): >= 1,500,000 layer-samples/s with SQLite, >= 500,000 with PostgreSQL, "
        ">= 1,200,000 with jobs whose batches are one step (--step-rate 20)"
    )


if __name__ == "__main__":
    main()
