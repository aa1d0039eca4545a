"""The collector's control plane: versioned RateCommands per run, delivery, acks, audit.

A run has at most one *current* command. ``SetControl`` gives it the next
version of the run, stores it, and pushes it on every open, control-capable
session of the run; a session that (re)connects gets the current command
again right after its Hello. Delivery is at least once: the job's Layca
answers a repeated version with its earlier result and changes nothing, so a
resend after a reconnect never applies a command twice.

The job is the authority on what it runs: it validates every command (finite
numbers, its own ``rho_max``, known layer names) and acknowledges the version
it applied or the reason it refused. The collector records those answers and
keeps an audit trail (requested / sent / applied / rejected, who, when,
what, at which step), in memory for status queries and in the history store
for restarts.

Multi-rank jobs. Layca runs on every rank of a data-parallel job after the
gradients are all-reduced, so the replicas stay identical only if every rank
switches rates at the same step; a command that reached rank 0 before step 120
and rank 1 after it would make them diverge for the rest of training, silently.
So for a run with more than one rank the collector stamps each command with
``apply_at_step`` = (highest step any rank reported) + a lead (see
:func:`command_lead`), every rank holds the command until the boundary before
that step, and a rank that gets it too late (a slow link, a reconnect) still
applies it at its next boundary and is recorded as *late*: per rank in the
status, in the audit trail and in ``layrot_control_late_total{run}``.
Single-rank runs keep ``apply_at_step`` 0 (the next boundary, lowest latency).

Everything here runs on the collector's asyncio loop thread, except
``RunControl.requested_rates`` and ``applied_state`` which the metrics thread
calls: they only read attributes that are replaced in one assignment (the
``applied`` dict included: a new dict per change, never an update in place).
"""

from __future__ import annotations

import collections
import logging
import math
import re
import sqlite3
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from layrot.core.rates import RateRule
from layrot.proto import layrot_pb2 as pb
from layrot.proto.commands import rule_from_command, validate_command
from layrot.server.store_api import StoreError

if TYPE_CHECKING:  # imported for type hints only: state.py imports this module
    from layrot.server.state import CollectorState, LiveSession, RunState
    from layrot.server.store_api import HistoryStore

log = logging.getLogger(__name__)

# Audit entries kept in memory per run (all of them are in the store).
AUDIT_KEEP = 1000
# Newest audit entries returned by GetControl.
STATUS_AUDIT = 200
# The collector does not know a job's rho_max; requested rates are computed
# for display only, so any finite bound that accepts every sane command works.
_DISPLAY_RHO_MAX = 1e300

# ---- the lead of a multi-rank command (see command_lead)
# Steps added whatever the timing: a rank may be mid-step when the command
# arrives (it can only switch at its next boundary), data-parallel ranks drift
# a step or so apart between collectives, and rounding.
MIN_LEAD_STEPS = 4
# Collector -> every rank: the gRPC push, the job's connection thread getting
# the GIL from a busy training thread, a loaded host. Loopback takes
# milliseconds; a second covers a loaded 2-core machine and a WAN link, and
# costs multi-rank commands that much latency, nothing else.
DELIVERY_SECONDS = 1.0
# A newest report older than this is a paused job (evaluation, checkpoint) or
# a clock skew between job and collector, not a report in flight: extrapolating
# further would only delay the command.
MAX_REPORT_AGE = 10.0
# Steps/s assumed before a run has two reports to measure its speed from.
FALLBACK_STEP_RATE = 100.0
# Newest reported steps of a rank the step rate is measured over.
RATE_REPORTS = 64
# apply_at_step of past versions kept in memory, to tell late acknowledgements.
APPLY_AT_KEEP = 4096


class StoredControl(NamedTuple):
    """What the history store holds of some runs' control state (``ControlPlane.read_stored``)."""

    commands: list[tuple[int, int, bytes]]  # (run_id, version, serialized command): each run's newest
    applied: list[tuple]  # (run_id, rank, version, step, time, reason): each rank's newest 'applied'
    rejected: list[tuple]  # (run_id, rank, version, reason): each rank's newest 'rejected'
    audit: dict[int, list[tuple]]  # run_id -> its newest audit rows, newest first


