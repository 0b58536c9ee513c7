"""The SQLAlchemy repositories on SQLite and PostgreSQL (each test: a fresh database)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from services.auth_svc.domain import (
    ADMIN,
    USER,
    AuditEvent,
    AuditKind,
    RefreshToken,
    Revocation,
    User,
)
from services.auth_svc.infra.limiter import InMemoryLoginLimiter
from services.auth_svc.repository.models import AuditRow, RefreshFamilyRow
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from services.auth_svc.service.auth_service import AuthPolicy, AuthService
from services.auth_svc.service.ports import EmailTaken
from shared.config.clock import SystemClock, utc
from shared.rpc.errors import DomainError
from tests.helpers import FakeClock
from tests.unit.auth.fakes import FakeHasher, key_ring

UowFactory = Callable[[], SqlAuthUnitOfWork]
T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def a_user(email: str = "ada@example.com", **changes: object) -> User:
    fields: dict[str, object] = {
        "id": uuid.uuid4(),
        "email": email,
        "display_name": "Ada",
        "roles": (USER,),
        "disabled": False,
        "password_hash": "hash",
        "create_time": T0,
        "update_time": T0,
    }
    fields.update(changes)
    return User(**fields)  # type: ignore[arg-type]


def add_user(uow: UowFactory, user: User) -> User:
    with uow() as work:
        work.users.add(user)
        work.commit()
    return user


def a_token(family: uuid.UUID, user_id: uuid.UUID, token_hash: str) -> RefreshToken:
    return RefreshToken(
        id=uuid.uuid4(),
        family_id=family,
        user_id=user_id,
        token_hash=token_hash,
        create_time=T0,
        expire_time=T0 + timedelta(days=30),
    )


def add_family(uow: UowFactory, user: User, *hashes: str) -> uuid.UUID:
    family = uuid.uuid4()
    with uow() as work:
        work.refresh_tokens.add_family(family, user.id, T0)
        for token_hash in hashes:
            work.refresh_tokens.add(a_token(family, user.id, token_hash))
        work.commit()
    return family


# -- users ------------------------------------------------------------------------------


def test_a_user_round_trips_with_aware_utc_times(uow: UowFactory) -> None:
    user = add_user(uow, a_user(roles=(USER, ADMIN)))
    with uow() as work:
        by_id = work.users.get(user.id)
        by_email = work.users.get_by_email("ada@example.com")
    assert by_id == user
    assert by_email == user
    assert by_id is not None
    assert by_id.create_time.tzinfo is not None
    assert by_id.create_time == T0  # microseconds kept


def test_unknown_users_are_none(uow: UowFactory) -> None:
    with uow() as work:
        assert work.users.get(uuid.uuid4()) is None
        assert work.users.get_by_email("nobody@example.com") is None


def test_work_that_is_not_committed_is_rolled_back(uow: UowFactory) -> None:
    user = a_user()
    with uow() as work:
        work.users.add(user)
    with uow() as work:
        assert work.users.get(user.id) is None


def test_a_taken_email_is_email_taken_and_the_unit_of_work_goes_on(uow: UowFactory) -> None:
    add_user(uow, a_user())
    other = a_user("grace@example.com")
    with uow() as work:
        with pytest.raises(EmailTaken):
            work.users.add(a_user())
        work.users.add(other)  # the failed insert only rolled back to its savepoint
        work.commit()
    with uow() as work:
        assert work.users.get(other.id) == other


def test_replace_password_hash_changes_hash_and_update_time(uow: UowFactory) -> None:
    user = add_user(uow, a_user())
    later = T0 + timedelta(hours=1)
    with uow() as work:
        assert work.users.replace_password_hash(
            user.id, expected="hash", new="new-hash", when=later
        )
        work.commit()
    with uow() as work:
        stored = work.users.get(user.id)
    assert stored is not None
    assert (stored.password_hash, stored.update_time, stored.create_time) == ("new-hash", later, T0)


def test_replace_password_hash_is_a_compare_and_set(uow: UowFactory) -> None:
    user = add_user(uow, a_user())
    later = T0 + timedelta(hours=1)
    with uow() as work:
        assert not work.users.replace_password_hash(
            user.id, expected="another hash", new="new-hash", when=later
        )
        assert not work.users.replace_password_hash(
            uuid.uuid4(), expected="hash", new="new-hash", when=later
        )
        work.commit()
    with uow() as work:
        assert work.users.get(user.id) == user


def test_lock_reads_the_user_as_stored_now(uow: UowFactory) -> None:
    user = add_user(uow, a_user())
    with uow() as work:
        assert work.users.get(user.id) == user  # now in this session's identity map
        work.users.replace_password_hash(user.id, expected="hash", new="changed", when=T0)
        locked = work.users.lock(user.id)  # not the identity map's stale copy
        assert work.users.lock(uuid.uuid4()) is None
    assert locked is not None
    assert locked.password_hash == "changed"


def test_concurrent_registrations_of_one_email_create_exactly_one_user(
    uow: UowFactory, engine: Engine
) -> None:
    clock = FakeClock()
    service = AuthService(
        uow=uow,
        hasher=FakeHasher(),
        limiter=InMemoryLoginLimiter(max_failures=5, lockout_seconds=60, monotonic=clock.monotonic),
        tokens=key_ring(clock),
        clock=clock,
        policy=AuthPolicy(),
    )
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def register() -> None:
        start.wait(timeout=10)
        try:
            service.register(email="race@example.com", password="password123", display_name="")
            outcomes.append("created")
        except DomainError as error:
            outcomes.append(error.reason)

    threads = [threading.Thread(target=register) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["EMAIL_TAKEN"] * 5 + ["created"]


# -- refresh tokens ---------------------------------------------------------------------


def test_refresh_tokens_are_found_by_hash_and_family(uow: UowFactory) -> None:
    user = add_user(uow, a_user())
    family = add_family(uow, user, "h1", "h2")
    with uow() as work:
        assert work.refresh_tokens.family_of("h1") == family
        assert work.refresh_tokens.family_of("h2") == family
        assert work.refresh_tokens.family_of("nope") is None
        stored = work.refresh_tokens.get_by_hash("h1")
        assert work.refresh_tokens.get_by_hash("nope") is None
    assert stored is not None
    assert (stored.family_id, stored.user_id, stored.rotated_time) == (family, user.id, None)
    assert stored.expire_time == T0 + timedelta(days=30)


def test_a_refresh_token_hash_is_unique(uow: UowFactory) -> None:
    user = add_user(uow, a_user())
    add_family(uow, user, "h1")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        add_family(uow, user, "h1")


def test_rotation_marks_the_used_token(uow: UowFactory) -> None:
    user = add_user(uow, a_user())
    add_family(uow, user, "h1")
    later = T0 + timedelta(seconds=10)
    with uow() as work:
        stored = work.refresh_tokens.get_by_hash("h1")
        assert stored is not None
        work.refresh_tokens.mark_rotated(stored.id, later)
        assert work.refresh_tokens.get_by_hash("h1").rotated_time == later  # type: ignore[union-attr]
        work.commit()
    with uow() as work:
        assert work.refresh_tokens.get_by_hash("h1").rotated_time == later  # type: ignore[union-attr]


def test_a_live_family_can_be_locked_until_it_is_revoked(uow: UowFactory, engine: Engine) -> None:
    user = add_user(uow, a_user())
    family = add_family(uow, user, "h1")
    used = T0 + timedelta(minutes=1)
    with uow() as work:
        assert work.refresh_tokens.lock_live_family(family, used)
        work.commit()
    with uow() as work:
        work.refresh_tokens.revoke_family(family, used)
        work.commit()
    with uow() as work:
        assert not work.refresh_tokens.lock_live_family(family, used)
        assert not work.refresh_tokens.lock_live_family(uuid.uuid4(), used)
    with engine.connect() as connection:
        row = connection.execute(
            select(RefreshFamilyRow.last_used_time, RefreshFamilyRow.revoked_time)
        ).one()
    assert [utc(t) for t in row] == [used, used]


def test_revoking_a_revoked_family_keeps_the_first_time(uow: UowFactory, engine: Engine) -> None:
    user = add_user(uow, a_user())
    family = add_family(uow, user, "h1")
    for moment in (T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)):
        with uow() as work:
            work.refresh_tokens.revoke_family(family, moment)
            work.commit()
    with engine.connect() as connection:
        revoked = connection.execute(select(RefreshFamilyRow.revoked_time)).scalar_one()
    assert revoked is not None
    assert utc(revoked) == T0 + timedelta(minutes=1)


def test_revoking_a_users_families_leaves_other_users_alone(uow: UowFactory) -> None:
    ada = add_user(uow, a_user())
    grace = add_user(uow, a_user("grace@example.com"))
    ada_families = [add_family(uow, ada, "a1"), add_family(uow, ada, "a2")]
    grace_family = add_family(uow, grace, "g1")
    with uow() as work:
        work.refresh_tokens.revoke_user_families(ada.id, T0)
        work.commit()
    with uow() as work:
        assert not any(work.refresh_tokens.lock_live_family(f, T0) for f in ada_families)
        assert work.refresh_tokens.lock_live_family(grace_family, T0)


# -- revocations ------------------------------------------------------------------------


def test_the_latest_revocation_in_force_is_found_per_subject(uow: UowFactory) -> None:
    """What a login in the second of a revocation takes as its token's `iat`."""
    soon, later = T0 + timedelta(seconds=1), T0 + timedelta(seconds=5)
    with uow() as work:
        work.revocations.add(Revocation("ada", soon, T0), expire_time=T0 + timedelta(minutes=10))
        work.revocations.add(Revocation("ada", later, T0), expire_time=T0 + timedelta(minutes=1))
        work.revocations.add(Revocation("grace", T0 + timedelta(hours=1), T0), expire_time=T0)
        work.commit()
    with uow() as work:
        assert work.revocations.latest("ada", T0) == later
        assert work.revocations.latest("ada", T0 + timedelta(minutes=2)) == soon  # one expired
        assert work.revocations.latest("grace", T0) is None  # expired
        assert work.revocations.latest("nobody", T0) is None


