"""What every client user needs without loading gRPC: the default address and the error type.

``layrot-agent --help`` and the option defaults of every command come from
here, so building the command line does not import grpc or protobuf.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import grpc

DEFAULT_COLLECTOR = "localhost:50051"

__all__ = ["DEFAULT_COLLECTOR", "CollectorError", "default_address"]


def default_address() -> str:
    """``$LAYROT_COLLECTOR`` or ``localhost:50051``."""
    return os.environ.get("LAYROT_COLLECTOR") or DEFAULT_COLLECTOR


class CollectorError(Exception):
    """A query failed; ``str(exc)`` is a one-line explanation for humans.

    ``status`` names the outcome the same way for both transports: the gRPC status code's
    name (``"NOT_FOUND"`` for an unknown run, ``"UNAUTHENTICATED"``, ...), None when there
    was no answer. ``code`` is the ``grpc.StatusCode`` itself on the gRPC client (None on
    the HTTP client, which never loads grpc).
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status if status is not None else (code.name if code is not None else None)
