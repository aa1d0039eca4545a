"""``layrot-agent export``'s chunked writers (cli/export_format.py) against record-by-record references.

The references are the straightforward writers (``csv.DictWriter`` and ``json.dumps``
per record), so a difference in quoting, number spelling or missing values shows.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from layrot.cli.export_format import EXPORT_FIELDS, write_csv, write_json
from layrot.client.history import History


def records(parts):
    for h in parts:
        for s, step in enumerate(h.steps.tolist()):
            for i, name in enumerate(h.layer_names):
                rec = {"run": h.run, "step": step, "layer": name, "layer_index": i}
                for key in ("rotation", "step_angle", "weight_norm", "rho"):
                    v = float(getattr(h, key)[s, i])
                    rec[key] = v if math.isfinite(v) else None
                yield rec


def reference_csv(parts) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    w.writeheader()
    for rec in records(parts):
        w.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    return out.getvalue()


def reference_json(parts) -> str:
    recs = [json.dumps(r, allow_nan=False) for r in records(parts)]
    return "[" + ("\n  " + ",\n  ".join(recs) + "\n]\n" if recs else "]\n")


def chunk(run, names, steps, rng, special=()):
    S, L = len(steps), len(names)
    cols = {k: rng.standard_normal((S, L)) * 10.0 ** rng.integers(-12, 6, (S, L)) for k in ("r", "a", "n", "p")}
    for k, (s, i), v in special:
        cols[k][s, i] = v
    return History(
        run=run,
        layer_names=list(names),
        steps=np.asarray(steps, dtype=np.int64),
        times=np.zeros(S),
        loss=np.zeros(S),
        rotation=cols["r"],
        step_angle=cols["a"],
        weight_norm=cols["n"],
        rho=cols["p"],
    )


def test_same_bytes_as_record_by_record_writers():
    rng = np.random.default_rng(0)
    names = ["conv,1.weight", 'say "hi"', "line\nbreak", "ünïcode", "plain.weight"]
    run = 'run, "quoted"'
    parts = [
        chunk(run, names, [1, 2, 3], rng, special=[("r", (0, 1), float("nan")), ("a", (2, 4), float("inf"))]),
        chunk(run, names, [4, 5], rng, special=[("p", (1, 0), -float("inf")), ("n", (0, 0), 0.0)]),
        chunk(run, names, [], rng),
    ]
    for writer, ref in ((write_csv, reference_csv), (write_json, reference_json)):
        out = io.StringIO()
        writer(parts, out)
        assert out.getvalue() == ref(parts), writer.__name__
    out = io.StringIO()
    write_json([], out)
    assert json.loads(out.getvalue()) == []
    rows = list(csv.DictReader(io.StringIO(reference_csv(parts))))
    assert rows[1]["layer"] == 'say "hi"' and rows[1]["rotation"] == ""  # round-trips through a CSV reader


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=4, max_size=4),
    step=st.integers(min_value=1, max_value=2**62),
    name=st.text(min_size=1, max_size=12),
)
def test_any_value_and_name(values, step, name):
    h = History(
        run=name,
        layer_names=[name],
        steps=np.asarray([step], dtype=np.int64),
        times=np.zeros(1),
        loss=np.zeros(1),
        rotation=np.array([[values[0]]]),
        step_angle=np.array([[values[1]]]),
        weight_norm=np.array([[values[2]]]),
        rho=np.array([[values[3]]]),
    )
    for writer, ref in ((write_csv, reference_csv), (write_json, reference_json)):
        out = io.StringIO()
        writer([h], out)
        assert out.getvalue() == ref([h])
