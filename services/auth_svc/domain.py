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
    "ServiceAccount",
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


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """Who did what; never a password or a token."""

    kind: AuditKind
    time: datetime
    user_id: uuid.UUID | None = None
    email: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
