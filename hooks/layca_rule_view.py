"""What the PyTorch and the Keras Layca share above the math: views of their rate rule, the command intake."""

from __future__ import annotations

import numpy as np

from layrot.agent.commands import CommandInbox, CommandListener, RateCommand
from layrot.core.rates import RateRule


class RuleView:
    """Mixin: properties over ``_rule`` (in force), ``_base_rule`` (the job's own) and ``_rho_max``."""

    _rule: RateRule
    _base_rule: RateRule
    _rho_max: float

    @property
    def rule(self) -> RateRule:
        """The rule in force (it governs the next step)."""
        return self._rule

    @property
    def base_rule(self) -> RateRule:
        """The job's own rule (constructor / set_rule); ``mode="off"`` commands return to it."""
        return self._base_rule

    @property
    def command_version(self) -> int:
        """Version of the RateCommand in force (0 = the job's own settings)."""
        return self._rule.version

    @property
    def rho_max(self) -> float:
        """The largest rate any rule may produce; commands above it are refused."""
        return self._rho_max

    @property
    def mode(self) -> str:
        """ "layca", "lars" or "off" under the rule in force."""
        return self._rule.mode

    def rates_at(self, step: int) -> np.ndarray:
        """rho_l for optimizer step ``step`` under the rule in force (float64, layer order)."""
        return self._rule.rates(step)


class CommandIntake:
    """Mixin: the control-plane surface of a Layca, delegating to its ``_inbox``."""

    _inbox: CommandInbox

    def submit_command(self, cmd: RateCommand) -> None:
        """Queue a RateCommand; thread-safe (call it from any thread).

        A command is handled at the step boundary before its ``apply_at_step``
        (held until then; 0 or a step already passed = the next ``step()``): it is
        validated (:func:`~layrot.proto.commands.validate_command`) and applied or
        rejected. Older queued ones that it overrides are reported as superseded
        (:func:`~layrot.proto.commands.split_due`), versions older than the last one
        handled as stale, and a repeat of the last one gets its earlier answer.
        Listeners get ``(version, applied, reason, step)``. The queue is the shared
        :class:`~layrot.agent.commands.CommandInbox`.
        """
        self._inbox.submit(cmd)

    def add_command_listener(self, fn: CommandListener) -> None:
        """Call ``fn(version, applied, reason, step)`` for every command result."""
        self._inbox.add_listener(fn)

    def remove_command_listener(self, fn: CommandListener) -> None:
        """Stop calling ``fn``; raises ValueError if it was not added."""
        self._inbox.remove_listener(fn)

    @property
    def on_command_result(self) -> CommandListener | None:
        """One more listener, set as an attribute (None: none)."""
        return self._inbox.on_result

    @on_command_result.setter
    def on_command_result(self, fn: CommandListener | None) -> None:
        self._inbox.on_result = fn

    @property
    def has_pending_commands(self) -> bool:
        """Whether commands wait for a step boundary."""
        return self._inbox.has_pending
