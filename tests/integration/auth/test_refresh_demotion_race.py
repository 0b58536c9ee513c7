"""A refresh racing a demotion, on PostgreSQL: the token the refresh issues must not keep
the roles the demotion took away (found by an outside review).

Every revocation (a demotion, a disable, a password change, RevokeAllSessions) locks the
user's row, reads the clock, then revokes the user's refresh families. A refresh locked
its family first and read the user without a lock: a demotion that read its clock at
X.99 (its moment X+1) then waited for that family while the refresh signed at X+1.01
with the old roles (iat X+1, not before the moment): a demoted admin's token lived on at
agent_svc. Locked the other way round (the fix of an earlier finding) the two deadlocked.
The refresh now locks the user first, like every revocation: the demotion waits for it
and reads its clock after the refresh committed, so its moment covers that token.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from services.auth_svc.infra.limiter import InMemoryLoginLimiter
from services.auth_svc.repository.sql import SqlAuthUnitOfWork, SqlRefreshTokenRepository
from services.auth_svc.service.admin import UserAdmin, etag_of
from services.auth_svc.service.auth_service import AuthPolicy, AuthService
from shared.data import migrations
from shared.data.db import make_engine, session_factory
from shared.security.tokens import Principal, StaticKeyProvider, TokenVerifier
from tests.helpers import FakeClock
from tests.integration.auth.races import DEADLINE, Gate, waiting_for_a_lock
from tests.unit.auth.fakes import AUDIENCE, ISSUER, FakeHasher, key_ring

PASSWORD = "correct horse battery"


class _GatedTokens(SqlRefreshTokenRepository):
    def __init__(self, session: Session, gate: Gate) -> None:
        super().__init__(session)
        self._gate = gate

    def lock_live_family(self, family_id: uuid.UUID, when: datetime) -> bool:
        live = super().lock_live_family(family_id, when)
        self._gate.hold()
        return live


@dataclass
class World:
    engine: Engine
    service: AuthService
    users: UserAdmin
    clock: FakeClock
    gate: Gate
    verifier: TokenVerifier


@pytest.fixture
def world(postgres_url: str) -> Iterator[World]:
    migrations.upgrade("auth", postgres_url)
    engine = make_engine(postgres_url, pool_size=4)
    sessions = session_factory(engine)
    gate = Gate()

    class _Uow(SqlAuthUnitOfWork):
        def _open_repositories(self, session: Session) -> None:
            super()._open_repositories(session)
            self.refresh_tokens = _GatedTokens(session, gate)

    # A second fraction of 0.99: the demotion below reads the clock just before a second
    # ends, and the refresh signs just after.
    start = datetime.fromtimestamp(int(time.time()) + 0.99, UTC)
    clock = FakeClock(start)
    keys = key_ring(clock)
    service = AuthService(
        uow=lambda: _Uow(sessions),
        hasher=FakeHasher(),
        limiter=InMemoryLoginLimiter(max_failures=5, lockout_seconds=60, monotonic=clock.monotonic),
        tokens=keys,
        clock=clock,
        policy=AuthPolicy(),
    )
    users = UserAdmin(
        uow=lambda: _Uow(sessions),
        limiter=InMemoryLoginLimiter(max_failures=5, lockout_seconds=60, monotonic=clock.monotonic),
        clock=clock,
        token_lifetime_seconds=900,
    )
    verifier = TokenVerifier(
        StaticKeyProvider(keys.verification_keys), issuer=ISSUER, audience=AUDIENCE, clock=clock
    )
    yield World(engine, service, users, clock, gate, verifier)
    gate.proceed.set()
    engine.dispose()


def run(call: Callable[[], object], outcome: dict[str, object], name: str) -> threading.Thread:
    def target() -> None:
        try:
            outcome[name] = call()
        except BaseException as error:  # reported by the assertions
            outcome[name] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_a_refresh_racing_a_demotion_issues_a_token_the_demotion_covers(world: World) -> None:
    root = world.service.register(
        email="root@example.com", password=PASSWORD, display_name="", admin=True
    )
    ada = world.service.register(
        email="ada@example.com", password=PASSWORD, display_name="", admin=True
    )
    admin = world.verifier.verify(
        world.service.login(email="root@example.com", password=PASSWORD).access_token
    )
    assert admin.user_id == str(root.id)
    session = world.service.login(email="ada@example.com", password=PASSWORD)
    outcome: dict[str, object] = {}

    world.gate.armed = True
    refresh = run(
        lambda: world.service.refresh(refresh_token=session.refresh_token), outcome, "refresh"
    )
    assert world.gate.reached.wait(DEADLINE)  # the refresh holds its locks, not committed
    demote = run(
        lambda: world.users.update(
            principal=admin,
            user_id=str(ada.id),
            etag=etag_of(ada),
            paths=["roles"],
            display_name="",
            roles=["user"],
        ),
        outcome,
        "demote",
    )
    deadline = time.monotonic() + DEADLINE
    while demote.is_alive() and not waiting_for_a_lock(world.engine):
        assert time.monotonic() < deadline, "the demotion neither waited nor finished"
        time.sleep(0.01)
    world.clock.advance(0.02)  # the next second: the refresh signs in it
    world.gate.proceed.set()
    refresh.join(DEADLINE)
    demote.join(DEADLINE)

    refreshed = outcome["refresh"]
    assert not isinstance(refreshed, BaseException), refreshed
    demoted = outcome["demote"]
    assert not isinstance(demoted, BaseException), demoted  # no deadlock either
    token: Principal = world.verifier.verify(refreshed.access_token)  # type: ignore[attr-defined]
    with SqlAuthUnitOfWork(session_factory(world.engine)) as uow:
        assert uow.revocations.covers(token.user_id, token.issued_at, world.clock.now()), (
            f"a token with roles {sorted(token.roles)} issued at {token.issued_at} outlives "
            "the demotion"
        )
