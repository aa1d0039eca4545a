"""How a layrot client reaches a collector: address rules, TLS credentials, channel options.

One place for the job's reporter and for the operator's query client, so both accept
the same addresses and the same TLS settings:

- an address is ``host:port`` (IPv6 as ``[::1]:50051``), no scheme; it is checked
  before any connection is tried (:func:`check_address`);
- TLS is on when a CA file is given (``tls_ca=`` or ``LAYROT_TLS_CA``); a client
  certificate and key (``tls_cert`` / ``tls_key``, ``LAYROT_TLS_CERT`` /
  ``LAYROT_TLS_KEY``) add mutual TLS;
- when a connection fails, :func:`explain_connection_error` words the TLS mismatches
  (a plaintext client at a TLS collector, a wrong CA, a missing client certificate)
  the same way for the job's warning and the CLI's error; gRPC itself only says
  "Socket closed".
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = [
    "TLSConfig",
    "check_address",
    "open_channel",
    "DEFAULT_OPTIONS",
    "AddressError",
    "explain_connection_error",
    "speaks_tls",
    "RUN_METADATA_KEY",
    "split_collectors",
    "collector_order",
    "header_value",
]

#: gRPC metadata key carrying the run name on every call, so an L7 proxy (nginx
#: ``hash $http_x_layrot_run consistent;``) sends every session of a run to one collector.
RUN_METADATA_KEY = "x-layrot-run"

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


def split_collectors(value: str) -> list[str]:
    """The addresses of ``a:50051,b:50051`` (one address is a list of one), each checked, no duplicates.

    Raises :class:`AddressError` for an empty list or a bad address.
    """
    if not isinstance(value, str):
        raise AddressError("the collector address must be a string of host:port[,host:port...]")
    out: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        check_address(part)
        if part not in out:
            out.append(part)
    if not out:
        raise AddressError("the collector address is empty (expected host:port, e.g. localhost:50051)")
    return out


def header_value(value: str) -> str:
    """``value`` as a gRPC metadata value: printable ASCII kept, ``%`` and anything else percent-encoded (UTF-8)."""
    return "".join(c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode()) for c in value)


def _score(address: str, run: str) -> int:
    digest = hashlib.sha256(f"{address}\0{run}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def collector_order(addresses: Sequence[str], run: str) -> list[str]:
    """``addresses`` in the order a job of run ``run`` tries them (rendezvous hashing).

    Every process of a run computes the same order, so all its sessions (every rank,
    every reconnect) land on the same collector while it is up; a job fails over to the
    next address only when the first does not answer. Adding or removing one collector
    moves only the runs that hashed to it. Ties (impossible in practice) keep list order.
    """
    return sorted(addresses, key=lambda a: -_score(a, run))


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


# ---------------------------------------------------------------- explaining failed connections


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def speaks_tls(address: str, timeout: float = 2.0) -> bool | None:
    """Whether the server at ``address`` answers a TLS handshake: True, False, or None when it cannot be reached.

    Used only after a plaintext connection failed, to tell "this collector speaks TLS"
    from other failures. The handshake verifies nothing (it only asks whether the
    peer speaks TLS at all) and sends no data.
    """
    try:
        host, port = _split(check_address(address))
        raw = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(timeout)
        return True
    except ssl.SSLError as exc:
        # A TLS alert (e.g. "certificate required" from a mutual-TLS collector) is still TLS;
        # a plaintext HTTP/2 server answers with bytes that are no TLS record at all.
        return "ALERT" in str(exc).upper()
    except OSError:
        return False
    finally:
        raw.close()


def explain_connection_error(address: str, tls: TLSConfig | None, details: str, probe: bool = True) -> str | None:
    """One line naming a TLS mismatch behind a failed connection to ``address``, or None when it is not one.

    ``tls`` is what the client used (None: plaintext), ``details`` the gRPC error text.
    With ``probe`` a plaintext client that failed asks the server for a TLS handshake
    (:func:`speaks_tls`, at most about 2 s, on the error path only). Callers print the
    line as is: the job's reporter in its warning, the CLI as its error.
    """
    text = details or ""
    upper = text.upper()
    if tls is None or not tls.enabled:
        if probe and speaks_tls(address):
            return (
                f"the collector at {address} speaks TLS and this client connected without it:"
                " pass --tls-ca FILE or set LAYROT_TLS_CA to the CA that signed its certificate"
            )
        return None
    if "WRONG_VERSION_NUMBER" in upper or "PACKET_LENGTH_TOO_LONG" in upper or "HTTP_REQUEST" in upper:
        return (
            f"the collector at {address} does not speak TLS: drop --tls-ca / LAYROT_TLS_CA,"
            " or start it with serve --tls-cert FILE --tls-key FILE"
        )
    if "CERTIFICATE_VERIFY_FAILED" in upper or "CERTIFICATE VERIFY FAILED" in upper:
        return (
            f"the certificate of the collector at {address} is not signed by the CA in {tls.ca}"
            " (--tls-ca / LAYROT_TLS_CA), or it is not issued for that host name"
        )
    if ("SOCKET CLOSED" in upper and "FAILED TO CONNECT" in upper) or "ALERT" in upper:
        # A mutual-TLS collector ends the handshake of a client without an accepted certificate.
        if tls.cert is None:
            return (
                f"the collector at {address} closed the TLS connection: it may require a client certificate"
                " (mutual TLS): pass --tls-cert FILE --tls-key FILE or set LAYROT_TLS_CERT / LAYROT_TLS_KEY"
            )
        return (
            f"the collector at {address} closed the TLS connection: it may not accept the client certificate"
            f" {tls.cert} (is it signed by the CA the collector trusts, serve --tls-client-ca?)"
        )
    return None
