"""Fuzz the collector's Ingest and Query services with >= 100,000 generated messages.

The generators and properties are those of tests/test_fuzz.py (tests/fuzz_ingest.py), run
here against a real ``layrot-agent serve`` process on loopback with longer sessions and many
more examples, beside an innocent job (the real reporter, spool on). Prints: messages sent,
crashes (health / ListRuns unanswered), calls that took over 1 s after their last message,
statuses UNKNOWN / INTERNAL, refusals by reason (``layrot_messages_rejected_total`` before
and after), refusals the clients were told about, unanswered calls, the innocent job's
steps, wall time and the load average.

    python benchmarks/fuzz.py                       # 100,000 messages
    python benchmarks/fuzz.py --messages 20000 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from collector_proc import free_port, start_collector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000, help="stop after this many generated messages")
    ap.add_argument("--session-messages", type=int, default=200, help="most messages after a session's Hello")
    ap.add_argument("--round", type=int, default=10, help="examples per hypothesis round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    from layrot.client.query import QueryClient
    from tests.fuzz_ingest import INNOCENT, Fuzzer, InnocentJob, query_calls, sessions

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        mport = free_port()
        serve, address = start_collector(tmp, [], db_name="fuzz.db", metrics_port=mport)
        try:
            fuzz = Fuzzer(address, f"http://127.0.0.1:{mport}/metrics")
            for _ in range(100):
                try:
                    before = fuzz.rejected()
                    break
                except OSError:
                    time.sleep(0.1)
            job = InnocentJob(address, os.path.join(tmp, "spool")).start()
            failures: list[str] = []
            rounds = 0
            while fuzz.tally.messages < args.messages:

                @seed(args.seed * 1_000_003 + rounds)
                @settings(
                    max_examples=args.round, deadline=None, database=None, suppress_health_check=list(HealthCheck)
                )
                @given(
                    st.lists(sessions(max_messages=args.session_messages), min_size=1, max_size=3),
                    st.lists(query_calls(), max_size=6),
                )
                def example(sess, calls):
                    if fuzz.tally.messages >= args.messages:
                        return
                    for s in sess:
                        fuzz.session(s)
                    for name, req in calls:
                        fuzz.call(name, req)
                    if not fuzz.alive():
                        failures.append("collector did not answer health / ListRuns")

                example()
                rounds += 1
                t = fuzz.tally
                print(
                    f"round {rounds}: {t.messages:,} messages, {t.sessions:,} sessions, {t.queries:,} queries, "
                    f"hangs {len(t.hangs)}, crashes {t.crashes}, {time.monotonic() - t_start:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                if serve.poll() is not None:
                    failures.append(f"collector process exited with {serve.returncode}")
                    break
            flushed, dropped = job.finish()
            hist = QueryClient(address).history(INNOCENT)
            job.reporter.close(5.0)
            after = fuzz.rejected()
            fuzz.close()
        finally:
            serve.terminate()
            serve.wait(timeout=30)
    wall = time.monotonic() - t_start
    t = fuzz.tally
    reasons = {k: int(after.get(k, 0) - before.get(k, 0)) for k in sorted(after) if after.get(k, 0) - before.get(k, 0)}
    counted = sum(reasons.values())
    innocent_ok = list(hist.steps) == list(range(1, job.trained + 1))
    out = {
        "messages": t.messages,
        "sessions": t.sessions,
        "queries": t.queries,
        "crashes": t.crashes + len(failures),
        "hangs_over_1s": len(t.hangs),
        "slowest_call_s": round(t.slowest, 3),
        "unknown_or_internal": len(t.bad_status),
        "refusals_counted": counted,
        "refusals_by_reason": reasons,
        "refusals_told_to_clients": t.told,
        "refusals_told_not_counted": max(0, t.told - counted),
        "garbage_sessions": t.garbage_sessions,
        "garbage_unanswered": t.garbage_unanswered,
        "unanswered_calls": t.unanswered,
        "statuses": dict(t.statuses),
        "innocent_trained": job.trained,
        "innocent_in_history": int(len(hist.steps)),
        "innocent_dropped": dropped,
        "innocent_flushed": flushed,
        "innocent_history_complete": innocent_ok,
        "wall_s": round(wall, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "failures": failures[:5] + [f"{w}: {c} {d}" for w, c, d in t.bad_status[:5]] + [str(h) for h in t.hangs[:5]],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"fuzz: {out['messages']:,} messages ({out['sessions']:,} sessions, {out['queries']:,} query calls)")
    print(f"crashes: {out['crashes']}   hangs > 1 s: {out['hangs_over_1s']} (slowest call {out['slowest_call_s']} s)")
    print(f"UNKNOWN / INTERNAL statuses: {out['unknown_or_internal']}   statuses: {out['statuses']}")
    print(f"refusals counted: {counted:,}, by reason: " + ", ".join(f"{k} {v:,}" for k, v in reasons.items()))
    print(
        f"refusals told to clients: {t.told:,} (not counted: {out['refusals_told_not_counted']}); "
        f"garbage sessions {t.garbage_sessions:,}, unanswered {t.garbage_unanswered}; unanswered calls {t.unanswered}"
    )
    print(
        f"innocent job: {job.trained:,} trained, {out['innocent_in_history']:,} in the history, {dropped} dropped, "
        f"flush {flushed}, history == trained: {innocent_ok}"
    )
    print(f"wall time {wall:.1f} s, load average {out['load_average']} on {os.cpu_count()} cores")
    for f in out["failures"]:
        print("FAILURE:", f)


if __name__ == "__main__":
    main()
