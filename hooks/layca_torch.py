"""Layca for PyTorch: wrap any ``torch.optim.Optimizer`` and control layer rotation.

Layca (Carbonnelle & De Vleeschouwer, Algorithm 1) takes the step ``s`` the base
optimizer proposes for each layer's weights ``w`` and

1. projects ``s`` orthogonally to ``w``,
2. rescales it to ``||w||``,
3. applies it with the layer's rate: ``w <- w + rho_l(t) s``,
4. renormalises ``w`` to ``||w(0)||``,

so the angle between ``w(t-1)`` and ``w(t)`` is exactly ``arctan(rho_l(t))``.
``mode="lars"`` (the paper's Appendix A.4) does operations 2 and 3 only and caps
the per-step increase of ``||w||`` at ``1e-4 * ||w(0)||``.

The wrapper lets the base optimizer do its own update (momentum, Adam moments,
weight decay...), reads the step back as ``w_new - w_old`` from a snapshot, and
rewrites the layer weights. Parameters that are not layers (biases, norm
scales) keep the base optimizer's update unchanged: they train.

Everything in :meth:`Layca.step` runs on the parameters' device with foreach
kernels (or a per-tensor loop on CPU) and never synchronises with the host.

Precision notes:

- The angle is exact up to float rounding of the weights themselves (measured
  relative error ~1e-6 on float32 MLPs, ~5e-7 on ResNet-18's 2.4 M-element
  kernels); ``||w||`` stays at ``||w(0)||`` to ~1e-7 with no drift, because every
  step renormalises from freshly measured norms.
- The step *direction* is read back as ``w_new - w_old`` in the parameter dtype,
  so each element carries an error of up to half an ulp of ``w``: relative to
  the step that is ~6e-8 * |w| / |lr * step| in float32. Only the direction is
  affected (the magnitude is Layca's), and with usual learning rates it is far
  below the gradient noise; a base ``lr`` many orders of magnitude below the
  weights (or half-precision parameters) makes the direction noisy.
- A non-finite base step (a diverged run) propagates NaN/Inf into the weights
  exactly as the base optimizer would; use GradScaler to skip such steps.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from layrot.agent.commands import CommandInbox, CommandListener
from layrot.core.layer_rule import LayerSelector, is_layer, select_layers
from layrot.core.rates import DEFAULT_RHO0, LARS_GROWTH_CAP, RateRule, RhoSchedule
from layrot.hooks.layca_rule_view import CommandIntake, RuleView
from layrot.hooks.torch_shards import reject_sharded_layca

__all__ = ["Layca", "CommandListener"]

logger = logging.getLogger(__name__)

_STATE_FORMAT = 1


def _scalar_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-layer coefficient math (L-vectors, so precision is free)."""
    if device.type == "mps":  # no float64 there
        return torch.float32
    return torch.float64


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    # Reductions over half/bfloat16 tensors must accumulate in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coef_dtype(dtype: torch.dtype) -> torch.dtype:
    # Coefficients in the parameter dtype keep foreach kernels homogeneous;
    # half/bfloat16 coefficients would round rho to 3 digits, so use float32 there.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


_CPU_ROWS = 256


