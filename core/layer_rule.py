"""The layer rule, shared by every hook and Layca: which named weights are *layers*.

A layer is a multiplicative weight: a trainable tensor with ndim >= 2 (dense
and convolution kernels, embeddings, custom 2-D+ weights). ``layers=`` narrows
or overrides that choice the same way in PyTorch and TensorFlow:

* None: every candidate with ndim >= 2;
* a regex (string or compiled; ``re.search`` on names) or a predicate
  ``(name, tensor) -> bool``: filters those ndim >= 2 candidates, so
  ``layers="head"`` picks the head's kernel, not its bias;
* a sequence of exact names: exactly those, even 1-D ones (an explicit choice).

Framework-free: callers pass (name, tensor) pairs and how to read a tensor's ndim.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, Union

T = TypeVar("T")

#: What ``layers=`` accepts.
LayerSelector = Union[None, str, "re.Pattern[str]", Sequence[str], Callable[[str, Any], bool]]


def select_layers(
    named: Sequence[tuple[str, T]],
    ndim: Callable[[T], int],
    layers: LayerSelector = None,
    what: str = "trainable parameters",
) -> list[tuple[str, T]]:
    """The (name, tensor) pairs of ``named`` that ``layers`` selects, in ``named``'s order
    (for a sequence of names: in the sequence's order).

    Raises ValueError for unknown names or an empty selection.
    """
    if layers is None or isinstance(layers, (str, re.Pattern)) or callable(layers):
        if layers is None:
            keep: Callable[[str, T], bool] = lambda n, t: True  # noqa: E731
        elif isinstance(layers, (str, re.Pattern)):
            pattern = re.compile(layers) if isinstance(layers, str) else layers
            keep = lambda n, t: bool(pattern.search(n))  # noqa: E731
        else:
            keep = layers
        chosen = [(n, t) for n, t in named if ndim(t) >= 2 and keep(n, t)]
        if not chosen:
            raise ValueError(
                f"no layers selected: none of the {what} with ndim >= 2 matches `layers`"
                + ("" if layers is None else f" ({layers!r})")
            )
        return chosen
    wanted = [layers] if isinstance(layers, bytes) else list(layers)
    by_name = dict(named)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"layers not found among the {what}: {unknown}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"layers= names a layer twice: {wanted}")
    if not wanted:
        raise ValueError("no layers selected: `layers` is an empty list")
    return [(n, by_name[n]) for n in wanted]
