"""``layrot.lightning.RotationCallback``: layer rotation of a PyTorch Lightning run, one callback.

::

    import lightning as L
    import layrot.lightning

    trainer = L.Trainer(callbacks=[layrot.lightning.RotationCallback(run="bert-lr3e-4")])
    trainer.fit(module, datamodule)

What the callback does, hook by hook:

* ``on_fit_start``: ``layrot.watch(module, optimizer, ...)`` for each of the trainer's
  optimizers, unwrapped to the real ``torch.optim.Optimizer`` (``LightningOptimizer``
  and similar wrappers; a ``layrot.Layca`` is kept as it is). One watch handle per
  optimizer: the first reports under ``run``, optimizer ``i > 0`` under ``f"{run}-opt{i}"``,
  each with the layers that optimizer updates. A report is made per optimizer step (the
  hook sits on the optimizer's step hooks): with ``accumulate_grad_batches=k`` one report per
  k batches, and steps that AMP's ``GradScaler`` skips are not steps.
* the loss: the losses Lightning backpropagates (``on_before_backward``; their sum over the
  micro-batches of an accumulated step is the step's mean loss, unscaled when AMP scales
  it) go to ``handle.observe_loss`` in ``on_before_optimizer_step``, as device tensors:
  no host sync per step.
* resume: the callback's ``state_dict()`` (in every Lightning checkpoint) holds each
  handle's ``state_dict()``; ``trainer.fit(..., ckpt_path=...)`` loads it, so w(0) and the
  step count carry over and the curves continue. Without an explicit ``run`` the
  resumed job reports under the run name saved in the checkpoint.
* DDP: every rank watches its module; without ``run`` rank 0 picks the name
  (``LAYROT_RUN`` or script-time-host) and ``trainer.strategy.broadcast`` shares it.
* ``on_fit_end`` / ``on_exception``: ``close()`` (flushes what the collector can still take).

Never fatal: an exception in the callback, or in the watch hook while the optimizer
steps, is caught, logged once (with its traceback), counted in ``failures`` /
``errors``, and training continues; a handle whose hook failed stops reporting (its
numbers could be stale otherwise).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import layrot
from layrot.hooks.integration_guard import CallbackSettings, never_fatal, real_optimizer
from layrot.hooks.watch_base import default_run_name

try:  # the unified package first, the standalone one when only it is installed
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as _pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "layrot.lightning needs PyTorch Lightning: pip install 'layrot[lightning]' (or lightning)"
        ) from exc

log = logging.getLogger(__name__)

__all__ = ["RotationCallback"]

#: Version of the dict :meth:`RotationCallback.state_dict` returns.
STATE_VERSION = 1


# ---------------------------------------------------------------- lightning-only helpers
def layers_of_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, layers: Any) -> Any:
    """``layers`` narrowed to the parameters ``optimizer`` updates (unchanged when it updates them all)."""
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and id(p) not in ids]
    if not outside:
        return layers
    if layers is None:
        return lambda n, p: id(p) in ids
    if isinstance(layers, (str, re.Pattern)):
        pattern = re.compile(layers) if isinstance(layers, str) else layers
        return lambda n, p: id(p) in ids and bool(pattern.search(n))
    if callable(layers):
        user = layers
        return lambda n, p: id(p) in ids and bool(user(n, p))
    params = dict(model.named_parameters())
    return [n for n in layers if n not in params or id(params[n]) in ids]


def is_layca(optimizer: Any) -> bool:
    """True for a ``layrot.Layca``."""
    return isinstance(optimizer, layrot.Layca)


def planned_steps(trainer: Any) -> int | None:
    """The optimizer steps the fit plans (``trainer.estimated_stepping_batches``, else ``max_steps``); None if unknown.

    ``estimated_stepping_batches`` already counts gradient accumulation and devices and
    is ``inf`` for a fit without an end (``max_epochs=-1``); it needs the data loaders
    and may raise, so any failure means "unknown".
    """
    for name in ("estimated_stepping_batches", "max_steps"):
        try:
            value = getattr(trainer, name)
        except Exception:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return int(value)
    return None


# ---------------------------------------------------------------- the callback
class _RotationCallbackMixin(CallbackSettings):
    """The callback's logic; :class:`RotationCallback` binds it to the installed Lightning's ``Callback``."""

    def __init__(
        self,
        run: str | None = None,
        *,
        collector: str | None = None,
        every: int = 1,
        layers: Any = None,
        control: bool = False,
        loss: bool = True,
        close_timeout: float = 5.0,
        **watch_kwargs: Any,
    ) -> None:
        """Configure the callback; nothing is watched before ``on_fit_start``.

        Args:
            run: the run id (optimizer ``i > 0`` reports under ``f"{run}-opt{i}"``); default: the
                name saved in the checkpoint being resumed, else ``LAYROT_RUN`` or
                script-time-host, chosen by rank 0 and shared with every rank.
            collector: ``host:port`` of the collector (default ``LAYROT_COLLECTOR``).
            every: report every N optimizer steps.
            layers: ``layrot.watch``'s layer rule, narrowed to each optimizer's parameters.
            control: accept remote Layca rate commands on the optimizers that are ``layrot.Layca``.
            loss: forward the training loss (``handle.observe_loss``).
            close_timeout: seconds ``close()`` waits for the collector at the end of fit.
            **watch_kwargs: passed to ``layrot.watch`` (``token``, ``meta``, ``tls_ca``, ``spool``, ...).
        """
        super().__init__()
        self._configure(
            "the Lightning RotationCallback", run, collector, every, layers, control, loss, close_timeout, watch_kwargs
        )
        #: One watch handle per optimizer (None where watching it failed).
        self.handles: list[Any] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._pending: Mapping[str, Any] | None = None
        self._closed_state: dict[str, Any] | None = None
        self._base_run: str | None = None
        self._loss_sum: torch.Tensor | None = None
        self._fit: tuple[Any, Any] | None = None

    # ------------------------------------------------------------ public
    @property
    def handle(self) -> Any:
        """The first optimizer's watch handle (None before ``on_fit_start`` or when watching failed)."""
        return self.handles[0] if self.handles else None

    @property
    def stats(self) -> Any:
        """The first handle's reporter counters (``handle.stats``), or None."""
        h = self.handle
        return h.stats if h is not None else None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run=self.run)  # type: ignore[attr-defined]

    # ------------------------------------------------------------ Lightning hooks
    @never_fatal
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit = (trainer, pl_module)
        self._open(trainer, pl_module)

    @never_fatal
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if not (self.loss and self.handles) or not isinstance(loss, torch.Tensor):
            return
        value = loss.detach()
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            scale = getattr(scaler, "_scale", None)  # a device tensor: dividing needs no sync (get_scale() would)
            if not isinstance(scale, torch.Tensor):
                return
            value = value / scale.to(value.dtype)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value

    @never_fatal
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        loss, self._loss_sum = self._loss_sum, None
        if loss is None:
            return
        real = real_optimizer(optimizer)
        for h, opt in zip(self.handles, self._optimizers):
            if h is not None and opt is real:
                h.observe_loss(loss)

    @never_fatal
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    @never_fatal
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    @never_fatal
    def state_dict(self) -> dict[str, Any]:
        """Each handle's ``state_dict()`` (w(0), step, run key), saved in the Lightning checkpoint."""
        if not self.handles:  # before fit (a loaded state) or after it (the last handles' state)
            return dict(self._pending or self._closed_state or {})
        states = [h.state_dict() if h is not None else None for h in self.handles]
        return {"version": STATE_VERSION, "run": self._base_run, "handles": states}

    @never_fatal
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Keep the saved state for the handles; applied when they open (or now, when they are open)."""
        if not state_dict:
            return
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported layrot Lightning callback state version {state_dict.get('version')!r}")
        self._pending = dict(state_dict)
        if self.handles and self._fit is not None:
            # Strategies that restore after setup (FSDP, DeepSpeed) load callbacks after on_fit_start:
            # reopen (no step ran yet) so the saved run name and w(0) apply.
            self._open(*self._fit)

    # ------------------------------------------------------------ internals
    def _open(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        self._optimizers = [real_optimizer(o) for o in trainer.optimizers]
        if not self._optimizers:
            log.warning("layrot: the trainer has no optimizer; nothing to watch")
            return
        self._base_run = self._run_name(trainer)
        if self.control and not any(is_layca(o) for o in self._optimizers):
            log.warning("layrot: control=True but no optimizer is a layrot.Layca; watching without remote control")
        meta, kwargs = self._watch_options("lightning")
        kwargs.setdefault("total_steps", planned_steps(trainer))  # not_learning is judged at a share of it
        saved = list((self._pending or {}).get("handles") or [])
        for i, opt in enumerate(self._optimizers):
            run = self._base_run if i == 0 else f"{self._base_run}-opt{i}"
            handle = None
            try:
                handle = layrot.watch(
                    pl_module,
                    opt,
                    run,
                    collector=self.collector,
                    every=self.every,
                    layers=layers_of_optimizer(pl_module, opt, self.layers),
                    control=bool(self.control and is_layca(opt)),
                    meta={**meta, "optimizer_index": str(i)},
                    **kwargs,
                )
                handle.on_error = self._failed  # the handle guards its hooks; one count, one warning
                if i < len(saved) and saved[i]:
                    handle.load_state_dict(saved[i])
            except Exception as exc:
                self._failed(f"watching optimizer {i}", exc)
                if handle is not None:
                    handle.close(0.0)
                    handle = None
            self.handles.append(handle)
        self._pending = None

    def _run_name(self, trainer: Any) -> str:
        if self.run:
            return self.run
        saved = (self._pending or {}).get("run")
        if isinstance(saved, str) and saved:
            return saved
        name = default_run_name() if getattr(trainer, "global_rank", 0) == 0 else None
        return str(trainer.strategy.broadcast(name, src=0))

    def _close(self) -> None:
        if self.handles:  # so trainer.save_checkpoint() after fit still carries the curves' state
            try:
                self._closed_state = self.state_dict()
            except Exception as exc:
                self._failed("state_dict at close", exc)
        handles, self.handles = self.handles, []
        self._loss_sum = None
        for h in handles:
            if h is not None:
                try:
                    h.close(self.close_timeout)
                except Exception as exc:
                    self._failed("close", exc)


class RotationCallback(_RotationCallbackMixin, _pl.Callback):
    """A Lightning ``Callback`` streaming each layer's rotation to the layrot collector.

    ``RotationCallback(run=None, *, collector=None, every=1, layers=None, control=False,
    loss=True, close_timeout=5.0, **watch_kwargs)``; see the module docstring for what it
    does at each hook and :class:`_RotationCallbackMixin` for the arguments.
    """


def __getattr__(name: str) -> Any:
    # The standalone ``pytorch_lightning`` package is a second class hierarchy: its Trainer takes
    # only its own Callback subclasses. Built on first use, so a ``lightning`` job never imports it.
    if name == "PLRotationCallback":
        if _pl.__name__ == "pytorch_lightning":
            return RotationCallback
        import pytorch_lightning

        class PLRotationCallback(_RotationCallbackMixin, pytorch_lightning.Callback):
            """:class:`RotationCallback` for ``pytorch_lightning.Trainer`` (the standalone package)."""

        globals()[name] = PLRotationCallback
        return PLRotationCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
