"""What a ``RateCommand`` means: the protocol side of the Layca rate rules.

- conversions between the pure rules of :mod:`layrot.core.rates` and their
  wire messages (:func:`schedule_to_proto`, :func:`schedule_from_proto`,
  :func:`table_to_proto`, :func:`table_from_proto`),
- :func:`validate_command` / :func:`rule_from_command`: turning a remote
  ``RateCommand`` into a rule, refusing anything that could hurt the job,
- :func:`split_due` / :func:`resolve_commands`: what a job does at a step
  boundary with the commands that arrived since the last one (shared by the
  PyTorch and Keras Layca through :mod:`layrot.agent.commands`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from layrot.core.rates import MODES, RateRule, RateTable, RhoSchedule, is_finite
from layrot.proto import layrot_pb2

_log = logging.getLogger(__name__)

__all__ = [
    "CommandResult",
    "schedule_to_proto",
    "schedule_from_proto",
    "table_to_proto",
    "table_from_proto",
    "validate_command",
    "rule_from_command",
    "split_due",
    "resolve_commands",
]

_F64 = np.dtype("<f8")

CommandResult = tuple  # (version, applied, reason, step)


# ---------------------------------------------------------------- conversions


def schedule_to_proto(s: RhoSchedule) -> layrot_pb2.RhoSchedule:
    """The wire form (``layrot.v1.RhoSchedule``) of a schedule."""
    return layrot_pb2.RhoSchedule(
        rho0=s.rho0,
        kind=s.kind,
        milestones=list(s.milestones),
        factor=s.factor,
        total_steps=s.total_steps,
        rho_min=s.rho_min,
    )


def schedule_from_proto(msg: layrot_pb2.RhoSchedule) -> RhoSchedule:
    """Build from the wire form; an empty ``kind`` means ``"constant"``. Raises ValueError."""
    return RhoSchedule(
        rho0=msg.rho0,
        kind=msg.kind or "constant",
        milestones=tuple(msg.milestones),
        factor=msg.factor,
        total_steps=msg.total_steps,
        rho_min=msg.rho_min,
    )


def table_to_proto(t: RateTable) -> layrot_pb2.RateTable:
    """The wire form of an AdaptCopy table (float64 little-endian, row-major)."""
    return layrot_pb2.RateTable(
        start_step=t.start_step, num_layers=t.rates.shape[1], rates=np.ascontiguousarray(t.rates, dtype=_F64).tobytes()
    )


def table_from_proto(msg: layrot_pb2.RateTable) -> RateTable:
    """Build from the wire form; raises ValueError on an inconsistent byte length."""
    n_layers = int(msg.num_layers)
    if n_layers <= 0:
        raise ValueError("rate table num_layers must be > 0")
    if len(msg.rates) % (8 * n_layers):
        raise ValueError(f"rate table has {len(msg.rates)} bytes, not a multiple of 8 x {n_layers} layers")
    return RateTable(start_step=msg.start_step, rates=np.frombuffer(msg.rates, dtype=_F64).reshape(-1, n_layers))


# ---------------------------------------------------------------- commands


def _command_mode(cmd: layrot_pb2.RateCommand) -> str:
    # proto3's default is the empty string: a command that says nothing about mode means Layca.
    return cmd.mode or "layca"


def validate_command(
    cmd: layrot_pb2.RateCommand, layer_names: Sequence[str], rho_max: float, base: RateRule | None = None
) -> str | None:
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
        if not is_finite(rho_max) or rho_max < 0:
            return f"job rho_max {rho_max!r} is not a finite number >= 0"
        mode = _command_mode(cmd)
        if mode not in MODES + ("off",):
            return f"unknown mode {cmd.mode!r} (expected layca, lars or off)"
        if mode == "off":
            return None
        if not is_finite(cmd.alpha):
            return f"alpha is not finite ({cmd.alpha!r})"
        if not -1.0 <= cmd.alpha <= 1.0:
            return f"alpha {cmd.alpha:g} is outside [-1, 1]"
        if cmd.HasField("schedule"):
            s = cmd.schedule
            for fname in ("rho0", "factor", "rho_min"):
                if not is_finite(getattr(s, fname)):
                    return f"schedule.{fname} is not finite ({getattr(s, fname)!r})"
            for m in s.milestones:
                if not is_finite(m):
                    return f"schedule milestone is not finite ({m!r})"
            if s.rho0 < 0:
                return f"rho0 {s.rho0:g} is negative"
            if s.rho0 > rho_max:
                return f"rho0 {s.rho0:g} exceeds the job's rho_max {rho_max:g}"
            try:
                schedule_from_proto(s)
            except ValueError as e:
                return f"bad schedule: {e}"
        if len(cmd.multipliers) not in (0, n):
            return f"got {len(cmd.multipliers)} multipliers for {n} layers"
        for i, v in enumerate(cmd.multipliers):
            if not is_finite(v):
                return f"multiplier {i} is not finite ({v!r})"
            if v < 0:
                return f"multiplier {i} is negative ({v:g})"
        known = set(names)
        for k, v in cmd.layer_multipliers.items():
            if k not in known:
                return f"unknown layer name {k!r} in layer_multipliers"
            if not is_finite(v):
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


def rule_from_command(cmd: layrot_pb2.RateCommand, layer_names: Sequence[str], base: RateRule) -> RateRule:
    """The rule a (validated) RateCommand asks for.

    Mode "off" returns ``base`` (the rule the job was constructed with) tagged
    with the command's version. A command without a schedule keeps ``base``'s
    schedule. Raises ValueError on invalid input; call :func:`validate_command` first.
    """
    names = tuple(layer_names)
    mode = _command_mode(cmd)
    if mode == "off":
        return base.replace(version=cmd.version)
    schedule = schedule_from_proto(cmd.schedule) if cmd.HasField("schedule") else base.schedule
    table = table_from_proto(cmd.table) if cmd.HasField("table") else None
    return RateRule(
        layer_names=names,
        mode=mode,
        alpha=cmd.alpha,
        schedule=schedule,
        multipliers=tuple(cmd.multipliers),
        layer_multipliers=dict(cmd.layer_multipliers),
        table=table,
        step_offset=cmd.step_offset,
        version=cmd.version,
    )


# ---------------------------------------------------------------- step-boundary decisions
# Shared by the PyTorch and Keras Layca: what a job does with the commands that
# arrived since its last step, and how a local set_rule() edits its own rule.


def split_due(
    pending: Sequence[layrot_pb2.RateCommand], step: int
) -> tuple[list[layrot_pb2.RateCommand], list[layrot_pb2.RateCommand], list[CommandResult]]:
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
    by_version: dict[int, layrot_pb2.RateCommand] = {}
    for c in pending:
        by_version[c.version] = c  # the last copy received wins (a re-send is identical)
    due: list = []
    held: list = []
    results: list[CommandResult] = []
    earliest = None  # effective step of the newest kept command, walking down
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


def resolve_commands(
    pending: Sequence[layrot_pb2.RateCommand],
    step: int,
    last_result: CommandResult | None,
    layer_names: Sequence[str],
    rho_max: float,
    base: RateRule,
) -> tuple[RateRule | None, list[CommandResult], CommandResult | None]:
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
        (c.version, False, f"superseded by version {newest.version} before a step boundary", step) for c in pending[:-1]
    ]
    if last_result is not None and newest.version < last_result[0]:
        results.append(
            (
                newest.version,
                False,
                f"stale: version {newest.version} is older than version {last_result[0]} already handled",
                step,
            )
        )
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
            _log.warning(
                "Layca: command version %d arrived after its step %d; applied late at step %d",
                newest.version,
                wanted,
                step,
            )
        _log.info("Layca: applied command version %d at step %d: %s", newest.version, step, rule.describe())
        result: CommandResult = (newest.version, True, "", step)
    else:
        _log.warning("Layca: rejected command version %d: %s", newest.version, reason)
        result = (newest.version, False, str(reason), step)
    results.append(result)
    return rule, results, result