class ControlRefused(Exception):
    """SetControl cannot be accepted for this run (e.g. the job did not opt in)."""


# Largest integer field of a command the collector accepts: steps and versions go
# into SQLite (audit) and step arithmetic, both signed 64-bit.
_MAX_COMMAND_INT = 2**62
# Per-layer entries and table bytes of one command (a job has at most IngestLimits.max_layers layers).
_MAX_COMMAND_LAYERS = 100_000
_MAX_TABLE_BYTES = 64 << 20


def check_command_args(cmd: pb.RateCommand) -> str | None:
    """What no job could accept in a SetControl command (a reason), else None.

    The collector's own check, before the command is versioned, stored and
    sent: every number finite, rates and multipliers >= 0, alpha in [-1, 1],
    integer fields within the store's range, bounded sizes. What depends on
    the job (its rho_max, its layer names) stays the job's to check, and is
    then shown as rejected in the status.
    """
    doubles = [("alpha", cmd.alpha), ("issued_at", cmd.issued_at)]
    if cmd.HasField("schedule"):
        s = cmd.schedule
        doubles += [("schedule.rho0", s.rho0), ("schedule.factor", s.factor), ("schedule.rho_min", s.rho_min)]
        doubles += [("schedule.milestones", m) for m in s.milestones]
        if s.rho0 < 0 or s.rho_min < 0 or s.factor < 0:
            return "schedule rho0, rho_min and factor must be >= 0"
        if s.total_steps > _MAX_COMMAND_INT:
            return f"schedule.total_steps {s.total_steps} is out of range"
    if len(cmd.multipliers) > _MAX_COMMAND_LAYERS or len(cmd.layer_multipliers) > _MAX_COMMAND_LAYERS:
        return "too many multipliers"
    doubles += [("multipliers", m) for m in cmd.multipliers]
    doubles += [(f"layer_multipliers[{k[:80]!r}]", v) for k, v in cmd.layer_multipliers.items()]
    for name, v in doubles:
        if not math.isfinite(v):
            return f"{name} is not finite ({v!r})"
    if not -1.0 <= cmd.alpha <= 1.0:
        return f"alpha {cmd.alpha:g} is outside [-1, 1]"
    if any(m < 0 for m in cmd.multipliers) or any(v < 0 for v in cmd.layer_multipliers.values()):
        return "multipliers must be >= 0"
    for name in ("apply_at_step", "step_offset", "version"):
        if getattr(cmd, name) > _MAX_COMMAND_INT:
            return f"{name} {getattr(cmd, name)} is out of range"
    if cmd.HasField("table"):
        t = cmd.table
        if t.start_step > _MAX_COMMAND_INT or len(t.rates) > _MAX_TABLE_BYTES:
            return "rate table out of range (start_step or size)"
        if len(t.rates) % 8 == 0 and t.rates:
            rates = np.frombuffer(t.rates, dtype="<f8")
            if not np.isfinite(rates).all() or (rates < 0).any():
                return "rate table values must be finite and >= 0"
    for name in ("reason", "issued_by", "controller", "mode"):
        if len(getattr(cmd, name)) > 4096:
            return f"{name} is longer than 4096 characters"
    return None


