"""The one place a gRPC channel to a control plane is made: target, TLS and token.

The SDK's :class:`plait.Client` and every CLI command that talks to a server use
:func:`open_channel`; nothing else builds channels or reads the TLS variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from plait import errors
from plait._settings import saved_token

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
    """host:port."""
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
        """The token is ``token``, else ``$PLAIT_TOKEN``, else one saved for ``address``
        (:func:`plait._settings.saved_token`: ``plait login``, or the local daemon's credential
        file)."""
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


def open_channel(config: ChannelConfig) -> Any:
    """A ``grpc.Channel`` to the control plane: TLS when ``config.tls_ca`` is set."""
    if not config.tls_ca:
        return grpc.insecure_channel(config.address, options=_OPTIONS)
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(config.tls_ca).read_bytes(),
            private_key=Path(config.tls_key).read_bytes() if config.tls_key else None,
            certificate_chain=Path(config.tls_cert).read_bytes() if config.tls_cert else None,
        )
    except OSError as exc:
        raise errors.PlaitError(f"cannot read the TLS files: {exc}") from None
    return grpc.secure_channel(config.address, credentials, options=_OPTIONS)


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
