"""The failed-login limit while Redis is down: counted in auth_svc's own table, shared by
every replica (SQLite and PostgreSQL), and the composition root that chains the tiers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Engine, select

from services.auth_svc.bootstrap import AuthApp, build_app
from services.auth_svc.infra.limiter import InMemoryLoginLimiter, SqlLoginLimiter, key_digest
from services.auth_svc.repository.models import LoginAttemptRow
from services.auth_svc.service.ports import LoginAttempt
from services.auth_svc.settings import load_auth_settings
from shared.data.db import make_engine
from shared.rpc.errors import DomainError
from tests.helpers import FakeClock
from tests.integration.auth.limits import parallel_attempts
from tests.unit.auth.fakes import FakeHasher

EMAIL = "ada@example.com"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
UNREACHABLE_POSTGRES = "postgresql://postgres@127.0.0.1:1/none"


def on(engine: Engine, clock: FakeClock, limit: int = 3, lockout: float = 60) -> SqlLoginLimiter:
    return SqlLoginLimiter(
        engine,
        max_failures=limit,
        lockout_seconds=lockout,
        clock=clock,
        fallback=InMemoryLoginLimiter(
            max_failures=limit, lockout_seconds=lockout, monotonic=clock.monotonic
        ),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def rows(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        query = select(LoginAttemptRow.key_digest, LoginAttemptRow.attempts)
        return [tuple(row) for row in connection.execute(query)]  # type: ignore[misc]


def test_attempts_up_to_the_limit_are_allowed_and_the_last_one_is_flagged(
    engine: Engine, clock: FakeClock
) -> None:
    limits = on(engine, clock)
    attempts = [limits.acquire(EMAIL) for _ in range(4)]
    assert attempts == [
        LoginAttempt(allowed=True),
        LoginAttempt(allowed=True),
        LoginAttempt(allowed=True, locks_on_failure=True),
        LoginAttempt(allowed=False, retry_after_seconds=pytest.approx(60)),  # type: ignore[arg-type]
    ]
    assert rows(engine) == [(key_digest(EMAIL).hex(), 3)]  # the table never holds the email


def test_the_cool_down_counts_down_and_ends(engine: Engine, clock: FakeClock) -> None:
    limits = on(engine, clock)
    for _ in range(3):
        limits.acquire(EMAIL)
    clock.advance(45)
    assert limits.acquire(EMAIL).retry_after_seconds == pytest.approx(15)
    clock.advance(15)
    assert limits.acquire(EMAIL) == LoginAttempt(allowed=True)  # counted anew from 1


def test_release_and_reset(engine: Engine, clock: FakeClock) -> None:
    limits = on(engine, clock, limit=2)
    limits.release(EMAIL)  # nothing counted: nothing happens
    limits.acquire(EMAIL)
    limits.acquire(EMAIL)
    assert not limits.acquire(EMAIL).allowed
    limits.release(EMAIL)
    assert limits.acquire(EMAIL) == LoginAttempt(allowed=True, locks_on_failure=True)
    for _ in range(5):
        limits.release(EMAIL)
    assert rows(engine) == [(key_digest(EMAIL).hex(), 0)]  # never below zero
    limits.reset(EMAIL)
    assert rows(engine) == []
    assert limits.acquire("grace@example.com").allowed  # keys are independent


def test_expired_rows_are_purged(engine: Engine, clock: FakeClock) -> None:
    limits = on(engine, clock, lockout=60)
    for n in range(5):
        limits.acquire(f"old-{n}@example.com")
    clock.advance(120)
    limits.acquire(EMAIL)
    assert rows(engine) == [(key_digest(EMAIL).hex(), 1)]


def test_fifty_parallel_attempts_against_a_limit_of_ten_allow_exactly_ten(
    engine: Engine, clock: FakeClock
) -> None:
    attempts = parallel_attempts(on(engine, clock, limit=10), EMAIL)
    assert sum(a.allowed for a in attempts) == 10
    assert sum(a.locks_on_failure for a in attempts) == 1


def test_an_unreachable_database_falls_back_to_the_in_process_limit(clock: FakeClock) -> None:
    engine = make_engine(UNREACHABLE_POSTGRES, pool_size=1)
    try:
        limits = on(engine, clock, limit=2)
        assert [limits.acquire(EMAIL).allowed for _ in range(3)] == [True, True, False]
        limits.release(EMAIL)  # no error either
        assert limits.acquire(EMAIL).allowed
        limits.reset(EMAIL)
        assert limits.acquire(EMAIL).allowed
    finally:
        engine.dispose()


# -- the composition root: two replicas, one database, Redis down ----------------------


@pytest.fixture
def replicas(migrated_url: str, tmp_path: Path) -> Iterator[list[AuthApp]]:
    env = {
        "AUTH_DATABASE_URL": migrated_url,
        "AUTH_REDIS_URL": UNREACHABLE_REDIS,
        "AUTH_DATA_DIR": str(tmp_path / "data"),  # one dev key for both
        "AUTH_METRICS_PORT": "0",
        "AUTH_DB_POOL_SIZE": "3",
        "AUTH_LOGIN_MAX_FAILURES": "5",
        "AUTH_MIGRATE_ON_START": "false",
    }
    apps = [build_app(load_auth_settings(env), hasher=FakeHasher()) for _ in range(2)]
    yield apps
    for app in apps:
        app.close()


def test_two_replicas_with_redis_down_together_allow_exactly_the_limit(
    replicas: list[AuthApp],
) -> None:
    first, second = (app.service for app in replicas)
    first.register(email=EMAIL, password="the right password", display_name="")
    outcomes = []
    for n in range(12):  # alternating replicas, as a load balancer would
        service = (first, second)[n % 2]
        with pytest.raises(DomainError) as excinfo:
            service.login(email=EMAIL, password="a wrong password")
        outcomes.append((excinfo.value.code, excinfo.value.reason))
    assert (
        outcomes
        == [(grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")] * 5
        + [(grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_LOCKED")] * 7
    )
    for service in (first, second):  # even the right password waits for the cool-down
        with pytest.raises(DomainError) as excinfo:
            service.login(email=EMAIL, password="the right password")
        assert excinfo.value.reason == "LOGIN_LOCKED"
