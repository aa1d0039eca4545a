"""Framework-agnostic Layca rate rules: what decides rho_l(t).

Pure host-side numpy (float64), no protocol code, so the PyTorch and
TensorFlow Layca optimizers, the collector and the controllers share one
definition of the paper's rules:

- :func:`alpha_profile`: the per-layer multipliers of Eq. 1,
- :class:`RhoSchedule`: the warmup-free global rate rho(t),
- :class:`RateTable`: an AdaptCopy replay of recorded per-layer rates,
- :class:`RateRule`: mode, alpha, schedule, per-layer multipliers, an optional
  AdaptCopy table and the version of the control command that produced it,
- :func:`edited_rule`: a job's own local change of its rule.

What a remote ``RateCommand`` means (validation, conversion to a rule) lives
beside the protocol, in :mod:`layrot.proto.commands`.

Steps are optimizer steps counted from 1 (the first step is step 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "MODES",
    "SCHEDULE_KINDS",
    "DEFAULT_RHO0",
    "LARS_GROWTH_CAP",
    "alpha_profile",
    "RhoSchedule",
    "RateTable",
    "RateRule",
    "edited_rule",
    "is_finite",
]

MODES = ("layca", "lars")
SCHEDULE_KINDS = ("constant", "step", "cosine")
DEFAULT_RHO0 = 3.0**-3
# Appendix A.4: LARS mode caps the per-step norm increase at this fraction of ||w(0)||.
LARS_GROWTH_CAP = 1e-4

_F64 = np.dtype("<f8")


def is_finite(x: object) -> bool:
    """True for a number that converts to a finite float (never raises)."""
    try:
        return math.isfinite(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False


def alpha_profile(alpha: float, num_layers: int) -> np.ndarray:
    """Per-layer rate multipliers of the paper's Eq. 1 (float64, forward order).

    ``m_l = (1-alpha)^(5(L-1-l)/(L-1))`` if ``alpha > 0``, else
    ``(1+alpha)^(5 l/(L-1))``; layer 0 is the first layer in the forward pass.
    ``alpha < 0`` favours the first layers, ``alpha > 0`` the last, 0 is uniform.

    Edge cases: ``L = 1`` gives ``[1.0]`` (the exponent's ``L-1`` would be 0);
    ``alpha = 1`` gives 1 for the last layer and 0 for all others (those layers
    are frozen: they do not rotate at all); ``alpha = -1`` symmetrically keeps
    only the first layer. Raises ValueError for non-finite ``alpha``,
    ``|alpha| > 1`` or a negative layer count.
    """
    if not is_finite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    alpha = float(alpha)
    if abs(alpha) > 1.0:
        raise ValueError(f"alpha must be in [-1, 1], got {alpha}")
    num_layers = int(num_layers)
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if num_layers == 0:
        return np.zeros(0, dtype=np.float64)
    if num_layers == 1:
        return np.ones(1, dtype=np.float64)
    l = np.arange(num_layers, dtype=np.float64)
    span = float(num_layers - 1)
    if alpha > 0:
        # 0.0 ** 0.0 == 1.0 keeps the last layer at rho(t) when alpha == 1.
        return np.power(1.0 - alpha, 5.0 * (span - l) / span)
    return np.power(1.0 + alpha, 5.0 * l / span)


@dataclass(frozen=True)
class RhoSchedule:
    """A warmup-free global rate schedule rho(t); ``rho_at(1) == rho0``.

    kinds:
      - ``"constant"``: rho0 at every step.
      - ``"step"``: rho0 * factor^k where k counts the milestones m with
        ``step > m`` (the decay takes effect after m steps, like MultiStepLR).
        Milestones >= 1 are step counts (integers); milestones in (0, 1) are
        fractions of ``total_steps`` (rounded to the nearest step).
      - ``"cosine"``: ``rho_min + (rho0 - rho_min) (1 + cos(pi p)) / 2`` with
        ``p = min((step-1)/total_steps, 1)`` (as CosineAnnealingLR with
        T_max = total_steps), then rho_min.
    All schedules are non-increasing, so rho0 is their maximum.
    """

    rho0: float = DEFAULT_RHO0
    kind: str = "constant"
    milestones: tuple[float, ...] = ()
    factor: float = 0.2
    total_steps: int = 0
    rho_min: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if not is_finite(self.rho0) or float(self.rho0) < 0:
            raise ValueError(f"rho0 must be a finite number >= 0, got {self.rho0!r}")
        object.__setattr__(self, "rho0", float(self.rho0))
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        try:
            total = int(self.total_steps)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"total_steps must be an integer >= 0, got {self.total_steps!r}") from None
        if total < 0 or total != self.total_steps:
            raise ValueError(f"total_steps must be an integer >= 0, got {self.total_steps!r}")
        object.__setattr__(self, "total_steps", total)
        if self.kind == "step":
            if not is_finite(self.factor) or not (0.0 < float(self.factor) <= 1.0):
                raise ValueError(f"step decay factor must be in (0, 1], got {self.factor!r}")
            for m in self.milestones:
                if not is_finite(m) or m <= 0:
                    raise ValueError(f"milestones must be steps >= 1 or fractions in (0, 1), got {m!r}")
                if m < 1.0:
                    if total <= 0:
                        raise ValueError(f"fractional milestone {m} needs total_steps > 0")
                elif m != math.floor(m):
                    raise ValueError(f"milestone {m} >= 1 must be a whole step count")
        if self.kind == "cosine":
            if total <= 0:
                raise ValueError("a cosine schedule needs total_steps > 0")
            if not is_finite(self.rho_min) or not (0.0 <= float(self.rho_min) <= self.rho0):
                raise ValueError(f"rho_min must be in [0, rho0={self.rho0}], got {self.rho_min!r}")
        object.__setattr__(self, "factor", float(self.factor))
        object.__setattr__(self, "rho_min", float(self.rho_min))
        # Resolved milestone steps, sorted; fractions become step counts once here.
        steps = []
        if self.kind == "step":
            for m in self.milestones:
                steps.append(int(round(m * total)) if m < 1.0 else int(m))
        object.__setattr__(self, "_milestone_steps", tuple(sorted(steps)))

    @property
    def milestone_steps(self) -> tuple[int, ...]:
        """Milestones as step counts (the decay applies to steps after each)."""
        return self._milestone_steps  # type: ignore[attr-defined]

    def rho_at(self, step: int) -> float:
        """Global rate for optimizer step ``step`` (1 = the first step; < 1 is clamped to 1)."""
        step = max(int(step), 1)
        if self.kind == "constant":
            return self.rho0
        if self.kind == "step":
            k = len([m for m in self.milestone_steps if step > m])
            return self.rho0 * self.factor**k
        p = min((step - 1) / self.total_steps, 1.0)
        return self.rho_min + (self.rho0 - self.rho_min) * 0.5 * (1.0 + math.cos(math.pi * p))

    def to_dict(self) -> dict:
        """Plain-Python form for checkpoints."""
        return {
            "rho0": self.rho0,
            "kind": self.kind,
            "milestones": list(self.milestones),
            "factor": self.factor,
            "total_steps": self.total_steps,
            "rho_min": self.rho_min,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> RhoSchedule:
        """Inverse of :meth:`to_dict`."""
        return cls(
            rho0=d["rho0"],
            kind=d["kind"],
            milestones=tuple(d["milestones"]),
            factor=d["factor"],
            total_steps=d["total_steps"],
            rho_min=d["rho_min"],
        )


@dataclass(frozen=True, eq=False)
class RateTable:
    """AdaptCopy replay: ``rates[step - start_step, l]`` for the job steps it covers."""

    start_step: int
    rates: np.ndarray  # (n_steps, num_layers) float64, read-only

    def __post_init__(self) -> None:
        r = np.array(self.rates, dtype=np.float64, copy=True)
        if r.ndim != 2:
            raise ValueError(f"rate table must be 2-D (steps, layers), got shape {r.shape}")
        if not np.all(np.isfinite(r)) or np.any(r < 0):
            raise ValueError("rate table values must be finite and >= 0")
        if int(self.start_step) < 0:
            raise ValueError("start_step must be >= 0")
        r.setflags(write=False)
        object.__setattr__(self, "rates", r)
        object.__setattr__(self, "start_step", int(self.start_step))

    @property
    def num_steps(self) -> int:
        return int(self.rates.shape[0])

    def row(self, step: int) -> int | None:
        """Row index for ``step``, or None when the table does not cover it."""
        i = int(step) - self.start_step
        return i if 0 <= i < self.rates.shape[0] else None

    def to_dict(self) -> dict:
        # bytes, not numpy: torch.load(weights_only=True) accepts it.
        return {
            "start_step": self.start_step,
            "num_layers": int(self.rates.shape[1]),
            "rates": np.ascontiguousarray(self.rates, dtype=_F64).tobytes(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> RateTable:
        return cls(
            start_step=d["start_step"], rates=np.frombuffer(d["rates"], dtype=_F64).reshape(-1, int(d["num_layers"]))
        )


def _as_multipliers(values: Iterable[float] | None, n: int) -> tuple[float, ...]:
    vals = tuple(float(v) for v in (values or ()))
    if vals and len(vals) != n:
        raise ValueError(f"expected {n} per-layer multipliers, got {len(vals)}")
    for v in vals:
        if not is_finite(v) or v < 0:
            raise ValueError(f"multipliers must be finite and >= 0, got {v!r}")
    return vals


@dataclass(frozen=True, eq=False)
class RateRule:
    """Everything that decides the per-layer rates rho_l(t) of one job.

    ``rates(step) = base(step) * multipliers[l] * layer_multipliers[name_l]`` where
    ``base(step)`` is the AdaptCopy table row when ``table`` covers the (job) step,
    else ``alpha_profile(alpha, L) * schedule.rho_at(step - step_offset)``.

    ``version`` is the RateCommand version that produced the rule (0 = local settings).
    Instances are immutable; use :meth:`replace` to derive new ones.
    """

    layer_names: tuple[str, ...]
    mode: str = "layca"
    alpha: float = 0.0
    schedule: RhoSchedule = field(default_factory=RhoSchedule)
    multipliers: tuple[float, ...] = ()
    layer_multipliers: Mapping[str, float] = field(default_factory=dict)
    table: RateTable | None = None
    step_offset: int = 0
    version: int = 0

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.layer_names)
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")
        object.__setattr__(self, "layer_names", names)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        profile = alpha_profile(self.alpha, len(names))
        object.__setattr__(self, "alpha", float(self.alpha))
        if not isinstance(self.schedule, RhoSchedule):
            raise TypeError("schedule must be a RhoSchedule")
        mult = np.ones(len(names), dtype=np.float64)
        per_layer = _as_multipliers(self.multipliers, len(names))
        object.__setattr__(self, "multipliers", per_layer)
        if per_layer:
            mult *= np.asarray(per_layer, dtype=np.float64)
        by_name = {str(k): float(v) for k, v in dict(self.layer_multipliers).items()}
        index = {n: i for i, n in enumerate(names)}
        for k, v in by_name.items():
            if k not in index:
                raise ValueError(f"unknown layer name {k!r} in layer_multipliers")
            if not is_finite(v) or v < 0:
                raise ValueError(f"layer multiplier for {k!r} must be finite and >= 0, got {v!r}")
            mult[index[k]] *= v
        object.__setattr__(self, "layer_multipliers", by_name)
        if self.table is not None and self.table.rates.shape[1] != len(names):
            raise ValueError(f"rate table has {self.table.rates.shape[1]} layers, the job has {len(names)}")
        if int(self.step_offset) < 0 or int(self.version) < 0:
            raise ValueError("step_offset and version must be >= 0")
        object.__setattr__(self, "step_offset", int(self.step_offset))
        object.__setattr__(self, "version", int(self.version))
        mult.setflags(write=False)
        pv = profile * mult
        pv.setflags(write=False)
        object.__setattr__(self, "_mult", mult)
        object.__setattr__(self, "_profile", pv)
        tm = None
        if self.table is not None:
            tm = self.table.rates * mult[None, :]
            tm.setflags(write=False)
        object.__setattr__(self, "_table", tm)

    # ------------------------------------------------------------ queries
    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def multiplier_vector(self) -> np.ndarray:
        """Combined per-layer multipliers (index and name), float64, read-only."""
        return self._mult  # type: ignore[attr-defined]

    @property
    def profile_vector(self) -> np.ndarray:
        """``alpha_profile * multipliers``: rates per unit of rho(t), float64, read-only."""
        return self._profile  # type: ignore[attr-defined]

    @property
    def table_matrix(self) -> np.ndarray | None:
        """The AdaptCopy table times the multipliers, (n_steps, L), or None."""
        return self._table  # type: ignore[attr-defined]

    def source(self, step: int) -> tuple[str, float]:
        """How ``rates(step)`` is formed: ``("table", row)`` or ``("profile", rho_t)``.

        ``rates(step)`` equals ``table_matrix[row]`` or ``profile_vector * rho_t``;
        device implementations cache on this key instead of re-uploading rates.
        """
        if self.table is not None:
            row = self.table.row(step)
            if row is not None:
                return ("table", row)
        return ("profile", self.schedule.rho_at(int(step) - self.step_offset))

    def rates(self, step: int) -> np.ndarray:
        """Per-layer rates rho_l for optimizer step ``step`` (float64, forward order)."""
        kind, value = self.source(step)
        if kind == "table":
            return np.array(self._table[int(value)], dtype=np.float64)  # type: ignore[attr-defined]
        return self._profile * float(value)  # type: ignore[attr-defined]

    def max_rate(self) -> float:
        """Upper bound of ``rates(step)`` over all steps (schedules never increase)."""
        m = float(np.max(self._profile, initial=0.0)) * self.schedule.rho0  # type: ignore[attr-defined]
        if self._table is not None and self._table.size:  # type: ignore[attr-defined]
            m = max(m, float(np.max(self._table)))  # type: ignore[attr-defined]
        return m

    def describe(self) -> str:
        """One line for logs and audit trails."""
        s = self.schedule
        parts = [f"mode={self.mode}", f"alpha={self.alpha:g}", f"rho0={s.rho0:g}", f"schedule={s.kind}"]
        if s.kind == "step":
            parts.append(f"milestones={list(s.milestone_steps)} factor={s.factor:g}")
        if s.kind == "cosine":
            parts.append(f"total_steps={s.total_steps} rho_min={s.rho_min:g}")
        if self.multipliers or self.layer_multipliers:
            parts.append("multipliers")
        if self.table is not None:
            parts.append(f"table[{self.table.start_step}..+{self.table.num_steps}]")
        if self.step_offset:
            parts.append(f"step_offset={self.step_offset}")
        parts.append(f"version={self.version}")
        return " ".join(parts)

    # ------------------------------------------------------------ derivation
    def replace(self, **changes) -> RateRule:
        """A new, validated rule with some fields changed."""
        return dataclasses.replace(self, **changes)

    def permuted(self, order: Sequence[int], names: Sequence[str]) -> RateRule:
        """The same rule for a reordered/renamed layer list.

        ``order[j]`` is the old index of new layer j; every layer keeps its own
        index multiplier and table column. By-name multipliers are kept only
        for names that still exist (they follow the name, not the index).
        """
        order = [int(i) for i in order]
        if sorted(order) != list(range(self.num_layers)) or len(names) != self.num_layers:
            raise ValueError("order must be a permutation of the current layers")
        mult = tuple(self.multipliers[i] for i in order) if self.multipliers else ()
        table = None
        if self.table is not None:
            table = RateTable(self.table.start_step, self.table.rates[:, order])
        by_name = {k: v for k, v in self.layer_multipliers.items() if k in set(names)}
        return dataclasses.replace(
            self, layer_names=tuple(names), multipliers=mult, layer_multipliers=by_name, table=table
        )

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """Plain-Python form (no numpy objects) for checkpoints."""
        return {
            "layer_names": list(self.layer_names),
            "mode": self.mode,
            "alpha": self.alpha,
            "schedule": self.schedule.to_dict(),
            "multipliers": list(self.multipliers),
            "layer_multipliers": dict(self.layer_multipliers),
            "table": None if self.table is None else self.table.to_dict(),
            "step_offset": self.step_offset,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> RateRule:
        """Inverse of :meth:`to_dict`."""
        return cls(
            layer_names=tuple(d["layer_names"]),
            mode=d["mode"],
            alpha=d["alpha"],
            schedule=RhoSchedule.from_dict(d["schedule"]),
            multipliers=tuple(d["multipliers"]),
            layer_multipliers=dict(d["layer_multipliers"]),
            table=None if d["table"] is None else RateTable.from_dict(d["table"]),
            step_offset=d["step_offset"],
            version=d["version"],
        )


def edited_rule(
    base: RateRule,
    *,
    mode: str | None = None,
    alpha: float | None = None,
    rho: float | None = None,
    schedule: RhoSchedule | None = None,
    multipliers: Sequence[float] | None = None,
    layer_multipliers: Mapping[str, float] | None = None,
) -> RateRule:
    """``base`` with the given fields changed, as the job's own rule (version 0, no table).

    ``rho`` sets a constant schedule; pass it or ``schedule``, not both.
    """
    changes: dict = {"version": 0, "table": None, "step_offset": 0}
    if mode is not None:
        changes["mode"] = mode
    if alpha is not None:
        changes["alpha"] = alpha
    if rho is not None and schedule is not None:
        raise ValueError("pass rho or schedule, not both")
    if rho is not None:
        changes["schedule"] = RhoSchedule(rho0=rho)
    if schedule is not None:
        changes["schedule"] = schedule
    if multipliers is not None:
        changes["multipliers"] = tuple(multipliers)
    if layer_multipliers is not None:
        changes["layer_multipliers"] = dict(layer_multipliers)
    return base.replace(**changes)
