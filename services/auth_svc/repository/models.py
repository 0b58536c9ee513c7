"""auth_svc tables (its own metadata; agent_svc never reads these)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AuditRow",
    "AuthBase",
    "LoginAttemptRow",
    "RefreshFamilyRow",
    "RefreshTokenRow",
    "RevocationRow",
    "ServiceAccountKeyRow",
    "ServiceAccountRow",
    "ServiceAccountSecretRow",
    "SigningKeyRow",
    "UsedAssertionRow",
    "UserRow",
]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class AuthBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


Timestamp = DateTime(timezone=True)


class UserRow(AuthBase):
    __tablename__ = "auth_users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    password_hash: Mapped[str] = mapped_column(String(255))
    roles: Mapped[list[str]] = mapped_column(JSON)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    update_time: Mapped[datetime] = mapped_column(Timestamp)


class RefreshFamilyRow(AuthBase):
    """A login session: every refresh token rotated from one login shares a family."""

    __tablename__ = "auth_refresh_families"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("auth_users.id", ondelete="CASCADE"), index=True
    )
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    last_used_time: Mapped[datetime] = mapped_column(Timestamp)
    revoked_time: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # The client's address at login (NULL for sessions from before it was kept).
    peer: Mapped[str | None] = mapped_column(String(128), nullable=True)


class RefreshTokenRow(AuthBase):
    __tablename__ = "auth_refresh_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    family_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("auth_refresh_families.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    expire_time: Mapped[datetime] = mapped_column(Timestamp)
    rotated_time: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class AuditRow(AuthBase):
    __tablename__ = "auth_audit_events"
    __table_args__ = (
        Index("ix_auth_audit_events_user_time", "user_id", "time"),
        Index("ix_auth_audit_events_kind_time", "kind", "time"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    time: Mapped[datetime] = mapped_column(Timestamp, index=True)
    kind: Mapped[str] = mapped_column(String(40))
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Who did it, through whom, from where, in which call (NULL in events from before).
    actor: Mapped[str | None] = mapped_column(String(80), nullable=True)
    actor_via: Mapped[str | None] = mapped_column(String(80), nullable=True)
    peer: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)


class LoginAttemptRow(AuthBase):
    """Failed-login counts while Redis is down, shared by every replica (the limiter's
    database fallback, infra/limiter.py). Keyed by the SHA-256 of the email: the table
    never holds an address. Rows are purged once expired."""

    __tablename__ = "auth_login_attempts"

    key_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer)
    expire_time: Mapped[datetime] = mapped_column(Timestamp, index=True)


class ServiceAccountRow(AuthBase):
    """A machine caller's account (its id is the OAuth client id)."""

    __tablename__ = "auth_service_accounts"
    __table_args__ = (Index("ix_auth_service_accounts_create_time_id", "create_time", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    display_name: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    last_used_time: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class ServiceAccountSecretRow(AuthBase):
    """A client secret, as its keyed hash (HMAC-SHA256 under AUTH_CLIENT_SECRET_KEY)."""

    __tablename__ = "auth_service_account_secrets"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("auth_service_accounts.id", ondelete="CASCADE"), index=True
    )
    secret_hash: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(Timestamp)


class ServiceAccountKeyRow(AuthBase):
    """A public key verifying the account's JWT assertions; kid = its RFC 7638 thumbprint."""

    __tablename__ = "auth_service_account_keys"

    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("auth_service_accounts.id", ondelete="CASCADE"), primary_key=True
    )
    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    public_key_pem: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(Timestamp)


class UsedAssertionRow(AuthBase):
    """The `jti` of every accepted client assertion until it expires: a replay fails the
    primary key, on every replica. Keyed by the SHA-256 of (client id, jti)."""

    __tablename__ = "auth_used_assertions"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    expire_time: Mapped[datetime] = mapped_column(Timestamp, index=True)


class RevocationRow(AuthBase):
    """Access tokens of `subject` issued before `not_before` are refused (agent_svc polls
    these); kept until no such token can still be live (`expire_time`)."""

    __tablename__ = "auth_revocations"
    # Every admin call and token exchange asks whether the caller's token is covered.
    __table_args__ = (Index("ix_auth_revocations_subject", "subject", "not_before"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    subject: Mapped[str] = mapped_column(String(64))
    not_before: Mapped[datetime] = mapped_column(Timestamp)
    create_time: Mapped[datetime] = mapped_column(Timestamp, index=True)
    expire_time: Mapped[datetime] = mapped_column(Timestamp, index=True)


class SigningKeyRow(AuthBase):
    """A signing key; the private part AES-GCM encrypted under a key-encryption key from
    the environment (nonce ‖ ciphertext, with the kid as associated data)."""

    __tablename__ = "auth_signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    public_pem: Mapped[str] = mapped_column(Text)
    private_blob: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    activate_time: Mapped[datetime] = mapped_column(Timestamp)
    remove_time: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    revoke_time: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
