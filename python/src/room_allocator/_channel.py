"""What the sync and asyncio clients set up alike: the target, TLS, the
bearer token and the request messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import grpc

Metadata = Tuple[Tuple[str, str], ...]
ChannelOptions = Sequence[Tuple[str, Any]]

#: Default per-call deadline in seconds: the server's default
#: ``--request-timeout-secs``.
DEFAULT_TIMEOUT = 10.0
#: Workers per ListWorkers page when ``workers()`` pages through them all.
WORKERS_PAGE_SIZE = 1000


@dataclass(frozen=True)
class ChannelSpec:
    """Where and how to connect: ``secure`` means TLS with ``credentials``."""

    address: str
    credentials: Optional[grpc.ChannelCredentials]
    options: Tuple[Tuple[str, Any], ...]
    metadata: Metadata


def channel_spec(
    target: str,
    *,
    token: Optional[str],
    root_certificates: Optional[bytes],
    private_key: Optional[bytes],
    certificate_chain: Optional[bytes],
    tls_server_name: Optional[str],
    options: ChannelOptions,
) -> ChannelSpec:
    """Turns the client's arguments into a channel specification.

    ``target`` is ``host:port`` (TLS when ``root_certificates`` or a client
    certificate is given), or a URL as the Rust client and CLI take it:
    ``http://host:port`` (plaintext) or ``https://host:port`` (TLS, with the
    system's roots unless ``root_certificates`` is given).
    """
    address = target
    secure = root_certificates is not None or certificate_chain is not None
    if target.startswith("https://"):
        address, secure = target[len("https://") :], True
    elif target.startswith("http://"):
        if secure:
            raise ValueError(f"{target!r} asks for plaintext, but TLS material was given; use https:// or host:port")
        address = target[len("http://") :]
    address = address.rstrip("/")
    if not address or "/" in address:
        raise ValueError(f"{target!r} is not a gRPC target; use host:port, e.g. 127.0.0.1:50051")
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mutual TLS needs both private_key and certificate_chain")
    credentials = (
        grpc.ssl_channel_credentials(
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        if secure
        else None
    )
    channel_options = list(options)
    if tls_server_name is not None:
        channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
    return ChannelSpec(address, credentials, tuple(channel_options), bearer_metadata(token))


def bearer_metadata(token: Optional[str]) -> Metadata:
    """``authorization: Bearer <token>`` call metadata, or none.

    It is sent as call metadata rather than as grpc call credentials because
    grpc refuses call credentials on plaintext channels, and the server
    accepts the token over plaintext too (inside a trusted network).
    """
    if token is None:
        return ()
    token = token.strip()
    if not token or not token.isascii() or not token.isprintable():
        raise ValueError("the bearer token must be non-empty printable ASCII")
    return (("authorization", f"Bearer {token}"),)
