"""What auth_svc's background jobs delete: each function deletes at most `limit` rows in
the session's transaction and returns how many (shared.data.jobs.purge_in_batches calls
it until a batch comes back short). Conditional deletes: two replicas purging at once
delete each row once."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from services.auth_svc.repository.models import (
    AuditRow,
    LoginAttemptRow,
    RefreshFamilyRow,
    RefreshTokenRow,
    RevocationRow,
    UsedAssertionRow,
)

__all__ = [
    "purge_audit_events",
    "purge_empty_families",
    "purge_expired_refresh_tokens",
    "purge_login_attempts",
    "purge_revocations",
    "purge_used_assertions",
]


def _count(result: object) -> int:
    return int(result.rowcount)  # type: ignore[attr-defined]


def purge_expired_refresh_tokens(session: Session, now: datetime, limit: int) -> int:
    """Refresh tokens past their expiry: no call accepts them any more."""
    ids = select(RefreshTokenRow.id).where(RefreshTokenRow.expire_time < now).limit(limit)
    return _count(session.execute(delete(RefreshTokenRow).where(RefreshTokenRow.id.in_(ids))))


def purge_empty_families(session: Session, now: datetime, limit: int) -> int:
    """Sessions (refresh families) none of whose tokens is left: nothing can use them. A
    family is created with its first token in one transaction, so an empty family is one
    whose tokens were all purged (`now` is not needed; kept for a uniform signature).

    Only the sessions no one holds (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite has one
    writer at a time): the purge never waits for a lock, so it cannot deadlock with a
    user's revocation, which locks that user's sessions in another order; a refresh
    holding its session keeps it (and the token it adds). A session skipped goes at a
    later pass."""
    del now
    empty = (
        select(RefreshFamilyRow.id)
        .where(~exists().where(RefreshTokenRow.family_id == RefreshFamilyRow.id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return _count(session.execute(delete(RefreshFamilyRow).where(RefreshFamilyRow.id.in_(empty))))


def purge_audit_events(session: Session, before: datetime, limit: int) -> int:
    """Audit events older than the retention."""
    ids = select(AuditRow.id).where(AuditRow.time < before).limit(limit)
    return _count(session.execute(delete(AuditRow).where(AuditRow.id.in_(ids))))


def purge_used_assertions(session: Session, now: datetime, limit: int) -> int:
    """Used client-assertion ids whose assertions have expired (a replay fails anyway)."""
    digests = select(UsedAssertionRow.digest).where(UsedAssertionRow.expire_time < now)
    return _count(
        session.execute(
            delete(UsedAssertionRow).where(UsedAssertionRow.digest.in_(digests.limit(limit)))
        )
    )


def purge_login_attempts(session: Session, now: datetime, limit: int) -> int:
    """Failed-login counts of the limiter's database fallback, once they have expired."""
    keys = select(LoginAttemptRow.key_digest).where(LoginAttemptRow.expire_time < now)
    return _count(
        session.execute(
            delete(LoginAttemptRow).where(LoginAttemptRow.key_digest.in_(keys.limit(limit)))
        )
    )


def purge_revocations(session: Session, now: datetime, limit: int) -> int:
    """Revocations no live token can be covered by any more (past their expire_time)."""
    ids = select(RevocationRow.id).where(RevocationRow.expire_time < now).limit(limit)
    return _count(session.execute(delete(RevocationRow).where(RevocationRow.id.in_(ids))))
