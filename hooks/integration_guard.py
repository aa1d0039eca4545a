"""What the training-framework integrations share: never fatal, and the optimizer that really steps.

Used by :mod:`layrot.lightning` and :mod:`layrot.hf` (torch only: neither
integration imports the other's framework). ``real_optimizer`` unwraps
Accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer``;
``HookGuard``, ``FailureLog`` and ``never_fatal`` keep an exception of a hook or a
callback out of the training loop (logged once, counted).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["real_optimizer", "HookGuard", "FailureLog", "never_fatal", "CallbackSettings"]

_F = TypeVar("_F", bound=Callable[..., Any])


def real_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose step hooks fire, below wrappers such as Accelerate's
    ``AcceleratedOptimizer`` (a torch Optimizer subclass without its hook tables) or
    ``LightningOptimizer``; a ``layrot.Layca`` is a real optimizer and is kept.

    Raises TypeError for an object that is neither an optimizer nor wraps one.
    """
    opt = optimizer
    for _ in range(8):
        if isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "_optimizer_step_pre_hooks"):
            return opt
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            inner = getattr(opt, "_optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    raise TypeError(
        f"layrot: {type(optimizer).__name__} is not a torch.optim.Optimizer and wraps none (.optimizer); "
        "pass the optimizer whose step() updates the weights"
    )


class HookGuard:
    """Makes a watch handle's hooks never fatal.

    Replaces, in place, the hook functions the handle (or one of its helper objects,
    e.g. the forward-order recorder) registered on the optimizer, the model's modules
    and its parameters with wrappers that catch exceptions. The first exception stops
    the handle's hooks (later calls return at once) and is passed to ``on_error``.
    The hook ids stay the same, so the handle's own ``remove()`` calls still work.
    """

    def __init__(self, handle: Any, optimizer: Any, model: nn.Module, on_error: Callable[[str, BaseException], None]):
        self.failed = False
        self._on_error = on_error
        owners = {id(handle)} | {
            id(v)
            for v in getattr(handle, "__dict__", {}).values()
            if type(v).__module__.startswith("layrot.") and not isinstance(v, torch.optim.Optimizer)
        }
        self.wrapped = 0
        for where, hooks in _hook_dicts(optimizer, model):
            for key, fn in list(hooks.items()):
                if id(getattr(fn, "__self__", None)) in owners:
                    hooks[key] = self._wrap(fn, where)
                    self.wrapped += 1
        if not self.wrapped:
            log.debug("layrot: found no hook of the watch handle to guard (it guards itself or uses other hooks)")

    def _wrap(self, fn: Callable[..., Any], where: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.failed:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                self.failed = True
                self._on_error(f"watch hook ({where}: {getattr(fn, '__name__', fn)})", exc)
                return None

        return guarded


def _hook_dicts(optimizer: Any, model: nn.Module) -> list[tuple[str, dict[Any, Any]]]:
    out = []
    for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        d = getattr(optimizer, attr, None)
        if isinstance(d, dict):
            out.append((attr.strip("_"), d))
    for module in model.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
            d = getattr(module, attr, None)
            if isinstance(d, dict) and d:
                out.append((attr.strip("_"), d))
    for p in model.parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            d = getattr(p, attr, None)
            if isinstance(d, dict) and d:
                out.append((attr.strip("_"), d))
    return out


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
        if self.failures == 1:
            log.warning(
                "layrot: %s failed in %s (%s: %s); training continues, layrot monitoring of this job may stop",
                self._where,
                stage,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
        else:
            log.debug("layrot: %s failed again in %s: %r", self._where, stage, exc)


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
