"""Auth business rules: registration, login with lock-out, refresh-token rotation."""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from services.auth_svc.domain import (
    ADMIN,
    USER,
    AuditEvent,
    AuditKind,
    IssuedTokens,
    RefreshToken,
    User,
)
from services.auth_svc.service.admin import (
    MAX_IAT_AHEAD_SECONDS,
    refuse_if_revoked,
    revoke_tokens,
)
from services.auth_svc.service.ports import (
    AuthUnitOfWork,
    EmailTaken,
    HashingSlot,
    LoginAttempt,
    LoginLimiter,
    LoginObserver,
    LoginResult,
    PasswordHasher,
    TokenIssuer,
)
from services.auth_svc.service.validation import (
    display_name_violation,
    email_violation,
    is_refresh_token_shaped,
    login_email_violation,
    normalize_email,
    password_violation,
    presented_password_violation,
)
from shared.config.clock import Clock, utc
from shared.rpc.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from shared.security.tokens import Principal

__all__ = ["AuthPolicy", "AuthService", "hash_refresh_token"]

_audit_log = logging.getLogger("agentplatform.audit")


def hash_refresh_token(token: str) -> str:
    """Refresh tokens carry 256 random bits, so a plain SHA-256 is a safe stored form."""
    return hashlib.sha256(token.encode()).hexdigest()


def _revoked_until(uow: AuthUnitOfWork, user: User, now: datetime) -> int | None:
    """The `iat` a token of the user issued now must carry to outlive a revocation made
    this second (None: now, the issuer's default, is fine)."""
    moment = uow.revocations.latest(str(user.id), now)
    if moment is None:
        return None
    until = moment.timestamp()
    second = math.floor(now.timestamp())
    if until <= second or until > second + MAX_IAT_AHEAD_SECONDS:
        return None  # past; or too far ahead: refused until then (`revoke_tokens` bounds it)
    return math.ceil(until)


def _bad_credentials() -> Unauthenticated:
    return Unauthenticated("invalid email or password", reason="INVALID_CREDENTIALS")


def _bad_refresh_token() -> Unauthenticated:
    return Unauthenticated("invalid refresh token", reason="INVALID_REFRESH_TOKEN")


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    password_min_length: int = 8
    refresh_token_ttl_seconds: int = 30 * 24 * 3600
    refresh_reuse_grace_seconds: float = 5.0


