"""Which parameters of a PyTorch model are *layers*, under which names, and in which order.

A layer is a multiplicative weight: a parameter with ndim >= 2 (Linear, ConvNd,
Embedding, custom modules' 2-D+ parameters), frozen ones included, so layers
unfrozen later (gradual unfreezing) are in the run from its first step. Biases
and normalisation parameters are not layers.

Names are the model's parameter names without the components that wrappers
add (:func:`stable_named_parameters`): ``_orig_mod.`` (``torch.compile``),
``module.`` (DDP, DataParallel), ``_fsdp_wrapped_module.`` and
``_checkpoint_wrapped_module.``, so compiled, distributed and plain runs of one
model report the same layers and load each other's checkpoints. A parameter
shared by several modules (tied weights, GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) is one layer, named where ``named_parameters``
first meets it.

The order is the forward order (:class:`ForwardOrderRecorder`), learned from
the first training step: the first call of the modules owning the parameters,
and the order in which the first backward accumulates their gradients, which
also sees parameters read by functional code (``nn.MultiheadAttention``'s
``out_proj.weight``) and forwards run inside ``optimizer.step(closure)``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from layrot.core.layer_rule import LayerSelector, select_layers
from layrot.hooks.torch_shards import module_type_name

log = logging.getLogger(__name__)


def _wrapper_attributes(module: nn.Module) -> tuple[str, ...]:
    """The child attribute through which a wrapper module holds the real model (empty for others)."""
    names = []
    cls = type(module)
    if cls.__name__ == "OptimizedModule":  # torch.compile(model)
        names.append("_orig_mod")
    if cls.__name__ in ("DistributedDataParallel", "DataParallel") or (
        isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel))
    ):
        names.append("module")
    names += ["_fsdp_wrapped_module", "_checkpoint_wrapped_module"]  # FSDP1, activation checkpointing
    return tuple(names)


def _stable_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, str, nn.Module]]:
    """(raw name, stable name, module) of every module, each once, stable names without wrapper components."""
    seen: set[int] = set()

    def walk(mod: nn.Module, raw: str, stable: str) -> Iterator[tuple[str, str, nn.Module]]:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        yield raw, stable, mod
        skip = _wrapper_attributes(mod)
        for child_name, child in mod._modules.items():
            if child is None:
                continue
            child_raw = f"{raw}.{child_name}" if raw else child_name
            child_stable = stable if child_name in skip else (f"{stable}.{child_name}" if stable else child_name)
            yield from walk(child, child_raw, child_stable)

    yield from walk(module, prefix, prefix)


def stable_named_parameters(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(raw name, stable name, parameter) in ``model.named_parameters()`` order (shared parameters once).

    The stable name drops the wrapper components listed in the module docstring.
    """
    stable_of: dict[str, str] = {}
    for raw_mod, stable_mod, module in _stable_modules(model):
        for p_name, _ in module.named_parameters(recurse=False):
            raw = f"{raw_mod}.{p_name}" if raw_mod else p_name
            stable_of[raw] = f"{stable_mod}.{p_name}" if stable_mod else p_name
    return [(n, stable_of.get(n, n), p) for n, p in model.named_parameters()]


def stable_name(name: str) -> str:
    """A parameter name of a saved state without wrapper components, read from the string alone.

    For names saved by an older release (which kept ``_orig_mod.`` / ``module.``):
    ``module.`` is dropped only as the leading component (where DDP puts it).
    """
    parts = [c for c in name.split(".") if c not in ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")]
    while parts and parts[0] == "module" and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts)


class EffectiveWeight:
    """The tensor a parametrized module computes (``torch.nn.utils.parametrize``), kept in a buffer.

    ``weight_norm(module)`` stores a magnitude ``parametrizations.weight.original0``
    (shape (out, 1)) and a direction ``original1``; neither is the weight the layer
    multiplies by, and the magnitude is no layer at all. The hook measures the
    effective ``module.weight`` instead, under that name: :meth:`refresh` recomputes
    it into :attr:`buffer` (on the parameters' device, no host sync) before each
    measurement and each w(t-1) copy. Any other parametrization (``orthogonal``,
    ``spectral_norm``) is measured the same way.
    """

    __slots__ = ("name", "module", "attr", "originals", "buffer")

    def __init__(self, name: str, module: nn.Module, attr: str, originals: list[str]) -> None:
        self.name = name
        self.module = module
        self.attr = attr
        #: Stable names of the parametrization's own parameters (hidden from the layer table).
        self.originals = originals
        with torch.no_grad():
            self.buffer: torch.Tensor = getattr(module, attr).detach().clone()

    def refresh(self) -> None:
        """Recompute the effective tensor into the buffer (call under ``torch.no_grad``)."""
        self.buffer.copy_(getattr(self.module, self.attr))


