"""What the PyTorch and TensorFlow watch handles share: closing, flushing and the checkpoint state's frame."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from layrot.agent.reporter import Reporter

#: Version of the dict that ``state_dict()`` / ``state()`` return.
STATE_VERSION = 1

_H = TypeVar("_H", bound="WatchBase")


class WatchBase:
    """Base of the watch handles; subclasses set the attributes below and may override :meth:`_detach`."""

    run: str
    reporter: Reporter | None
    _closed: bool
    _layca: Any
    _control: bool
    _names: Sequence[str]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the collector acknowledged every reported step (or timeout)."""
        return self.reporter.flush(timeout) if self.reporter is not None else True

    def close(self, timeout: float = 5.0) -> None:
        """Detach from the training job, flush what the collector can still take, stop the reporter's threads."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        if self._layca is not None and self._control and self.reporter is not None:
            try:
                self._layca.remove_command_listener(self.reporter.command_result)
            except ValueError:
                pass
        if self.reporter is not None:
            self.reporter.close(timeout)

    def _detach(self) -> None:
        """Remove framework hooks (nothing by default)."""

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _state_frame(self, step: int) -> dict[str, Any]:
        return {"version": STATE_VERSION, "run": self.run, "step": int(step), "names": list(self._names)}

    def _state_index(self, state: Mapping[str, Any], same_by_position: bool = False) -> dict[str, int]:
        """Saved position of each current layer name; raises ValueError when the state does not fit.

        ``same_by_position``: the caller checked that the saved layers are these
        layers under other names (e.g. Keras paths rebuilt by load_model).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported layrot watch state version {state.get('version')!r}")
        index = {n: i for i, n in enumerate(state["names"])}
        missing = [n for n in self._names if n not in index]
        if not missing:
            return index
        if same_by_position and len(state["names"]) == len(self._names):
            return {n: i for i, n in enumerate(self._names)}
        raise ValueError(f"the saved state has no w(0) for layers {missing}")
