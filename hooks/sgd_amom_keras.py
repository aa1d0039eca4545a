"""SGD_AMom for Keras 3: SGD with Adam-style momentum (the paper's Appendix B.4).

::

    opt = layrot.keras.Layca(layrot.keras.SGD_AMom(learning_rate=0.1, momentum=0.9))

The same rule as the PyTorch :class:`layrot.hooks.sgd_amom.SGD_AMom`, with its
coefficients from :mod:`layrot.core.amom` (which says what the paper leaves open)::

    g_t = grad_t + weight_decay * w_{t-1}
    v_t = m * v_{t-1} + (1 - m) * g_t          v_0 = 0
    w_t = w_{t-1} - lr * v_t                   (lr / (1 - m^t) with bias_correction=True)

Written with ``keras.ops`` only, in ``build`` / ``update_step`` like Keras' own
SGD, so it runs on every Keras backend. Registered as ``layrot>SGD_AMom`` so
``keras.models.load_model`` rebuilds it.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
from keras import ops

from layrot.core.amom import average_gains, step_size, validate

__all__ = ["SGD_AMom"]

logger = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="layrot")
class SGD_AMom(keras.optimizers.Optimizer):  # noqa: N801  (the paper's name)
    """SGD with Adam-style momentum: ``v = m v + (1 - m) g``, ``w -= lr v`` (Appendix B.4).

    Args:
        learning_rate: a float, a ``LearningRateSchedule`` or a callable (the rate rho).
        momentum: m in [0, 1), Adam's ``beta_1``.
        weight_decay: L2 coefficient added to the gradient *before* the average, as
            in the PyTorch SGD_AMom and the paper's "Adam + L2" runs. This is not
            Keras' decoupled ``weight_decay`` (``w -= lr * wd * w`` after the
            update); variables excluded with ``exclude_from_weight_decay`` get none.
        bias_correction: divide ``v_t`` by ``1 - m^t`` (Adam's ``m_hat``); off by
            default, as in the paper's formula.
        **kwargs: the other arguments of ``keras.optimizers.Optimizer`` (``clipnorm``,
            ``use_ema``, ``name``...).

    Raises:
        ValueError: for momentum outside [0, 1) or weight_decay < 0.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        momentum: float = 0.9,
        weight_decay: float | None = None,
        bias_correction: bool = False,
        name: str = "sgd_amom",
        **kwargs: Any,
    ) -> None:
        wd = float(weight_decay or 0.0)
        lr_check = float(learning_rate) if isinstance(learning_rate, (int, float)) else 0.0
        validate(lr_check, float(momentum), wd)
        # Keras' own weight_decay is decoupled; ours enters the gradient, so the base gets None.
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
        self.momentum = float(momentum)
        self.l2_weight_decay = wd
        self.bias_correction = bool(bias_correction)

    def build(self, variables: list[Any]) -> None:
        """Create one zero momentum variable per model variable (``v_0 = 0``)."""
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One SGD_AMom step of ``variable`` with ``gradient``."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        if self.l2_weight_decay and self._use_weight_decay(variable):
            g = ops.add(g, ops.multiply(variable, ops.cast(self.l2_weight_decay, dtype)))
        keep, gain = average_gains(self.momentum)
        m = self.momentums[self._get_variable_index(variable)]
        self.assign(m, ops.add(ops.multiply(m, ops.cast(keep, dtype)), ops.multiply(g, ops.cast(gain, dtype))))
        # iterations counts the steps already taken; this update is step iterations + 1.
        local_step = ops.cast(self.iterations + 1, dtype)
        size = step_size(lr, self.momentum, local_step, self.bias_correction)
        self.assign_sub(variable, ops.multiply(m, size))

    def get_config(self) -> dict[str, Any]:
        """Keras config; ``weight_decay`` is the coupled L2 coefficient of this optimizer."""
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.l2_weight_decay or None,
                "bias_correction": self.bias_correction,
            }
        )
        return config
