"""``layrot.watch``: the one hook line for PyTorch training jobs.

After each reported optimizer step, the hook measures per layer, on the
parameter's device (``torch_distances``: one fused CPU sweep, or a handful of
foreach kernels), the four sums of the measurement contract
(:mod:`layrot.agent.measurement`), with d0 = w(t) - w(0), ds = w(t) - w(t-1):

    ||d0||^2,  d0 . w(0),  ||ds||^2,  ds . w(t)

packs them with the loss and hands them, still on the device, to the
background reporter, whose thread derives ||w(t)|| and ||w(t-1)|| exactly from
||w(0)||. Dots of the small differences with the weights (not norms of the
weights) let the collector turn them into rotations and tiny step angles
without cancellation. No host-device sync happens on the training thread;
unreported steps cost at most one copy.

Never fatal: once ``watch()`` returned, an exception of the hook (its optimizer
step hooks, the one-time forward-order hooks), of the hand-off to the reporter or
of ``observe_loss`` / ``flush`` / ``close`` never reaches the training loop. It is
logged once (or passed to ``handle.on_error``), counted in
``handle.stats.hook_errors``, and the handle stops measuring (its numbers could be
stale otherwise) while training continues. The reporter's own threads already
catch their errors (drops are counted in ``stats``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from layrot.agent.local_view import LayerReport
from layrot.agent.measurement import DEVICE_ROWS, PackedMeasurement
from layrot.agent.reporter import LayerSpec, ReporterStats, default_run_name, new_run_key
from layrot.hooks.torch_distances import LayerDistances
from layrot.hooks.torch_layers import (
    EagerUntilOrdered,
    ForwardOrderRecorder,
    LayerSelector,
    candidate_layers,
    effective_weights,
    init_norms,
    stable_name,
    stable_named_parameters,
)
from layrot.hooks.torch_shards import PendingSums, ShardGroups, reject_sharded_layca
from layrot.hooks.watch_base import WatchBase, legacy_positionals, log_failure

log = logging.getLogger(__name__)


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def real_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose step hooks fire, below wrappers such as Accelerate's
    ``AcceleratedOptimizer`` (a torch Optimizer subclass without its hook tables, ``.optimizer``)
    or Lightning's ``LightningOptimizer`` (``._optimizer``); a ``layrot.Layca`` is a real
    optimizer and is kept.

    Raises:
        TypeError: for an object that is neither a torch optimizer nor wraps one.
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


def _elastic_run_name() -> str | None:
    """``<script>-<TORCHELASTIC_RUN_ID>`` under torchrun with a rendezvous id (the same on every rank), else None."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if not run_id or run_id == "none":  # torchrun's default id when none was given
        return None
    script = os.path.splitext(os.path.basename(sys.argv[0] or "python"))[0] or "python"
    return f"{script}-{run_id}"


def _shared_run(run: str | None) -> tuple[str | None, str]:
    """The run name (None: the default, resolved later) and run key every rank uses.

    The key is rank 0's, and so is the default name when the job names no run
    (``run=None``, no ``LAYROT_RUN``): the default has a timestamp and a host, so
    ranks choosing their own would split the job into one run per rank. Under
    torchrun with a rendezvous id the name is taken from it; otherwise both travel in
    one ``broadcast_object_list`` when torch.distributed runs (every rank calls
    ``watch``, as the key needs already).
    """
    key = new_run_key()
    named = run is not None or bool(os.environ.get("LAYROT_RUN"))
    if not named:
        run = _elastic_run_name()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box: list[Any] = [key, run if (named or run is not None) else default_run_name()]
            dist.broadcast_object_list(box, src=0)
            key = str(box[0])
            if not named:
                run = str(box[1])
            return run, key
    except Exception as exc:  # a rank with its own key is refused by the collector, never crashed
        log.warning(
            "layrot: could not share the run name and key across ranks (%s); pass run= and set LAYROT_RUN_KEY", exc
        )
        return run, key
    if not named and run is None and _dist_rank_world()[1] > 1:
        log.warning(
            "layrot: WORLD_SIZE > 1 but no process group is initialized at watch(): each rank picks its own "
            "default run name; call watch() after init_process_group, or pass run= / set LAYROT_RUN"
        )
    return run, key


