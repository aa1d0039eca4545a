"""What the training-framework integrations share: never fatal callbacks, and the optimizer that really steps.

Used by :mod:`layrot.lightning` and :mod:`layrot.hf` (torch only: neither
integration imports the other's framework). ``real_optimizer`` (from
:mod:`layrot.hooks.torch_watch`, which unwraps by itself too) finds the optimizer
below Accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer``;
``FailureLog`` and ``never_fatal`` keep an exception of a callback out of the
training loop (logged once, counted). The watch handle guards its own hooks;
the callbacks set its ``on_error`` to their ``FailureLog`` so one count and one
warning cover both.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from layrot.hooks.torch_watch import real_optimizer
from layrot.hooks.watch_base import log_failure

log = logging.getLogger(__name__)

__all__ = ["real_optimizer", "FailureLog", "never_fatal", "CallbackSettings"]

_F = TypeVar("_F", bound=Callable[..., Any])


class FailureLog:
    """Counts exceptions caught by an integration and logs the first one with its traceback."""

    def __init__(self, where: str) -> None:
        self._where = where
        self.failures = 0
        self.errors: list[str] = []

    def __call__(self, stage: str, exc: BaseException) -> None:
        self.failures += 1
        if len(self.errors) < 100:
            self.errors.append(f"{stage}: {type(exc).__name__}: {exc}")
        log_failure(self.failures == 1, self._where, stage, exc, "layrot monitoring of this job may stop")


def never_fatal(method: _F) -> _F:
    """Decorator for callback methods: an exception is counted and logged (``self._failed``), never raised."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._failed(method.__name__, exc)
            return None

    return wrapper  # type: ignore[return-value]


class CallbackSettings:
    """What both framework callbacks take and report: the watch settings and the failures they caught."""

    _failed: FailureLog

    def _configure(
        self,
        where: str,
        run: str | None,
        collector: str | None,
        every: int,
        layers: Any,
        control: bool,
        loss: bool,
        close_timeout: float,
        watch_kwargs: dict[str, Any],
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.run = run
        self.collector = collector
        self.every = int(every)
        self.layers = layers
        self.control = control
        self.loss = loss
        self.close_timeout = close_timeout
        self.watch_kwargs = dict(watch_kwargs)
        self._failed = FailureLog(where)

    def _watch_options(self, integration: str) -> tuple[dict[str, str], dict[str, Any]]:
        """(meta naming the integration, the other ``layrot.watch`` keyword arguments given by the user)."""
        meta = {"integration": integration, **dict(self.watch_kwargs.get("meta") or {})}
        return meta, {k: v for k, v in self.watch_kwargs.items() if k != "meta"}

    @property
    def failures(self) -> int:
        """Exceptions caught so far (callback and watch hooks); training went on after each."""
        return self._failed.failures

    @property
    def errors(self) -> list[str]:
        """What those exceptions were (the first 100)."""
        return list(self._failed.errors)