def describe_command(cmd: pb.RateCommand) -> str:
    """One human-readable line for a RateCommand (audit trails, logs, CLI)."""
    mode = cmd.mode or "layca"
    if mode == "off":
        at = f" from step {cmd.apply_at_step}" if cmd.apply_at_step else ""
        return f"off: back to the job's own Layca settings{at}"
    parts = [f"mode={mode}", f"alpha={cmd.alpha:g}"]
    if cmd.HasField("schedule"):
        s = cmd.schedule
        kind = s.kind or "constant"
        parts.append(f"rho0={s.rho0:g} schedule={kind}")
        if kind == "step":
            parts.append(f"milestones={[float(m) if m < 1 else int(m) for m in s.milestones]} factor={s.factor:g}")
        if s.total_steps:
            parts.append(f"total_steps={s.total_steps}")
        if kind == "cosine":
            parts.append(f"rho_min={s.rho_min:g}")
    else:
        parts.append("schedule=job's own")
    if len(cmd.multipliers):
        m = np.asarray(cmd.multipliers, dtype=np.float64)
        parts.append(f"multipliers[{m.size}] min={m.min():.3g} max={m.max():.3g}")
    if cmd.layer_multipliers:
        items = sorted(cmd.layer_multipliers.items())
        shown = ", ".join(f"{k}={v:g}" for k, v in items[:4])
        parts.append(f"layers {{{shown}{', ...' if len(items) > 4 else ''}}}")
    if cmd.HasField("table"):
        t = cmd.table
        n = len(t.rates) // (8 * t.num_layers) if t.num_layers else 0
        parts.append(f"table steps {t.start_step}..{t.start_step + max(n, 1) - 1} ({n} x {t.num_layers})")
    if cmd.step_offset:
        parts.append(f"step_offset={cmd.step_offset}")
    if cmd.apply_at_step:
        parts.append(f"apply_at_step={cmd.apply_at_step}")
    if cmd.controller:
        parts.append(f"controller={cmd.controller}")
    return " ".join(parts)


def step_rate(rows: Sequence[tuple[int, float]]) -> float | None:
    """Training speed in steps/s from reported ``(step, time)`` rows of one rank, or None.

    The median over consecutive reports of (steps between them) / (seconds
    between them): a pause (evaluation, checkpoint) in the window does not drag
    it down, so the lead it gives errs long, never short. Both times come from
    the job's own clock, so clock skew against the collector does not matter.
    """
    pts = sorted((int(st), float(t)) for st, t in rows if t is not None and math.isfinite(t))
    rates = [(s1 - s0) / (t1 - t0) for (s0, t0), (s1, t1) in zip(pts, pts[1:]) if s1 > s0 and t1 > t0]
    return float(statistics.median(rates)) if rates else None


def command_lead(rate: float | None, report_age: float, every: int) -> int:
    """Steps between the highest reported step and ``apply_at_step`` of a multi-rank command.

    ``lead = MIN_LEAD_STEPS + every + ceil(rate * (clamp(report_age, 0, MAX_REPORT_AGE) + DELIVERY_SECONDS))``

    - ``rate * report_age``: the ranks kept training since their newest report
      was measured (``report_age`` = now - that report's time: the batching
      delay, reports every ``every`` steps, anything queued on the way);
    - ``rate * DELIVERY_SECONDS``: steps they take while the command travels
      to every rank;
    - ``every``: one more report interval, for a rank whose report is still
      in flight or a rate measured slow (a job clock ahead of the collector's
      makes ``report_age`` read short);
    - ``MIN_LEAD_STEPS``: mid-step arrival, rank drift and rounding.

    Too short a lead makes a rank late (the replicas diverge, and it shows);
    too long only delays the switch, by about ``lead / rate`` seconds (1 s plus
    a report interval for a job that reports promptly). ``rate`` None (fewer
    than two reports yet) assumes ``FALLBACK_STEP_RATE``.
    """
    r = rate if rate is not None and math.isfinite(rate) and rate > 0 else FALLBACK_STEP_RATE
    age = min(max(float(report_age), 0.0), MAX_REPORT_AGE) if math.isfinite(report_age) else MAX_REPORT_AGE
    return MIN_LEAD_STEPS + max(1, int(every)) + math.ceil(r * (age + DELIVERY_SECONDS))


_WANTED = re.compile(r"wanted step (\d+)")


class Applied(NamedTuple):
    """A rank's newest applied command: version, first step it governs, when, the step it asked for."""

    version: int
    step: int
    time: float
    wanted: int = 0  # the command's apply_at_step (0 = the next boundary, or unknown)

    @property
    def late(self) -> bool:
        """The command arrived after its apply_at_step and governs from a later step."""
        return 0 < self.wanted < self.step


def _requested_rule(cmd: pb.RateCommand, names: list[str]) -> RateRule | None:
    """The rule a command asks for, if the collector can know it (not for "off" or no schedule)."""
    if (cmd.mode or "layca") == "off" or not cmd.HasField("schedule"):
        return None
    if validate_command(cmd, names, _DISPLAY_RHO_MAX) is not None:
        return None
    try:
        return rule_from_command(cmd, names, RateRule(tuple(names)))
    except Exception:
        return None