def effective_weights(model: nn.Module) -> list[EffectiveWeight]:
    """The parametrized tensors of ``model`` (see :class:`EffectiveWeight`), registration order."""
    from torch.nn.utils import parametrize

    out = []
    for _, stable_mod, module in _stable_modules(model):
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():  # type: ignore[union-attr, operator]
            base = f"{stable_mod}.parametrizations.{attr}" if stable_mod else f"parametrizations.{attr}"
            originals = [f"{base}.{n}" for n, _ in plist.named_parameters(recurse=False)]
            out.append(EffectiveWeight(f"{stable_mod}.{attr}" if stable_mod else attr, module, attr, originals))
    return out


def candidate_layers(
    model: nn.Module, layers: LayerSelector = None, effective: Sequence[EffectiveWeight] = ()
) -> list[tuple[str, torch.Tensor, str]]:
    """(stable name, tensor, owning module type) of the selected layers, registration order.

    ``layers``: see :mod:`layrot.core.layer_rule` (None, a regex or predicate on
    the ndim >= 2 parameters, or exact parameter names; stable names, and a raw
    name with wrapper components is accepted too). ``effective``: parametrized
    tensors (:func:`effective_weights`); each replaces its parametrization's own
    parameters, at the place of the first one (their names still select them when
    listed explicitly).
    """
    owners: dict[str, str] = {}
    for _, stable_mod, module in _stable_modules(model):
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{stable_mod}.{p_name}" if stable_mod else p_name] = module_type_name(module)
    triples = stable_named_parameters(model)
    explicit: set[str] = set()
    if layers is not None and not isinstance(layers, (str, bytes, re.Pattern)) and not callable(layers):
        raw_to_stable = {raw: st for raw, st, _ in triples}
        layers = [raw_to_stable.get(n, n) if isinstance(n, str) else n for n in layers]
        explicit = {n for n in layers if isinstance(n, str)}
    first_of = {e.originals[0]: e for e in effective if e.originals}
    hidden = {n for e in effective for n in e.originals} - explicit
    named: list[tuple[str, torch.Tensor]] = []
    for _, st, p in triples:
        if st in first_of:
            e = first_of[st]
            named.append((e.name, e.buffer))
            owners[e.name] = module_type_name(e.module)
        # Frozen parameters too: gradual unfreezing makes them trainable later, and a layer
        # table is fixed at the first step. While frozen they are measured as they are (their
        # rotation stays, their step angle is 0: exact, no special case on the wire).
        if st not in hidden:
            named.append((st, p))
    chosen = select_layers(named, lambda p: p.ndim, layers, "model's parameters")
    return [(n, p, owners.get(n, "")) for n, p in chosen]


class EagerUntilOrdered:
    """Makes ``torch.compile`` run eagerly (stance ``"force_eager"``) until :meth:`release`.

    The forward order is recorded with module hooks during the first training step and
    the hooks are removed after it. Compiled into dynamo's first graph, their removal
    would change what the graph guards on and force a recompilation at the second
    step; run eagerly, the first step compiles nothing, the second compiles exactly
    the graphs a run without the hook compiles, and the hooks see every module call
    (``torch.compile`` applied before or after ``watch`` alike). The stance is global,
    so compiled functions of the job run eagerly until then too, and several handles
    (one per optimizer) share it: the first one in sets it, the last one out gives the
    job's own stance back, whichever order they release in.
    """

    # Reentrant: a handle's finalizer calls ``release`` whenever the garbage collector runs, which
    # can be inside this lock on the same thread (an allocation in set_stance or an import below);
    # a plain Lock then deadlocks the training thread. Re-entered there, ``release`` finds nothing
    # to do or a consistent count (every change of ``_holders`` is one statement).
    _lock = threading.RLock()
    _holders = 0
    _ours: Any = None
    _prior: Any = None

    def __init__(self) -> None:
        self._held = False
        cls = type(self)
        with cls._lock:
            if cls._holders == 0:
                try:
                    stance = torch.compiler.set_stance("force_eager")
                except Exception as exc:  # an older torch, or called inside a compiled region
                    log.debug("layrot: cannot make torch.compile eager for the first step (%r)", exc)
                    return
                cls._ours, cls._prior = stance.stance, stance.prev
            cls._holders += 1
            self._held = True

    def release(self) -> None:
        """Let go (idempotent); the last holder gives back the prior stance, unless the job changed it meanwhile."""
        cls = type(self)
        with cls._lock:
            if not self._held:
                return
            self._held = False
            cls._holders -= 1
            if cls._holders > 0:
                return
            ours, cls._ours = cls._ours, None
            from torch._dynamo import eval_frame

            if ours is not None and getattr(eval_frame, "_stance", None) is ours:
                eval_frame._set_stance(cls._prior)


_Wrap = Callable[[Callable[..., Any], str], Callable[..., Any]]


def _no_wrap(fn: Callable[..., Any], where: str) -> Callable[..., Any]:
    return fn


