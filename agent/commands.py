"""The job side of the control plane: what happens to a RateCommand inside the job.

Shared by the PyTorch and the Keras Layca (framework-free). :class:`CommandInbox`
owns everything between a command's arrival (on the reporter's connection thread)
and the step boundary that decides it (on the training thread): the queue of
copies, the earliest step at which a held command becomes due, the last answer
(checkpointed, so a command re-sent after a restart is not applied twice) and the
listeners that hear every answer. The meaning of a command (validation, the rule
it asks for, superseded / stale / late) is :mod:`layrot.proto.commands`'.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from layrot.core.rates import RateRule
from layrot.proto.commands import CommandResult, resolve_commands, split_due
from layrot.proto.layrot_pb2 import RateCommand

_log = logging.getLogger(__name__)

__all__ = ["CommandInbox", "CommandListener", "CommandResult", "RateCommand", "notify_listeners"]

#: ``listener(version, applied, reason, step)``; ``step`` is the first step the command governs.
CommandListener = Callable[[int, bool, str, int], None]

#: :attr:`CommandInbox.due_at` while nothing waits: no step reaches it.
NEVER = sys.maxsize


def notify_listeners(results: Iterable[CommandResult], listeners: Iterable) -> None:
    """Call every listener with every result; a broken listener never stops training."""
    listeners = [fn for fn in listeners if fn is not None]
    for r in results:
        for fn in listeners:
            try:
                fn(*r)
            except Exception:
                _log.exception("Layca: command listener failed")


class CommandInbox:
    """Commands waiting for a step boundary, and the answers given so far.

    ``submit`` may be called from any thread; ``decide`` from the training thread
    only. A step with nothing due costs one integer compare: ``step >= inbox.due_at``.

    Args:
        on_pending: optional ``fn(waiting: bool)``, called under the inbox's lock
            whenever commands start or stop waiting (the Keras Layca mirrors it
            into a device flag its traced step reads). It must be quick and not
            call back into the inbox.
    """

    def __init__(self, on_pending: Callable[[bool], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._pending: list[RateCommand] = []
        # First step whose boundary must look at _pending: 0 after a new command
        # arrives, else the earliest apply_at_step of the held ones, NEVER when empty.
        self.due_at: int = NEVER
        self.last_result: CommandResult | None = None
        self.listeners: list[CommandListener] = []
        #: One more listener, settable as an attribute (``Layca.on_command_result``).
        self.on_result: CommandListener | None = None
        self._on_pending = on_pending

    # ------------------------------------------------------------ intake
    def submit(self, cmd: RateCommand) -> None:
        """Queue a copy of ``cmd`` (the caller may reuse its message); thread-safe."""
        copy = RateCommand()
        copy.CopyFrom(cmd)
        with self._lock:
            self._pending.append(copy)
            self.due_at = 0
            if self._on_pending is not None:
                self._on_pending(True)

    @property
    def has_pending(self) -> bool:
        """Whether any command waits (due or held for a later step)."""
        return bool(self._pending)

    def set_on_pending(self, fn: Callable[[bool], None] | None) -> None:
        """Replace the ``on_pending`` callback and call it now with the current state."""
        with self._lock:
            self._on_pending = fn
            if fn is not None:
                fn(bool(self._pending))

    # ------------------------------------------------------------ listeners
    def add_listener(self, fn: CommandListener) -> None:
        """Call ``fn(version, applied, reason, step)`` for every command result."""
        self.listeners.append(fn)

    def remove_listener(self, fn: CommandListener) -> None:
        """Stop calling ``fn``; raises ValueError if it was not added."""
        self.listeners.remove(fn)

    # ------------------------------------------------------------ the step boundary
    def decide(
        self,
        step: int,
        layer_names: Sequence[str],
        rho_max: float,
        base_rule: RateRule,
        install: Callable[[RateRule], None] | None = None,
    ) -> RateRule | None:
        """Handle the commands due at the boundary before ``step``; the new rule, or None.

        Commands whose ``apply_at_step`` is ahead stay queued (see
        :func:`~layrot.proto.commands.split_due`); of the due ones the newest is
        validated and applied or rejected (:func:`~layrot.proto.commands.resolve_commands`).
        ``install(rule)``, if given, runs before the listeners hear that the
        command was applied, so whoever learns of it sees the rule in force.
        Every result goes to the listeners; a broken listener is logged, never raised.
        """
        step = int(step)
        with self._lock:
            pending, self._pending = self._pending, []
            self.due_at = NEVER
            if self._on_pending is not None:
                self._on_pending(False)
        if not pending:
            return None
        due, held, results = split_due(pending, step)
        with self._lock:
            # Commands that arrived meanwhile are looked at next step (due 0).
            if not self._pending:
                self.due_at = min((int(c.apply_at_step) for c in held), default=NEVER)
            self._pending[:0] = held
            if self._pending and self._on_pending is not None:
                self._on_pending(True)
        rule = None
        if due:
            rule, answers, self.last_result = resolve_commands(
                due, step, self.last_result, layer_names, rho_max, base_rule
            )
            results += answers
            if rule is not None and install is not None:
                install(rule)
        notify_listeners(results, [*self.listeners, self.on_result])
        return rule

    # ------------------------------------------------------------ checkpoints and pickling
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the last answer (plain Python types)."""
        return {"last_result": None if self.last_result is None else list(self.last_result)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (queued commands and listeners are not checkpointed)."""
        last = state.get("last_result")
        self.last_result = None if last is None else tuple(last)

    def __getstate__(self) -> dict[str, Any]:
        # A copy of the optimizer is a new job: it hears no listeners and inherits no queue.
        return {"last_result": self.last_result}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.last_result = state.get("last_result")
