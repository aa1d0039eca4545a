"""How a layrot client reaches a collector: address rules, TLS credentials, channel options.

One place for the job's reporter and for the operator's query client, so both accept
the same addresses and the same TLS settings:

- an address is ``host:port`` (IPv6 as ``[::1]:50051``), no scheme; it is checked
  before any connection is tried (:func:`check_address`);
- TLS is on when a CA file is given (``tls_ca=`` or ``LAYROT_TLS_CA``); a client
  certificate and key (``tls_cert`` / ``tls_key``, ``LAYROT_TLS_CERT`` /
  ``LAYROT_TLS_KEY``) add mutual TLS.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["TLSConfig", "check_address", "open_channel", "DEFAULT_OPTIONS", "AddressError"]

# Messages up to 16 MiB both ways (a StepBatch is at most ~1 MiB; history chunks are smaller).
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5000),
)

_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252}))$")


class AddressError(ValueError):
    """A collector address that no connection could use; the message says why."""


def check_address(address: str) -> str:
    """``address`` if it is ``host:port`` (no scheme, port 1-65535), else raise :class:`AddressError`."""
    if not isinstance(address, str) or not address:
        raise AddressError("the collector address is empty (expected host:port, e.g. localhost:50051)")
    if "://" in address:
        raise AddressError(f"collector address {address!r} has a scheme; give host:port (e.g. localhost:50051)")
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise AddressError(f"collector address {address!r} has no port; give host:port (e.g. localhost:50051)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"collector address {address!r}: the port must be a number from 1 to 65535")
    if not _HOST.match(host):
        raise AddressError(f"collector address {address!r}: {host!r} is not a host name or IP address")
    return address


@dataclass(frozen=True)
class TLSConfig:
    """Client-side TLS: the CA that signed the collector's certificate, optionally a client cert for mTLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_env(cls, ca: str | None = None, cert: str | None = None, key: str | None = None) -> TLSConfig:
        """Explicit values first, then ``LAYROT_TLS_CA`` / ``LAYROT_TLS_CERT`` / ``LAYROT_TLS_KEY``."""
        return cls(
            ca=ca or os.environ.get("LAYROT_TLS_CA") or None,
            cert=cert or os.environ.get("LAYROT_TLS_CERT") or None,
            key=key or os.environ.get("LAYROT_TLS_KEY") or None,
        )

    @property
    def enabled(self) -> bool:
        return self.ca is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials; raises ValueError naming the file that cannot be read."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key (LAYROT_TLS_CERT, LAYROT_TLS_KEY)")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA certificate") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path!r}: {exc.strerror or exc}") from None


def open_channel(
    address: str, tls: TLSConfig | None = None, options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS
) -> grpc.Channel:
    """A channel to ``address``: TLS when ``tls`` has a CA, plaintext otherwise."""
    check_address(address)
    tls = tls if tls is not None else TLSConfig.from_env()
    if tls.enabled:
        return grpc.secure_channel(address, tls.credentials(), options=list(options))
    return grpc.insecure_channel(address, options=list(options))
