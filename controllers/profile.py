"""Static rate profiles: RateCommands from an alpha / rho(t) description (``control set``).

The command is checked here with the same rules the job uses (``layrot.core.rates``,
numpy only), so a typo fails in the operator's terminal instead of as a
rejection from the job. The job still validates everything itself: it alone
knows its ``rho_max`` and its layer names.
"""

from __future__ import annotations

import getpass
import math
import socket
from collections.abc import Iterable, Mapping, Sequence

from layrot.core.rates import DEFAULT_RHO0, MODES, SCHEDULE_KINDS, RhoSchedule, alpha_profile
from layrot.proto import layrot_pb2 as pb
from layrot.proto.commands import schedule_to_proto

__all__ = ["issuer", "parse_floats", "parse_layer_multipliers", "schedule_from_args", "profile_command", "off_command"]


def issuer() -> str:
    """``user@host`` of this process, for the audit trail."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def parse_floats(text: str | None, what: str) -> list[float]:
    """``"0.8,0.9,0.97"`` -> ``[0.8, 0.9, 0.97]``; ValueError naming ``what`` on bad input."""
    if text is None or not text.strip():
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            x = float(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a number") from None
        if not math.isfinite(x):
            raise ValueError(f"{what}: {part!r} is not finite")
        out.append(x)
    return out


def parse_layer_multipliers(items: Iterable[str]) -> dict[str, float]:
    """``["conv1.weight=2", "fc.weight=0.5"]`` -> ``{"conv1.weight": 2.0, "fc.weight": 0.5}``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise ValueError(f"--layer expects NAME=MULT, got {item!r}")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"--layer {item!r}: {value!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"--layer {item!r}: the multiplier must be finite and >= 0")
        out[name] = v
    return out


def schedule_from_args(
    rho0: float,
    kind: str | None = None,
    milestones: Sequence[float] = (),
    factor: float = 0.2,
    total_steps: int = 0,
    rho_min: float = 0.0,
) -> RhoSchedule:
    """A validated RhoSchedule; ``kind`` defaults to "step" with milestones, else "constant"."""
    if kind is None:
        kind = "step" if milestones else "constant"
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_KINDS)}, got {kind!r}")
    if milestones and kind != "step":
        raise ValueError(f"--milestones only apply to the step schedule, not {kind!r}")
    if kind == "step" and not milestones:
        raise ValueError("the step schedule needs --milestones (steps, or fractions of --total-steps)")
    return RhoSchedule(
        rho0=rho0, kind=kind, milestones=tuple(milestones), factor=factor, total_steps=int(total_steps), rho_min=rho_min
    )


def profile_command(
    *,
    alpha: float = 0.0,
    rho0: float = DEFAULT_RHO0,
    schedule: RhoSchedule | None = None,
    multipliers: Sequence[float] = (),
    layer_multipliers: Mapping[str, float] | None = None,
    mode: str = "layca",
    reason: str = "",
    controller: str = "manual",
    step_offset: int = 0,
    issued_by: str | None = None,
) -> pb.RateCommand:
    """A RateCommand for an alpha profile (paper's Eq. 1) times rho(t) and optional multipliers.

    Raises ValueError for anything the job would refuse regardless of its
    settings (alpha outside [-1, 1], a malformed schedule, negative multipliers).
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    alpha_profile(alpha, 2)  # raises for |alpha| > 1
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    sched = schedule if schedule is not None else RhoSchedule(rho0=rho0)
    mults = [float(m) for m in multipliers]
    for m in mults:
        if not math.isfinite(m) or m < 0:
            raise ValueError(f"multipliers must be finite and >= 0, got {m!r}")
    if step_offset < 0:
        raise ValueError("step_offset must be >= 0")
    return pb.RateCommand(
        mode=mode,
        alpha=float(alpha),
        schedule=schedule_to_proto(sched),
        multipliers=mults,
        layer_multipliers=dict(layer_multipliers or {}),
        reason=reason,
        controller=controller,
        step_offset=int(step_offset),
        issued_by=issued_by if issued_by is not None else issuer(),
    )


def off_command(reason: str = "", issued_by: str | None = None) -> pb.RateCommand:
    """Back to the job's own Layca settings (mode "off")."""
    return pb.RateCommand(
        mode="off", reason=reason, controller="off", issued_by=issued_by if issued_by is not None else issuer()
    )
