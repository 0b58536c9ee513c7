"""auth_svc's background jobs on SQLite and PostgreSQL: they delete what has expired and
nothing else, and replicas running them at once do the work once."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from services.auth_svc.domain import USER, AuditEvent, AuditKind, RefreshToken, Revocation, User
from services.auth_svc.jobs import auth_jobs
from services.auth_svc.repository.models import (
    AuditRow,
    LoginAttemptRow,
    RefreshFamilyRow,
    RefreshTokenRow,
    RevocationRow,
    UsedAssertionRow,
)
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from shared.config.clock import utc
from shared.data.jobs import PostgresJobLocks, Worker, job_locks_for
from tests.helpers import FakeClock

NOW = datetime(2031, 6, 1, 12, 0, tzinfo=UTC)


def count(sessions: sessionmaker[Session], row: type) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(row)) or 0)


def seed(sessions: sessionmaker[Session]) -> uuid.UUID:
    """A user with a live session, a session whose only token expired, one expired token in
    the live session; an old and a recent audit event; used assertions, login counts and
    revocations, one expired and one live of each."""
    user = User(uuid.uuid4(), "ada@example.com", "Ada", (USER,), False, "h", NOW, NOW)
    live, dead = uuid.uuid4(), uuid.uuid4()
    with SqlAuthUnitOfWork(sessions) as uow:
        uow.users.add(user)
        for family in (live, dead):
            uow.refresh_tokens.add_family(family, user.id, NOW - timedelta(days=40))
        for family, expire, digest in (
            (live, NOW + timedelta(days=1), "a"),
            (live, NOW - timedelta(days=1), "b"),
            (dead, NOW - timedelta(seconds=1), "c"),
        ):
            uow.refresh_tokens.add(
                RefreshToken(uuid.uuid4(), family, user.id, digest * 64, NOW, expire)
            )
        for age in (400, 10):
            uow.audit.record(
                AuditEvent(AuditKind.LOGIN_SUCCEEDED, NOW - timedelta(days=age), user.id)
            )
        uow.service_accounts.use_assertion("old", NOW - timedelta(seconds=1))
        uow.service_accounts.use_assertion("new", NOW + timedelta(minutes=1))
        for subject, expires in (("gone", NOW - timedelta(1)), ("kept", NOW + timedelta(1))):
            uow.revocations.add(Revocation(subject, NOW, NOW), expire_time=expires)
        uow.commit()
    with sessions.begin() as session:
        session.add_all(
            [
                LoginAttemptRow(key_digest="x" * 64, attempts=3, expire_time=NOW - timedelta(1)),
                LoginAttemptRow(key_digest="y" * 64, attempts=3, expire_time=NOW + timedelta(1)),
            ]
        )
    return live


def test_the_jobs_purge_what_expired_and_keep_the_rest(
    sessions: sessionmaker[Session], engine: Engine
) -> None:
    live = seed(sessions)
    worker = Worker(
        auth_jobs(sessions, clock=FakeClock(NOW), audit_retention_days=365),
        locks=job_locks_for(engine),
        interval_seconds=60,
    )
    seen: dict[str, dict[str, int]] = {}
    for job in worker.jobs:
        seen[job.name] = dict(job.run())
    assert seen == {
        "auth.refresh_tokens.purge": {"tokens_deleted": 2, "sessions_deleted": 1},
        "auth.audit.purge": {"deleted": 1},
        "auth.assertions.purge": {"deleted": 1},
        "auth.login_attempts.purge": {"deleted": 1},
        "auth.revocations.purge": {"deleted": 1},
    }
    with sessions() as session:
        assert session.scalars(select(RefreshFamilyRow.id)).all() == [live]
        assert session.scalars(select(RefreshTokenRow.token_hash)).all() == ["a" * 64]
        assert utc(session.scalars(select(AuditRow.time)).one()) == NOW - timedelta(days=10)
        assert session.scalars(select(UsedAssertionRow.digest)).all() == ["new"]
        assert session.scalars(select(LoginAttemptRow.key_digest)).all() == ["y" * 64]
        assert session.scalars(select(RevocationRow.subject)).all() == ["kept"]
    # Idempotent: a second pass finds nothing.
    assert all(result == "success" for result in worker.run_once().values())
    assert count(sessions, RefreshTokenRow) == 1


def test_retention_zero_keeps_every_audit_event(sessions: sessionmaker[Session]) -> None:
    seed(sessions)
    jobs = {j.name: j for j in auth_jobs(sessions, clock=FakeClock(NOW), audit_retention_days=0)}
    assert dict(jobs["auth.audit.purge"].run()) == {}
    assert count(sessions, AuditRow) == 2


def test_replicas_purging_at_once_delete_each_row_once(
    sessions: sessionmaker[Session],
) -> None:
    seed(sessions)
    jobs = auth_jobs(sessions, clock=FakeClock(NOW), audit_retention_days=365)
    purge = next(j for j in jobs if j.name == "auth.refresh_tokens.purge")
    barrier = threading.Barrier(3)
    results: list[dict[str, int]] = []

    def run() -> None:
        barrier.wait()
        results.append(dict(purge.run()))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r["tokens_deleted"] for r in results) == 2  # no lock taken here: still once
    assert sum(r["sessions_deleted"] for r in results) == 1
    assert count(sessions, RefreshTokenRow) == 1


def test_on_postgresql_one_replica_holds_a_job_and_the_others_skip(postgres_url: str) -> None:
    from shared.data.db import make_engine

    engine = make_engine(postgres_url)
    try:
        first, second = PostgresJobLocks(engine), PostgresJobLocks(engine)
        with first.hold("auth.audit.purge") as got:
            assert got
            with second.hold("auth.audit.purge") as also:
                assert not also
            with second.hold("auth.assertions.purge") as other:
                assert other  # another job's lock is free
        with second.hold("auth.audit.purge") as after:
            assert after  # released when the pass ended
    finally:
        engine.dispose()


def test_on_postgresql_the_session_purge_waits_for_no_lock_a_revocation_holds(
    postgres_url: str,
) -> None:
    """A user's revocation locks their sessions (revoke_user_families) while the purge
    deletes empty sessions of many users: the two locked the same rows in different
    orders and could deadlock (PostgreSQL then aborts one: a revocation failing, or a
    purge pass). The purge now takes only the sessions no one holds: it completes at once,
    and the held one goes at a later pass."""
    from shared.data import migrations
    from shared.data.db import make_engine, session_factory
    from tests.integration.auth.races import DEADLINE, waiting_for_a_lock

    migrations.upgrade("auth", postgres_url)
    engine = make_engine(postgres_url, pool_size=4)
    sessions = session_factory(engine)
    try:
        user = User(uuid.uuid4(), "eve@example.com", "Eve", (USER,), False, "h", NOW, NOW)
        held, free = uuid.uuid4(), uuid.uuid4()
        with SqlAuthUnitOfWork(sessions) as uow:
            uow.users.add(user)
            for family in (held, free):  # empty: their tokens were purged
                uow.refresh_tokens.add_family(family, user.id, NOW - timedelta(days=40))
            uow.commit()
        jobs = auth_jobs(sessions, clock=FakeClock(NOW), audit_retention_days=0)
        purge = next(j for j in jobs if j.name == "auth.refresh_tokens.purge")
        with sessions.begin() as revoking:
            revoking.execute(
                select(RefreshFamilyRow).where(RefreshFamilyRow.id == held).with_for_update()
            )
            done = threading.Event()
            result: list[dict[str, int]] = []

            def purge_pass() -> None:
                result.append(dict(purge.run()))
                done.set()

            thread = threading.Thread(target=purge_pass)
            thread.start()
            finished = done.wait(DEADLINE)
            waited = waiting_for_a_lock(engine)
        thread.join(DEADLINE)
        assert finished, "the purge waited for the revocation's lock"
        assert not waited
        assert result == [{"tokens_deleted": 0, "sessions_deleted": 1}]
        with sessions() as session:
            left = session.scalars(select(RefreshFamilyRow.id)).all()
        assert left == [held]
        assert dict(purge.run()) == {"tokens_deleted": 0, "sessions_deleted": 1}
    finally:
        engine.dispose()
