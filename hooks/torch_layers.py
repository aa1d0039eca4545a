"""Which parameters of a PyTorch model are *layers*, and in which order.

A layer is a multiplicative weight: a trainable parameter with ndim >= 2
(Linear, ConvNd, Embedding, custom modules' 2-D+ parameters). Biases and
normalisation parameters are not layers. The order is the forward order,
learned from the first forward pass (falling back to registration order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layrot.core.layer_rule import LayerSelector, select_layers
from layrot.hooks.torch_shards import module_type_name


def candidate_layers(model: nn.Module, layers: LayerSelector = None) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, owning module type) of the selected layers, registration order.

    ``layers``: see :mod:`layrot.core.layer_rule` (None, a regex or predicate on
    the ndim >= 2 parameters, or exact parameter names).
    """
    owners: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module_type_name(module)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    chosen = select_layers(named, lambda p: p.ndim, layers, "model's trainable parameters")
    return [(n, p, owners.get(n, "")) for n, p in chosen]


class ForwardOrderRecorder:
    """Records the order in which modules owning the given parameters first run.

    Installs forward pre-hooks that remove themselves after the first forward
    pass, so steady-state training pays nothing.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self._first_call: dict[str, int] = {}
        self._handles = []
        wanted = set(names)
        self._by_module: dict[int, list[str]] = {}
        for mod_name, module in model.named_modules():
            owned = [f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)]
            owned = [n for n in owned if n in wanted]
            if owned:
                self._by_module[id(module)] = owned
                self._handles.append(module.register_forward_pre_hook(self._hook))
        self._counter = 0

    def _hook(self, module: nn.Module, args: object) -> None:
        for name in self._by_module.get(id(module), ()):
            if name not in self._first_call:
                self._first_call[name] = self._counter
                self._counter += 1

    @property
    def seen(self) -> bool:
        return bool(self._first_call)

    def order(self, names: Sequence[str]) -> list[int]:
        """Permutation of ``names`` into forward order (unseen ones last, stable)."""
        big = len(names) + len(self._first_call)
        return sorted(range(len(names)), key=lambda i: (self._first_call.get(names[i], big), i))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def init_norms(params: Sequence[torch.Tensor]) -> list[float]:
    """Exact ||w|| of each tensor in float64 (one host sync, at setup only)."""
    if not params:
        return []
    norms = torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64) for p in params])
    return [float(v) for v in norms.cpu().tolist()]