class AuthService:
    """The auth use cases; every dependency arrives through the constructor."""

    def __init__(
        self,
        *,
        uow: Callable[[], AuthUnitOfWork],
        hasher: PasswordHasher,
        limiter: LoginLimiter,
        tokens: TokenIssuer | None,
        clock: Clock,
        policy: AuthPolicy,
        on_login: LoginObserver | None = None,
    ) -> None:
        self._uow = uow
        self._hasher = hasher
        self._limiter = limiter
        self._tokens = tokens
        self._clock = clock
        self._policy = policy
        self._on_login: LoginObserver = on_login or _ignore_login
        # Verified against when the email is unknown, so both paths cost one hash check
        # (through the same queue, with the same limits).
        with hasher.reserve() as slot:
            self._dummy_hash = slot.hash(secrets.token_urlsafe(16))

    # -- accounts ---------------------------------------------------------------------

    def register(
        self, *, email: str, password: str, display_name: str, admin: bool = False
    ) -> User:
        """Creates an account with the role "user" (and "admin" if asked by an operator)."""
        email = normalize_email(email)
        display_name = display_name.strip()
        _check(
            email_violation(email),
            password_violation(password, self._policy.password_min_length),
            display_name_violation(display_name),
        )
        with self._hasher.reserve() as slot:
            password_hash = slot.hash(password)
        now = self._clock.now()
        user = User(
            id=uuid.uuid4(),
            email=email,
            display_name=display_name or email.split("@", 1)[0],
            roles=(USER, ADMIN) if admin else (USER,),
            disabled=False,
            password_hash=password_hash,
            create_time=now,
            update_time=now,
        )
        with self._uow() as uow:
            if uow.users.get_by_email(email) is not None:
                raise _email_taken()
            try:
                uow.users.add(user)
            except EmailTaken:
                raise _email_taken() from None
            kind = AuditKind.ADMIN_CREATED if admin else AuditKind.REGISTERED
            self._audit(uow, kind, user_id=user.id, email=email)
            uow.commit()
        return user

    def current_user(self, *, principal: Principal) -> User:
        """The caller's account."""
        try:
            user_id = uuid.UUID(principal.user_id)
        except ValueError:  # only a token from another issuer could carry such a subject
            raise Unauthenticated("unknown subject", reason="ACCOUNT_INACTIVE") from None
        with self._uow() as uow:
            user = uow.users.get(user_id)
        if user is None or user.disabled:
            raise Unauthenticated("account no longer active", reason="ACCOUNT_INACTIVE")
        return user

    def change_password(
        self, *, principal: Principal, current_password: str, new_password: str
    ) -> None:
        """Checks the current password, stores the new one, revokes every refresh token.

        Like a login, the check runs outside any transaction; the new hash is then stored
        only if the checked one is still there (under the user's row lock, which a login
        creating a session also takes), and every family is revoked in that transaction."""
        _check(
            presented_password_violation(current_password, field="current_password"),
            password_violation(
                new_password, self._policy.password_min_length, field="new_password"
            ),
        )
        with self._hasher.reserve() as slot:
            user = self.current_user(principal=principal)
            attempt = self._check_attempt(user.email)
            with self._given_back_on_error(user.email):
                matches = slot.verify(user.password_hash, current_password)
                new_hash = slot.hash(new_password) if matches else None
        if new_hash is None:
            self._record_failure(
                user.email, user.id, "wrong_current_password", attempt.locks_on_failure
            )
            raise PermissionDenied("current password is wrong", reason="WRONG_PASSWORD")
        with self._given_back_on_error(user.email):
            changed = self._replace_password(user, new_hash, principal)
        if not changed:  # changed by another call since the check: the checked one is old
            self._record_failure(user.email, user.id, "password_changed", attempt.locks_on_failure)
            raise PermissionDenied("current password is wrong", reason="WRONG_PASSWORD")
        self._limiter.reset(user.email)

    def _replace_password(self, user: User, new_hash: str, principal: Principal) -> bool:
        with self._uow() as uow:
            current = uow.users.lock(user.id)
            if current is None or current.disabled:
                raise Unauthenticated("account no longer active", reason="ACCOUNT_INACTIVE")
            now = self._clock.now()
            if not uow.users.replace_password_hash(
                user.id, expected=user.password_hash, new=new_hash, when=now
            ):
                return False
            # As the database says now: a token revoked since (by an earlier change: each
            # revocation within a second pushes the next a second further) changes nothing
            # (raised before the commit: the new hash is not kept).
            refuse_if_revoked(uow, principal, now)
            uow.refresh_tokens.revoke_user_families(user.id, now)
            # The access tokens issued with the old password stop working too.
            lifetime = self._tokens.access_token_ttl_seconds if self._tokens is not None else 0
            revoke_tokens(uow, str(user.id), now, token_lifetime_seconds=lifetime)
            self._audit(uow, AuditKind.PASSWORD_CHANGED, user_id=user.id)
            uow.commit()
        return True

    # -- login and tokens --------------------------------------------------------------

    def login(self, *, email: str, password: str) -> IssuedTokens:
        """Email + password → tokens; the same error for every failure, limited per email.

        The password is checked outside any transaction (argon2 never runs while a
        connection or a lock is held); the session is then created under the user's row
        lock, and only if the hash checked is still the stored one: a password change
        that lands in between ends this login, and one that comes after revokes it."""
        email = normalize_email(email)
        _check(login_email_violation(email), presented_password_violation(password))
        # The hashing place first, before Redis and the database: a flood the hashing
        # queue refuses costs nothing but the refusal, and is not counted.
        with self._hasher.reserve() as slot:
            try:
                attempt = self._check_attempt(email)
            except ResourceExhausted:
                self._on_login("locked")
                raise
            with self._given_back_on_error(email):
                with self._uow() as uow:
                    user = uow.users.get_by_email(email)
                stored_hash = user.password_hash if user else self._dummy_hash
                matches = slot.verify(stored_hash, password)
                good = user is not None and matches and not user.disabled
                rehash = self._rehash(slot, stored_hash, password) if good else None
        if user is None or not matches or user.disabled:
            why = "unknown_email" if user is None else "disabled" if matches else "wrong_password"
            self._record_failure(email, user.id if user else None, why, attempt.locks_on_failure)
            self._on_login("failure")
            raise _bad_credentials()
        with self._given_back_on_error(email):
            issued = self._start_session(user, rehash)
        if isinstance(issued, str):  # the account changed since the check
            self._record_failure(email, user.id, issued, attempt.locks_on_failure)
            self._on_login("failure")
            raise _bad_credentials()
        self._limiter.reset(email)
        self._on_login("success")
        return issued

    def _rehash(self, slot: HashingSlot, stored_hash: str, password: str) -> str | None:
        """A new hash of the checked password if the stored one has outdated parameters."""
        return slot.hash(password) if self._hasher.needs_rehash(stored_hash) else None

    def _start_session(self, checked: User, rehash: str | None) -> IssuedTokens | str:
        """A new refresh family for the user whose password was checked and its tokens,
        or why not (the reason of a failed login). The access token is signed before the
        commit: a replica that cannot sign (UNAVAILABLE) leaves no session behind."""
        with self._uow() as uow:
            user = uow.users.lock(checked.id)
            if user is None:
                return "unknown_email"
            if user.password_hash != checked.password_hash:
                return "password_changed"
            if user.disabled:
                return "disabled"
            now = self._clock.now()
            # Compare-and-set, though the lock makes it certain: the old password can
            # never be stored over a new one.
            if rehash and uow.users.replace_password_hash(
                user.id, expected=checked.password_hash, new=rehash, when=now
            ):
                user = replace(user, password_hash=rehash, update_time=now)
            family = uuid.uuid4()
            uow.refresh_tokens.add_family(family, user.id, now)
            refresh = self._new_refresh_token(uow, family, user.id)
            self._audit(uow, AuditKind.LOGIN_SUCCEEDED, user_id=user.id)
            issued = self._issue(uow, user, refresh)
            uow.commit()
        return issued

    def _check_attempt(self, email: str) -> LoginAttempt:
        attempt = self._limiter.acquire(email)
        if not attempt.allowed:
            raise ResourceExhausted(
                "too many failed attempts; try again later",
                retry_after_seconds=attempt.retry_after_seconds,
                reason="LOGIN_LOCKED",
            )
        return attempt

    @contextmanager
    def _given_back_on_error(self, email: str) -> Iterator[None]:
        """Around the work of a counted attempt that is not yet a judgement of the password:
        if it fails (the database is down, hashing is busy), the attempt is given back, so
        an obedient client retrying through an outage never locks itself out."""
        try:
            yield
        except BaseException:
            self._limiter.release(email)
            raise

    def _record_failure(
        self, email: str, user_id: uuid.UUID | None, why: str, locks: bool = False
    ) -> None:
        with self._uow() as uow:
            self._audit(uow, AuditKind.LOGIN_FAILED, user_id=user_id, email=email, reason=why)
            if locks:
                self._audit(uow, AuditKind.LOCKED_OUT, user_id=user_id, email=email)
            uow.commit()

    def refresh(self, *, refresh_token: str) -> IssuedTokens:
        """A new pair for a live refresh token; reuse after the grace window kills the family."""
        _check_refresh_token(refresh_token)
        token_hash = hash_refresh_token(refresh_token)
        with self._uow() as uow:
            presented = uow.refresh_tokens.get_by_hash(token_hash)
            if presented is None:
                raise _bad_refresh_token()
            # The user's row lock first, as every revocation takes it (then the families):
            # a refresh and a demotion, a disable or a password change serialize, and the
            # token issued here is either covered by the revocation (its moment is read
            # after this commits) or refused (the family revoked before). Locked the other
            # way round the two deadlocked (outside review).
            user = uow.users.lock(presented.user_id)
            family = presented.family_id
            # The family row lock serializes every rotation and revocation of the family.
            if user is None or not uow.refresh_tokens.lock_live_family(family, self._clock.now()):
                raise _bad_refresh_token()
            now = self._clock.now()  # read after the lock: a rotation we waited for is past
            stored = uow.refresh_tokens.get_by_hash(token_hash)
            if stored is None or utc(stored.expire_time) <= now:
                raise _bad_refresh_token()
            if stored.rotated_time is not None:
                since = (now - utc(stored.rotated_time)).total_seconds()
                grace = self._policy.refresh_reuse_grace_seconds
                # A grace of 0 means none: even a reuse in the same instant kills the family.
                if grace <= 0 or since > grace:
                    uow.refresh_tokens.revoke_family(family, now)
                    self._audit(uow, AuditKind.REFRESH_REUSE_DETECTED, user_id=stored.user_id)
                    uow.commit()
                    raise _bad_refresh_token()
            else:
                uow.refresh_tokens.mark_rotated(stored.id, now)
            if user.disabled:
                raise _bad_refresh_token()
            refresh = self._new_refresh_token(uow, family, user.id)
            self._audit(uow, AuditKind.REFRESHED, user_id=user.id)
            # Signed before the commit: if it cannot be, the presented token is not spent.
            issued = self._issue(uow, user, refresh)
            uow.commit()
        return issued

    def logout(self, *, refresh_token: str) -> None:
        """Revokes the token's family; unknown or already revoked tokens are fine."""
        _check_refresh_token(refresh_token)
        with self._uow() as uow:
            token_hash = hash_refresh_token(refresh_token)
            family = uow.refresh_tokens.family_of(token_hash)
            if family is None:
                return
            now = self._clock.now()
            if uow.refresh_tokens.lock_live_family(family, now):
                stored = uow.refresh_tokens.get_by_hash(token_hash)
                uow.refresh_tokens.revoke_family(family, now)
                self._audit(uow, AuditKind.LOGGED_OUT, user_id=stored.user_id if stored else None)
                uow.commit()

    def jwks(self) -> list[dict[str, str]]:
        """The public keys that verify access tokens."""
        return self._tokens.public_jwks() if self._tokens is not None else []

    def _new_refresh_token(self, uow: AuthUnitOfWork, family: uuid.UUID, user_id: uuid.UUID) -> str:
        value = secrets.token_urlsafe(32)
        now = self._clock.now()
        uow.refresh_tokens.add(
            RefreshToken(
                id=uuid.uuid4(),
                family_id=family,
                user_id=user_id,
                token_hash=hash_refresh_token(value),
                create_time=now,
                expire_time=now + timedelta(seconds=self._policy.refresh_token_ttl_seconds),
            )
        )
        return value

    def _issue(self, uow: AuthUnitOfWork, user: User, refresh_token: str) -> IssuedTokens:
        """The user's tokens. The caller holds the user's row lock and read `user` under
        it, as every revocation takes that lock before it reads its clock.

        A revocation refuses the tokens issued before the next whole second (`iat` is in
        whole seconds), so a token issued later in the same second (a login right after
        ChangePassword or RevokeAllSessions) would be refused too: such a token takes the
        revocation's moment as its `iat` instead (`revoke_tokens` makes the next
        revocation reach past it)."""
        if self._tokens is None:
            raise RuntimeError("this AuthService was built to register only: it issues no token")
        issued_at = _revoked_until(uow, user, self._clock.now())
        return IssuedTokens(
            access_token=self._tokens.issue_access_token(user, issued_at=issued_at),
            refresh_token=refresh_token,
            expires_in=self._tokens.access_token_ttl_seconds,
            user=user,
        )

    def _audit(
        self,
        uow: AuthUnitOfWork,
        kind: AuditKind,
        *,
        user_id: uuid.UUID | None = None,
        email: str | None = None,
        **detail: str,
    ) -> None:
        event = AuditEvent(
            kind=kind, time=self._clock.now(), user_id=user_id, email=email, detail=detail
        )
        uow.audit.record(event)
        _audit_log.info(
            "audit %s",
            kind.value,
            extra={
                "audit": {
                    "event": kind.value,
                    "user_id": str(user_id) if user_id else None,
                    "email": email,
                    **detail,
                }
            },
        )


def _check(*violations: FieldViolation | None) -> None:
    """Raises InvalidArgument listing every violation found, if any."""
    found = [v for v in violations if v is not None]
    if found:
        raise InvalidArgument(found)


def _check_refresh_token(refresh_token: str) -> None:
    if not refresh_token:
        raise InvalidArgument.field("refresh_token", "required")
    if not is_refresh_token_shaped(refresh_token):  # never issued: no query for it
        raise _bad_refresh_token()


def _ignore_login(result: LoginResult, /) -> None:
    """The default LoginObserver: nobody is watching."""


def _email_taken() -> AlreadyExists:
    return AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN")
