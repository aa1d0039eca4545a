"""What a read client of the collector offers, whichever transport it uses (gRPC or the HTTP API)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from layrot.client.history import History

__all__ = ["ReadClient"]


class ReadClient(Protocol):
    """The read methods :class:`~layrot.client.query.QueryClient` and
    :class:`~layrot.client.http_query.HttpQueryClient` both have, with the same answers."""

    address: str

    def list_runs(self) -> list[dict[str, Any]]: ...

    def get_run(self, run: str) -> dict[str, Any]: ...

    def get_control(self, run: str) -> dict[str, Any]: ...

    def list_alerts(self, run: str | None = None, limit: int = 0, since: float = 0.0) -> list[dict[str, Any]]: ...

    def watch_alerts(
        self, run: str | None = None, since: float = 0.0, backlog: int = 0
    ) -> Iterator[dict[str, Any]]: ...

    def iter_history(self, run: str, since_step: int = 0, until_step: int = 0, rank: int = 0) -> Iterator[History]: ...

    def history(self, run: str, since_step: int = 0, until_step: int = 0, rank: int = 0) -> History: ...

    def close(self) -> None: ...

    def __enter__(self) -> ReadClient: ...

    def __exit__(self, *exc: Any) -> None: ...
