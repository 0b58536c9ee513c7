"""What the auth service layer needs from the outside world, as Protocols.

The SQLAlchemy repositories, the argon2 hasher, the Redis/in-process login limiter and
the key ring implement these; unit tests pass in-memory fakes.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from services.auth_svc.domain import AuditEvent, RefreshToken, User
from shared.data.uow import UnitOfWork

__all__ = [
    "AuditLog",
    "AuthUnitOfWork",
    "EmailTaken",
    "HashingSlot",
    "LoginAttempt",
    "LoginLimiter",
    "LoginObserver",
    "LoginResult",
    "PasswordHasher",
    "RefreshTokenRepository",
    "TokenIssuer",
    "UserRepository",
]


class EmailTaken(Exception):
    """A user with that email exists (raised by UserRepository.add)."""


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


class RefreshTokenRepository(Protocol):
    def add_family(self, family_id: uuid.UUID, user_id: uuid.UUID, when: datetime) -> None: ...

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

    def revoke_user_families(self, user_id: uuid.UUID, when: datetime) -> None: ...


class AuditLog(Protocol):
    def record(self, event: AuditEvent) -> None: ...


class AuthUnitOfWork(UnitOfWork, Protocol):
    """One transaction over the auth repositories (see shared.data.uow.UnitOfWork)."""

    @property
    def users(self) -> UserRepository: ...

    @property
    def refresh_tokens(self) -> RefreshTokenRepository: ...

    @property
    def audit(self) -> AuditLog: ...


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

    def issue_access_token(self, user: User) -> str: ...

    def public_jwks(self) -> list[dict[str, str]]:
        """Every public key that may still verify a live token, as JWK member dicts."""
        ...
