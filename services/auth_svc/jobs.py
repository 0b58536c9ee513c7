"""auth_svc's background jobs (shared.data.jobs): what piles up, purged in batches.

auth.refresh_tokens.purge    expired refresh tokens, then sessions left without one
auth.audit.purge             audit events older than AUTH_AUDIT_RETENTION_DAYS (0: kept)
auth.assertions.purge        used client-assertion ids whose assertions have expired
auth.login_attempts.purge    expired failed-login counts of the limiter's fallback
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.auth_svc.infra.keystore import KeyEncryption, KeyFactory
from services.auth_svc.repository.purge import (
    purge_audit_events,
    purge_empty_families,
    purge_expired_refresh_tokens,
    purge_login_attempts,
    purge_revocations,
    purge_used_assertions,
)
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from services.auth_svc.service.signing_keys import SigningKeyAdmin
from services.auth_svc.settings import AuthSettings, load_or_create_dev_kek
from shared.config.clock import Clock, SystemClock
from shared.data.db import session_factory
from shared.data.jobs import Job, Worker, purge_in_batches
from shared.rpc.observability import Observability
from shared.rpc.worker import make_worker, worker_process

__all__ = ["auth_jobs", "build_worker"]

Purge = Callable[[Session, datetime, int], int]


def _batches(sessions: sessionmaker[Session], purge: Purge, cutoff: datetime) -> int:
    def one_batch(limit: int) -> int:
        with sessions.begin() as session:
            return purge(session, cutoff, limit)

    return purge_in_batches(one_batch)


def auth_jobs(
    sessions: sessionmaker[Session],
    *,
    clock: Clock,
    audit_retention_days: int,
    signing_keys: SigningKeyAdmin | None = None,
) -> list[Job]:
    def refresh_tokens() -> dict[str, int]:
        now = clock.now()
        return {
            "tokens_deleted": _batches(sessions, purge_expired_refresh_tokens, now),
            "sessions_deleted": _batches(sessions, purge_empty_families, now),
        }

    def audit() -> dict[str, int]:
        if audit_retention_days <= 0:
            return {}
        before = clock.now() - timedelta(days=audit_retention_days)
        return {"deleted": _batches(sessions, purge_audit_events, before)}

    def assertions() -> dict[str, int]:
        return {"deleted": _batches(sessions, purge_used_assertions, clock.now())}

    def login_attempts() -> dict[str, int]:
        return {"deleted": _batches(sessions, purge_login_attempts, clock.now())}

    def revocations() -> dict[str, int]:
        return {"deleted": _batches(sessions, purge_revocations, clock.now())}

    return [
        Job("auth.refresh_tokens.purge", refresh_tokens),
        Job("auth.audit.purge", audit),
        Job("auth.assertions.purge", assertions),
        Job("auth.login_attempts.purge", login_attempts),
        Job("auth.revocations.purge", revocations),
        *(
            [Job("auth.signing_keys.maintain", signing_keys.maintain)]
            if signing_keys is not None
            else []
        ),
    ]


def worker_for(
    settings: AuthSettings, engine: Engine, observability: Observability, clock: Clock
) -> Worker:
    sessions = session_factory(engine)
    keks = settings.key_encryption_keys or load_or_create_dev_kek(settings.common.data_dir)
    signing_keys = SigningKeyAdmin(
        uow=lambda: SqlAuthUnitOfWork(sessions),
        keys=KeyFactory(KeyEncryption(keks)),
        reload=lambda: None,  # the servers reload on their own within seconds
        clock=clock,
        publish_ahead_seconds=settings.key_publish_ahead_seconds,
        token_lifetime_seconds=settings.access_token_ttl_seconds,
        rotation_days=settings.key_rotation_days,
    )
    jobs = auth_jobs(
        sessions,
        clock=clock,
        audit_retention_days=settings.audit_retention_days,
        signing_keys=signing_keys,
    )
    return make_worker(jobs, engine=engine, settings=settings.common, observability=observability)


def build_worker(settings: AuthSettings) -> tuple[Worker, Observability]:
    """`python -m services.auth_svc worker`: the jobs on their own engine and metrics."""
    return worker_process(
        settings.common,
        lambda engine, observability: worker_for(settings, engine, observability, SystemClock()),
    )
