"""layrot: watch and steer layer rotation in running training jobs.

PyTorch::

    import layrot
    handle = layrot.watch(model, optimizer, run="my-run")      # monitoring, one line
    optimizer = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    optimizer = layrot.Layca(layrot.SGD_AMom(model.parameters(), lr=0.1))  # AdaptCopy of an Adam run

Keras / TensorFlow: ``layrot.keras.RotationCallback``, ``layrot.keras.Layca`` and
``layrot.tf.watch``. From a notebook: ``layrot.Client("http://localhost:9400").runs()``.
Framework modules load lazily, so ``import layrot`` (and the ``layrot-agent`` CLI) never
import torch or TensorFlow by themselves.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from layrot.core.version import __version__

__all__ = ["watch", "Layca", "SGD_AMom", "WatchHandle", "Client", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from layrot.client.notebook import Client
    from layrot.hooks.layca_torch import Layca
    from layrot.hooks.sgd_amom import SGD_AMom
    from layrot.hooks.torch_watch import WatchHandle, watch

_LAZY = {
    "watch": ("layrot.hooks.torch_watch", "watch"),
    "WatchHandle": ("layrot.hooks.torch_watch", "WatchHandle"),
    "Layca": ("layrot.hooks.layca_torch", "Layca"),
    "SGD_AMom": ("layrot.hooks.sgd_amom", "SGD_AMom"),
    "Client": ("layrot.client.notebook", "Client"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in ("keras", "tf", "lightning", "hf"):
        return importlib.import_module(f"layrot.{name}")
    raise AttributeError(f"module 'layrot' has no attribute {name!r}")
