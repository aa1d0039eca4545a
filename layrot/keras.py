"""Keras 3 (TensorFlow backend) entry points.

::

    import layrot.keras

    model.compile(optimizer=layrot.keras.Layca(keras.optimizers.SGD(0.1, momentum=0.9)), loss=...)
    model.fit(x, y, callbacks=[layrot.keras.RotationCallback(run="cnn", control=True)])

Importing this module registers ``layrot>Layca`` with Keras, so
``keras.models.load_model`` can rebuild a saved Layca optimizer.
"""

from __future__ import annotations

from layrot.core.rates import RateRule, RhoSchedule
from layrot.hooks.keras_callback import RotationCallback
from layrot.hooks.layca_keras import Layca

__all__ = ["RotationCallback", "Layca", "RhoSchedule", "RateRule"]
