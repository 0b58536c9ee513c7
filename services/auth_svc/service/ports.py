"""What the auth service layer needs from the outside world, as Protocols.

The SQLAlchemy repositories, the argon2 hasher, the Redis/in-process login limiter and
the key ring implement these; unit tests pass in-memory fakes.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from services.auth_svc.domain import (
    AuditEvent,
    ClientKey,
    ClientSecret,
    RefreshToken,
    Revocation,
    ServiceAccount,
    Session,
    SigningKeyRecord,
    User,
)
from shared.data.uow import UnitOfWork

__all__ = [
    "AuditLog",
    "AuthUnitOfWork",
    "ClientThrottle",
    "EmailTaken",
    "HashingSlot",
    "KeyExists",
    "KeyFactory",
    "LoginAttempt",
    "LoginLimiter",
    "LoginObserver",
    "LoginResult",
    "PasswordHasher",
    "RefreshTokenRepository",
    "RevocationRepository",
    "ServiceAccountRepository",
    "SigningKeyRepository",
    "TokenIssuer",
    "UserRepository",
]


class EmailTaken(Exception):
    """A user with that email exists (raised by UserRepository.add)."""


class KeyExists(Exception):
    """The account already has a key with that id (raised by ServiceAccountRepository)."""


class UserRepository(Protocol):
    def add(self, user: User) -> None:
        """Stores a new user; raises EmailTaken if the email is in use."""
        ...

    def get(self, user_id: uuid.UUID) -> User | None: ...

    def get_by_email(self, email: str) -> User | None: ...

    def lock(self, user_id: uuid.UUID) -> User | None:
        """The user as stored now, its row locked until the transaction ends (SELECT … FOR
        UPDATE): logins and password changes of one user serialize on it."""
        ...

    def replace_password_hash(
        self, user_id: uuid.UUID, *, expected: str, new: str, when: datetime
    ) -> bool:
        """Stores `new` only if the stored hash is still `expected` (compare-and-set);
        False if it is not (or there is no such user)."""
        ...

    def page(
        self,
        *,
        email_prefix: str = "",
        role: str = "",
        disabled: bool | None = None,
        after: tuple[datetime, uuid.UUID] | None = None,
        limit: int,
    ) -> list[User]:
        """Users in (create_time, id) order strictly after the cursor, filtered."""
        ...

    def save(self, user: User) -> None:
        """Stores the user's display name, roles, disabled flag and update time."""
        ...