def _cpu_norm(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """||x|| on CPU, accurate for large tensors.

    A flat float32 ``vector_norm`` on CPU accumulates long runs in float32: for a
    2.4 M-element conv kernel it is off by ~4e-5 (relative), which would show up
    directly in ||w|| and in the rotation angle. Norms of 256 rows, then of those,
    are ~1e-8 accurate and faster (the rows reduce in parallel).
    """
    n = x.numel()
    if n < 16 * _CPU_ROWS or not x.is_contiguous():
        return torch.linalg.vector_norm(x, dtype=dtype)
    flat = x.view(-1)
    cols = n // _CPU_ROWS
    head = torch.linalg.vector_norm(flat[: cols * _CPU_ROWS].view(_CPU_ROWS, cols), dim=1, dtype=dtype)
    if cols * _CPU_ROWS == n:
        return torch.linalg.vector_norm(head)
    tail = torch.linalg.vector_norm(flat[cols * _CPU_ROWS :], dtype=dtype)
    return torch.linalg.vector_norm(torch.cat([head, tail.reshape(1)]))


class _Group:
    """Layers sharing a device and dtype: one foreach call per operation."""

    def __init__(self, index: list[int], params: list[torch.Tensor], foreach: bool):
        self.index = np.asarray(index, dtype=np.int64)
        self.params = params
        p0 = params[0]
        self.device = p0.device
        self.dtype = p0.dtype
        self.sd = _scalar_dtype(self.device, self.dtype)
        self.nd = _norm_dtype(self.dtype)
        self.cd = _coef_dtype(self.dtype)
        self.foreach = foreach
        self.bufs = [torch.empty_like(p, memory_format=torch.preserve_format).detach() for p in params]
        self.w0n: torch.Tensor | None = None  # ||w(0)|| per layer (sd)
        self.profile: torch.Tensor | None = None  # rule.profile_vector[index] (sd)
        self.table: torch.Tensor | None = None  # rule.table_matrix[:, index] (sd)
        self.rates = torch.zeros(len(params), dtype=self.sd, device=self.device)
        self.key: tuple | None = None  # what self.rates currently holds
        self.ones = torch.ones(len(params), dtype=self.sd, device=self.device)
        self.zeros = torch.zeros(len(params), dtype=self.sd, device=self.device)

    # --- list ops: foreach kernels, or the same math tensor by tensor
    def _each_(self, foreach_op: Callable[..., Any], op: Callable[..., Any], *lists: Sequence[Any]) -> None:
        """``foreach_op(*lists)``, or ``op`` on each tuple of their items when foreach is off."""
        if self.foreach:
            foreach_op(*lists)
        else:
            for items in zip(*lists):
                op(*items)

    def copy_(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        self._each_(torch._foreach_copy_, torch.Tensor.copy_, dst, src)

    def sub_(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        self._each_(torch._foreach_sub_, torch.Tensor.sub_, xs, ys)

    def add_(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        self._each_(torch._foreach_add_, torch.Tensor.add_, xs, ys)

    def norms(self, xs: list[torch.Tensor]) -> torch.Tensor:
        out: list[torch.Tensor] | tuple[torch.Tensor, ...]
        if self.device.type == "cpu":
            out = [_cpu_norm(x, self.nd) for x in xs]
        elif self.foreach:
            out = torch._foreach_norm(xs, 2, dtype=self.nd)
        else:
            out = [torch.linalg.vector_norm(x, dtype=self.nd) for x in xs]
        return torch.stack(out).to(self.sd)

    def scale_(self, xs: list[torch.Tensor], coef: torch.Tensor) -> None:
        """xs[i] *= coef[i] (coef: a device L-vector; no host values involved)."""
        self._each_(torch._foreach_mul_, torch.Tensor.mul_, xs, coef.to(self.cd).unbind(0))

    def axpy_(self, xs: list[torch.Tensor], ys: list[torch.Tensor], coef: torch.Tensor) -> None:
        """xs[i] += coef[i] * ys[i]."""
        self._each_(torch._foreach_addcmul_, torch.Tensor.addcmul_, xs, ys, coef.to(self.cd).unbind(0))

    def dots(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
        # There is no foreach dot: L small reduction kernels, still no host sync.
        out = []
        for x, y in zip(xs, ys):
            if x.dtype in (torch.float32, torch.float64) and x.is_contiguous() and y.is_contiguous():
                out.append(torch.dot(x.view(-1), y.view(-1)))
            else:
                out.append(torch.sum(x.to(self.sd) * y.to(self.sd)))
        return torch.stack(out).to(self.sd)


def _takes_one_argument(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is an old-style ``fn(param)`` predicate (it cannot take ``(name, param)``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: assume the current form
        return False
    try:
        sig.bind(None, None)
        return False
    except TypeError:
        pass
    try:
        sig.bind(None)
        return True
    except TypeError:
        return False


def _positions_of(flat: list[torch.Tensor], params: Sequence[torch.Tensor]) -> list[int]:
    where = {id(p): i for i, p in enumerate(flat)}
    index = []
    for p in params:
        if id(p) not in where:
            raise ValueError("a parameter in layers= is not optimized by the base optimizer")
        index.append(where[id(p)])
    if len(set(index)) != len(index):
        raise ValueError("layers= lists a parameter twice")
    return index


class Layca(torch.optim.Optimizer, RuleView, CommandIntake):
    """Layca around any ``torch.optim.Optimizer``; itself a ``torch.optim.Optimizer``.

    Args:
        optimizer: the base optimizer (SGD, SGD + momentum, Adam, AdamW, RMSprop...).
            It proposes the step direction; Layca sets the per-layer rotation.
        rho: initial global rate rho(0) (the paper's best: 3**-3). Ignored when
            ``schedule`` is given (then it must be left at its default or equal
            ``schedule.rho0``).
        alpha: Eq. 1 profile parameter in [-1, 1] (< 0 favours first layers).
        schedule: a :class:`~layrot.core.rates.RhoSchedule` (default constant ``rho``).
        mode: ``"layca"`` (Algorithm 1) or ``"lars"`` (Appendix A.4).
        layers: which parameters are layers (multiplicative weights), by the layer
            rule of :mod:`layrot.core.layer_rule` shared with ``layrot.watch``: None
            for every weight with ``ndim >= 2`` (not biases or normalization
            parameters, whatever their shape; frozen ones included, so a layer
            unfrozen later is rotated by Layca from then on) in the optimizer's order, a regex or a
            predicate ``(name, param) -> bool`` filtering those, or a list of exact
            names. Names are the base optimizer's ``param_names`` (build it from
            ``model.named_parameters()``), else
            ``"param{i}"`` by optimizer position. Deprecated (they warn): a list of
            parameter tensors, a one-argument predicate ``param -> bool``.
        rho_max: the largest rate any rule may produce; remote commands above it are
            refused (1.0 = 45 degrees per step).
        foreach: use ``torch._foreach_*`` kernels; None picks them on devices that
            have them (CUDA, XPU...) and a per-tensor loop elsewhere (CPU).

    ``param_groups``, ``state`` and ``defaults`` *are* the base optimizer's, so LR
    schedulers, ``GradScaler`` (``scaler.unscale_(layca)``, ``scaler.step(layca)``),
    gradient clipping and ``zero_grad`` work unchanged. The base ``lr`` still
    drives the non-layer parameters; for layers only its direction matters (it
    cancels in the rescaling), though a tiny lr costs float32 precision in the
    recovered step direction (see the module's precision notes).

    Step hooks registered on the Layca object (``register_step_post_hook``) run
    after Layca's update; hooks on the base optimizer see the weights before it
    (global ``register_optimizer_step_post_hook`` hooks fire for both).
    ``GradScaler.step(layca)`` takes the standard path (unscale, skip the whole
    step when gradients are not finite).

    Memory: one extra copy of the layer weights (the snapshot of ``w(t-1)``).
    Layers whose ``||w(0)||`` is 0 cannot be rotated; they keep the base update.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rho: float = DEFAULT_RHO0,
        alpha: float = 0.0,
        schedule: RhoSchedule | None = None,
        mode: str = "layca",
        layers: LayerSelector = None,
        rho_max: float = 1.0,
        foreach: bool | None = None,
    ) -> None:
        if isinstance(optimizer, Layca):
            raise TypeError("the optimizer is already wrapped by Layca")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Layca wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(rho_max, (int, float)) and math.isfinite(rho_max) and rho_max >= 0):
            raise ValueError(f"rho_max must be a finite number >= 0, got {rho_max!r}")
        # Optimizer.__init__ is deliberately not called: it would build its own
        # param_groups/state, while ours are the base optimizer's (properties below).
        self.base_optimizer = optimizer
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()  # wraps step so registered step hooks fire
        self._warned_capturable_if_run_uncaptured = True

        self._rho_max = float(rho_max)
        self._foreach_arg = foreach
        flat = self._flat_params()
        index = self._select_layers(flat, layers)
        self._layer_index: list[int] = index
        self._names: tuple[str, ...] = tuple(self._default_names()[i] for i in index)
        names = dict(zip((id(flat[i]) for i in index), self._names))
        reject_sharded_layca([flat[i] for i in index], lambda p: names.get(id(p), "?"))
        if not index:
            logger.warning("Layca: the optimizer has no layer parameters (ndim >= 2); it runs the base optimizer only")

        if schedule is None:
            schedule = RhoSchedule(rho0=rho)
        elif rho != DEFAULT_RHO0 and rho != schedule.rho0:
            raise ValueError(f"rho={rho} conflicts with schedule.rho0={schedule.rho0}; set rho0 in the schedule")
        rule = RateRule(self._names, mode=mode, alpha=alpha, schedule=schedule)
        self._check_rho_max(rule)
        self._base_rule = rule
        self._rule = rule
        self._rule_step = 1  # first step governed by the current rule

        self._step = 0
        self._last_rule: RateRule | None = None  # the rule that governed step self._step
        self._w0n: list[torch.Tensor] | None = None  # per layer, global order, 0-d tensors
        self._groups: list[_Group] | None = None

        self._inbox = CommandInbox()

    def _select_layers(self, flat: list[torch.Tensor], layers: Any) -> list[int]:
        """Optimizer positions of the layer parameters chosen by ``layers=``."""
        if layers is None:
            # The shared rule by role (a bias kept as a matrix is not a layer), from the
            # optimizer's param_names when it has them ("param{i}" says nothing: ndim decides).
            names = self._default_names()
            # Frozen ones too: unfrozen later (gradual unfreezing) they are Layca's layers from
            # the start; while frozen their step is zero and Layca leaves them bitwise unchanged.
            return [i for i, p in enumerate(flat) if is_layer(names[i], p.ndim)]
        if callable(layers) and not isinstance(layers, re.Pattern) and _takes_one_argument(layers):
            warnings.warn(
                "Layca(layers=fn) with a one-argument predicate fn(param) is deprecated; "
                "pass fn(name, param) -> bool (the layer rule of layrot.watch)",
                DeprecationWarning,
                stacklevel=3,
            )
            return [i for i, p in enumerate(flat) if layers(p)]
        if not isinstance(layers, (str, re.Pattern)) and not callable(layers):
            items = list(layers)
            if items and all(isinstance(p, torch.Tensor) for p in items):
                warnings.warn(
                    "Layca(layers=[param, ...]) is deprecated; pass parameter names, a regex or "
                    "a predicate (name, param) -> bool (the layer rule of layrot.watch)",
                    DeprecationWarning,
                    stacklevel=3,
                )
                return _positions_of(flat, items)
            if not all(isinstance(n, str) for n in items):
                raise TypeError("layers= must be names (str), a regex, a predicate (name, param) -> bool or None")
            layers = items
        names = self._default_names()
        named = [(names[i], p) for i, p in enumerate(flat)]
        chosen = select_layers(named, lambda p: p.ndim, layers, "optimizer's parameters (Layca)")
        return _positions_of(flat, [p for _, p in chosen])

    # ------------------------------------------------------------ torch.optim surface
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's parameter groups (shared, not copied)."""
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self):
        """The base optimizer's per-parameter state."""
        return self.base_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.base_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The base optimizer's defaults."""
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegates to the base optimizer."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds the group to the base optimizer; its parameters train without Layca."""
        self.base_optimizer.add_param_group(param_group)
        logger.info("Layca: parameters of a group added after construction are not Layca layers")

    def __repr__(self) -> str:
        return f"Layca({self._rule.describe()}, layers={len(self._layer_index)}, base={self.base_optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_groups", None)  # device buffers, rebuilt at the next step
        return state  # the inbox pickles without its queue and listeners

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_inbox" not in state:  # pickled before the shared inbox existed
            inbox = CommandInbox()
            inbox.last_result = state.pop("_last_result", None)
            for k in ("_lock", "_pending", "_pending_due", "_listeners", "on_command_result"):
                state.pop(k, None)
            state["_inbox"] = inbox
        self.__dict__.update(state)
        self._groups = None
        self._patch_step_function()

    # ------------------------------------------------------------ layers
    def _flat_params(self) -> list[torch.Tensor]:
        return [p for g in self.base_optimizer.param_groups for p in g["params"]]

    def _default_names(self) -> list[str]:
        names: list[str] = []
        i = 0
        for g in self.base_optimizer.param_groups:
            pn = g.get("param_names")
            for j, _ in enumerate(g["params"]):
                names.append(str(pn[j]) if pn is not None and j < len(pn) else f"param{i}")
                i += 1
        return names

    @property
    def layers(self) -> list[torch.Tensor]:
        """The layer parameters, in layer (forward) order."""
        flat = self._flat_params()
        return [flat[i] for i in self._layer_index]

    @property
    def layer_names(self) -> list[str]:
        """Layer names in layer order ("param{i}" by optimizer position until set_layer_order)."""
        return list(self._names)

    @property
    def num_layers(self) -> int:
        return len(self._layer_index)

    def set_layer_order(self, named_params: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Set the forward order and names of the layers.

        ``named_params`` must list exactly the current layer parameters (any order,
        unique names); each layer keeps its own w(0) norm and per-layer rule
        settings. Call it before training when possible (the monitoring hook does).
        """
        named_params = list(named_params)
        current = {id(p): j for j, p in enumerate(self.layers)}
        ids = [id(p) for _, p in named_params]
        if len(set(ids)) != len(ids) or set(ids) != set(current):
            given = {id(p) for _, p in named_params}
            extra = sum(1 for i in given if i not in current)
            missing = sum(1 for i in current if i not in given)
            raise ValueError(
                f"set_layer_order needs exactly the {len(current)} Layca layers "
                f"({extra} unknown, {missing} missing, or duplicates); "
                f"see Layca.layers / the layers= argument"
            )
        names = [str(n) for n, _ in named_params]
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")
        order = [current[i] for i in ids]
        self._layer_index = [self._layer_index[j] for j in order]
        self._names = tuple(names)
        if self._w0n is not None:
            self._w0n = [self._w0n[j] for j in order]
        self._rule = self._rule.permuted(order, names)
        self._base_rule = self._base_rule.permuted(order, names)
        if self._last_rule is not None:
            self._last_rule = self._last_rule.permuted(order, names)
        self._groups = None

    # ------------------------------------------------------------ rates
    @property
    def step_count(self) -> int:
        """Optimizer steps taken through Layca (the last step's number; 0 before the first)."""
        return self._step

    def current_rates(self) -> np.ndarray:
        """rho_l applied at the step just run (``step_count``), under the rule that
        governed it; before the first step, the rates step 1 will use. Host-side
        float64, no device sync. A command or ``set_rule`` shows up once a step ran with it.
        """
        if self._last_rule is not None:
            return self._last_rule.rates(self._step)
        return self._rule.rates(max(self._step, 1))

    @property
    def init_norms(self) -> np.ndarray | None:
        """||w(0)|| per layer (float64), or None before the first step. Syncs with the device."""
        if self._w0n is None:
            return None
        return np.array([float(t) for t in self._w0n], dtype=np.float64)

    def set_rule(
        self,
        rule: RateRule | None = None,
        *,
        mode: str | None = None,
        alpha: float | None = None,
        rho: float | None = None,
        schedule: RhoSchedule | None = None,
        multipliers: Sequence[float] | None = None,
        layer_multipliers: dict[str, float] | None = None,
    ) -> RateRule:
        """Replace the job's own rule locally (from the training thread); governs the next step.

        Either pass a complete ``rule`` (for these layers) or change fields of the
        current base rule (``rho`` sets a constant schedule). The result becomes
        both the base rule and the rule in force, with version 0. Returns it.
        """
        rule = self._resolved_rule(rule, mode, alpha, rho, schedule, multipliers, layer_multipliers)
        self._check_rho_max(rule)
        self._base_rule = rule
        self._install_rule(rule)
        return rule

    def _install_rule(self, rule: RateRule) -> None:
        self._rule = rule
        self._rule_step = self._step + 1
        if self._groups is not None:
            self._upload_rule(self._groups)

    # ------------------------------------------------------------ control plane
    def _process_commands(self) -> None:
        self._inbox.decide(self._step + 1, self._names, self._rho_max, self._base_rule, install=self._install_rule)

    # ------------------------------------------------------------ device state
    def _use_foreach(self, params: list[torch.Tensor]) -> bool:
        if self._foreach_arg is not None:
            return bool(self._foreach_arg)
        from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

        supported = set(_get_foreach_kernels_supported_devices())
        return all(p.device.type in supported for p in params)

    def _build_groups(self) -> list[_Group]:
        layers = self.layers
        by_key: dict[tuple, list[int]] = {}
        for j, p in enumerate(layers):
            by_key.setdefault((p.device, p.dtype), []).append(j)
        groups = [
            _Group(idx, [layers[j] for j in idx], self._use_foreach([layers[j] for j in idx]))
            for idx in by_key.values()
        ]
        if self._w0n is not None:
            for g in groups:
                g.w0n = torch.stack([self._w0n[j].to(g.device, g.sd) for j in g.index.tolist()])
        self._upload_rule(groups)
        return groups

    def _upload_rule(self, groups: list[_Group]) -> None:
        # Host -> device copies happen here, when the rule changes, not per step.
        rule = self._rule
        for g in groups:
            g.profile = torch.tensor(rule.profile_vector[g.index], dtype=g.sd, device=g.device)
            tm = rule.table_matrix
            g.table = None if tm is None else torch.tensor(tm[:, g.index], dtype=g.sd, device=g.device)
            g.key = None

    def _capture_init_norms(self, groups: list[_Group]) -> None:
        w0n: list[torch.Tensor | None] = [None] * len(self._layer_index)
        for g in groups:
            norms = [torch.linalg.vector_norm(p.detach(), dtype=g.sd) for p in g.params]
            g.w0n = torch.stack(norms)
            for j, t in zip(g.index.tolist(), norms):
                w0n[j] = t
        self._w0n = w0n  # type: ignore[assignment]

    # ------------------------------------------------------------ the step
    def step(self, closure: Callable[[], float] | None = None):
        """Run the base optimizer's step, then Layca's per-layer operations.

        Pending control commands are handled first (this is the step boundary).
        Returns the closure's loss like any optimizer.
        """
        if self._step + 1 >= self._inbox.due_at:  # one compare while nothing is due
            self._process_commands()
        if not self._layer_index:
            loss = self.base_optimizer.step(closure) if closure is not None else self.base_optimizer.step()
            self._step += 1
            self._last_rule = self._rule
            return loss
        if self._groups is None:
            self._groups = self._build_groups()
        groups = self._groups
        t = self._step + 1
        key = self._rule.source(t)
        with torch.no_grad():
            if self._w0n is None:
                self._capture_init_norms(groups)
            for g in groups:
                g.copy_(g.bufs, g.params)
                if g.key != key:
                    if key[0] == "table":
                        g.rates.copy_(g.table[int(key[1])])  # type: ignore[index]
                    else:
                        assert g.profile is not None  # uploaded by _build_groups / _install_rule
                        torch.mul(g.profile, float(key[1]), out=g.rates)
                    g.key = key
        # The base step runs in the caller's grad mode (closures need it).
        loss = self.base_optimizer.step(closure) if closure is not None else self.base_optimizer.step()
        with torch.no_grad():
            lars = self._rule.mode == "lars"
            for g in groups:
                self._layca_update(g, lars)
        self._step = t
        self._last_rule = self._rule
        return loss

    @staticmethod
    def _layca_update(g: _Group, lars: bool) -> None:
        P, B, w0n = g.params, g.bufs, g.w0n
        assert w0n is not None  # step() captures ||w(0)|| before the first update
        g.sub_(P, B)  # P := s = w_new - w_old
        nb = g.norms(B)  # ||w_old||
        active = (nb > 0) & (w0n > 0)  # a zero vector cannot be rotated
        if not lars:
            dots = g.dots(P, B)
            k = torch.where(active, dots / torch.where(active, nb * nb, g.ones), g.zeros)
            g.axpy_(P, B, -k)  # 1: s := s - (s.w / w.w) w
        ns = g.norms(P)
        # rho = 0 is a zero step too, so frozen layers stay bitwise unchanged.
        moving = active & (ns > 0) & (g.rates > 0)
        # 2-3: w := w_old + rho ||w_old|| s/||s||. A zero step stays zero (f = 0); a
        # layer that cannot be rotated keeps the base update (f = 1).
        f = torch.where(moving, g.rates * nb / torch.where(moving, ns, g.ones), torch.where(active, g.zeros, g.ones))
        if not lars:
            # 3-4 fused: w := c (w_old + f s) with c = ||w(0)|| / ||w_old + f s||. As s is
            # orthogonal to w_old, ||w_old + f s|| = ||w_old|| sqrt(1 + rho^2): no third norm pass.
            c = torch.where(moving, w0n / (torch.where(moving, nb, g.ones) * torch.sqrt(1 + g.rates * g.rates)), g.ones)
            g.scale_(P, c * f)
            g.axpy_(P, B, c)
            return
        g.scale_(P, f)
        g.add_(P, B)
        # Appendix A.4: the norm may not grow by more than 1e-4 ||w(0)|| in one step;
        # a radial rescale enforces it without changing the direction. Without
        # projection s is not orthogonal to w, so the new norm is measured.
        nw = g.norms(P)
        cap = LARS_GROWTH_CAP * w0n
        c = torch.where(moving & (nw - nb > cap), (nb + cap) / torch.where(nw > 0, nw, g.ones), g.ones)
        g.scale_(P, c)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"layca"`` entry.

        The ``"layca"`` entry holds the step count, the layer table (optimizer
        positions and names), ||w(0)|| per layer in float64 and the rules (in force
        and the job's own), in plain Python types (``torch.load(weights_only=True)``
        accepts it). The base part loads into a plain base optimizer as well.
        """
        for pre in self._optimizer_state_dict_pre_hooks.values():
            pre(self)
        sd = dict(self.base_optimizer.state_dict())
        sd["layca"] = {
            "format": _STATE_FORMAT,
            "step": self._step,
            "layer_index": list(self._layer_index),
            "layer_names": list(self._names),
            "init_norms": None if self._w0n is None else [float(t) for t in self._w0n],
            "rule": self._rule.to_dict(),
            "rule_step": self._rule_step,
            "base_rule": self._base_rule.to_dict(),
            **self._inbox.state_dict(),  # "last_result"
        }
        for post in self._optimizer_state_dict_post_hooks.values():
            out = post(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (or a plain base-optimizer state dict,
        which keeps the current Layca settings)."""
        for pre in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre(self, state_dict)
            if out is not None:
                state_dict = out
        layca = state_dict.get("layca")
        base_part = {k: v for k, v in state_dict.items() if k != "layca"}
        self.base_optimizer.load_state_dict(base_part)
        if layca is None:
            logger.warning("Layca: the state dict has no Layca entry; Layca settings are unchanged")
        else:
            self._load_layca(layca)
        for post in self._optimizer_load_state_dict_post_hooks.values():
            post(self)

    def _load_layca(self, d: dict[str, Any]) -> None:
        if int(d.get("format", 0)) != _STATE_FORMAT:
            raise ValueError(f"unsupported Layca state format {d.get('format')!r}")
        flat = self._flat_params()
        index = [int(i) for i in d["layer_index"]]
        if any(not 0 <= i < len(flat) for i in index):
            raise ValueError("the Layca state refers to parameters the optimizer does not have")
        names = tuple(str(n) for n in d["layer_names"])
        rule = RateRule.from_dict(d["rule"])
        base_rule = RateRule.from_dict(d["base_rule"])
        if rule.layer_names != names or base_rule.layer_names != names or len(names) != len(index):
            raise ValueError("inconsistent Layca state: layer names differ between entries")
        self._layer_index = index
        self._names = names
        self._rule = rule
        self._base_rule = base_rule
        self._rule_step = int(d["rule_step"])
        self._step = int(d["step"])
        self._last_rule = rule if self._rule_step <= self._step else None
        self._inbox.load_state_dict(d)
        init = d["init_norms"]
        if init is None:
            self._w0n = None
        else:
            if len(init) != len(index):
                raise ValueError("inconsistent Layca state: init_norms length")
            self._w0n = [
                torch.tensor(float(v), dtype=_scalar_dtype(flat[i].device, flat[i].dtype), device=flat[i].device)
                for v, i in zip(init, index)
            ]
        self._groups = None
