"""What the PyTorch and the Keras Layca share above the math: views of their rate rule, the command intake."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from layrot.agent.commands import CommandInbox, CommandListener, RateCommand
from layrot.core.rates import RateRule, RhoSchedule, edited_rule


class RuleView:
    """Mixin: properties over ``_rule`` (in force), ``_base_rule`` (the job's own) and ``_rho_max``,
    and the checks of a new rule for the layers ``_names``."""

    _rule: RateRule
    _base_rule: RateRule
    _rho_max: float
    _names: tuple[str, ...]

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

    def _check_rho_max(self, rule: RateRule) -> None:
        top = rule.max_rate()
        if not top <= self._rho_max * (1 + 1e-12):
            raise ValueError(f"rates reach {top:g}, above rho_max={self._rho_max:g} (raise rho_max to allow it)")

    def _resolved_rule(
        self,
        rule: RateRule | None,
        mode: str | None,
        alpha: float | None,
        rho: float | None,
        schedule: RhoSchedule | None,
        multipliers: Sequence[float] | None,
        layer_multipliers: dict[str, float] | None,
    ) -> RateRule:
        """What ``set_rule`` was given: ``rule``, or the base rule with those fields changed, for these layers."""
        if rule is None:
            rule = edited_rule(
                self._base_rule,
                mode=mode,
                alpha=alpha,
                rho=rho,
                schedule=schedule,
                multipliers=multipliers,
                layer_multipliers=layer_multipliers,
            )
        if tuple(rule.layer_names) != self._names:
            raise ValueError("the rule's layer names differ from the optimizer's layers")
        return rule


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
