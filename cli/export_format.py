"""``layrot-agent export``'s writers: JSON and CSV, one history chunk at a time.

A record per (step, layer) with the keys of :data:`EXPORT_FIELDS`. The text is
built per chunk, not per record through ``json.dumps`` / ``csv.DictWriter``:
the parts that repeat (run and layer, quoted once per layer) are made once, and
each column's numbers are spelled in one C call (``json.dumps`` of the column
writes every float with ``repr``, as both writers did record by record). The
output is the same, byte for byte, and about 10x faster (``benchmarks/export.py``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
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
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([value])
    return buf.getvalue()[:-1]


def write_csv(parts: Iterable[History], out: IO[str]) -> None:
    """CSV with a header line; empty fields where a value is unknown (NaN)."""
    out.write(",".join(EXPORT_FIELDS) + "\n")
    heads: list[str] = []
    run = ""
    names: list[str] = []
    for part in parts:
        if part.layer_names != names or part.run != run:
            run, names = part.run, list(part.layer_names)
            run_field = _csv_field(run)
            heads = [f",{_csv_field(n)},{i}," for i, n in enumerate(names)]
        L = len(names)
        cols = [_spell(getattr(part, key), "") for key in COLUMNS]
        lines: list[str] = []
        for s, step in enumerate(part.steps.tolist()):
            start = f"{run_field},{step}"
            base = s * L
            rot, ang, norm, rho = (c[base : base + L] for c in cols)
            lines.extend(f"{start}{h}{a},{b},{c},{d}\n" for h, a, b, c, d in zip(heads, rot, ang, norm, rho))
        out.write("".join(lines))


def write_json(parts: Iterable[History], out: IO[str]) -> None:
    """A JSON list, one record per line; null where a value is unknown (NaN)."""
    out.write("[")
    first = True
    heads: list[str] = []
    run = ""
    names: list[str] = []
    for part in parts:
        if part.layer_names != names or part.run != run:
            run, names = part.run, list(part.layer_names)
            run_json = json.dumps(run)
            heads = [f', "layer": {json.dumps(n)}, "layer_index": {i}, "rotation": ' for i, n in enumerate(names)]
        L = len(names)
        cols = [_spell(getattr(part, key), "null") for key in COLUMNS]
        lines: list[str] = []
        for s, step in enumerate(part.steps.tolist()):
            start = f'{{"run": {run_json}, "step": {step}'
            base = s * L
            rot, ang, norm, rho = (c[base : base + L] for c in cols)
            lines.extend(
                f'{start}{h}{a}, "step_angle": {b}, "weight_norm": {c}, "rho": {d}}}'
                for h, a, b, c, d in zip(heads, rot, ang, norm, rho)
            )
        if lines:
            out.write(("\n  " if first else ",\n  ") + ",\n  ".join(lines))
            first = False
    out.write("\n]\n" if not first else "]\n")
