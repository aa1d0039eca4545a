"""The layer rule, shared by every hook and Layca: which named weights are *layers*.

A layer is a multiplicative weight: a trainable tensor with ndim >= 2 whose
*role* is a weight (dense and convolution kernels, embeddings, attention
projections, custom 2-D+ weights). The role is read from the last component
of the variable's name (``.../query/bias``, ``encoder.0.self_attn.in_proj_bias``),
because ndim alone is not enough: Keras ``MultiHeadAttention`` keeps its
query/key/value biases as (heads, head_dim) matrices, ``nn.MultiheadAttention``
its ``bias_k`` as (1, 1, E), and a per-channel scale may be stored as
(1, C, 1, 1). Those are additive or per-channel parameters: their "rotation" is
meaningless (they start at zero, so it is NaN) and under Layca they would take
Eq. 1 positions. Roles (:func:`variable_role`):

* ``"bias"``: a last name component that is ``bias`` or has ``bias`` as one of
  its ``_``-separated words (``in_proj_bias``, ``bias_k``, ``recurrent_bias``);
* ``"normalization"``: ``gamma``, ``beta`` (Keras normalization layers) and the
  moving statistics (``moving_mean``, ``moving_variance``, ``running_mean``,
  ``running_var``);
* ``"weight"``: everything else (``kernel``, ``embeddings``, ``weight``,
  ``depthwise_kernel``, ``in_proj_weight``, unnamed custom tensors).

``layers=`` narrows or overrides that choice the same way in PyTorch and TensorFlow:

* None: every candidate (role ``"weight"`` with ndim >= 2, :func:`is_layer`);
* a regex (string or compiled; ``re.search`` on names) or a predicate
  ``(name, tensor) -> bool``: filters those candidates, so ``layers="head"``
  picks the head's kernel, not its bias;
* a sequence of exact names: exactly those, even 1-D ones or biases (an explicit choice).

Framework-free: callers pass (name, tensor) pairs and how to read a tensor's ndim.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

#: What ``layers=`` accepts.
LayerSelector = Union[None, str, "re.Pattern[str]", Sequence[str], Callable[[str, Any], bool]]

#: The roles :func:`variable_role` tells apart.
Role = Literal["weight", "bias", "normalization"]

# Keras separates path components with "/", PyTorch with "."; variable_names() adds
# "#index" to duplicates and TF 2 names may still carry ":0".
_SPLIT = re.compile(r"[/.]")
_SUFFIX = re.compile(r"(#\d+|:\d+)$")
_NORMALIZATION = frozenset({"gamma", "beta", "moving_mean", "moving_variance", "running_mean", "running_var"})


def variable_role(name: str) -> Role:
    """The role of a variable from its name's last component (see the module docstring)."""
    last = _SPLIT.split(_SUFFIX.sub("", name))[-1].lower()
    if "bias" in last.split("_") or last == "biases":
        return "bias"
    if last in _NORMALIZATION:
        return "normalization"
    return "weight"


def is_layer(name: str, ndim: int) -> bool:
    """Whether a variable is a layer by default: a multiplicative weight with ndim >= 2."""
    return ndim >= 2 and variable_role(name) == "weight"


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
        chosen = [(n, t) for n, t in named if is_layer(n, ndim(t)) and keep(n, t)]
        if not chosen:
            raise ValueError(
                f"no layers selected: none of the {what} that are weights with ndim >= 2 "
                "(not biases or normalization parameters) matches `layers`"
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
