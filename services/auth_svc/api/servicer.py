"""AuthService over gRPC: proto ⇄ domain, nothing else."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.auth_svc.domain import IssuedTokens, User
from services.auth_svc.service.admin import RevocationFeed, etag_of
from services.auth_svc.service.auth_service import AuthService
from shared.config.clock import utc
from shared.rpc.errors import InvalidArgument
from shared.rpc.request_path import principal_of

__all__ = ["AuthServicer", "moment_of", "timestamp_of", "user_to_proto"]

TOKEN_TYPE = "Bearer"


_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799  # years 1 to 9999


def moment_of(message: Any, field: str) -> datetime | None:
    """A Timestamp field as a datetime (None if unset); INVALID_ARGUMENT naming the field
    if it is out of the Timestamp range (which ToDatetime() would raise on)."""
    if not message.HasField(field):
        return None
    stamp = getattr(message, field)
    if not (_MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS and 0 <= stamp.nanos < 1_000_000_000):
        raise InvalidArgument.field(field, "not a valid timestamp (years 1 to 9999)")
    return utc(stamp.ToDatetime())


def timestamp_of(moment: datetime) -> Timestamp:
    """A datetime as a protobuf Timestamp (every auth API message's times)."""
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def user_to_proto(user: User) -> auth_pb2.User:
    return auth_pb2.User(
        etag=etag_of(user),
        id=str(user.id),
        email=user.email,
        display_name=user.display_name,
        roles=list(user.roles),
        disabled=user.disabled,
        create_time=timestamp_of(user.create_time),
        update_time=timestamp_of(user.update_time),
    )


def _token_fields(issued: IssuedTokens) -> dict[str, Any]:
    return {
        "access_token": issued.access_token,
        "refresh_token": issued.refresh_token,
        "token_type": TOKEN_TYPE,
        "expires_in": issued.expires_in,
    }


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, service: AuthService, revocations: RevocationFeed | None = None) -> None:
        self._service = service
        self._revocations = revocations

    def Register(
        self, request: auth_pb2.RegisterRequest, context: Any
    ) -> auth_pb2.RegisterResponse:
        user = self._service.register(
            email=request.email, password=request.password, display_name=request.display_name
        )
        return auth_pb2.RegisterResponse(user=user_to_proto(user))

    def Login(self, request: auth_pb2.LoginRequest, context: Any) -> auth_pb2.LoginResponse:
        issued = self._service.login(email=request.email, password=request.password)
        return auth_pb2.LoginResponse(**_token_fields(issued), user=user_to_proto(issued.user))

    def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: Any
    ) -> auth_pb2.RefreshTokenResponse:
        issued = self._service.refresh(refresh_token=request.refresh_token)
        return auth_pb2.RefreshTokenResponse(**_token_fields(issued))

    def Logout(self, request: auth_pb2.LogoutRequest, context: Any) -> auth_pb2.LogoutResponse:
        self._service.logout(refresh_token=request.refresh_token)
        return auth_pb2.LogoutResponse()

    def GetJwks(self, request: auth_pb2.GetJwksRequest, context: Any) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.Jwk(**jwk) for jwk in self._service.jwks()])

    def GetCurrentUser(
        self, request: auth_pb2.GetCurrentUserRequest, context: Any
    ) -> auth_pb2.GetCurrentUserResponse:
        user = self._service.current_user(principal=principal_of(context))
        return auth_pb2.GetCurrentUserResponse(user=user_to_proto(user))

    def ChangePassword(
        self, request: auth_pb2.ChangePasswordRequest, context: Any
    ) -> auth_pb2.ChangePasswordResponse:
        self._service.change_password(
            principal=principal_of(context),
            current_password=request.current_password,
            new_password=request.new_password,
        )
        return auth_pb2.ChangePasswordResponse()

    def GetRevocations(
        self, request: auth_pb2.GetRevocationsRequest, context: Any
    ) -> auth_pb2.GetRevocationsResponse:
        if self._revocations is None:
            return auth_pb2.GetRevocationsResponse()
        since = moment_of(request, "since_time")
        revocations, now, truncated = self._revocations.since(since)
        revoked_kids = self._revocations.revoked_kids()
        return auth_pb2.GetRevocationsResponse(
            revocations=[
                auth_pb2.Revocation(
                    subject=r.subject,
                    not_before=timestamp_of(r.not_before),
                    create_time=timestamp_of(r.create_time),
                )
                for r in revocations
            ],
            server_time=timestamp_of(now),
            revoked_kids=revoked_kids,
            truncated=truncated,
        )
