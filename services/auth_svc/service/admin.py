"""Operators' controls: users, sessions, the audit trail, and token revocations.

Revocations make a change take effect beyond the refresh tokens: disabling a user,
removing one of their roles, logging them out everywhere, a password change and deleting
a service account each record a `Revocation` — the access tokens of that subject issued
before the next whole second are refused. agent_svc polls them (`GetRevocations`) and
checks every token against them, remembered ones included, so a revoked token stops
working there within its poll interval instead of living out its 15 minutes. A
revocation is kept until no token it covers can still be live (not_before + the access
token lifetime + a minute of leeway), then the worker purges it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from services.auth_svc.domain import (
    ADMIN,
    KNOWN_ROLES,
    USER,
    AuditEvent,
    AuditKind,
    Revocation,
    Session,
    User,
)
from services.auth_svc.service.ports import AuthUnitOfWork, LoginLimiter
from shared.config.clock import Clock
from shared.config.text import line_problem
from shared.rpc.errors import (
    Aborted,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from shared.security.tokens import Principal

__all__ = [
    "REVOCATIONS_PER_REPLY",
    "AuditReader",
    "RevocationFeed",
    "Sessions",
    "UserAdmin",
    "actor_of",
    "decode_cursor",
    "encode_cursor",
    "etag_of",
    "page_size_of",
    "parse_uuid",
    "require_admin",
    "revoke_tokens",
]

DEFAULT_PAGE_SIZE = 50
# Revocations in one GetRevocations reply (a reply that leaves some out says so).
REVOCATIONS_PER_REPLY = 10_000
MAX_PAGE_SIZE = 1000
MAX_DISPLAY_NAME = 128
REVOCATION_LEEWAY = timedelta(minutes=1)
# How far past the whole second it is issued in a token's `iat` may be set to outlive a
# revocation made in that second (`AuthService._issue`); a moment further ahead (another
# replica's clock ahead, a burst of revocations) leaves the token at its own time.
MAX_IAT_AHEAD_SECONDS = 5
UPDATABLE = frozenset({"display_name", "roles"})


# -- shared pieces ---------------------------------------------------------------------------


def actor_of(principal: Principal) -> tuple[str, str | None]:
    """Who acts (`users/<id>` or `serviceAccounts/<id>`) and through whom (a delegate)."""
    kind = "serviceAccounts" if principal.is_service_account else "users"
    via = f"serviceAccounts/{principal.actor}" if principal.actor else None
    return f"{kind}/{principal.user_id}", via


def etag_of(user: User) -> str:
    """Changes whenever the user does (every change sets update_time)."""
    micros = int(user.update_time.timestamp() * 1_000_000)
    return f"{micros:x}"


def refuse_if_revoked(uow: AuthUnitOfWork, principal: Principal, now: datetime) -> None:
    """TOKEN_REVOKED if a revocation in the database covers the caller's token (before
    any verifier's poll has it): the user's, or the delegating account's (as the
    verifiers judge a delegated token)."""
    subjects = (principal.user_id, principal.actor) if principal.actor else (principal.user_id,)
    if any(uow.revocations.covers(s, principal.issued_at, now) for s in subjects):
        raise Unauthenticated("the access token was revoked", reason="TOKEN_REVOKED")


def revoke_tokens(
    uow: AuthUnitOfWork,
    subject: str,
    now: datetime,
    *,
    token_lifetime_seconds: int,
    forever: bool = False,
) -> None:
    """Refuses the subject's access tokens issued before the next whole second (tokens
    carry `iat` in whole seconds: one issued earlier in this second is refused too).

    A token issued after a revocation within its second carries the revocation's moment
    as its `iat` (`AuthService._issue`), so a second revocation of the subject within that
    second must reach past it: its moment is one second after the latest in force when
    that one is not already past. The callers hold the user's row lock (a login takes it
    too), so two revocations and a login of one user are serialized. `forever`: every
    token the subject may hold, also one issued while this commits (a deleted account)."""
    not_before = datetime.fromtimestamp(math.floor(now.timestamp()) + 1, UTC)
    if forever:  # a subject that gets no token again (a deleted account): every one it has
        not_before += timedelta(seconds=token_lifetime_seconds)
    latest = uow.revocations.latest(subject, now)
    if latest is not None and latest >= not_before:
        # Past every `iat` handed out since: each is at most `latest` and at most
        # MAX_IAT_AHEAD_SECONDS past its whole second (`AuthService._issue`). The second
        # bound keeps a burst of revocations (an administrator's loop) from pushing the
        # moment on without end: the user's logins are refused for at most that long.
        cap = math.floor(now.timestamp()) + MAX_IAT_AHEAD_SECONDS + 1
        not_before = min(latest + timedelta(seconds=1), datetime.fromtimestamp(cap, UTC))
    uow.revocations.add(
        Revocation(subject, not_before, now),
        expire_time=not_before + timedelta(seconds=token_lifetime_seconds) + REVOCATION_LEEWAY,
    )


def parse_uuid(text: str, field: str) -> uuid.UUID:
    if not text:
        raise InvalidArgument.field(field, "required")
    try:
        if len(text) > 45:
            raise ValueError
        return uuid.UUID(text)
    except ValueError:
        raise InvalidArgument.field(field, "must be a UUID") from None


def page_size_of(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_cursor(moment: datetime, ident: uuid.UUID, bound: str) -> str:
    payload = json.dumps([moment.isoformat(), str(ident), bound]).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_cursor(token: str, bound: str) -> tuple[datetime, uuid.UUID]:
    """The cursor of a page token made for the same query (`bound`); else INVALID_ARGUMENT."""
    try:
        if len(token) > 1000:
            raise ValueError
        moment, ident, binding = json.loads(
            base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        )
        if binding != bound:
            raise ValueError
        when = datetime.fromisoformat(moment)
        if when.tzinfo is None:
            raise ValueError
        return when, uuid.UUID(ident)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidArgument.field(
            "page_token", "not a page token of this query (pass next_page_token back unchanged)"
        ) from None


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin or principal.actor or principal.is_service_account:
        raise PermissionDenied("this is for administrators", reason="ADMIN_REQUIRED")


def require_admin(principal: Principal, uow: Callable[[], AuthUnitOfWork], clock: Clock) -> None:
    """An administrator acting for themselves — as the database says now, not only as the
    token says: a token revoked since (TOKEN_REVOKED), or of a user disabled or demoted
    since (ADMIN_REQUIRED), is refused here at once, before any verifier polls."""
    _require_admin(principal)
    with uow() as work:
        user = work.users.get(principal.subject) if principal.subject is not None else None
        refuse_if_revoked(work, principal, clock.now())
    if user is None or user.disabled or ADMIN not in user.roles:
        raise PermissionDenied("this is for administrators", reason="ADMIN_REQUIRED")


def _user_not_found() -> NotFound:
    return NotFound("no such user", reason="USER_NOT_FOUND")


class _Audited:
    def __init__(self, uow: Callable[[], AuthUnitOfWork], clock: Clock) -> None:
        self._uow = uow
        self._clock = clock

    def _audit(
        self,
        uow: AuthUnitOfWork,
        kind: AuditKind,
        principal: Principal,
        user: User | None,
        **detail: str,
    ) -> None:
        actor, via = actor_of(principal)
        uow.audit.record(
            AuditEvent(
                kind=kind,
                time=self._clock.now(),
                user_id=user.id if user else None,
                email=user.email if user else None,
                detail=detail,
                actor=actor,
                actor_via=via,
            )
        )


# -- users -----------------------------------------------------------------------------------


class UserAdmin(_Audited):
    """Listing, reading, changing, disabling and unlocking users (administrators only)."""

    def __init__(
        self,
        *,
        uow: Callable[[], AuthUnitOfWork],
        limiter: LoginLimiter,
        clock: Clock,
        token_lifetime_seconds: int,
    ) -> None:
        super().__init__(uow, clock)
        self._limiter = limiter
        self._lifetime = token_lifetime_seconds

    def list(
        self,
        *,
        principal: Principal,
        page_size: int,
        page_token: str,
        email_prefix: str = "",
        role: str = "",
        disabled: bool | None = None,
    ) -> tuple[list[User], str]:
        require_admin(principal, self._uow, self._clock)
        size = page_size_of(page_size)
        prefix = email_prefix.strip().lower()
        if len(prefix) > 254:
            raise InvalidArgument.field("email_prefix", "at most 254 characters")
        if prefix and (problem := line_problem(prefix)):  # NUL would fail in PostgreSQL
            raise InvalidArgument.field("email_prefix", problem)
        if role and role not in KNOWN_ROLES:
            raise InvalidArgument.field("role", f"one of {', '.join(sorted(KNOWN_ROLES))}")
        bound = json.dumps([prefix, role, disabled])
        after = decode_cursor(page_token, bound) if page_token else None
        with self._uow() as uow:
            users = uow.users.page(
                email_prefix=prefix, role=role, disabled=disabled, after=after, limit=size + 1
            )
        if len(users) > size:
            last = users[size - 1]
            return users[:size], encode_cursor(last.create_time, last.id, bound)
        return users, ""

    def get(self, *, principal: Principal, user_id: str) -> User:
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(user_id, "id")
        with self._uow() as uow:
            user = uow.users.get(ident)
        if user is None:
            raise _user_not_found()
        return user

    def update(
        self,
        *,
        principal: Principal,
        user_id: str,
        etag: str,
        paths: Sequence[str],
        display_name: str,
        roles: Sequence[str],
    ) -> User:
        """Changes the named fields; removing a role revokes the user's sessions and tokens."""
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(user_id, "user.id")
        problems: list[FieldViolation] = []
        if not paths:
            problems.append(FieldViolation("update_mask", "name at least one field"))
        unknown = sorted(set(paths) - UPDATABLE)
        if unknown:
            problems.append(FieldViolation("update_mask", f"cannot update {', '.join(unknown)}"))
        name = display_name.strip()
        if "display_name" in paths:
            problem = (
                "required"
                if not name
                else f"at most {MAX_DISPLAY_NAME} characters"
                if len(name) > MAX_DISPLAY_NAME
                else line_problem(name)
            )
            if problem:
                problems.append(FieldViolation("user.display_name", problem))
        wanted = tuple(dict.fromkeys(roles))
        if "roles" in paths:
            if set(wanted) - KNOWN_ROLES:
                problems.append(
                    FieldViolation("user.roles", f"known roles: {', '.join(sorted(KNOWN_ROLES))}")
                )
            elif USER not in wanted:
                problems.append(FieldViolation("user.roles", 'must include "user"'))
        if problems:
            raise InvalidArgument(problems)
        with self._uow() as uow:
            user = uow.users.lock(ident)
            if user is None:
                raise _user_not_found()
            if etag and etag != etag_of(user):
                raise Aborted(
                    "the user changed since it was read; read it again", reason="ETAG_MISMATCH"
                )
            if "roles" in paths and user.id == principal.subject and ADMIN not in wanted:
                raise InvalidArgument.field(
                    "user.roles", "an administrator cannot remove their own admin role"
                )
            now = self._clock.now()
            changed = replace(
                user,
                display_name=name if "display_name" in paths else user.display_name,
                roles=tuple(r for r in (USER, ADMIN) if r in wanted)
                if "roles" in paths
                else user.roles,
            )
            if changed == user:
                return user
            changed = replace(changed, update_time=now)
            uow.users.save(changed)
            removed = set(user.roles) - set(changed.roles)
            if removed:  # tokens carry the roles: the old ones must stop working
                uow.refresh_tokens.revoke_user_families(user.id, now)
                revoke_tokens(uow, str(user.id), now, token_lifetime_seconds=self._lifetime)
            self._audit(
                uow,
                AuditKind.USER_UPDATED,
                principal,
                changed,
                fields=",".join(sorted(paths)),
                roles=",".join(changed.roles),
            )
            uow.commit()
        return changed

    def set_disabled(self, *, principal: Principal, user_id: str, disabled: bool) -> User:
        """Disables (ending every session and token) or enables a user; idempotent."""
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(user_id, "id")
        if disabled and ident == principal.subject:
            raise InvalidArgument.field("id", "an administrator cannot disable themselves")
        with self._uow() as uow:
            user = uow.users.lock(ident)
            if user is None:
                raise _user_not_found()
            if user.disabled == disabled:
                return user
            now = self._clock.now()
            changed = replace(user, disabled=disabled, update_time=now)
            uow.users.save(changed)
            if disabled:
                uow.refresh_tokens.revoke_user_families(user.id, now)
                revoke_tokens(uow, str(user.id), now, token_lifetime_seconds=self._lifetime)
            kind = AuditKind.USER_DISABLED if disabled else AuditKind.USER_ENABLED
            self._audit(uow, kind, principal, changed)
            uow.commit()
        return changed

    def unlock(self, *, principal: Principal, user_id: str) -> None:
        """Forgets the user's failed logins: the lock-out (if any) ends now."""
        user = self.get(principal=principal, user_id=user_id)
        self._limiter.reset(user.email)
        with self._uow() as uow:
            self._audit(uow, AuditKind.USER_UNLOCKED, principal, user)
            uow.commit()


