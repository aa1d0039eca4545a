"""Strict JSON for numbers that may be NaN: the collector's HTTP API and the CLI's ``--json`` write ``null``."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["jsonable"]


def jsonable(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that strict JSON (``allow_nan=False``) takes it.

    Recurses into dicts, lists and tuples (tuples become lists); numpy float64 is a float and is handled too.
    """
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
