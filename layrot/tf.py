"""TensorFlow custom training loops: ``layrot.tf.watch(model_or_variables, run=...)``.

::

    import layrot.tf

    handle = layrot.tf.watch(model, run="my-run")
    for x, y in data:
        loss = train_step(x, y)     # your tf.function, ending in optimizer.apply_gradients
        handle.observe_loss(loss)
        handle.step()
"""

from __future__ import annotations

from layrot.hooks.tf_watch import TFWatchHandle, candidate_variables, watch

__all__ = ["watch", "TFWatchHandle", "candidate_variables"]
