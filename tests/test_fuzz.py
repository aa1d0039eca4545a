"""Property-based fuzz of the Ingest and Query services on a real collector (tests/fuzz_ingest.py).

Properties, over generated sessions (valid and broken Hellos, StepBatches of random sizes, seqs,
steps and values, garbage bytes on a raw stream) and calls of every Query method with random
fields: the collector never crashes (it answers health and ListRuns after every example), no
call takes over 1 s, no status is UNKNOWN or INTERNAL, every refusal the client is told about
is counted in ``layrot_messages_rejected_total{reason}``, every garbage message is refused with
a reason, and an innocent job (the real reporter) training beside the fuzzer loses no step.
``python benchmarks/fuzz.py`` runs the same with >= 100,000 messages.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layrot.client.query import QueryClient
from tests.fuzz_ingest import INNOCENT, Fuzzer, InnocentJob, query_calls, sessions

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("LAYROT_FUZZ_EXAMPLES", "250"))


def test_fuzz_ingest_and_query(collector_factory, tmp_path):
    c = collector_factory(tmp_path / "fuzz.db")
    fuzz = Fuzzer(c.grpc_address, c.metrics_url)
    before = fuzz.rejected()
    job = InnocentJob(c.grpc_address, str(tmp_path / "spool")).start()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(sessions(), min_size=1, max_size=3), st.lists(query_calls(), max_size=4))
    def example(sess, calls):
        for s in sess:
            fuzz.session(s)
        for name, req in calls:
            fuzz.call(name, req)
        assert fuzz.alive(), "the collector stopped answering health / ListRuns"
        assert not fuzz.tally.bad_status, fuzz.tally.bad_status
        assert not fuzz.tally.hangs, fuzz.tally.hangs

    try:
        example()
        flushed, dropped = job.finish()
    finally:
        fuzz.close()
    t = fuzz.tally
    after = fuzz.rejected()
    counted = sum(after.values()) - sum(before.values())
    assert t.sessions >= EXAMPLES and t.messages > 2 * EXAMPLES
    assert t.crashes == 0 and not t.hangs and not t.bad_status
    # Every refusal the clients were told about is counted with a reason (some, e.g. empty messages,
    # are counted without an answer), and every garbage message was refused.
    assert counted >= t.told > 0, (counted, t.told, after)
    assert t.garbage_unanswered == 0
    assert after.get("undecodable", 0) > 0
    # The innocent job: history + dropped = trained, with 0 dropped.
    h = QueryClient(c.grpc_address).history(INNOCENT)
    job.reporter.close(5.0)
    assert flushed and dropped == 0
    assert list(h.steps) == list(range(1, job.trained + 1))
