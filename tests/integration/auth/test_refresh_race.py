"""Two refreshes of one token at the same moment, on a real database.

What is asserted, precisely: the family row lock serializes the two transactions, so the
second one always sees the first one's rotation. Hence the used token is marked rotated
exactly once, and the second call is judged by the reuse policy as if it came later:
- grace 0: exactly one call gets a new pair; the other is UNAUTHENTICATED and revokes the
  family, so the winner's new refresh token is dead too (no live child survives);
- grace 60 s: both get a new pair (a reuse within grace), the family stays live with
  exactly two children, and no reuse is reported.
Without the lock both transactions would read "not rotated yet", both would rotate, and
with grace 0 two live children would exist: the failure these tests look for.

On PostgreSQL both transactions are made to read the family before either locks it (a
barrier after the lookup), so they really contend for the row lock. SQLite takes its
write lock at BEGIN, where such a barrier would deadlock; there the race runs unforced.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from services.auth_svc.domain import AuditKind, RefreshToken
from services.auth_svc.infra.limiter import InMemoryLoginLimiter
from services.auth_svc.repository.models import AuditRow, RefreshFamilyRow, RefreshTokenRow
from services.auth_svc.repository.sql import SqlAuthUnitOfWork, SqlRefreshTokenRepository
from services.auth_svc.service.auth_service import AuthPolicy, AuthService
from shared.config.clock import SystemClock
from shared.data import migrations
from shared.data.db import make_engine, session_factory
from shared.rpc.errors import DomainError
from tests.helpers import FakeClock
from tests.unit.auth.fakes import FakeHasher, key_ring

ROUNDS = 5
EMAIL = "racer@example.com"
PASSWORD = "password123"


@dataclass
class Instruments:
    """Shared by every unit of work of one service: where the race is forced and counted."""

    barrier: threading.Barrier | None = None
    rotations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _InstrumentedTokens(SqlRefreshTokenRepository):
    def __init__(self, session: Session, instruments: Instruments) -> None:
        super().__init__(session)
        self._instruments = instruments
        self._looked = False

    def get_by_hash(self, token_hash: str) -> RefreshToken | None:
        token = super().get_by_hash(token_hash)
        if self._instruments.barrier is not None and not self._looked:
            self._looked = True  # the refresh's first lookup, before it takes any lock
            self._instruments.barrier.wait(timeout=10)  # both have looked; now both lock
        return token

    def mark_rotated(self, token_id: uuid.UUID, when: object) -> None:
        with self._instruments.lock:
            self._instruments.rotations += 1
        super().mark_rotated(token_id, when)  # type: ignore[arg-type]


def instrumented_uow(
    sessions: sessionmaker[Session], instruments: Instruments
) -> Callable[[], SqlAuthUnitOfWork]:
    class _Uow(SqlAuthUnitOfWork):
        def _open_repositories(self, session: Session) -> None:
            super()._open_repositories(session)
            self.refresh_tokens = _InstrumentedTokens(session, instruments)

    return lambda: _Uow(sessions)


def service_on(engine: Engine, instruments: Instruments, grace: float) -> AuthService:
    clock = SystemClock()
    return AuthService(
        uow=instrumented_uow(session_factory(engine), instruments),
        hasher=FakeHasher(),
        limiter=InMemoryLoginLimiter(
            max_failures=100, lockout_seconds=60, monotonic=clock.monotonic
        ),
        tokens=key_ring(FakeClock()),
        clock=clock,
        policy=AuthPolicy(refresh_reuse_grace_seconds=grace),
    )


def race(service: AuthService, refresh_token: str) -> list[str | DomainError]:
    """Both threads refresh the same token; returns each one's new token or its error."""
    start = threading.Barrier(2)
    outcomes: list[str | DomainError] = []
    failures: list[BaseException] = []

    def refresh() -> None:
        try:
            start.wait(timeout=10)
            outcomes.append(service.refresh(refresh_token=refresh_token).refresh_token)
        except DomainError as error:
            outcomes.append(error)
        except BaseException as unexpected:
            failures.append(unexpected)

    threads = [threading.Thread(target=refresh) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures, failures
    assert len(outcomes) == 2
    return outcomes


def count(engine: Engine, statement: object) -> int:
    with engine.connect() as connection:
        return int(connection.execute(statement).scalar_one())  # type: ignore[call-overload]


@pytest.fixture(params=["postgres", "sqlite"])
def race_engine(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    url = str(request.getfixturevalue(f"{request.param}_url"))
    migrations.upgrade("auth", url)
    engine = make_engine(url, pool_size=4)
    yield engine, request.param == "postgres"
    engine.dispose()


def test_with_no_grace_exactly_one_concurrent_refresh_wins_and_the_family_dies(
    race_engine: tuple[Engine, bool],
) -> None:
    engine, force = race_engine
    instruments = Instruments()
    service = service_on(engine, instruments, grace=0)
    service.register(email=EMAIL, password=PASSWORD, display_name="")
    for _ in range(ROUNDS):
        refresh_token = service.login(email=EMAIL, password=PASSWORD).refresh_token
        instruments.rotations = 0
        instruments.barrier = threading.Barrier(2) if force else None
        outcomes = race(service, refresh_token)
        instruments.barrier = None

        winners = [o for o in outcomes if isinstance(o, str)]
        losers = [o for o in outcomes if isinstance(o, DomainError)]
        assert len(winners) == 1
        assert len(losers) == 1
        assert (losers[0].code, losers[0].reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_REFRESH_TOKEN",
        )
        assert instruments.rotations == 1
        with pytest.raises(DomainError):  # the winner's child died with its family
            service.refresh(refresh_token=winners[0])
    assert count(engine, select(func.count()).where(RefreshFamilyRow.revoked_time.is_(None))) == 0
    reuse = AuditRow.kind == AuditKind.REFRESH_REUSE_DETECTED.value
    assert count(engine, select(func.count()).where(reuse)) == ROUNDS


def test_within_grace_both_concurrent_refreshes_get_a_pair_and_rotate_once(
    race_engine: tuple[Engine, bool],
) -> None:
    engine, force = race_engine
    instruments = Instruments()
    service = service_on(engine, instruments, grace=60)
    service.register(email=EMAIL, password=PASSWORD, display_name="")
    for _ in range(ROUNDS):
        refresh_token = service.login(email=EMAIL, password=PASSWORD).refresh_token
        instruments.rotations = 0
        instruments.barrier = threading.Barrier(2) if force else None
        outcomes = race(service, refresh_token)
        instruments.barrier = None

        assert all(isinstance(o, str) for o in outcomes), outcomes
        assert len(set(outcomes)) == 2
        assert instruments.rotations == 1
        for child in outcomes:  # both children are live
            assert isinstance(child, str)
            service.refresh(refresh_token=child)
    assert (
        count(engine, select(func.count()).where(RefreshFamilyRow.revoked_time.is_not(None))) == 0
    )
    reuse = AuditRow.kind == AuditKind.REFRESH_REUSE_DETECTED.value
    assert count(engine, select(func.count()).where(reuse)) == 0
    # Per round: the login token, its two children, and one grandchild of each.
    assert count(engine, select(func.count()).select_from(RefreshTokenRow)) == ROUNDS * 5
