"""The job side of the control plane: what happens to a RateCommand inside the job.

Shared by the PyTorch and the Keras Layca (framework-free).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from layrot.proto.commands import CommandResult

_log = logging.getLogger(__name__)

__all__ = ["notify_listeners"]


def notify_listeners(results: Iterable[CommandResult], listeners: Iterable) -> None:
    """Call every listener with every result; a broken listener never stops training."""
    listeners = [fn for fn in listeners if fn is not None]
    for r in results:
        for fn in listeners:
            try:
                fn(*r)
            except Exception:
                _log.exception("Layca: command listener failed")