# -- sessions --------------------------------------------------------------------------------


class Sessions(_Audited):
    """A user's sessions: their own, or anyone's for an administrator."""

    def __init__(
        self, *, uow: Callable[[], AuthUnitOfWork], clock: Clock, token_lifetime_seconds: int
    ) -> None:
        super().__init__(uow, clock)
        self._lifetime = token_lifetime_seconds

    def _whose(self, principal: Principal, user_id: str) -> uuid.UUID:
        if not user_id or (principal.subject is not None and user_id == principal.user_id):
            if principal.subject is None or principal.is_service_account:
                raise PermissionDenied("only users have sessions", reason="CALLER_NOT_A_USER")
            return principal.subject
        require_admin(principal, self._uow, self._clock)
        return parse_uuid(user_id, "user_id")

    def _is_admin(self, principal: Principal) -> bool:
        try:
            require_admin(principal, self._uow, self._clock)
        except (PermissionDenied, Unauthenticated):
            return False
        return True

    def list(
        self, *, principal: Principal, user_id: str, page_size: int, page_token: str
    ) -> tuple[list[Session], str]:
        whose = self._whose(principal, user_id)
        size = page_size_of(page_size)
        bound = str(whose)
        before = decode_cursor(page_token, bound) if page_token else None
        with self._uow() as uow:
            sessions = uow.refresh_tokens.live_sessions(whose, before=before, limit=size + 1)
        if len(sessions) > size:
            last = sessions[size - 1]
            return sessions[:size], encode_cursor(last.create_time, last.id, bound)
        return sessions, ""

    def revoke(self, *, principal: Principal, session_id: str) -> None:
        ident = parse_uuid(session_id, "id")
        with self._uow() as uow:
            session = uow.refresh_tokens.live_session(ident)
        mine = session is not None and session.user_id == principal.subject
        # (The administrator check reads the database itself: outside the unit of work.)
        if session is None or not (mine or self._is_admin(principal)):
            # Someone else's session is NOT_FOUND, as one that does not exist.
            raise NotFound("no such session", reason="SESSION_NOT_FOUND")
        with self._uow() as uow:
            now = self._clock.now()
            uow.refresh_tokens.revoke_family(ident, now)
            user = uow.users.get(session.user_id)
            self._audit(uow, AuditKind.SESSION_REVOKED, principal, user, session_id=str(ident))
            uow.commit()

    def revoke_all(self, *, principal: Principal, user_id: str) -> int:
        """Ends every session of the user and refuses their access tokens; how many ended."""
        whose = self._whose(principal, user_id)
        with self._uow() as uow:
            user = uow.users.lock(whose)  # serialized with logins (`revoke_tokens`)
            if user is None:
                raise _user_not_found()
            now = self._clock.now()
            if whose == principal.subject:
                # As the database says now: each revocation of a user within a second
                # pushes the next one's moment a second further (`revoke_tokens`), so one
                # token revoking again and again would keep the user's new logins refused
                # (an outside review locked a user out for 48 s with a burst).
                refuse_if_revoked(uow, principal, now)
            count = uow.refresh_tokens.revoke_user_families(whose, now)
            revoke_tokens(uow, str(whose), now, token_lifetime_seconds=self._lifetime)
            self._audit(uow, AuditKind.SESSIONS_REVOKED, principal, user, count=str(count))
            uow.commit()
        return count


