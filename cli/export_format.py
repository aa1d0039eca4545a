"""``layrot-agent export``'s writers: JSON and CSV, one history chunk at a time.

A record per (step, layer) with the keys of :data:`EXPORT_FIELDS`. The text is
built per chunk, not per record through ``json.dumps`` / ``csv.DictWriter``:
the parts that repeat (run and layer, quoted once per layer) are made once, and
each column's numbers are spelled in one C call (``json.dumps`` of the column
writes every float with ``repr``, as both writers did record by record). The
output is the same, byte for byte, and about 10x faster (``benchmarks/export.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from layrot.client.history import History

# numpy loads in the writers, not here: `layrot-agent` reads EXPORT_FIELDS at start-up.

__all__ = ["EXPORT_FIELDS", "write_csv", "write_json"]

EXPORT_FIELDS = ("run", "step", "layer", "layer_index", "rotation", "step_angle", "weight_norm", "rho")
COLUMNS = ("rotation", "step_angle", "weight_norm", "rho")


def _spell(a: np.ndarray, missing: str) -> list[str]:
    """``repr`` of every element of ``a`` (flattened, step-major); ``missing`` for NaN and infinities."""
    import numpy as np

    flat = np.ascontiguousarray(a, dtype=np.float64).ravel()
    if flat.size == 0:
        return []
    words = json.dumps(flat.tolist())[1:-1].split(", ")
    bad = ~np.isfinite(flat)
    if bad.any():
        for k in np.flatnonzero(bad).tolist():
            words[k] = missing
    return words


def _csv_field(value: str) -> str:
    import csv  # here: `layrot-agent` reads EXPORT_FIELDS at start-up, a query command needs no csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([value])
    return buf.getvalue()[:-1]


@dataclass(frozen=True)
class _Dialect:
    """How one record is spelled: ``start(run, step) + head(layer, index) + v0 + seps[0] + v1 + ... + end``."""

    missing: str  # a NaN value
    quote: Callable[[str], str]  # a run or layer name as the format writes it
    start: str  # with {run} and {step}
    head: str  # with {layer} and {index}; ends where the first value begins
    seps: tuple[str, str, str]  # between the four values
    end: str


CSV = _Dialect("", _csv_field, "{run},{step}", ",{layer},{index},", (",", ",", ","), "\n")
JSON = _Dialect(
    "null",
    json.dumps,
    '{{"run": {run}, "step": {step}',
    ', "layer": {layer}, "layer_index": {index}, "rotation": ',
    (', "step_angle": ', ', "weight_norm": ', ', "rho": '),
    "}",
)


def _records(parts: Iterable[History], d: _Dialect) -> Iterator[list[str]]:
    """Per history chunk, its records spelled in dialect ``d`` (step-major, layers in order)."""
    heads: list[str] = []
    run_text, run, names = "", None, None
    s1, s2, s3 = d.seps
    for part in parts:
        if part.layer_names != names or part.run != run:  # quoted once per layer table, not per record
            run, names = part.run, list(part.layer_names)
            run_text = d.quote(run)
            heads = [d.head.format(layer=d.quote(n), index=i) for i, n in enumerate(names)]
        L = len(heads)
        cols = [_spell(getattr(part, key), d.missing) for key in COLUMNS]
        lines: list[str] = []
        for s, step in enumerate(part.steps.tolist()):
            start = d.start.format(run=run_text, step=step)
            rot, ang, norm, rho = (c[s * L : (s + 1) * L] for c in cols)
            lines.extend(
                f"{start}{h}{a}{s1}{b}{s2}{c}{s3}{v}{d.end}" for h, a, b, c, v in zip(heads, rot, ang, norm, rho)
            )
        yield lines


def write_csv(parts: Iterable[History], out: IO[str]) -> None:
    """CSV with a header line; empty fields where a value is unknown (NaN)."""
    out.write(",".join(EXPORT_FIELDS) + "\n")
    for lines in _records(parts, CSV):
        out.write("".join(lines))


def write_json(parts: Iterable[History], out: IO[str]) -> None:
    """A JSON list, one record per line; null where a value is unknown (NaN)."""
    out.write("[")
    first = True
    for lines in _records(parts, JSON):
        if lines:
            out.write(("\n  " if first else ",\n  ") + ",\n  ".join(lines))
            first = False
    out.write("\n]\n" if not first else "]\n")