# -- audit ------------------------------------------------------------------------------


def test_audit_events_are_stored_as_rows(uow: UowFactory, engine: Engine) -> None:
    user = add_user(uow, a_user())
    with uow() as work:
        work.audit.record(AuditEvent(kind=AuditKind.REGISTERED, time=T0, user_id=user.id))
        work.audit.record(
            AuditEvent(
                kind=AuditKind.LOGIN_FAILED,
                time=T0 + timedelta(seconds=1),
                email="nobody@example.com",
                detail={"reason": "unknown_email"},
            )
        )
        work.commit()
    with engine.connect() as connection:
        rows = connection.execute(
            select(AuditRow.kind, AuditRow.user_id, AuditRow.email, AuditRow.detail).order_by(
                AuditRow.time
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("register", user.id, None, {}),
        ("login_failed", None, "nobody@example.com", {"reason": "unknown_email"}),
    ]


def test_the_service_audits_into_the_table(uow: UowFactory, engine: Engine) -> None:
    clock = SystemClock()
    service = AuthService(
        uow=uow,
        hasher=FakeHasher(),
        limiter=InMemoryLoginLimiter(max_failures=5, lockout_seconds=60, monotonic=clock.monotonic),
        tokens=key_ring(FakeClock()),
        clock=clock,
        policy=AuthPolicy(),
    )
    service.register(email="ada@example.com", password="password123", display_name="")
    issued = service.login(email="ada@example.com", password="password123")
    service.logout(refresh_token=issued.refresh_token)
    with engine.connect() as connection:
        kinds = connection.execute(select(AuditRow.kind).order_by(AuditRow.time)).scalars().all()
        details = " ".join(str(d) for d in connection.execute(select(AuditRow.detail)).scalars())
    assert kinds == ["register", "login_succeeded", "logout"]
    assert "password123" not in details
    assert issued.refresh_token not in details
