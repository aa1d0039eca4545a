"""Read a real /metrics endpoint the way Prometheus parses it."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def scrape(target: Any) -> dict[str, list]:
    """/metrics of a collector (or a URL) as {sample name: [(labels, value), ...]}."""
    url = target if isinstance(target, str) else target.metrics_url
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out
