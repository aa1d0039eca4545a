"""Framework-agnostic Layca rate rules: what decides rho_l(t).

Everything here is host-side numpy (float64) so the PyTorch and TensorFlow
Layca optimizers share one definition of the paper's rules:

- :func:`alpha_profile`: the per-layer multipliers of Eq. 1,
- :class:`RhoSchedule`: the warmup-free global rate rho(t),
- :class:`RateRule`: mode, alpha, schedule, per-layer multipliers, an optional
  AdaptCopy table and the version of the control command that produced it,
- :func:`validate_command` / :func:`rule_from_command`: turning a remote
  ``RateCommand`` into a rule, refusing anything that could hurt the job.

Steps are optimizer steps counted from 1 (the first step is step 1).

It lives beside the wire protocol because it defines what a ``RateCommand``
means: the job (hooks), the collector (requested-rate metrics) and the
controllers all read commands through it, and it depends on nothing but numpy
and the generated messages.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from layrot.proto import layrot_pb2

_log = logging.getLogger("layrot.hooks.layca")

__all__ = [
    "MODES",
    "SCHEDULE_KINDS",
    "DEFAULT_RHO0",
    "LARS_GROWTH_CAP",
    "alpha_profile",
    "RhoSchedule",
    "RateTable",
    "RateRule",
    "validate_command",
    "rule_from_command",
    "split_due",
    "resolve_commands",
    "notify_listeners",
    "edited_rule",
]

MODES = ("layca", "lars")
SCHEDULE_KINDS = ("constant", "step", "cosine")
DEFAULT_RHO0 = 3.0 ** -3
# Appendix A.4: LARS mode caps the per-step norm increase at this fraction of ||w(0)||.
LARS_GROWTH_CAP = 1e-4

_F64 = np.dtype("<f8")


def _finite(x: float) -> bool:
    try:
        return math.isfinite(float(x))
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
    if not _finite(alpha):
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
        if not _finite(self.rho0) or float(self.rho0) < 0:
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
            if not _finite(self.factor) or not (0.0 < float(self.factor) <= 1.0):
                raise ValueError(f"step decay factor must be in (0, 1], got {self.factor!r}")
            for m in self.milestones:
                if not _finite(m) or m <= 0:
                    raise ValueError(f"milestones must be steps >= 1 or fractions in (0, 1), got {m!r}")
                if m < 1.0:
                    if total <= 0:
                        raise ValueError(f"fractional milestone {m} needs total_steps > 0")
                elif m != math.floor(m):
                    raise ValueError(f"milestone {m} >= 1 must be a whole step count")
        if self.kind == "cosine":
            if total <= 0:
                raise ValueError("a cosine schedule needs total_steps > 0")
            if not _finite(self.rho_min) or not (0.0 <= float(self.rho_min) <= self.rho0):
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
            k = sum(1 for m in self._milestone_steps if step > m)  # type: ignore[attr-defined]
            return self.rho0 * self.factor ** k
        p = min((step - 1) / self.total_steps, 1.0)
        return self.rho_min + (self.rho0 - self.rho_min) * 0.5 * (1.0 + math.cos(math.pi * p))

    def to_proto(self) -> "layrot_pb2.RhoSchedule":
        """The wire form (``layrot.v1.RhoSchedule``)."""
        return layrot_pb2.RhoSchedule(
            rho0=self.rho0, kind=self.kind, milestones=list(self.milestones),
            factor=self.factor, total_steps=self.total_steps, rho_min=self.rho_min)

    @classmethod
    def from_proto(cls, msg: "layrot_pb2.RhoSchedule") -> "RhoSchedule":
        """Build from the wire form; an empty ``kind`` means ``"constant"``. Raises ValueError."""
        return cls(rho0=msg.rho0, kind=msg.kind or "constant", milestones=tuple(msg.milestones),
                   factor=msg.factor,
                   total_steps=msg.total_steps, rho_min=msg.rho_min)

    def to_dict(self) -> dict:
        """Plain-Python form for checkpoints."""
        return {"rho0": self.rho0, "kind": self.kind, "milestones": list(self.milestones),
                "factor": self.factor, "total_steps": self.total_steps, "rho_min": self.rho_min}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RhoSchedule":
        """Inverse of :meth:`to_dict`."""
        return cls(rho0=d["rho0"], kind=d["kind"], milestones=tuple(d["milestones"]),
                   factor=d["factor"], total_steps=d["total_steps"], rho_min=d["rho_min"])


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

    def to_proto(self) -> "layrot_pb2.RateTable":
        return layrot_pb2.RateTable(start_step=self.start_step, num_layers=self.rates.shape[1],
                                    rates=np.ascontiguousarray(self.rates, dtype=_F64).tobytes())

    @classmethod
    def from_proto(cls, msg: "layrot_pb2.RateTable") -> "RateTable":
        n_layers = int(msg.num_layers)
        if n_layers <= 0:
            raise ValueError("rate table num_layers must be > 0")
        if len(msg.rates) % (8 * n_layers):
            raise ValueError(f"rate table has {len(msg.rates)} bytes, not a multiple of "
                             f"8 x {n_layers} layers")
        return cls(start_step=msg.start_step,
                   rates=np.frombuffer(msg.rates, dtype=_F64).reshape(-1, n_layers))

    def to_dict(self) -> dict:
        # bytes, not numpy: torch.load(weights_only=True) accepts it.
        return {"start_step": self.start_step, "num_layers": int(self.rates.shape[1]),
                "rates": np.ascontiguousarray(self.rates, dtype=_F64).tobytes()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RateTable":
        return cls(start_step=d["start_step"],
                   rates=np.frombuffer(d["rates"], dtype=_F64).reshape(-1, int(d["num_layers"])))


def _as_multipliers(values: Iterable[float] | None, n: int) -> tuple[float, ...]:
    vals = tuple(float(v) for v in (values or ()))
    if vals and len(vals) != n:
        raise ValueError(f"expected {n} per-layer multipliers, got {len(vals)}")
    for v in vals:
        if not _finite(v) or v < 0:
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
            if not _finite(v) or v < 0:
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
    def replace(self, **changes) -> "RateRule":
        """A new, validated rule with some fields changed."""
        return dataclasses.replace(self, **changes)

    def permuted(self, order: Sequence[int], names: Sequence[str]) -> "RateRule":
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
        return dataclasses.replace(self, layer_names=tuple(names), multipliers=mult,
                                   layer_multipliers=by_name, table=table)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """Plain-Python form (no numpy objects) for checkpoints."""
        return {"layer_names": list(self.layer_names), "mode": self.mode, "alpha": self.alpha,
                "schedule": self.schedule.to_dict(), "multipliers": list(self.multipliers),
                "layer_multipliers": dict(self.layer_multipliers),
                "table": None if self.table is None else self.table.to_dict(),
                "step_offset": self.step_offset, "version": self.version}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RateRule":
        """Inverse of :meth:`to_dict`."""
        return cls(layer_names=tuple(d["layer_names"]), mode=d["mode"], alpha=d["alpha"],
                   schedule=RhoSchedule.from_dict(d["schedule"]), multipliers=tuple(d["multipliers"]),
                   layer_multipliers=dict(d["layer_multipliers"]),
                   table=None if d["table"] is None else RateTable.from_dict(d["table"]),
                   step_offset=d["step_offset"], version=d["version"])


# ---------------------------------------------------------------- commands

def _command_mode(cmd: "layrot_pb2.RateCommand") -> str:
    # proto3's default is the empty string: a command that says nothing about mode means Layca.
    return cmd.mode or "layca"


def validate_command(cmd: "layrot_pb2.RateCommand", layer_names: Sequence[str],
                     rho_max: float, base: RateRule | None = None) -> str | None:
    """Check a RateCommand against a job; None if it is safe to apply, else a human reason.

    Checks: the mode is known ("layca", "lars", "off"; empty means "layca"); every
    number is finite; ``0 <= rho0 <= rho_max``; ``-1 <= alpha <= 1``; the schedule
    is well formed; ``multipliers`` has 0 or L entries, each >= 0;
    ``layer_multipliers`` names are layers of the job, values >= 0; the AdaptCopy
    table has ``num_layers == L``, a consistent byte length and values in
    ``[0, rho_max]``; and no rate the resulting rule can produce exceeds rho_max.
    ``base`` supplies the schedule when the command carries none (default: the
    default schedule). A command with mode "off" needs no other field. Never raises.
    """
    try:
        names = list(layer_names)
        n = len(names)
        if not _finite(rho_max) or rho_max < 0:
            return f"job rho_max {rho_max!r} is not a finite number >= 0"
        mode = _command_mode(cmd)
        if mode not in MODES + ("off",):
            return f"unknown mode {cmd.mode!r} (expected layca, lars or off)"
        if mode == "off":
            return None
        if not _finite(cmd.alpha):
            return f"alpha is not finite ({cmd.alpha!r})"
        if not -1.0 <= cmd.alpha <= 1.0:
            return f"alpha {cmd.alpha:g} is outside [-1, 1]"
        if cmd.HasField("schedule"):
            s = cmd.schedule
            for fname in ("rho0", "factor", "rho_min"):
                if not _finite(getattr(s, fname)):
                    return f"schedule.{fname} is not finite ({getattr(s, fname)!r})"
            for m in s.milestones:
                if not _finite(m):
                    return f"schedule milestone is not finite ({m!r})"
            if s.rho0 < 0:
                return f"rho0 {s.rho0:g} is negative"
            if s.rho0 > rho_max:
                return f"rho0 {s.rho0:g} exceeds the job's rho_max {rho_max:g}"
            try:
                RhoSchedule.from_proto(s)
            except ValueError as e:
                return f"bad schedule: {e}"
        if len(cmd.multipliers) not in (0, n):
            return f"got {len(cmd.multipliers)} multipliers for {n} layers"
        for i, v in enumerate(cmd.multipliers):
            if not _finite(v):
                return f"multiplier {i} is not finite ({v!r})"
            if v < 0:
                return f"multiplier {i} is negative ({v:g})"
        known = set(names)
        for k, v in cmd.layer_multipliers.items():
            if k not in known:
                return f"unknown layer name {k!r} in layer_multipliers"
            if not _finite(v):
                return f"layer multiplier for {k!r} is not finite ({v!r})"
            if v < 0:
                return f"layer multiplier for {k!r} is negative ({v:g})"
        if cmd.HasField("table"):
            t = cmd.table
            if t.num_layers != n:
                return f"rate table has num_layers={t.num_layers}, the job has {n} layers"
            if n == 0 or len(t.rates) % (8 * n):
                return f"rate table has {len(t.rates)} bytes, not a multiple of 8 x {n} layers"
            vals = np.frombuffer(t.rates, dtype=_F64)
            if not np.all(np.isfinite(vals)):
                return "rate table contains non-finite values"
            if vals.size and (vals.min() < 0 or vals.max() > rho_max):
                return f"rate table values must be in [0, rho_max={rho_max:g}]"
        rule = rule_from_command(cmd, names, base if base is not None else RateRule(tuple(names)))
        top = rule.max_rate()
        if not math.isfinite(top):
            return "resulting rates are not finite"
        if top > rho_max * (1.0 + 1e-12):
            return f"resulting rates reach {top:g}, above the job's rho_max {rho_max:g}"
        return None
    except Exception as e:  # a validator must answer, not crash the training step
        return f"invalid command: {e}"


def rule_from_command(cmd: "layrot_pb2.RateCommand", layer_names: Sequence[str],
                      base: RateRule) -> RateRule:
    """The rule a (validated) RateCommand asks for.

    Mode "off" returns ``base`` (the rule the job was constructed with) tagged
    with the command's version. A command without a schedule keeps ``base``'s
    schedule. Raises ValueError on invalid input; call :func:`validate_command` first.
    """
    names = tuple(layer_names)
    mode = _command_mode(cmd)
    if mode == "off":
        return base.replace(version=cmd.version)
    schedule = RhoSchedule.from_proto(cmd.schedule) if cmd.HasField("schedule") else base.schedule
    table = RateTable.from_proto(cmd.table) if cmd.HasField("table") else None
    return RateRule(layer_names=names, mode=mode, alpha=cmd.alpha, schedule=schedule,
                    multipliers=tuple(cmd.multipliers), layer_multipliers=dict(cmd.layer_multipliers),
                    table=table, step_offset=cmd.step_offset, version=cmd.version)


# ---------------------------------------------------------------- step-boundary decisions
# Shared by the PyTorch and Keras Layca: what a job does with the commands that
# arrived since its last step, and how a local set_rule() edits its own rule.

CommandResult = tuple  # (version, applied, reason, step)


def split_due(pending: Sequence["layrot_pb2.RateCommand"], step: int
              ) -> tuple[list["layrot_pb2.RateCommand"], list["layrot_pb2.RateCommand"], list[CommandResult]]:
    """Which queued commands the boundary before ``step`` handles, and which wait.

    A command governs from ``max(apply_at_step, step)`` (``apply_at_step`` 0 =
    the next boundary). Walking from the newest version down, a command is kept
    only if it takes effect strictly before every newer one kept so far;
    otherwise a newer command replaces it before it took effect (answered
    "superseded"). Kept commands whose step has come are *due* (at most one:
    the newest due), the others are *held* until their step. So two ranks that
    hold the same commands switch at the same steps whatever order and moment
    the commands reached them in; a held command is not dropped because a newer
    one that starts later arrived. Repeated copies of a version count once.
    Returns (due, held, results for superseded commands).
    """
    step = int(step)
    by_version: dict[int, "layrot_pb2.RateCommand"] = {}
    for c in pending:
        by_version[c.version] = c  # the last copy received wins (a re-send is identical)
    due: list = []
    held: list = []
    results: list[CommandResult] = []
    earliest = None      # effective step of the newest kept command, walking down
    newer = 0
    for v in sorted(by_version, reverse=True):
        c = by_version[v]
        eff = max(int(c.apply_at_step), step)
        if earliest is not None and eff >= earliest:
            results.append((v, False, f"superseded by version {newer} before it took effect", step))
            continue
        earliest, newer = eff, v
        (due if eff == step else held).append(c)
    results.reverse()  # oldest first, like resolve_commands
    return due, held[::-1], results


def resolve_commands(pending: Sequence["layrot_pb2.RateCommand"], step: int,
                     last_result: CommandResult | None, layer_names: Sequence[str], rho_max: float,
                     base: RateRule) -> tuple[RateRule | None, list[CommandResult], CommandResult | None]:
    """Decide the queued commands at the boundary before ``step``.

    Call it with the *due* commands of :func:`split_due` (it ignores
    ``apply_at_step``: whatever it gets governs from ``step``). The newest
    version is validated and applied or rejected; older queued ones are
    answered "superseded", a version older than the last one handled
    "stale", and a repeat of the last one gets its earlier answer (a command the
    collector re-sends after a reconnect is never applied twice). Returns the
    new rule (None = rates unchanged), the results to tell listeners, and the
    new last result.
    """
    pending = sorted(pending, key=lambda c: c.version)
    newest = pending[-1]
    results: list[CommandResult] = [
        (c.version, False, f"superseded by version {newest.version} before a step boundary", step)
        for c in pending[:-1]]
    if last_result is not None and newest.version < last_result[0]:
        results.append((newest.version, False, f"stale: version {newest.version} is older than "
                        f"version {last_result[0]} already handled", step))
        return None, results, last_result
    if last_result is not None and newest.version == last_result[0] and newest.version > 0:
        results.append(last_result)  # a re-sent command: repeat its answer, change nothing
        return None, results, last_result
    reason = validate_command(newest, layer_names, rho_max, base=base)
    rule = None
    if reason is None:
        try:
            rule = rule_from_command(newest, layer_names, base)
        except Exception as e:  # validate_command should have caught it
            reason = f"invalid command: {e}"
    if rule is not None:
        wanted = int(newest.apply_at_step)
        if 0 < wanted < step:
            # The operator's command still wins, but ranks that got it in time
            # switched at ``wanted``: data-parallel replicas now differ.
            _log.warning("Layca: command version %d arrived after its step %d; applied late at step %d",
                         newest.version, wanted, step)
        _log.info("Layca: applied command version %d at step %d: %s", newest.version, step, rule.describe())
        result: CommandResult = (newest.version, True, "", step)
    else:
        _log.warning("Layca: rejected command version %d: %s", newest.version, reason)
        result = (newest.version, False, str(reason), step)
    results.append(result)
    return rule, results, result


def notify_listeners(results: Iterable[CommandResult], listeners: Iterable) -> None:
    """Call every listener with every result; a broken listener never stops training."""
    listeners = [fn for fn in listeners if fn is not None]
    for r in results:
        for fn in listeners:
            try:
                fn(*r)
            except Exception:
                _log.exception("Layca: command listener failed")


def edited_rule(base: RateRule, *, mode: str | None = None, alpha: float | None = None, rho: float | None = None,
                schedule: RhoSchedule | None = None, multipliers: Sequence[float] | None = None,
                layer_multipliers: Mapping[str, float] | None = None) -> RateRule:
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