class RefreshTokenRepository(Protocol):
    def add_family(
        self, family_id: uuid.UUID, user_id: uuid.UUID, when: datetime, peer: str | None = None
    ) -> None: ...

    def live_sessions(
        self, user_id: uuid.UUID, *, before: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[Session]:
        """The user's unrevoked sessions, newest first, strictly before the cursor."""
        ...

    def live_session(self, family_id: uuid.UUID) -> Session | None:
        """The session if it exists and is not revoked."""
        ...

    def add(self, token: RefreshToken) -> None: ...

    def family_of(self, token_hash: str) -> uuid.UUID | None:
        """The family of the token with this hash, or None."""
        ...

    def lock_live_family(self, family_id: uuid.UUID, when: datetime) -> bool:
        """Takes the family's row lock for this transaction; False if it is revoked."""
        ...

    def get_by_hash(self, token_hash: str) -> RefreshToken | None: ...

    def mark_rotated(self, token_id: uuid.UUID, when: datetime) -> None: ...

    def revoke_family(self, family_id: uuid.UUID, when: datetime) -> None: ...

    def revoke_user_families(self, user_id: uuid.UUID, when: datetime) -> int:
        """Revokes every live family of the user; how many."""
        ...


class ServiceAccountRepository(Protocol):
    def add(self, account: ServiceAccount) -> None:
        """Stores a new account with its secrets (its keys are added one by one)."""
        ...

    def get(self, account_id: uuid.UUID) -> ServiceAccount | None:
        """The account with its secrets and keys."""
        ...

    def credentials(self, account_id: uuid.UUID) -> ServiceAccount | None:
        """The same as `get`, read in one statement (the token endpoint's hot path)."""
        ...

    def page(self, *, after: tuple[datetime, uuid.UUID] | None, limit: int) -> list[ServiceAccount]:
        """Accounts in (create_time, id) order, strictly after the cursor."""
        ...

    def delete(self, account_id: uuid.UUID) -> bool:
        """Deletes the account, its secrets and keys; False if there was none."""
        ...

    def add_secret(self, account_id: uuid.UUID, secret: ClientSecret) -> None: ...

    def remove_secret(self, account_id: uuid.UUID, secret_id: uuid.UUID) -> bool: ...

    def add_key(self, account_id: uuid.UUID, key: ClientKey) -> None:
        """Raises KeyExists if the account has a key with that kid."""
        ...

    def remove_key(self, account_id: uuid.UUID, kid: str) -> bool: ...

    def touch(self, account_id: uuid.UUID, when: datetime, *, not_since: datetime) -> None:
        """Sets last_used_time to `when` unless it is already at or after `not_since`."""
        ...

    def use_assertion(self, digest: str, expire_time: datetime) -> bool:
        """Records a client assertion as used until `expire_time`; False if it was."""
        ...

    def purge_assertions(self, before: datetime, *, limit: int = 1000) -> int:
        """Forgets used assertions that expired before `before`; how many."""
        ...


class SigningKeyRepository(Protocol):
    def lock(self) -> None:
        """Serializes changes to the key ring until the transaction ends."""
        ...

    def all(self) -> list[SigningKeyRecord]:
        """Every key, by activation time."""
        ...

    def add(self, key: SigningKeyRecord) -> None: ...

    def save(self, key: SigningKeyRecord) -> None:
        """Stores a key's times and private part."""
        ...


class KeyFactory(Protocol):
    def create(
        self, *, now: datetime, activate_time: datetime, private_pem: bytes | None = None
    ) -> SigningKeyRecord:
        """A new key record (a fresh key, or the given private key), sealed."""
        ...

    def public_only(
        self, public_pem: str, *, now: datetime, activate_time: datetime
    ) -> SigningKeyRecord:
        """A verify-only key (no private part)."""
        ...

    def rewrap(self, record: SigningKeyRecord) -> SigningKeyRecord | None:
        """The record sealed under the current key-encryption key, or None if it is."""
        ...


class AuditLog(Protocol):
    def record(self, event: AuditEvent) -> None: ...

    def page(
        self,
        *,
        user_id: uuid.UUID | None = None,
        kind: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
        before: tuple[datetime, uuid.UUID] | None = None,
        limit: int,
    ) -> list[AuditEvent]:
        """Events newest first, strictly before the cursor (time, id), filtered."""
        ...


class RevocationRepository(Protocol):
    def add(self, revocation: Revocation, *, expire_time: datetime) -> None: ...

    def since(self, when: datetime | None, *, now: datetime, limit: int) -> list[Revocation]:
        """Up to `limit` revocations still in force (expiring after `now`) recorded at or
        after `when`, oldest first (by create_time)."""
        ...

    def covers(self, subject: str, issued_at: float, now: datetime) -> bool:
        """Whether a token of `subject` issued at `issued_at` (epoch s) is revoked."""
        ...

    def latest(self, subject: str, now: datetime) -> datetime | None:
        """The latest `not_before` of the subject's revocations still in force (None: none)."""
        ...


class AuthUnitOfWork(UnitOfWork, Protocol):
    """One transaction over the auth repositories (see shared.data.uow.UnitOfWork)."""

    @property
    def users(self) -> UserRepository: ...

    @property
    def refresh_tokens(self) -> RefreshTokenRepository: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def service_accounts(self) -> ServiceAccountRepository: ...

    @property
    def revocations(self) -> RevocationRepository: ...

    @property
    def signing_keys(self) -> SigningKeyRepository: ...


class HashingSlot(Protocol):
    """One request's place for password hashes (see PasswordHasher.reserve). Each call
    raises Unavailable (HASHING_TIMEOUT) if its hash waited too long to start."""

    def hash(self, password: str) -> str: ...

    def verify(self, password_hash: str, password: str) -> bool:
        """True if the password matches; costs the same for any well-formed hash."""
        ...


class PasswordHasher(Protocol):
    def reserve(self) -> AbstractContextManager[HashingSlot]:
        """A place in the hashing queue, taken before a request does anything costly;
        raises ResourceExhausted (HASHING_BUSY) at once when there is none."""
        ...

    def needs_rehash(self, password_hash: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    allowed: bool
    retry_after_seconds: float = 0.0
    """When not allowed: how long the cool-down still runs."""
    locks_on_failure: bool = False
    """When allowed: this attempt is the last one before the cool-down if it fails."""


class LoginLimiter(Protocol):
    def acquire(self, key: str) -> LoginAttempt:
        """Atomically counts an attempt for `key`, unless the limit is reached."""
        ...

    def release(self, key: str) -> None:
        """Gives one counted attempt back, atomically and never below zero: the attempt
        ended in an infrastructure error (database down, hashing busy), which says nothing
        about the password."""
        ...

    def reset(self, key: str) -> None:
        """Forgets the counted attempts (after a successful login)."""
        ...


LoginResult = Literal["success", "failure", "locked"]


class LoginObserver(Protocol):
    """Told the outcome of every login attempt that got past validation (for metrics):
    success, failure (wrong email or password, disabled account) or locked (refused by
    the limiter without checking the password)."""

    def __call__(self, result: LoginResult, /) -> None: ...


class TokenIssuer(Protocol):
    @property
    def access_token_ttl_seconds(self) -> int: ...

    @property
    def issuer(self) -> str:
        """The `iss` of the tokens issued, and the `aud` client assertions must name."""
        ...

    def issue_access_token(self, user: User, *, issued_at: int | None = None) -> str:
        """A user's token; `iat` = `issued_at` if given (`AuthService._issue`: a token
        issued in the second of a revocation takes the revocation's moment)."""
        ...

    def issue_token(
        self,
        *,
        subject: str,
        client_id: str,
        scopes: Collection[str],
        lifetime_seconds: int,
        roles: Sequence[str] = (),
        actor: str | None = None,
        issued_at: int | None = None,
    ) -> str:
        """An access token for a machine caller: `sub`, `client_id`, `scope`, and `act`
        = {`sub`: actor} when it acts for the subject; `iat` = `issued_at` if given (a
        delegated token keeps its user token's, so revocations of the user cover it)."""
        ...

    def public_jwks(self) -> list[dict[str, str]]:
        """Every public key that may still verify a live token, as JWK member dicts."""
        ...


class ClientThrottle(Protocol):
    """Slows a client that keeps failing to authenticate (shared by every replica when
    there is Redis): a few failures pass at once, then one per interval."""

    def wait(self, client: str) -> float:
        """Seconds until the client may try again (0: now)."""
        ...

    def failed(self, client: str) -> float:
        """Counts a failed attempt; past the limit, the seconds to wait instead (0: counted)."""
        ...
