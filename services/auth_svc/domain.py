"""The auth domain: users, refresh tokens, service accounts, audit events."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "ADMIN",
    "USER",
    "AuditEvent",
    "AuditKind",
    "ClientKey",
    "ClientSecret",
    "IssuedTokens",
    "RefreshToken",
    "Revocation",
    "ServiceAccount",
    "Session",
    "SigningKeyRecord",
    "User",
]

USER = "user"
ADMIN = "admin"
KNOWN_ROLES = frozenset({USER, ADMIN})


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    display_name: str
    roles: tuple[str, ...]
    disabled: bool
    password_hash: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """A stored refresh token: only the SHA-256 of the opaque value is kept."""

    id: uuid.UUID
    family_id: uuid.UUID
    user_id: uuid.UUID
    token_hash: str
    create_time: datetime
    expire_time: datetime
    rotated_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    expires_in: int
    user: User


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """A client secret of a service account: only its keyed hash is kept."""

    id: uuid.UUID
    secret_hash: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A public key that verifies a service account's JWT assertions (RFC 7523)."""

    kid: str
    alg: str
    public_key_pem: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """An account of a machine caller; its id is the OAuth client id."""

    id: uuid.UUID
    display_name: str
    scopes: tuple[str, ...]
    create_time: datetime
    last_used_time: datetime | None = None
    secrets: tuple[ClientSecret, ...] = ()
    keys: tuple[ClientKey, ...] = ()


class AuditKind(StrEnum):
    REGISTERED = "register"
    LOGIN_SUCCEEDED = "login_succeeded"
    LOGIN_FAILED = "login_failed"
    LOCKED_OUT = "lockout"
    REFRESHED = "refresh"
    REFRESH_REUSE_DETECTED = "refresh_reuse_detected"
    LOGGED_OUT = "logout"
    PASSWORD_CHANGED = "password_changed"
    ADMIN_CREATED = "admin_created"
    SERVICE_ACCOUNT_CREATED = "service_account_created"
    SERVICE_ACCOUNT_DELETED = "service_account_deleted"
    CLIENT_SECRET_ADDED = "client_secret_added"
    CLIENT_SECRET_REMOVED = "client_secret_removed"
    CLIENT_KEY_ADDED = "client_key_added"
    CLIENT_KEY_REMOVED = "client_key_removed"
    TOKEN_ISSUED = "token_issued"
    TOKEN_REFUSED = "token_refused"
    USER_UPDATED = "user_updated"
    USER_DISABLED = "user_disabled"
    USER_ENABLED = "user_enabled"
    USER_UNLOCKED = "user_unlocked"
    SESSION_REVOKED = "session_revoked"
    SESSIONS_REVOKED = "sessions_revoked"
    SIGNING_KEY_CREATED = "signing_key_created"
    SIGNING_KEY_REVOKED = "signing_key_revoked"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """Who did what; never a password or a token. `user_id` is whom it is about; `actor`
    who did it (`users/<id>` or `serviceAccounts/<id>`; None: the user themselves or the
    system) and `actor_via` the service acting for them; `peer` and `request_id` identify
    the call (filled in from the call being served when not given)."""

    kind: AuditKind
    time: datetime
    user_id: uuid.UUID | None = None
    email: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    actor: str | None = None
    actor_via: str | None = None
    peer: str | None = None
    request_id: str | None = None
    id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class Session:
    """A login and the refresh tokens rotated from it (a refresh family)."""

    id: uuid.UUID
    user_id: uuid.UUID
    create_time: datetime
    last_use_time: datetime
    client_peer: str | None = None


@dataclass(frozen=True, slots=True)
class Revocation:
    """Access tokens of `subject` issued before `not_before` are refused."""

    subject: str
    not_before: datetime
    create_time: datetime


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    """A key that signs access tokens, its private part encrypted (`private_blob` under the
    key-encryption key `kek_id`). Its state follows from its times (see `state`)."""

    kid: str
    alg: str
    public_pem: str
    private_blob: bytes
    kek_id: str
    create_time: datetime
    activate_time: datetime
    remove_time: datetime | None = None
    revoke_time: datetime | None = None

    def state(self, now: datetime, signer: str | None) -> str:
        """next, active, retired, removed or revoked; `signer`: the kid that signs now."""
        if self.revoke_time is not None:
            return "revoked"
        if self.remove_time is not None and self.remove_time <= now:
            return "removed"
        if self.activate_time > now:
            return "next"
        return "active" if self.kid == signer else "retired"

    def published(self, now: datetime) -> bool:
        """In the JWKS: not revoked, not yet removed (a next key is published ahead)."""
        return self.revoke_time is None and (self.remove_time is None or self.remove_time > now)
