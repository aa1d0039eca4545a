"""Who may call what on the collector: bearer tokens in one gRPC server interceptor, and TLS.

Every call passes :class:`TokenInterceptor` before it reaches a servicer, so no
service can forget a check:

- health checks (``grpc.health.v1.Health``) are always open: load balancers and
  Kubernetes probes carry no token;
- reads are the Query methods named ``Get*``, ``List*`` or ``Watch*``; they need the
  read token when one is set (``serve --read-token``), and the write token works for
  them too; without a read token they stay open;
- everything else is a write (``Ingest.Session``, ``SetControl``, ``SetThresholds``
  and any method added later that is not named like a read): it needs the write token
  (``serve --token``) when one is set. Unknown methods default to writes on purpose, so a
  new call is protected until someone decides it is a read.

A refused call ends with ``UNAUTHENTICATED`` and a message that says which token it
lacks, and is counted in ``layrot_messages_rejected_total{reason="unauthenticated"}``.
Tokens are compared in constant time over their SHA-256 digests, so neither the
content nor the length of the expected token leaks through timing.

:class:`ServerTLS` loads and checks the certificate files once for both listeners
(gRPC and ``/metrics``), so a bad file is one clear error at start-up that names it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

log = logging.getLogger(__name__)

__all__ = [
    "HEALTH_SERVICE",
    "READ_PREFIXES",
    "REJECT_REASON",
    "ServerTLS",
    "TLSFileError",
    "TokenInterceptor",
    "bearer_matches",
    "is_loopback",
    "read_token_file",
    "token_digests",
]

HEALTH_SERVICE = "grpc.health.v1.Health"
# Query methods with these prefixes only read; the proto names every call this way.
READ_PREFIXES = ("Get", "List", "Watch")
REJECT_REASON = "unauthenticated"

Kind = str  # "open", "read" or "write"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_digests(*tokens: str | None) -> tuple[bytes, ...]:
    """SHA-256 digests of the given tokens (None and empty ones left out), as :func:`bearer_matches` wants them."""
    return tuple(_digest(t) for t in tokens if t)


def bearer_matches(metadata: Any, digests: tuple[bytes, ...]) -> bool:
    """True when one ``authorization: Bearer <token>`` entry of ``metadata`` carries a token with one of ``digests``.

    Every entry and every digest is compared (no early exit), so the time taken does
    not tell which token was close.
    """
    found = False
    for key, value in metadata or ():
        if key != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, given = str(value).partition(" ")
        if scheme.lower() != "bearer":
            continue
        got = hashlib.sha256(given.strip().encode()).digest()
        for want in digests:
            found |= hmac.compare_digest(got, want)
    return found


def method_kind(method: str) -> Kind:
    """``"open"``, ``"read"`` or ``"write"`` for a full gRPC method name (``/package.Service/Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service == HEALTH_SERVICE:
        return "open"
    if service.endswith(".Query") and name.startswith(READ_PREFIXES):
        return "read"
    return "write"


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with UNAUTHENTICATED.

    The shape must match (a streaming method needs a streaming handler) or gRPC
    would fail the call with an internal error instead of our message.
    """

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """The collector's one token check, for every service (see the module docstring for the rules).

    ``on_reject(reason)`` is called (on the server loop) for every refused call; the
    composition root connects it to the rejection counters.
    """

    def __init__(
        self,
        token: str | None = None,
        read_token: str | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._write = token_digests(token)
        # The write token is a superset: whoever may write may also read.
        self._read = token_digests(read_token, token) if read_token else ()
        self._on_reject = on_reject

    @property
    def enabled(self) -> bool:
        return bool(self._write or self._read)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        # Not cached per method: names come from clients, and a cache would let them grow it without bound.
        kind = method_kind(method)
        needed = self._write if kind == "write" else self._read if kind == "read" else ()
        handler = await continuation(handler_call_details)
        if not needed or handler is None or bearer_matches(handler_call_details.invocation_metadata, needed):
            return handler
        if self._on_reject is not None:
            self._on_reject(REJECT_REASON)
        log.debug("refused %s: %s token missing or wrong", method, kind)
        if kind == "write":
            message = (
                f"{method.rpartition('/')[2]} writes to the collector and needs its write token"
                " (serve --token): missing or wrong 'authorization: Bearer <token>'"
            )
        else:
            message = (
                f"{method.rpartition('/')[2]} needs the collector's read token or its write token"
                " (serve --read-token / --token): missing or wrong 'authorization: Bearer <token>'"
            )
        return _refusal(handler, message)


# ---------------------------------------------------------------- token files


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace and the final newline stripped); ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot read the token file {path}: {reason}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"the token file {path} holds more than one word; put only the token in it")
    return token


# ---------------------------------------------------------------- TLS


class TLSFileError(ValueError):
    """A certificate or key file the collector cannot use; the message names the file and why."""


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSFileError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TLSFileError(f"the TLS {what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """The collector's certificate and key, and the CA of client certificates for mutual TLS.

    :meth:`load` reads and checks the files (PEM, the key matches the certificate),
    so a mistake stops ``serve`` at once with the file's name instead of failing
    every handshake later.
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    cert: bytes = field(default=b"", repr=False)
    key: bytes = field(default=b"", repr=False)
    client_ca: bytes | None = field(default=None, repr=False)

    @classmethod
    def load(cls, cert_file: str, key_file: str, client_ca_file: str | None = None) -> ServerTLS:
        """Read and check the files; raises :class:`TLSFileError` naming the file at fault."""
        cert = _read_pem(cert_file, "certificate")
        key = _read_pem(key_file, "key")
        client_ca = _read_pem(client_ca_file, "client CA") if client_ca_file else None
        tls = cls(str(cert_file), str(key_file), str(client_ca_file) if client_ca_file else None, cert, key, client_ca)
        tls.ssl_context()  # the stdlib's parser is the check: it names PEM errors and a key that does not match
        return tls

    @property
    def mutual(self) -> bool:
        """Client certificates are required (a client CA was given)."""
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; with a client CA every client must present a certificate it signed."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca, require_client_auth=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side ``ssl.SSLContext`` (for ``/metrics``) with the same certificate and client rule as gRPC."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise TLSFileError(
                f"cannot use the TLS certificate {self.cert_file} with the key {self.key_file}: {_ssl_reason(exc)}"
            ) from None
        except OSError as exc:
            raise TLSFileError(
                f"cannot read the TLS certificate {self.cert_file} or key {self.key_file}: {exc.strerror or exc}"
            ) from None
        if self.client_ca_file:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise TLSFileError(f"cannot use the TLS client CA {self.client_ca_file}: {_ssl_reason(exc)}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(reason or exc).replace("_", " ").lower()


# ---------------------------------------------------------------- listen addresses


def is_loopback(host: str) -> bool:
    """True when ``host`` only reaches this machine (``127.0.0.1``, ``::1``, ``localhost``); ``0.0.0.0`` is not."""
    host = host.strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    # sockaddr[0] is the address text (an IPv6 one may carry a %scope suffix).
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)
