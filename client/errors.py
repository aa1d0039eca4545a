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

    ``code`` is the ``grpc.StatusCode`` of the failed call (None when there was no call),
    e.g. ``NOT_FOUND`` for an unknown run.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code
