"""``layrot.hf.RotationCallback``: layer rotation of a Hugging Face ``Trainer`` run, one callback.

::

    import layrot.hf

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[layrot.hf.RotationCallback(run="gpt2-lr3e-4")])
    trainer.train()                                 # or trainer.train(resume_from_checkpoint=True)

What the callback does, event by event:

* ``on_train_begin``: ``layrot.watch(model, optimizer, ...)`` with the optimizer below the
  Accelerate ``AcceleratedOptimizer`` that Trainer passes (its ``.optimizer``; a
  ``layrot.Layca`` given to Trainer is what is watched). The hook sits on that optimizer's
  step hooks: one report per optimizer step (``gradient_accumulation_steps`` micro-batches),
  and a step that the fp16 ``GradScaler`` skips is not a step.
* the loss (``loss=True``): Trainer logs its loss only every ``logging_steps``, and
  ``on_log`` comes after the step was reported; so the callback reads the loss the model
  returns (``outputs.loss``, through a forward hook on the model, in training mode only) and
  hands it, as a device tensor, to ``handle.observe_loss`` right before each optimizer step:
  no host sync. Over the micro-batches of a step it is their sum when Trainer passed
  ``num_items_in_batch`` (the model then normalised by the step's token count: the sum is
  the step's token mean, what Trainer logs), else their mean. A model that returns no loss
  (a custom ``compute_loss``) reports none.
* ``on_save``: ``layrot_state.pt`` (the handle's ``state_dict()``: w(0), step, run name and
  key) beside the checkpoint, in ``output_dir/checkpoint-<step>``. At ``on_train_begin`` of a
  resumed run (``state.global_step > 0``) it is loaded from ``args.resume_from_checkpoint``
  or ``output_dir/checkpoint-<global_step>``, so w(0) and the step count carry over and the
  curves continue; without an explicit ``run`` the run name saved there is used.
* DDP: every rank watches; without ``run`` rank 0 picks the name (``LAYROT_RUN`` or
  script-time-host) and ``torch.distributed`` shares it. Rank 0 writes ``layrot_state.pt``;
  other ranks write their own file only when their state differs by rank (sharded layers).
* ``on_train_end``: ``close()``.

Never fatal: an exception in the callback, or in the watch hook while the optimizer
steps, is caught, logged once (with its traceback), counted in ``failures`` / ``errors``,
and training continues; after a hook failure the handle stops reporting.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import layrot
from layrot.hooks.integration_guard import CallbackSettings, never_fatal, real_optimizer
from layrot.hooks.watch_base import default_run_name

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("layrot.hf needs transformers: pip install 'layrot[hf]'") from exc

log = logging.getLogger(__name__)

__all__ = ["RotationCallback", "STATE_FILE"]

#: The file beside each Trainer checkpoint.
STATE_FILE = "layrot_state.pt"
#: Version of the dict saved in it.
STATE_VERSION = 1
#: Trainer's checkpoint folder prefix (``transformers.trainer_utils.PREFIX_CHECKPOINT_DIR``).
CHECKPOINT_PREFIX = "checkpoint"


# ---------------------------------------------------------------- the callback
class RotationCallback(CallbackSettings, TrainerCallback):
    """A ``transformers.TrainerCallback`` streaming each layer's rotation to the layrot collector.

    See the module docstring for what it does at each event.
    """

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
        """Configure the callback; nothing is watched before ``on_train_begin``.

        Args:
            run: the run id; default: the name saved in the checkpoint being resumed, else
                ``LAYROT_RUN`` or script-time-host, chosen by rank 0 and shared with every rank.
            collector: ``host:port`` of the collector (default ``LAYROT_COLLECTOR``).
            every: report every N optimizer steps.
            layers: ``layrot.watch``'s layer rule.
            control: accept remote Layca rate commands (the optimizer given to Trainer is a
                ``layrot.Layca``; otherwise a warning and monitoring only).
            loss: forward the model's training loss (see the module docstring).
            close_timeout: seconds ``close()`` waits for the collector at the end of training.
            **watch_kwargs: passed to ``layrot.watch`` (``token``, ``meta``, ``tls_ca``, ``spool``, ...).
        """
        self._configure(
            "the Hugging Face RotationCallback",
            run,
            collector,
            every,
            layers,
            control,
            loss,
            close_timeout,
            watch_kwargs,
        )
        #: The watch handle (None before ``on_train_begin``, after ``on_train_end``, or when watching failed).
        self.handle: Any = None
        self._hooks: list[Any] = []
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._loss_scaled = False
        self._loss_factor = 1.0
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def stats(self) -> Any:
        """The handle's reporter counters (``handle.stats``), or None."""
        return self.handle.stats if self.handle is not None else None

    # ------------------------------------------------------------ Trainer events
    @never_fatal
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any):
        self._close()
        if model is None or optimizer is None:
            log.warning("layrot: Trainer passed no model or optimizer to on_train_begin; nothing to watch")
            return
        opt = real_optimizer(optimizer)
        saved = self._saved_state(args, state) if state.global_step > 0 else None
        run = self.run or (saved or {}).get("run") or _agreed_default_name()
        layca = isinstance(opt, layrot.Layca)
        if self.control and not layca:
            log.warning("layrot: control=True but the optimizer is not a layrot.Layca; watching without remote control")
        meta, kwargs = self._watch_options("transformers")
        if int(getattr(state, "max_steps", 0) or 0) > 0:
            kwargs.setdefault("total_steps", int(state.max_steps))  # not_learning is judged at a share of it
        handle = layrot.watch(
            model,
            opt,
            run,
            collector=self.collector,
            every=self.every,
            layers=self.layers,
            control=bool(self.control and layca),
            meta=meta,
            **kwargs,
        )
        self.handle, self._optimizer = handle, opt
        handle.on_error = self._failed  # the handle guards its hooks; one count, one warning
        if saved is not None:
            handle.load_state_dict(saved["handle"])
        elif state.global_step > 0:
            log.warning(
                "layrot: resuming at step %d without a %s beside the checkpoint: rotations restart from the "
                "current weights as w(0) and step 0",
                state.global_step,
                STATE_FILE,
            )
        if self.loss:
            world = int(getattr(args, "world_size", 1) or 1)
            self._loss_factor = float(world) if getattr(args, "average_tokens_across_devices", False) else 1.0
            self._hooks = [
                model.register_forward_hook(self._on_forward, with_kwargs=True),
                opt.register_step_pre_hook(self._before_step),
            ]

    @never_fatal
    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._loss_sum, self._loss_n = None, 0

    @never_fatal
    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.handle is None:
            return
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        if not os.path.isdir(folder):
            log.warning("layrot: no checkpoint folder %s; the layrot state is not saved", folder)
            return
        hstate = self.handle.state_dict()
        rank = int(getattr(args, "process_index", 0) or 0)
        if rank == 0:
            name = STATE_FILE
        elif any(hstate.get("sharded") or ()):
            name = _rank_file(rank)
        else:
            return  # replicas: rank 0's file is every rank's state
        path = os.path.join(folder, name)
        tmp = f"{path}.tmp"
        torch.save(
            {"version": STATE_VERSION, "global_step": int(state.global_step), "run": self.handle.run, "handle": hstate},
            tmp,
        )
        os.replace(tmp, path)

    @never_fatal
    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close()

    # ------------------------------------------------------------ internals
    def _on_forward(self, module: nn.Module, args: Any, kwargs: Mapping[str, Any], output: Any) -> None:
        try:
            if not module.training:
                return
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                return
            value = loss.detach().reshape(()).float()
            self._loss_scaled = kwargs.get("num_items_in_batch") is not None
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_n += 1
        except Exception as exc:
            self._failed("loss forward hook", exc)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            loss, n = self._loss_sum, self._loss_n
            self._loss_sum, self._loss_n = None, 0
            if loss is None or self.handle is None or self.handle.failed:
                return
            value = loss * self._loss_factor if self._loss_scaled else loss / n
            self.handle.observe_loss(value)
        except Exception as exc:
            self._failed("loss step hook", exc)

    def _saved_state(self, args: Any, state: Any) -> dict[str, Any] | None:
        rank = int(getattr(args, "process_index", 0) or 0)
        folders = []
        explicit = getattr(args, "resume_from_checkpoint", None)
        if isinstance(explicit, str) and explicit:
            folders.append(explicit)
        folders.append(os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}"))
        for folder in folders:
            for name in ([_rank_file(rank)] if rank else []) + [STATE_FILE]:
                path = os.path.join(folder, name)
                if not os.path.isfile(path):
                    continue
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("version") != STATE_VERSION:
                    log.warning("layrot: %s has state version %r; not used", path, saved.get("version"))
                elif int(saved.get("global_step", -1)) != int(state.global_step):
                    log.warning(
                        "layrot: %s is from step %s, Trainer resumes at %d; not used",
                        path,
                        saved.get("global_step"),
                        state.global_step,
                    )
                else:
                    return dict(saved)
        return None

    def _close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._loss_sum, self._loss_n = None, 0
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                handle.close(self.close_timeout)
            except Exception as exc:
                self._failed("close", exc)


def _rank_file(rank: int) -> str:
    stem, ext = os.path.splitext(STATE_FILE)
    return f"{stem}_rank{rank}{ext}"


def _agreed_default_name() -> str:
    """The default run name, rank 0's on every rank when torch.distributed runs."""
    name = default_run_name()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box: list[Any] = [name]
            dist.broadcast_object_list(box, src=0)
            name = str(box[0])
    except Exception as exc:  # ranks then report under their own names: visible, not fatal
        log.warning("layrot: could not agree on a run name across ranks (%s); pass run= or set LAYROT_RUN", exc)
    return name
