"""Keras 3 entry points.

::

    import layrot.keras

    model.compile(optimizer=layrot.keras.Layca(keras.optimizers.SGD(0.1, momentum=0.9)), loss=...)
    model.fit(x, y, callbacks=[layrot.keras.RotationCallback(run="cnn", control=True)])

``SGD_AMom`` (SGD with Adam-style momentum, the base for AdaptCopy of an Adam run) runs on
every backend. ``RotationCallback`` runs on the ``tensorflow`` and ``torch`` backends (``KERAS_BACKEND``;
other backends are refused when it is constructed); ``Layca`` needs TensorFlow.

On the TensorFlow backend, importing this module registers ``layrot>Layca`` with Keras,
so ``keras.models.load_model`` can rebuild a saved Layca optimizer. On the others
``Layca`` is imported on first use, so a torch-only install needs no TensorFlow.
"""

from __future__ import annotations

from typing import Any

import keras

from layrot.core.rates import RateRule, RhoSchedule
from layrot.hooks.keras_callback import RotationCallback
from layrot.hooks.sgd_amom_keras import SGD_AMom

__all__ = ["RotationCallback", "Layca", "SGD_AMom", "RhoSchedule", "RateRule"]

if keras.backend.backend() == "tensorflow":
    from layrot.hooks.layca_keras import Layca
else:

    def __getattr__(name: str) -> Any:
        if name == "Layca":
            # layca_keras imports TensorFlow; Layca itself refuses a non-TF backend when built.
            from layrot.hooks.layca_keras import Layca

            return Layca
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