class _DeviceFetch:
    """Brings a packed measurement (``layrot.agent.measurement``) to the host, once, on the reporter's thread.

    ``pending``: in-flight all-reduces of the sharded layers' columns (FSDP),
    waited for here on the reporter thread.
    """

    __slots__ = ("_tensor", "_event", "_pending")

    def __init__(self, tensor: torch.Tensor, pending: PendingSums | None = None) -> None:
        self._event = None
        self._pending = pending
        if tensor.device.type == "cuda":
            # One async device-to-host copy into pinned memory; the exporter
            # thread waits on the event, never the training thread.
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._tensor = host
        elif tensor.device.type == "cpu":
            self._tensor = tensor
        else:
            self._tensor = tensor.to("cpu", non_blocking=True)

    def __call__(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        host = self._tensor.numpy()
        if self._pending is not None:
            self._pending.apply(host)
            self._pending = None
        return host


class WatchHandle(WatchBase):
    """What ``layrot.watch`` returns: owns the hooks and the reporter.

    Attributes:
        run: the run id.
        step: optimizer steps taken since watching began (continues after
            ``load_state_dict``).
        layer_names: layers in forward order (known after the first step).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        run: str | None = None,
        every: int = 1,
        layers: LayerSelector = None,
        collector: str | None = None,
        token: str | None = None,
        control: bool = False,
        meta: Mapping[str, str] | None = None,
        reporter_options: Mapping[str, Any] | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        spool: bool | None = None,
        spool_max_bytes: int | None = None,
        total_steps: int | None = None,
        order: Sequence[str] | None = None,
        on_report: Callable[[LayerReport], object] | None = None,
        log_to: Any = None,
    ) -> None:
        run, run_key = _shared_run(run)  # collective when torch.distributed runs: before anything can raise
        self._configure(
            run,
            collector,
            every,
            token,
            meta,
            reporter_options,
            tls_ca,
            tls_cert,
            tls_key,
            spool,
            spool_max_bytes,
            total_steps=total_steps,
            on_report=on_report,
            log_to=log_to,
            make_writer=_summary_writer,
        )
        optimizer = real_optimizer(optimizer)
        self._optimizer = optimizer
        self._set_control(_as_layca(optimizer), control, "layrot.Layca")
        #: Called with (where, exception) for each exception the handle caught after setup,
        #: instead of its own one-time warning (the framework callbacks log through theirs).
        self.on_error: Callable[[str, BaseException], None] | None = None
        self._failed = False
        self._hook_errors = 0
        self._recorder: ForwardOrderRecorder | None = None

        effective = effective_weights(model)
        chosen = candidate_layers(model, layers, effective)
        # Parametrized layers (weight_norm): the effective weight, recomputed into its buffer.
        self._effective = [e for e in effective if any(e.buffer is t for _, t, _ in chosen)]
        self._alias = {e.name: e.originals for e in self._effective}
        self._names = [n for n, _, _ in chosen]
        self._params = [p for _, p, _ in chosen]
        self._types = [t for _, _, t in chosen]
        self._order = _check_order(order, self._names)
        # Names of every parameter (wrapper components dropped), so Layca's own layer set
        # can be put in forward order too.
        named = [(st, p) for _, st, p in stable_named_parameters(model)]
        self._name_of = {id(p): n for n, p in named}
        if self._layca is not None:
            reject_sharded_layca(self._layca.layers, lambda p: self._name_of.get(id(p), "?"))
        # FSDP2 layers: w(0), w(t-1) and the measurement are the rank's local shard.
        self._shards = ShardGroups(self._params, self._names)
        self._sharded = list(self._shards.sharded)
        # Parameters frozen at watch() (gradual unfreezing, a frozen backbone, LoRA's base weights)
        # cost nothing until they become trainable: no w(0) / w(t-1) copies (their w(0) is the
        # parameter itself, unchanged while frozen), no measurement (their rows are exact zeros).
        self._lazy = [
            isinstance(p, nn.Parameter) and not p.requires_grad and not sh for p, sh in zip(self._params, self._sharded)
        ]
        with torch.no_grad():
            views = self._shards.local_views()
            self._w0 = [v if lazy else v.clone() for v, lazy in zip(views, self._lazy)]
            self._prev = [v if lazy else w.clone() for v, w, lazy in zip(views, self._w0, self._lazy)]
        self._sleeping = [i for i, lazy in enumerate(self._lazy) if lazy]
        # Where each layer lives (module, attribute) and the storage measured: model.to(), .half() or a
        # new Parameter after watch() are seen at the next measurement and re-bound (_check_bindings).
        self._slots = _owner_slots(model, self._params)
        self._bound = [_binding(v) for v in self._shards.local_views()]
        self._warned_rebind = False
        self._init_norms = (
            self._shards.global_init_norms(self._w0, self.every) if self._shards.any else init_norms(self._w0)
        )
        self._recorder = ForwardOrderRecorder(model, named, wrap=self._guarded)
        self._prev_valid = True
        self._prev_is_w0 = True  # until the first copy, w(t-1) = w(0) and its norm is known exactly
        self._loss: torch.Tensor | None = None
        self.step = 0
        self._run_key = run_key
        self._hooks = [
            optimizer.register_step_pre_hook(self._guarded(self._pre_step, "optimizer step pre-hook", at_step=True)),
            optimizer.register_step_post_hook(self._guarded(self._post_step, "optimizer step post-hook", at_step=True)),
        ]
        # torch.compile stays eager until the order is fixed, so removing the hooks recompiles nothing.
        self._eager = EagerUntilOrdered()
        # The stance is global: a handle dropped before its first step must not leave the job eager.
        weakref.finalize(self, self._eager.release)

    # ------------------------------------------------------------ public API

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Attach the current loss to the next reported step (no host sync)."""
        if self._failed:
            return
        try:
            self._loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        except Exception as exc:
            self._fail("observe_loss", exc)

    @property
    def failed(self) -> bool:
        """True once the handle caught an exception after setup: it measures nothing from then on."""
        return self._failed

    @property
    def stats(self) -> ReporterStats:
        """Reporter counters (drops, acks, reconnects) and ``hook_errors``; zeros before the first step."""
        stats = super().stats
        stats.hook_errors = self._hook_errors
        return stats

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the collector acknowledged every reported step (or timeout); False on an error."""
        try:
            return super().flush(timeout)
        except Exception as exc:
            self._fail("flush", exc)
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Detach from the training job, flush what the collector can still take, stop the reporter's threads."""
        try:
            super().close(timeout)
        except Exception as exc:
            self._fail("close", exc)

    def _detach(self) -> None:
        for h in self._hooks:
            h.remove()
        if self._recorder is not None:
            self._recorder.remove()
        self._eager.release()

    # ------------------------------------------------------------ never fatal

    def _guarded(self, fn: Callable[..., Any], where: str, at_step: bool = False) -> Callable[..., Any]:
        """``fn`` as a hook that never raises: the first exception stops the handle (see the module docstring)."""

        def hook(*args: Any, **kwargs: Any) -> None:
            if self._failed:
                return None
            try:
                fn(*args, **kwargs)
            except Exception as exc:
                self._fail(where, exc)
                if at_step and self._recorder is not None:
                    # Safe here (no forward or backward runs): a failed handle keeps no per-forward hook.
                    self._recorder.remove()
            return None  # a step pre-hook returning something would replace the step's arguments

        hook.__name__ = getattr(fn, "__name__", "hook")
        return hook

    def _fail(self, where: str, exc: BaseException) -> None:
        self._hook_errors += 1
        first = not self._failed
        self._failed = True
        try:
            self._eager.release()
        except Exception as inner:
            log.debug("layrot: cannot restore the torch.compile stance: %r", inner)
        handler = self.on_error
        if handler is not None:
            try:
                handler(f"watch hook ({where})", exc)
                return
            except Exception as inner:  # the handler's own failure must not reach training either
                log.debug("layrot: the on_error handler failed: %r", inner)
        log_failure(first, f"watching run {self.run}", where, exc, "monitoring of this run stops")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs so a resumed job continues its rotation curves."""
        return {
            **self._state_frame(self.step),
            "w0": [w.detach().clone() for w in self._w0],
            "init_norms": list(self._init_norms),
            "sharded": list(self._sharded),
            # frozen since watch(): w(0) is the parameter as it is (a resumed job keeps it lazy)
            "frozen_since_watch": list(self._lazy),
            "rank": _dist_rank_world()[0],
            "world_size": _dist_rank_world()[1],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore w(0) and the step count saved by :meth:`state_dict`.

        States saved by earlier releases, whose names kept the ``_orig_mod.`` /
        ``module.`` components of ``torch.compile`` / DDP, load too.
        """
        if any(stable_name(n) != n for n in state.get("names", ())) and not set(self._names) <= set(state["names"]):
            state = {**state, "names": [stable_name(n) for n in state["names"]]}
        index = self._state_index(state)
        self._shards.check_resume(self._names, self._w0, state, index, _dist_rank_world())
        saved_lazy = state.get("frozen_since_watch") or [False] * len(state["names"])
        with torch.no_grad():
            for i, n in enumerate(self._names):
                if self._lazy[i] and saved_lazy[index[n]]:
                    continue  # still frozen since the first run's watch(): its w(0) is the loaded weight itself
                if self._lazy[i]:  # frozen here, trained before the checkpoint: it needs its own w(0)
                    self._w0[i] = self._w0[i].clone()
                    self._prev[i] = self._w0[i].clone()
                    self._lazy[i] = False
                self._w0[i].copy_(state["w0"][index[n]].to(self._w0[i].device))
        self._sleeping = [i for i, lazy in enumerate(self._lazy) if lazy]
        if self.reporter is not None:
            self._build_distances()
        self.step = self._restore_common(state, index)
        self._prev_valid = False
        self._prev_is_w0 = False  # w(t-1) is whatever the model holds before the next step

    # ------------------------------------------------------------ hooks

    def _finalize(self) -> None:
        """Fix the forward order and open the reporter (first optimizer step)."""
        everything = list(self._name_of.values())
        recorder = self._recorder
        self._forward_rank = (
            {everything[i]: r for r, i in enumerate(recorder.order(everything))}
            if recorder is not None and recorder.seen
            else {}
        )
        for name, originals in self._alias.items():  # a parametrized layer runs where its parameters do
            ranks = [self._forward_rank[n] for n in originals if n in self._forward_rank]
            if ranks:
                self._forward_rank[name] = min(ranks)
        if self._order:  # the job's own order first, then the recorded one
            k = len(self._order)
            recorded = {n: k + r for n, r in self._forward_rank.items() if n not in self._order}
            self._forward_rank = {**{n: i for i, n in enumerate(self._order)}, **recorded}
        if recorder is not None:
            recorder.remove()
        self._eager.release()
        order = self._in_forward_order(self._names)
        for attr in (
            "_names",
            "_params",
            "_types",
            "_w0",
            "_prev",
            "_init_norms",
            "_sharded",
            "_slots",
            "_bound",
            "_lazy",
        ):
            seq = getattr(self, attr)
            setattr(self, attr, [seq[i] for i in order])
        self._rho_index: np.ndarray | None = None  # set by _order_layca when Layca's layers differ
        if self._layca is not None:
            self._order_layca()
        # Shapes, numel and norms are the whole layer's (a DTensor's shape is global).
        specs = [
            LayerSpec(name=n, index=i, shape=tuple(p.shape), init_norm=nrm, numel=p.numel(), module_type=t, sharded=sh)
            for i, (n, p, nrm, t, sh) in enumerate(
                zip(self._names, self._params, self._init_norms, self._types, self._sharded)
            )
        ]
        self._check_bindings()  # a cast between watch() and the first step
        rank, world = _dist_rank_world()
        self._open_reporter(specs, "pytorch", torch.__version__, rank, world, self._meta)
        p0 = self._params[0]
        self._nan = torch.full((1,), float("nan"), dtype=torch.float64, device=p0.device)
        self._sleeping = [i for i, lazy in enumerate(self._lazy) if lazy]  # forward order indices now
        self._shards = ShardGroups(self._params, self._names)  # forward order from here on
        self._build_distances()
        self._init_norms_np = np.asarray(self._init_norms, dtype=np.float64)

    def _order_layca(self) -> None:
        """Give Layca the forward order and names of its layers, and map its rates to ours."""
        layca = self._layca
        lparams = list(layca.layers)
        lnames = [self._name_of.get(id(p), name) for p, name in zip(lparams, layca.layer_names)]
        order = self._in_forward_order(lnames)
        try:
            layca.set_layer_order([(lnames[i], lparams[i]) for i in order])
        except ValueError as exc:  # never crash a training step over naming
            log.warning("layrot: cannot give Layca the model's layer order (%s); it keeps its own", exc)
        pos = {n: i for i, n in enumerate(layca.layer_names)}
        idx = [pos.get(n, -1) for n in self._names]
        self._rho_index = None if idx == list(range(len(idx))) and len(pos) == len(idx) else np.array(idx)

    def _in_forward_order(self, names: Sequence[str]) -> list[int]:
        """Permutation putting ``names`` in forward order (unseen last, registration order kept)."""
        return sorted(range(len(names)), key=lambda i: (self._forward_rank.get(names[i], len(self._forward_rank)), i))

    @torch.no_grad()
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # A forward inside step(closure) (LBFGS, Lightning's automatic optimization) has not
        # run yet: then the order is fixed after the step, when the closure has run.
        if self.reporter is None and not self._closed and self._recorder is not None and self._recorder.seen:
            self._finalize()
        if self._sleeping:  # one requires_grad read per still-frozen layer, only while there are some
            self._wake_unfrozen()
        if not self._prev_valid:
            self._check_bindings()
            self._refresh_effective()
            if self.reporter is None:  # a state loaded before the first step: the layers are not ordered yet
                for buf, view in zip(self._prev, self._shards.local_views()):
                    buf.copy_(view)
            else:
                self._check_shards()
                self._copy_prev()
            self._prev_valid = True
            self._prev_is_w0 = False

    @torch.no_grad()
    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        if self.reporter is None:
            self._finalize()
        self.step += 1
        t = self.step
        if t % self.every == 0 or (t + 1) % self.every == 0:
            self._check_bindings()
            self._refresh_effective()
            if self._shards.any:
                self._check_shards()
        if t % self.every == 0:
            self._report(t)
        elif (t + 1) % self.every == 0:
            # Keep w(t) as next step's w(t-1); one copy, no sync.
            self._copy_prev()
            self._prev_valid = True
            self._prev_is_w0 = False

    def _refresh_effective(self) -> None:
        # Only where the buffers are read: the measurement and the w(t-1) copy before it.
        for e in self._effective:
            e.refresh()

    def _check_bindings(self) -> None:
        """Re-bind the layers whose parameter was replaced, moved or cast since it was bound.

        Checked only where the buffers are used (reported steps and the copy before
        them): a dict lookup and a pointer per layer, no device work. w(0) and w(t-1)
        follow the parameter to its new device and dtype (exact when widening, e.g.
        ``model.to(torch.float64)``; rounded when narrowing, said in the warning);
        ``||w(0)||`` stays the exact one announced to the collector.
        """
        moved = []
        for i, slot in enumerate(self._slots):
            if slot is None or self._sharded[i] or self._lazy[i]:
                continue  # FSDP shards: _check_shards; lazy layers: bound when they wake
            p = slot[0]._parameters.get(slot[1])
            if p is None:
                continue
            if p is not self._params[i] or _binding(p) != self._bound[i]:
                moved.append((i, p))
        if moved:
            self._rebind(moved)

    def _rebind(self, moved: Sequence[tuple[int, nn.Parameter]]) -> None:
        changes, narrowed = [], []
        for i, p in moved:
            old = self._w0[i]
            if tuple(p.shape) != tuple(self._params[i].shape):
                raise RuntimeError(
                    f"layer {self._names[i]} changed shape after watch() ({tuple(self._params[i].shape)} -> "
                    f"{tuple(p.shape)}); watch the new model with a new handle"
                )
            changes.append(f"{self._names[i]}: {old.dtype} on {old.device} -> {p.dtype} on {p.device}")
            if p.dtype.is_floating_point and torch.finfo(p.dtype).eps > torch.finfo(old.dtype).eps:
                narrowed.append(self._names[i])
            self._params[i] = p
            self._w0[i] = old.to(device=p.device, dtype=p.dtype)
            self._prev[i] = self._prev[i].to(device=p.device, dtype=p.dtype)
            self._bound[i] = _binding(p)
        if not self._warned_rebind:
            self._warned_rebind = True
            log.warning(
                "layrot: %d layer(s) of run %s were moved or cast after watch() (%s%s); measured in their new "
                "storage from this step on%s",
                len(changes),
                self.run,
                "; ".join(changes[:3]),
                f"; and {len(changes) - 3} more" if len(changes) > 3 else "",
                (
                    f". {len(narrowed)} to a narrower dtype: their w(0) and w(t-1) are rounded to it, so their "
                    "rotations carry that rounding"
                )
                if narrowed
                else "",
            )
        else:
            log.info("layrot: re-bound %d more moved or cast layer(s) of run %s", len(changes), self.run)
        self._shards = ShardGroups(self._params, self._names)
        if self.reporter is not None:  # before the first step the distances are built by _finalize
            self._nan = self._nan.to(self._params[0].device)
            self._build_distances()

    def _check_shards(self) -> None:
        # FSDP re-allocates a local shard on model.to() or assign-loads: measure the new storage.
        if self._shards.any and self._shards.moved():
            self._build_distances(self._shards.refresh())

    def _build_distances(self, views: Sequence[torch.Tensor] | None = None) -> None:
        """The measurement over the layers that are not lazy (frozen since watch())."""
        views = list(self._shards.local_views() if views is None else views)
        active = [i for i, lazy in enumerate(self._lazy) if not lazy]
        self._active = None if len(active) == len(views) else active
        if self._active is None:
            self._distances: LayerDistances | None = LayerDistances(views, self._w0, self._prev)
            return
        self._distances = (
            LayerDistances([views[i] for i in active], [self._w0[i] for i in active], [self._prev[i] for i in active])
            if active
            else None
        )
        self._active_index = torch.tensor(active, dtype=torch.long, device=self._nan.device)

    def _measure(self, refresh: bool) -> torch.Tensor:
        if self._active is None:
            assert self._distances is not None
            return self._distances.measure(refresh_prev=refresh)
        # Lazy layers did not move since watch(): d0 = ds = 0, their four sums are exact zeros.
        rows = torch.zeros((len(DEVICE_ROWS), len(self._params)), dtype=torch.float64, device=self._nan.device)
        if self._distances is not None:
            rows.index_copy_(1, self._active_index, self._distances.measure(refresh_prev=refresh).to(rows.device))
        return rows

    def _copy_prev(self) -> None:
        if self._distances is not None:
            self._distances.copy_prev()

    def _wake_unfrozen(self) -> None:
        """Lazy layers that became trainable get their buffers before this step updates them."""
        woken = [i for i in self._sleeping if self._params[i].requires_grad]
        if not woken:
            return
        with torch.no_grad():
            for i in woken:
                slot = self._slots[i]
                p = slot[0]._parameters.get(slot[1]) if slot is not None else None
                if p is not None and tuple(p.shape) == tuple(self._params[i].shape):
                    self._params[i] = p  # moved or cast while frozen: its current storage
                view = self._params[i].detach()
                self._w0[i] = view.clone()  # the weights of watch() time: frozen until now
                self._prev[i] = view.clone()
                self._bound[i] = _binding(view)
                self._lazy[i] = False
        self._sleeping = [i for i in self._sleeping if self._lazy[i]]
        log.info("layrot: %d frozen layer(s) of run %s became trainable and are measured", len(woken), self.run)
        if self.reporter is not None:
            self._shards = ShardGroups(self._params, self._names)
            self._build_distances()

    def _report(self, t: int) -> None:
        refresh = (t + 1) % self.every == 0
        rows = self._measure(refresh)
        # Sharded layers: one async all-reduce of their partial sums; the reporter thread waits.
        pending = self._shards.reduce_async(rows)
        prev_is_w0 = self._prev_is_w0
        self._prev_is_w0 = False
        self._prev_valid = refresh
        loss = self._loss.to(rows.device, torch.float64).reshape(1) if self._loss is not None else self._nan
        self._loss = None
        L = len(self._params)
        # The packed rows of the contract: DEVICE_ROWS, then the loss in column 0 of LOSS_ROW.
        packed = torch.cat([rows, torch.cat([loss, self._nan.expand(L - 1)]).unsqueeze(0)])
        measured = PackedMeasurement(_DeviceFetch(packed, pending), L, self._init_norms_np, prev_is_w0)
        rho = None
        version = 0
        if self._layca is not None:
            rho = self._layca.current_rates()
            if self._rho_index is not None:  # Layca covers other layers than the hook
                rho = np.where(self._rho_index >= 0, rho[np.maximum(self._rho_index, 0)], np.nan)
            version = self._layca.command_version
        reporter = self.reporter
        assert reporter is not None  # _post_step reports only once _finalize opened it
        reporter.submit(measured.record(t, rho=rho, command_version=version, time=time.time()))


def _check_order(order: Sequence[str] | None, names: Sequence[str]) -> list[str]:
    """``order=`` as a list of layer names; ValueError for a name that is no layer or a repeated one."""
    if order is None:
        return []
    if isinstance(order, str):
        raise ValueError("order= takes a sequence of layer names, not one string")
    given = [stable_name(str(n)) if str(n) not in names else str(n) for n in order]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise ValueError(f"order= names no layer: {unknown} (the layers: {list(names)})")
    if len(set(given)) != len(given):
        raise ValueError(f"order= names a layer twice: {given}")
    return given


def _owner_slots(model: nn.Module, params: Sequence[torch.Tensor]) -> list[tuple[nn.Module, str] | None]:
    """(module, attribute) holding each parameter (the first owner of a tied one); None if not found."""
    where: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) not in where:
                where[id(p)] = (module, attr)
    return [where.get(id(p)) for p in params]