class RunControl:
    """Control state of one run: current command, per-rank answers, recent audit."""

    def __init__(self) -> None:
        self.last_version = 0  # highest version assigned (or seen from a job)
        self.current: pb.RateCommand | None = None  # the command in force on the collector's side
        self.rule: RateRule | None = None  # its rule, for requested rates
        self.applied: dict[int, Applied] = {}  # rank -> newest applied
        self.rejected: dict[int, tuple[int, str]] = {}  # rank -> (version, reason)
        self.audit: collections.deque[pb.AuditEntry] = collections.deque(maxlen=AUDIT_KEEP)
        self.apply_at: collections.OrderedDict[int, int] = collections.OrderedDict()  # version -> apply_at_step
        self.late_total = 0  # late applications (Prometheus counter)

    @property
    def version(self) -> int:
        """Version of the current command (0 = none)."""
        return self.current.version if self.current is not None else 0

    def applied_state(self) -> tuple[int, int]:
        """(version, first step) applied by the lowest rank that answered; (0, 0) if none."""
        applied = self.applied
        if not applied:
            return 0, 0
        a = applied[min(applied)]
        return a.version, a.step

    def remember_apply_at(self, version: int, step: int) -> None:
        """Keep a command's apply_at_step, to tell a late acknowledgement of it."""
        self.apply_at[int(version)] = int(step)
        self.apply_at.move_to_end(int(version))
        while len(self.apply_at) > APPLY_AT_KEEP:
            self.apply_at.popitem(last=False)

    def wanted_step(self, version: int) -> int:
        """apply_at_step of ``version`` (0 when it had none or is no longer known)."""
        if self.current is not None and self.current.version == version:
            return int(self.current.apply_at_step)
        return self.apply_at.get(int(version), 0)

    def rejected_reason(self) -> str:
        """Why the current version was refused (first rank that refused it), else ''."""
        v = self.version
        for rank in sorted(self.rejected):
            rv, reason = self.rejected[rank]
            if rv == v and v > 0:
                return reason or "rejected"
        return ""

    def requested_rates(self, step: int) -> np.ndarray | None:
        """Per-layer rates the current command asks for at ``step`` (None when unknown)."""
        rule = self.rule
        if rule is None:
            return None
        return rule.rates(max(int(step), 1))