class ForwardOrderRecorder:
    """Records the forward order of the given parameters during the first training step.

    Two one-time sources, merged by :meth:`order`:

    * forward pre-hooks on the modules owning the parameters: the order of their
      first call (exact where modules are called);
    * post-accumulate-grad hooks on the parameters: the order in which the first
      backward accumulates their gradients. The autograd engine runs a node's
      backward when its inputs' gradients are ready, later-created nodes first, so
      this is the reverse of the forward order of the operations reading them, and
      it sees parameters read by functional code without calling their module
      (``nn.MultiheadAttention``'s ``out_proj.weight``) as well as forwards run inside
      ``optimizer.step(closure)``.

    Under ``torch.compile`` both need the first step to run eagerly
    (:class:`EagerUntilOrdered`): a compiled backward accumulates every gradient of
    its graph at once, in the graph's input order. ``module_hooks=False`` keeps only
    the gradient hooks. ``wrap(fn, where)`` lets the watch handle make the hooks
    never fatal. Both kinds are removed by
    :meth:`remove` (the handle calls it once the order is fixed).
    """

    def __init__(
        self,
        model: nn.Module,
        named: Sequence[tuple[str, torch.Tensor]],
        module_hooks: bool = True,
        wrap: _Wrap = _no_wrap,
    ) -> None:
        self._first_call: dict[str, int] = {}
        self._grad_order: list[str] = []
        self._grad_seen: set[str] = set()
        self._handles: list[Any] = []
        self._by_module: dict[int, list[str]] = {}
        name_of = {id(p): n for n, p in named}
        self._grad_name: dict[int, str] = {}
        if module_hooks:
            for module in model.modules():
                owned = [name_of[id(p)] for p in module.parameters(recurse=False) if id(p) in name_of]
                if owned and id(module) not in self._by_module:
                    self._by_module[id(module)] = owned
                    self._handles.append(module.register_forward_pre_hook(wrap(self._hook, "forward pre-hook")))
        grad_hook = wrap(self._grad_hook, "post-accumulate-grad hook")
        for n, p in named:
            if p.requires_grad and p.is_leaf and id(p) not in self._grad_name:
                self._grad_name[id(p)] = n
                self._handles.append(p.register_post_accumulate_grad_hook(grad_hook))

    def _hook(self, module: nn.Module, args: object) -> None:
        for name in self._by_module.get(id(module), ()):
            if name not in self._first_call:
                self._first_call[name] = len(self._first_call)

    def _grad_hook(self, param: torch.Tensor) -> None:
        name = self._grad_name.get(id(param))
        # Only the first backward counts (the sets are small: every parameter once).
        if name is not None and name not in self._grad_seen:
            self._grad_seen.add(name)
            self._grad_order.append(name)

    @property
    def seen(self) -> bool:
        """Whether a forward or a backward has run since the hooks were installed."""
        return bool(self._first_call or self._grad_order)

    def order(self, names: Sequence[str]) -> list[int]:
        """Permutation of ``names`` into forward order.

        The backward says when each parameter is first *read*: its gradient is complete
        only after its earliest use, so the reversed completion order is the order of
        first use, also for functional code (attention's ``out_proj``, a closure) and
        for a module's own parameters read after its children ran (ViT's ``cls_token``
        after the patch projection). The parameters one operation reads together (an
        LSTM's flat weights) complete in no meaningful order among themselves, so the
        parameters of one module stay together, in registration order, and the
        modules' groups are ordered by their first-used parameter. Groups the backward
        did not reach (frozen, or no backward yet) go by their module's first call,
        right after the group whose module was called last before theirs; parameters
        seen by neither go last, in the given order.
        """
        grad_rank = {n: i for i, n in enumerate(reversed(self._grad_order))}
        group_of: dict[str, int] = {}
        for gid, owned in enumerate(self._by_module.values()):
            for n in owned:
                group_of.setdefault(n, gid)
        groups: dict[Any, list[str]] = {}
        for n in dict.fromkeys(names):
            groups.setdefault(group_of.get(n, ("param", n)), []).append(n)
        never = sys.maxsize

        def first(group: list[str], rank: Mapping[str, int]) -> int:
            return min((rank[n] for n in group if n in rank), default=never)

        by_grad = sorted((g for g in groups.values() if first(g, grad_rank) < never), key=lambda g: first(g, grad_rank))
        by_call = sorted(
            (g for g in groups.values() if first(g, grad_rank) == never and first(g, self._first_call) < never),
            key=lambda g: first(g, self._first_call),
        )
        placed = list(by_grad)
        for g in by_call:
            c = first(g, self._first_call)
            earlier = [i for i, h in enumerate(placed) if first(h, self._first_call) < c]
            placed.insert(max(earlier) + 1 if earlier else 0, g)
        rest = [g for g in groups.values() if all(g is not h for h in placed)]
        rank = {n: i for i, n in enumerate(n for g in placed + rest for n in g)}
        return sorted(range(len(names)), key=lambda i: (rank.get(names[i], len(rank)), i))

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def init_norms(params: Sequence[torch.Tensor]) -> list[float]:
    """Exact ||w|| of each tensor in float64 (one host sync, at setup only)."""
    if not params:
        return []
    norms = torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64) for p in params])
    return [float(v) for v in norms.cpu().tolist()]
