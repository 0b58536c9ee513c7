"""UserService, SessionService and AuditService over gRPC: proto ⇄ domain, nothing else."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth_svc.api.servicer import moment_of, timestamp_of, user_to_proto
from services.auth_svc.domain import AuditEvent, Session, SigningKeyRecord
from services.auth_svc.service.admin import AuditReader, Sessions, UserAdmin
from services.auth_svc.service.signing_keys import SigningKeyAdmin
from shared.config.clock import Clock
from shared.rpc.request_path import principal_of

__all__ = ["AuditServicer", "SessionServicer", "SigningKeyServicer", "UserServicer"]


def session_to_proto(session: Session) -> auth_pb2.Session:
    return auth_pb2.Session(
        id=str(session.id),
        user_id=str(session.user_id),
        create_time=timestamp_of(session.create_time),
        last_use_time=timestamp_of(session.last_use_time),
        client_peer=session.client_peer or "",
    )


def event_to_proto(event: AuditEvent) -> auth_pb2.AuditEvent:
    return auth_pb2.AuditEvent(
        id=str(event.id or ""),
        kind=event.kind.value,
        time=timestamp_of(event.time),
        user_id=str(event.user_id or ""),
        email=event.email or "",
        actor=event.actor or "",
        actor_via=event.actor_via or "",
        peer=event.peer or "",
        request_id=event.request_id or "",
        detail={str(k): str(v) for k, v in event.detail.items()},
    )


class UserServicer(auth_pb2_grpc.UserServiceServicer):
    def __init__(self, admin: UserAdmin) -> None:
        self._admin = admin

    def ListUsers(
        self, request: auth_pb2.ListUsersRequest, context: Any
    ) -> auth_pb2.ListUsersResponse:
        users, next_token = self._admin.list(
            principal=principal_of(context),
            page_size=request.page_size,
            page_token=request.page_token,
            email_prefix=request.email_prefix,
            role=request.role,
            disabled=request.disabled if request.HasField("disabled") else None,
        )
        return auth_pb2.ListUsersResponse(
            users=[user_to_proto(u) for u in users], next_page_token=next_token
        )

    def GetUser(self, request: auth_pb2.GetUserRequest, context: Any) -> auth_pb2.GetUserResponse:
        user = self._admin.get(principal=principal_of(context), user_id=request.id)
        return auth_pb2.GetUserResponse(user=user_to_proto(user))

    def UpdateUser(
        self, request: auth_pb2.UpdateUserRequest, context: Any
    ) -> auth_pb2.UpdateUserResponse:
        user = self._admin.update(
            principal=principal_of(context),
            user_id=request.user.id,
            etag=request.user.etag,
            paths=list(request.update_mask.paths),
            display_name=request.user.display_name,
            roles=list(request.user.roles),
        )
        return auth_pb2.UpdateUserResponse(user=user_to_proto(user))

    def DisableUser(
        self, request: auth_pb2.DisableUserRequest, context: Any
    ) -> auth_pb2.DisableUserResponse:
        user = self._admin.set_disabled(
            principal=principal_of(context), user_id=request.id, disabled=True
        )
        return auth_pb2.DisableUserResponse(user=user_to_proto(user))

    def EnableUser(
        self, request: auth_pb2.EnableUserRequest, context: Any
    ) -> auth_pb2.EnableUserResponse:
        user = self._admin.set_disabled(
            principal=principal_of(context), user_id=request.id, disabled=False
        )
        return auth_pb2.EnableUserResponse(user=user_to_proto(user))

    def UnlockUser(
        self, request: auth_pb2.UnlockUserRequest, context: Any
    ) -> auth_pb2.UnlockUserResponse:
        self._admin.unlock(principal=principal_of(context), user_id=request.id)
        return auth_pb2.UnlockUserResponse()


class SessionServicer(auth_pb2_grpc.SessionServiceServicer):
    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def ListSessions(
        self, request: auth_pb2.ListSessionsRequest, context: Any
    ) -> auth_pb2.ListSessionsResponse:
        sessions, next_token = self._sessions.list(
            principal=principal_of(context),
            user_id=request.user_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return auth_pb2.ListSessionsResponse(
            sessions=[session_to_proto(s) for s in sessions], next_page_token=next_token
        )

    def RevokeSession(
        self, request: auth_pb2.RevokeSessionRequest, context: Any
    ) -> auth_pb2.RevokeSessionResponse:
        self._sessions.revoke(principal=principal_of(context), session_id=request.id)
        return auth_pb2.RevokeSessionResponse()

    def RevokeAllSessions(
        self, request: auth_pb2.RevokeAllSessionsRequest, context: Any
    ) -> auth_pb2.RevokeAllSessionsResponse:
        count = self._sessions.revoke_all(principal=principal_of(context), user_id=request.user_id)
        return auth_pb2.RevokeAllSessionsResponse(revoked_count=count)


class AuditServicer(auth_pb2_grpc.AuditServiceServicer):
    def __init__(self, reader: AuditReader) -> None:
        self._reader = reader

    def ListAuditEvents(
        self, request: auth_pb2.ListAuditEventsRequest, context: Any
    ) -> auth_pb2.ListAuditEventsResponse:
        events, next_token = self._reader.list(
            principal=principal_of(context),
            user_id=request.user_id,
            kind=request.kind,
            start=moment_of(request, "start_time"),
            end=moment_of(request, "end_time"),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return auth_pb2.ListAuditEventsResponse(
            audit_events=[event_to_proto(e) for e in events], next_page_token=next_token
        )


def signing_key_to_proto(
    record: SigningKeyRecord, now: datetime, signer: str | None
) -> auth_pb2.SigningKey:
    message = auth_pb2.SigningKey(
        kid=record.kid,
        alg=record.alg,
        state=record.state(now, signer),
        create_time=timestamp_of(record.create_time),
        activate_time=timestamp_of(record.activate_time),
    )
    if record.remove_time is not None:
        message.remove_time.CopyFrom(timestamp_of(record.remove_time))
    if record.revoke_time is not None:
        message.revoke_time.CopyFrom(timestamp_of(record.revoke_time))
    return message


class SigningKeyServicer(auth_pb2_grpc.SigningKeyServiceServicer):
    def __init__(self, admin: SigningKeyAdmin, clock: Clock) -> None:
        self._admin = admin
        self._clock = clock

    def ListSigningKeys(
        self, request: auth_pb2.ListSigningKeysRequest, context: Any
    ) -> auth_pb2.ListSigningKeysResponse:
        records, signer = self._admin.list_keys(principal=principal_of(context))
        now = self._clock.now()
        return auth_pb2.ListSigningKeysResponse(
            signing_keys=[signing_key_to_proto(r, now, signer) for r in records]
        )

    def RotateSigningKey(
        self, request: auth_pb2.RotateSigningKeyRequest, context: Any
    ) -> auth_pb2.RotateSigningKeyResponse:
        record = self._admin.rotate(principal=principal_of(context))
        return auth_pb2.RotateSigningKeyResponse(
            signing_key=signing_key_to_proto(record, self._clock.now(), None)
        )

    def RevokeSigningKey(
        self, request: auth_pb2.RevokeSigningKeyRequest, context: Any
    ) -> auth_pb2.RevokeSigningKeyResponse:
        record, signer = self._admin.revoke(principal=principal_of(context), kid=request.kid)
        return auth_pb2.RevokeSigningKeyResponse(
            signing_key=signing_key_to_proto(record, self._clock.now(), signer),
            active_kid=signer or "",
        )
