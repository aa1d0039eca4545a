"""SGD_AMom, framework-free: the paper's Appendix B.4 rule and which runs need it.

SGD with Adam-style momentum (Carbonnelle & De Vleeschouwer, Appendix B.4) keeps
Adam's first-moment average and drops Adam's per-parameter scaling::

    g_t = grad_t + weight_decay * w_{t-1}
    v_t = m * v_{t-1} + (1 - m) * g_t          v_0 = 0
    w_t = w_{t-1} - rho * v_t

It is the base optimizer that AdaptCopy of an Adam run needs (the paper's
Section 5.4, footnote 5): the copy replays Adam's per-layer rotation rates with
Layca, which keeps only the direction of the base step, so the base keeps Adam's
momentum scheme and drops only its parameter-level adaptivity (the thing the
experiment removes).

Details the paper leaves open, and the choices made here (the PyTorch and Keras
optimizers take them all from this module):

- ``v_0 = 0``: the recursion starts from a zero average, as Adam's ``m_0 = 0``
  and the authors' Keras code (``adam_like_momentum``, velocities from
  ``K.zeros``). ``torch.optim.SGD(momentum=m, dampening=m)`` is *not* this rule:
  it starts its buffer at ``g_1`` (no dampening on the first step), so its
  velocity carries an extra ``m^t g_1`` at step t.
- No bias correction by default: the paper's formula has none, nor has the
  authors' code. ``bias_correction=True`` divides ``v_t`` by ``1 - m^t`` (Adam's
  ``m_hat``), which matters only without Layca: Layca rescales each layer's
  step to ``||w||``, so a factor common to a whole tensor cancels (the layers
  follow the same trajectory either way; parameters Layca leaves to the base,
  such as biases, do not).
- Weight decay is L2 added to the gradient before the average (the paper's
  "Adam + L2" runs, and torch's ``SGD(weight_decay=...)``), not decoupled.

Steps are counted from 1 (the first ``step()`` is step 1).
"""

from __future__ import annotations

import math
import re

__all__ = [
    "OPTIMIZER_META_KEY",
    "validate",
    "average_gains",
    "step_size",
    "base_for",
    "is_sgd_amom",
]

# Hello.meta key under which a job may name its optimizer, e.g. meta={"optimizer": "Adam"}.
OPTIMIZER_META_KEY = "optimizer"

# Optimizers whose update follows an exponential moving average of gradients (Adam's first
# moment): their step direction is SGD_AMom's. RMSprop / Adagrad / Adadelta have no such
# average (torch's RMSprop momentum is heavy-ball), so a copy of them keeps plain SGD.
_ADAM_FAMILY = frozenset({"adam", "adamw", "nadam", "nadamw", "radam", "adamax", "amsgrad", "sparseadam", "lamb"})
_OTHER_ADAPTIVE = frozenset({"rmsprop", "adagrad", "adadelta", "adafactor"})


def validate(lr: float, momentum: float, weight_decay: float) -> None:
    """Raise ValueError for hyperparameters outside the rule's domain.

    ``momentum`` must be in [0, 1): at 1 the gradient gain ``1 - m`` is zero and
    nothing ever moves.
    """
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"Invalid momentum value: {momentum} (SGD_AMom needs 0 <= momentum < 1)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def average_gains(momentum: float) -> tuple[float, float]:
    """``(m, 1 - m)``: the weights of ``v_{t-1}`` and ``g_t`` in ``v_t`` (Adam's first moment)."""
    return momentum, 1.0 - momentum


def step_size(lr: float, momentum: float, step: int, bias_correction: bool) -> float:
    """The factor ``rho`` (or ``rho / (1 - m^t)``) that multiplies ``v_t`` at step ``step`` (>= 1)."""
    if not bias_correction:
        return lr
    return lr / (1.0 - momentum**step)


def _class_name(name: str) -> str:
    # "Layca(SGD_AMom(momentum=0.9))" -> "sgd_amom", "torch.optim.AdamW" -> "adamw": the innermost
    # class (keyword names, followed by "=", are skipped), its last dotted part.
    names = [n for n, eq in re.findall(r"(?<![\w.])([A-Za-z_][\w.]*)\s*(=?)", name) if not eq]
    if not names:
        return ""
    return names[-1].rsplit(".", 1)[-1].lower()


def base_for(source_optimizer: str) -> str | None:
    """The base optimizer a Layca copy of a run with ``source_optimizer`` should use.

    ``"SGD_AMom"`` for the Adam family, ``"SGD"`` for the other adaptive methods
    (RMSprop, Adagrad, Adadelta) and for SGD itself, None when the name is unknown
    or empty.
    """
    name = _class_name(source_optimizer)
    if name in _ADAM_FAMILY:
        return "SGD_AMom"
    if name == "sgd_amom":
        return "SGD_AMom"
    if name in _OTHER_ADAPTIVE or name == "sgd":
        return "SGD"
    return None


def is_sgd_amom(optimizer: str) -> bool:
    """Whether an optimizer name (``Layca(...)`` wrappers allowed) names SGD_AMom."""
    return _class_name(optimizer) == "sgd_amom"
