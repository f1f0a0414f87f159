"""TokenService: API tokens, managed by admins over the API."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from plait.api.v1 import token_service_pb2 as pb
from plait.api.v1 import token_service_pb2_grpc
from plait.engine.api._convert import name_id
from plait.engine.api._errors import abort_on_plait_error
from plait.engine.store import _tokens
from plait.engine.store._tokens import Role, TokenInfo
from plait.errors import PipelineError

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types

ROLE_TO_PROTO = {
    Role.ADMIN: pb.TOKEN_ROLE_ADMIN,
    Role.USER: pb.TOKEN_ROLE_USER,
    Role.WORKER: pb.TOKEN_ROLE_WORKER,
}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}


def token_to_proto(t: TokenInfo) -> pb.Token:
    msg = pb.Token(
        name=f"tokens/{t.id}", token_id=t.id, display_name=t.name, role=ROLE_TO_PROTO[t.role]
    )
    msg.create_time.FromNanoseconds(int(t.created_at * 1e9))
    if t.revoked_at is not None:
        msg.revoke_time.FromNanoseconds(int(t.revoked_at * 1e9))
    return msg


class TokenServicer(token_service_pb2_grpc.TokenServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: Ctx
    ) -> pb.CreateTokenResponse:
        async with abort_on_plait_error(context):
            role = ROLE_FROM_PROTO.get(request.role)
            if role is None:
                raise PipelineError("role: required (admin, user or worker)")
            info, secret = await self.cp.store.write(
                _tokens.create_token, request.display_name, role, time.time()
            )
        return pb.CreateTokenResponse(token=token_to_proto(info), secret=secret)

    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Ctx
    ) -> pb.ListTokensResponse:
        async with abort_on_plait_error(context):
            found = await self.cp.store.read(_tokens.list_tokens)
        return pb.ListTokensResponse(tokens=[token_to_proto(t) for t in found])

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Ctx
    ) -> pb.RevokeTokenResponse:
        async with abort_on_plait_error(context):
            token_id = name_id(request.name, "tokens")
            info = await self.cp.store.write(_tokens.revoke_token, token_id, time.time())
        return pb.RevokeTokenResponse(token=token_to_proto(info))