# -- the audit trail and the revocation feed -------------------------------------------------


class AuditReader:
    """The audit trail, newest first (administrators only)."""

    def __init__(self, *, uow: Callable[[], AuthUnitOfWork], clock: Clock) -> None:
        self._uow = uow
        self._clock = clock

    def list(
        self,
        *,
        principal: Principal,
        user_id: str,
        kind: str,
        start: datetime | None,
        end: datetime | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[AuditEvent], str]:
        require_admin(principal, self._uow, self._clock)
        size = page_size_of(page_size)
        whose = parse_uuid(user_id, "user_id") if user_id else None
        if kind and kind not in {k.value for k in AuditKind}:
            raise InvalidArgument.field("kind", "not an audit event kind")
        if start and end and end <= start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        bound = json.dumps(
            [user_id, kind, start.isoformat() if start else "", end.isoformat() if end else ""]
        )
        before = decode_cursor(page_token, bound) if page_token else None
        with self._uow() as uow:
            events = uow.audit.page(
                user_id=whose, kind=kind, start=start, end=end, before=before, limit=size + 1
            )
        if len(events) > size:
            last = events[size - 1]
            assert last.id is not None
            return events[:size], encode_cursor(last.time, last.id, bound)
        return events, ""


class RevocationFeed:
    """What verifiers poll: the revocations still in force recorded since a moment, and the
    signing keys revoked lately."""

    def __init__(
        self,
        *,
        uow: Callable[[], AuthUnitOfWork],
        clock: Clock,
        revoked_kids: Callable[[], list[str]] | None = None,
        on_revoked_kids: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._uow = uow
        self._clock = clock
        self._revoked_kids = revoked_kids or list
        self._on_revoked_kids = on_revoked_kids

    def since(
        self, when: datetime | None, *, limit: int = REVOCATIONS_PER_REPLY
    ) -> tuple[list[Revocation], datetime, bool]:
        """Up to `limit` revocations recorded at or after `when` (oldest first), this
        replica's clock, and whether more were left out: the caller asks again from the
        last one's create_time before it moves on to the clock."""
        now = self._clock.now()
        with self._uow() as uow:
            found = uow.revocations.since(when, now=now, limit=limit + 1)
        return found[:limit], now, len(found) > limit

    def revoked_kids(self) -> list[str]:
        kids = self._revoked_kids()
        if kids and self._on_revoked_kids is not None:
            self._on_revoked_kids(kids)  # this replica drops them too, before it answers
        return kids