def _binding(t: torch.Tensor) -> int:
    """What identifies the storage a layer is measured in: its address.

    A cast or a move allocates new storage, and the old one cannot be reused while
    the hook's views keep it alive, so the address alone tells (one call per layer).
    """
    return t.data_ptr()


def _as_layca(optimizer: Any) -> Any:
    try:
        from layrot.hooks.layca_torch import Layca
    except Exception:
        return None
    return optimizer if isinstance(optimizer, Layca) else None


#: The positional order after ``run`` of earlier releases (deprecated, still accepted).
def _summary_writer(log_dir: str) -> Any:
    """torch's SummaryWriter for ``log_to="tensorboard:DIR"`` (needs the tensorboard package)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


_LEGACY_POSITIONALS = ("every", "layers", "collector")
_DEFAULTS: dict[str, Any] = {"every": 1, "layers": None, "collector": None}


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run: str | None = None,
    *args: Any,
    every: int = 1,
    layers: LayerSelector = None,
    collector: str | None = None,
    token: str | None = None,
    control: bool = False,
    meta: Mapping[str, str] | None = None,
    reporter_options: Mapping[str, Any] | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    spool: bool | None = None,
    spool_max_bytes: int | None = None,
    total_steps: int | None = None,
    order: Sequence[str] | None = None,
    on_report: Callable[[LayerReport], object] | None = None,
    log_to: Any = None,
) -> WatchHandle:
    """Stream per-layer rotation of ``model`` to the layrot collector.

    Add one line after building the optimizer::

        handle = layrot.watch(model, optimizer, run="resnet18-lr0.1")

    The framework objects and ``run`` go by position, the rest by keyword, as in
    ``layrot.tf.watch(model, optimizer, run, ...)`` and
    ``layrot.keras.RotationCallback(run, ...)``; ``every``, ``layers`` and
    ``collector`` by position still work, with a DeprecationWarning.

    Args:
        model: the ``nn.Module`` being trained.
        optimizer: any ``torch.optim.Optimizer`` (or a ``layrot.Layca``); the
            hook runs right after its ``step()`` through the optimizer's step
            hooks, so a step skipped by ``GradScaler`` is not a step, and with
            gradient accumulation steps are optimizer steps.
        run: run id shared by all ranks; default ``LAYROT_RUN``, else ``<script>-<TORCHELASTIC_RUN_ID>``
            under torchrun with a rendezvous id, else rank 0's script+time+host (shared with
            every rank over the initialized process group: call ``watch`` on every rank).
        every: report every N optimizer steps (unreported steps cost at most one copy).
            FSDP2 (``fully_shard``): call ``watch`` on every rank after sharding,
            with the same ``every`` everywhere (checked at setup): each reported
            step all-reduces a (4, L) float64 tensor of partial sums over the
            shard group, so every rank reports whole-layer values.
        layers: the layer rule shared by every hook and Layca
            (:mod:`layrot.core.layer_rule`): None (parameters with ndim >= 2), a
            regex or a predicate ``(name, param) -> bool`` filtering those, or a
            list of exact parameter names. Names drop the wrappers' ``_orig_mod.`` / ``module.``;
            a tied weight (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is one
            layer, under the name ``named_parameters()`` gives it first; a parametrized
            weight (``weight_norm``) is measured as the effective weight under the module's
            name (``l1.weight``), never its magnitude ``original0``. Forward order comes from
            the first step (module calls and the first backward; closures included).
            Parameters frozen at ``watch()`` are layers too (gradual unfreezing): until they
            become trainable they cost no copy and no measurement, and report rotation 0.
        collector: ``host:port``; default ``LAYROT_COLLECTOR`` or ``localhost:50051``;
            ``"offline"`` (or ``LAYROT_MODE=offline``) records to the spool only, for a
            later ``layrot-agent sync``.
        token: bearer token if the collector requires one (``LAYROT_TOKEN``).
        control: accept remote Layca rate commands (needs a ``layrot.Layca`` optimizer).
        meta: free-form run metadata shown by the CLI.
        tls_ca, tls_cert, tls_key: TLS to the collector (CA file; client cert and key for
            mTLS); default ``LAYROT_TLS_CA`` / ``LAYROT_TLS_CERT`` / ``LAYROT_TLS_KEY``.
        spool: keep every batch on disk until the collector stored it (default on;
            ``LAYROT_SPOOL=0`` turns it off); the folder is ``LAYROT_SPOOL_DIR`` or the user
            cache dir (``~/.cache/layrot/spool``).
        spool_max_bytes: the spool's bound (default 1 GiB, ``LAYROT_SPOOL_MAX_BYTES``).
        order: layer names in forward order, for a model whose order the first step cannot
            show (e.g. a forward that differs at the first step); the layers not listed follow
            in the recorded order. Default: recorded.
        total_steps: the optimizer step the run plans to end at (None = unknown); the
            collector then judges ``not_learning`` at ``not_learning_share`` (5 %) of it
            instead of after ``not_learning_steps`` (100) reported steps.
        on_report: called with each reported step's numbers (a
            :class:`~layrot.agent.local_view.LayerReport`: per-layer rotation, step angle,
            norm, rho and the loss, as the collector computes them) on the reporter's
            thread, never the training thread, with or without a collector; an exception
            it raises is logged once and counted (``stats.report_callback_errors``).
            ``handle.latest()`` returns the newest one.
        log_to: forward the same per-layer rotation, step angle and indicator, from the
            reporter's thread, at step = the optimizer step: ``"wandb"`` (the active
            ``wandb.run``), a wandb Run, ``"mlflow"`` (the active MLflow run), a tuple
            ``(MlflowClient, run_id)``, ``"tensorboard:DIR"``, a ``SummaryWriter``, or a
            list of these (agent/bridges.py; names ``layrot/rotation/<layer>`` ...). A
            failing target is logged once and counted (``handle.bridges[i].failures``).

    Raises:
        ValueError: before training starts, for a run name the collector would refuse,
            a collector address that is not ``host:port``, an unreadable TLS file,
            ``every < 1``, a negative ``total_steps`` or an ``order`` naming no layer.
        TypeError: for an ``optimizer`` that is not a ``torch.optim.Optimizer`` and wraps
            none (Accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer``
            are unwrapped).

    Returns:
        A :class:`WatchHandle` with ``close()``, ``state_dict()`` /
        ``load_state_dict()``, ``observe_loss()`` and ``stats``. It also closes at exit.
        If the collector is unreachable training goes on at full speed: one
        warning, steps kept in the spool and sent after a reconnect (with the
        spool off: a bounded memory buffer, drops counted).
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "optimizer", "args")}
    if args:
        options = legacy_positionals("layrot.watch", args, _LEGACY_POSITIONALS, options, _DEFAULTS)
    return WatchHandle(model, optimizer, **options)