class ControlPlane:
    """Commands, delivery and audit for every run of one collector (loop thread)."""

    def __init__(self, state: CollectorState, store: HistoryStore) -> None:
        self.state = state
        self.store = store

    # ------------------------------------------------------------ restore
    def restore(self) -> None:
        """Load current commands, per-rank answers and recent audit from the store."""
        try:
            self._restore()
        except (sqlite3.Error, StoreError):  # an old db without the tables: nothing to restore
            log.exception("control plane: cannot restore commands from the history store")

    def _restore(self) -> None:
        runs = list(self.state.runs.values())
        n = self.apply_stored(runs, self.read_stored(None, [rs.run_id for rs in runs]))
        if n:
            log.info("control plane: restored the current command of %d runs", n)

    def read_stored(self, run_ids: Sequence[int] | None, audit_of: Sequence[int]) -> StoredControl:
        """What the store holds of the control state of ``run_ids`` (None: every run), and the recent audit
        of the runs ``audit_of``. Reads only: any thread (the executor, so the loop never waits on the
        database); ``apply_stored`` takes the result on the loop. Raises StoreError (or sqlite3.Error)."""
        store = self.store
        return StoredControl(
            store.current_commands(run_ids),
            store.last_applied(run_ids),
            store.last_rejected(run_ids),
            {run_id: store.recent_audit(run_id, AUDIT_KEEP) for run_id in audit_of},
        )

    def apply_stored(self, runs: Sequence[RunState], stored: StoredControl, replace: bool = False) -> int:
        """Make ``stored`` (``read_stored``) the control state of ``runs`` (loop thread); returns the runs with
        a current command. ``replace``: forget their answers and audit first (a run another collector holds,
        whose answers are recorded there)."""
        by_id = {rs.run_id: rs for rs in runs}
        if replace:
            for run in runs:
                run.control.audit.clear()
                run.control.applied = {}
                run.control.rejected.clear()
        n = 0
        for run_id, version, blob in stored.commands:
            rs = by_id.get(run_id)
            if rs is None:
                continue
            self._take(rs, blob, int(version))
            n += 1
        for run_id, rank, version, step, t, reason in stored.applied:
            rs = by_id.get(run_id)
            if rs is not None:
                # A late (or early) application records the step it wanted in its audit reason.
                m = _WANTED.search(reason or "")
                wanted = int(m.group(1)) if m else rs.control.wanted_step(int(version))
                rc = rs.control
                rc.applied = {**rc.applied, int(rank): Applied(int(version), int(step or 0), float(t or 0.0), wanted)}
        for run_id, rank, version, reason in stored.rejected:
            rs = by_id.get(run_id)
            if rs is not None:
                rs.control.rejected[int(rank)] = (int(version), reason or "")
        for run_id, rows in stored.audit.items():
            rs = by_id.get(run_id)
            if rs is None:
                continue
            for version, t, who, what, event, step, reason in reversed(rows):
                rs.control.audit.append(
                    pb.AuditEntry(
                        version=version or 0,
                        time=t or 0.0,
                        who=who or "",
                        what=what or "",
                        event=event or "",
                        step=step or 0,
                        reason=reason or "",
                    )
                )
        return n

    @staticmethod
    def _take(rs: RunState, blob: bytes, version: int) -> pb.RateCommand:
        """Make a stored command the run's current one."""
        cmd = pb.RateCommand()
        cmd.ParseFromString(blob)
        rc = rs.control
        rc.current = cmd
        rc.rule = _requested_rule(cmd, rs.names)
        rc.last_version = max(rc.last_version, version)
        rc.remember_apply_at(cmd.version, cmd.apply_at_step)
        return cmd

    def adopt(self, rs: RunState, blob: bytes, version: int) -> None:
        """A command another collector stored for a run whose sessions are here: current, and pushed to them."""
        cmd = self._take(rs, blob, version)
        log.info("control: run %s version %d (set through another collector) sent to its jobs", rs.run, cmd.version)
        for sess in list(rs.sessions):
            self._push(rs, sess, cmd, "set through another collector")

    # ------------------------------------------------------------ audit
    def _audit(
        self,
        rs: RunState,
        version: int,
        event: str,
        who: str,
        what: str = "",
        step: int = 0,
        reason: str = "",
        rank: int | None = None,
    ) -> None:
        entry = pb.AuditEntry(
            version=version, time=time.time(), who=who, what=what, event=event, step=step, reason=reason
        )
        rs.control.audit.append(entry)
        self.store.insert_audit((rs.run_id, version, entry.time, who, what, event, step, reason, rank))

    @staticmethod
    def _job_who(sess: LiveSession) -> str:
        return f"job rank {sess.rank} (pid {sess.pid}@{sess.host or '?'})"

    # ------------------------------------------------------------ SetControl
    @staticmethod
    def controllable(rs: RunState) -> bool:
        """True when the run opted in to remote control (now or in its first Hello)."""
        if rs.capabilities.get("control"):
            return True
        return any(s.capabilities.get("control") for s in rs.sessions)

    def set_command(self, rs: RunState, cmd: pb.RateCommand, who: str) -> pb.RateCommand:
        """Version, store and push a command for ``rs``; returns the stored command.

        Raises ControlRefused when the run did not opt in to remote control.
        The command's content is checked by the job, not here (only the job
        knows its ``rho_max``), so a bad command is stored, sent, refused by the
        job with a reason, and shows up as rejected in the status.
        """
        if not self.controllable(rs):
            raise ControlRefused(
                f"run {rs.run!r} did not opt in to remote control: start it with "
                "layrot.watch(model, optimizer, run=..., control=True) and a layrot.Layca optimizer"
            )
        rc = rs.control
        stored = pb.RateCommand()
        stored.CopyFrom(cmd)
        rc.last_version += 1
        stored.version = rc.last_version
        stored.run = rs.run
        stored.issued_at = time.time()
        if not stored.issued_by:
            stored.issued_by = who
        if not stored.controller:
            stored.controller = "off" if stored.mode == "off" else "manual"
        if self.multi_rank(rs):
            # Never earlier than the client asked for, never sooner than every rank can get it.
            stored.apply_at_step = max(stored.apply_at_step, self.apply_step(rs, stored.issued_at))
        rc.remember_apply_at(stored.version, stored.apply_at_step)
        rc.current = stored
        rc.rule = _requested_rule(stored, rs.names)
        self.store.insert_command(
            (
                rs.run_id,
                stored.version,
                stored.issued_at,
                stored.issued_by,
                stored.controller,
                stored.SerializeToString(),
            ),
        )
        what = describe_command(stored)
        self._audit(rs, stored.version, "requested", who, what, reason=stored.reason)
        log.info("control: run %s version %d requested by %s: %s", rs.run, stored.version, who, what)
        for sess in list(rs.sessions):
            self._push(rs, sess, stored, "")
        return stored

    @staticmethod
    def multi_rank(rs: RunState) -> bool:
        """True when the run has (or announced) more than one rank."""
        if rs.world_size > 1 or len(rs.last) > 1:
            return True
        return len({s.rank for s in rs.sessions}) > 1

    def apply_step(self, rs: RunState, now: float) -> int:
        """``apply_at_step`` for a multi-rank command issued at ``now``: newest step + :func:`command_lead`."""
        last = dict(rs.last)
        newest = max(last.values(), key=lambda snap: snap.step) if last else None
        if newest is None:
            rate, age, top = None, 0.0, 0
        else:
            rate = self._step_rate(rs, newest.rank)
            age, top = now - newest.time, newest.step
        lead = command_lead(rate, age, rs.every)
        log.info(
            "control: run %s has %d ranks: apply at step %d = newest step %d + lead %d (rate %s steps/s, "
            "newest report %.2f s old, every %d)",
            rs.run,
            max(rs.world_size, len(last)),
            top + lead,
            top,
            lead,
            "unknown" if rate is None else f"{rate:.3g}",
            age,
            rs.every,
        )
        return top + lead

    def _step_rate(self, rs: RunState, rank: int) -> float | None:
        # A primary-key range read of a few dozen rows: ~0.1 ms on the loop thread,
        # once per SetControl of a multi-rank run.
        try:
            rows = self.store.recent_steps(rs.run_id, rank, RATE_REPORTS)
        except (sqlite3.Error, StoreError):  # StoreError: PostgreSQL's read failures
            log.exception("control plane: cannot read the step history of run %s", rs.run)
            return None
        return step_rate(rows)

    def _push(self, rs: RunState, sess: LiveSession, cmd: pb.RateCommand, reason: str) -> None:
        if not sess.capabilities.get("control") or sess.closing:
            return
        sess.send(pb.CollectorMessage(rate_command=cmd))
        self._audit(rs, cmd.version, "sent", f"collector -> {self._job_who(sess)}", reason=reason, rank=sess.rank)

    # ------------------------------------------------------------ session events
    def on_hello(self, sess: LiveSession) -> None:
        """A session opened: re-send the run's current command if the job takes commands."""
        rs = sess.run
        if rs is None:
            return
        rc = rs.control
        # A job that ran a version this collector never assigned (lost db):
        # continue above it, or the job would refuse new commands as stale.
        if sess.applied_command_version > rc.last_version:
            rc.last_version = sess.applied_command_version
        if rc.current is not None and rc.current.version > 0:
            self._push(rs, sess, rc.current, "re-sent on (re)connect")

    def on_ack(self, sess: LiveSession, ack: pb.ControlAck) -> None:
        """The job answered a command: record applied/rejected and audit it."""
        rs = sess.run
        if rs is None:
            return
        rc = rs.control
        who = self._job_who(sess)
        if ack.applied:
            now = Applied(int(ack.version), int(ack.step), time.time(), rc.wanted_step(ack.version))
            prev = rc.applied.get(sess.rank)
            # A re-sent command is answered again with its first result: count a late one once.
            repeat = prev is not None and (prev.version, prev.step) == (now.version, now.step)
            if prev is None or ack.version >= prev.version:
                # A new dict, not an update in place: the metrics thread reads it (applied_state).
                rc.applied = {**rc.applied, sess.rank: now}
            old = rc.rejected.get(sess.rank)
            if old is not None and old[0] <= ack.version:
                del rc.rejected[sess.rank]
            reason = ""
            if now.late:
                reason = f"late (wanted step {now.wanted})"
                if not repeat:
                    rc.late_total += 1
                    log.warning(
                        "control: run %s rank %d applied version %d late at step %d (wanted %d)",
                        rs.run,
                        sess.rank,
                        now.version,
                        now.step,
                        now.wanted,
                    )
            elif now.step < now.wanted:
                # Only a job that does not hold commands does this (a layrot client older than apply_at_step).
                reason = f"early (wanted step {now.wanted}): the job does not hold commands, upgrade layrot"
                if not repeat:
                    log.warning(
                        "control: run %s rank %d applied version %d at step %d, before its step %d: "
                        "the job's layrot does not hold commands; its ranks may now differ",
                        rs.run,
                        sess.rank,
                        now.version,
                        now.step,
                        now.wanted,
                    )
            self._audit(rs, ack.version, "applied", who, step=ack.step, reason=reason, rank=sess.rank)
        else:
            rc.rejected[sess.rank] = (int(ack.version), ack.reason)
            self._audit(
                rs, ack.version, "rejected", who, step=ack.step, reason=ack.reason or "rejected", rank=sess.rank
            )
        if ack.version > rc.last_version:
            rc.last_version = int(ack.version)

    # ------------------------------------------------------------ status
    def status(self, rs: RunState, audit_limit: int = STATUS_AUDIT) -> pb.ControlStatus:
        """ControlStatus of a run: requested vs applied, per-layer rates, newest audit entries."""
        rc = rs.control
        applied_version, applied_step = rc.applied_state()
        out = pb.ControlStatus(
            run=rs.run,
            applied_version=applied_version,
            applied_step=applied_step,
            rejected_reason=rc.rejected_reason(),
            layer_names=rs.names,
        )
        if rc.current is not None:
            out.requested.CopyFrom(rc.current)
        audit = list(rc.audit)[-audit_limit:] if audit_limit > 0 else []
        out.audit.extend(audit)
        snap = rs.primary()
        step = snap.step if snap is not None else 1
        req = rc.requested_rates(step)
        if req is not None:
            out.requested_rho.extend(req.tolist())
        if snap is not None and snap.rho is not None:
            out.applied_rho.extend(float(x) for x in snap.rho)
        out.ranks.extend(self.rank_states(rs))
        return out

    @staticmethod
    def rank_states(rs: RunState) -> list[pb.RankControl]:
        """Per-rank control state, lowest rank first (every rank heard of: answered, reported or connected)."""
        rc = rs.control
        last = dict(rs.last)
        connected = {s.rank for s in rs.sessions}
        out = []
        for rank in sorted(set(rc.applied) | set(rc.rejected) | set(last) | connected):
            e = pb.RankControl(rank=rank, connected=rank in connected)
            a = rc.applied.get(rank)
            if a is not None:
                e.applied_version, e.applied_step, e.wanted_step, e.late = a.version, a.step, a.wanted, a.late
            r = rc.rejected.get(rank)
            if r is not None:
                e.rejected_version, e.rejected_reason = r[0], r[1] or "rejected"
            snap = last.get(rank)
            if snap is not None:
                e.step = snap.step
            out.append(e)
        return out


def attach(state: CollectorState, store: HistoryStore) -> ControlPlane:
    """Create the control plane of a collector, restore it, and hang it on ``state.control``.

    The collector wires its plane in server/app.py; this stays for embedders.
    """
    plane = ControlPlane(state, store)
    plane.restore()
    state.control = plane
    return plane


def client_who(request_who: str, peer: str) -> str:
    """'issued_by (peer)' for the audit trail; the token is shared, so issued_by is self-declared."""
    who = request_who.strip() or "unknown"
    return f"{who} from {peer}" if peer else who


__all__ = [
    "AUDIT_KEEP",
    "Applied",
    "ControlPlane",
    "ControlRefused",
    "RunControl",
    "StoredControl",
    "attach",
    "client_who",
    "command_lead",
    "describe_command",
    "step_rate",
]
