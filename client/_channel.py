"""The one place a gRPC channel to a control plane is made: target, TLS and token.

The SDK's :class:`plait.Client` and every CLI command that talks to a server use
:func:`open_channel`; nothing else builds channels or reads the TLS variables.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from plait import errors
from plait._settings import normalize_server, parse_server, saved_token

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest message a client sends or accepts (the control plane's limit too)."""

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # a control plane that restarts is back within a second or two: notice it that soon (gRPC's
    # default backoff grows to two minutes, long after the daemon is back)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach a control plane. ``from_env`` fills what is not given from the variables
    ``PLAIT_TOKEN``, ``PLAIT_TLS_CA``, ``PLAIT_TLS_CERT`` and ``PLAIT_TLS_KEY``."""

    address: str
    """Where the control plane is, in one of the forms of :data:`plait._settings.SERVER_FORMS`
    (``host:port``, ``host``, ``grpc://host[:port]``, ``grpcs://host[:port]``), or several
    comma-separated: the replicas of one control plane."""
    token: str = ""
    """Bearer token sent with every call; empty sends none."""
    tls_ca: str = ""
    """PEM CA bundle that signed the server's certificate: TLS when set."""
    tls_cert: str = ""
    """PEM client certificate, for mutual TLS."""
    tls_key: str = ""
    """PEM private key of tls_cert."""

    @classmethod
    def from_env(
        cls, address: str, *, token: str | None = None, tls_ca: str | None = None
    ) -> ChannelConfig:
        """The address normalized (:func:`plait._settings.normalize_server`); the token is
        ``token``, else ``$PLAIT_TOKEN``, else one saved for ``address``
        (:func:`plait._settings.saved_token`: ``plait login``, or the local daemon's credential
        file).

        Raises:
            PlaitError: ``address`` is not a server address (the message lists the forms).
        """
        address = normalize_server(address)
        if token is None:
            token = os.environ.get("PLAIT_TOKEN") or saved_token(address)
        return cls(
            address=address,
            token=token,
            tls_ca=tls_ca if tls_ca is not None else os.environ.get("PLAIT_TLS_CA", ""),
            tls_cert=os.environ.get("PLAIT_TLS_CERT", ""),
            tls_key=os.environ.get("PLAIT_TLS_KEY", ""),
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata that carries the token."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    @property
    def tls(self) -> bool:
        """Whether the channel is TLS: ``grpcs://``, or ``tls_ca`` set for an address without
        a scheme.

        Raises:
            PlaitError: the address is not one, or says ``grpc://`` (plain text) while
                ``tls_ca`` asks for TLS.
        """
        scheme = parse_server(self.address)[0].tls
        if scheme is False and self.tls_ca:
            raise errors.PlaitError(
                f"{self.address} says grpc:// (plain text) but PLAIT_TLS_CA asks for TLS: "
                f"use grpcs://, or leave PLAIT_TLS_CA unset for this server"
            )
        return bool(scheme) or (scheme is None and bool(self.tls_ca))


def target(address: str) -> str:
    """The gRPC target of ``address`` (see :data:`plait._settings.SERVER_FORMS`): ``host:port``
    for one server; for several, comma-separated, the replicas of one control plane (sharing
    one database), resolved here once into one list. gRPC then talks to the first that answers
    and, when it goes away, to the next (its ``pick_first`` policy), so a client reconnects to
    another replica by itself.

    Raises:
        PlaitError: ``address`` is not a server address, or a replica cannot be resolved.
    """
    servers = parse_server(address)
    if len(servers) == 1:
        return servers[0].host_port
    v4: list[str] = []
    v6: list[str] = []
    for server in servers:
        try:
            found = socket.getaddrinfo(
                server.host.strip("[]"), server.port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise errors.PlaitError(f"cannot resolve {server.host_port!r}: {exc}") from None
        ips = [(f, a[0], a[1]) for f, *_, a in found if isinstance(a[0], str)]
        v4 += [f"{ip}:{p}" for f, ip, p in ips if f == socket.AF_INET][:1]
        v6 += [f"[{ip}]:{p}" for f, ip, p in ips if f == socket.AF_INET6][:1]
    # one address family per target (gRPC's ipv4: and ipv6: schemes)
    if len(v4) == len(servers):
        return "ipv4:" + ",".join(v4)
    if len(v6) == len(servers):
        return "ipv6:" + ",".join(v6)
    raise errors.PlaitError(f"the servers {address!r} do not share an address family")


def open_channel(config: ChannelConfig) -> Any:
    """A ``grpc.Channel`` to the control plane (to one of its replicas, see :func:`target`):
    TLS for ``grpcs://`` or when ``config.tls_ca`` is set (``grpcs://`` without a CA bundle
    trusts the system's roots).

    Raises:
        PlaitError: the address is not a server address, or the TLS files cannot be read.
    """
    where = target(config.address)
    if not config.tls:
        return grpc.insecure_channel(where, options=_OPTIONS)
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(config.tls_ca).read_bytes() if config.tls_ca else None,
            private_key=Path(config.tls_key).read_bytes() if config.tls_key else None,
            certificate_chain=Path(config.tls_cert).read_bytes() if config.tls_cert else None,
        )
    except OSError as exc:
        raise errors.PlaitError(f"cannot read the TLS files: {exc}") from None
    return grpc.secure_channel(where, credentials, options=_OPTIONS)


def is_serving(config: ChannelConfig, timeout: float = 2.0) -> bool:
    """True when the control plane at ``config.address`` answers its health check SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with open_channel(config) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
    except (grpc.RpcError, errors.PlaitError):
        return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
