"""A login (or a second change) racing a password change, on SQLite and PostgreSQL.

The password is checked outside any transaction (argon2 never runs while a connection or a
lock is held), so a change can land between a login's check and the transaction that
creates its session. What must hold whatever the interleaving: after ChangePassword
returns, no session made with the old password is alive, and the old password is never
stored again. The tests force the two interleavings that matter:

1. login checked → change committed (families revoked) → login's transaction: the login
   must see that the hash it checked is gone (INVALID_CREDENTIALS), and a rehash of the old
   password must not overwrite the new hash;
2. login's transaction open (its family inserted, not committed) → change starts: the
   change must wait for the user row and revoke that family after it commits. Forced on
   PostgreSQL (the test waits until the change really waits for a lock); on SQLite every
   writer waits at BEGIN IMMEDIATE anyway, so there the order is only likely, and the
   outcome must be the same.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import grpc
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from services.auth_svc.infra.limiter import InMemoryLoginLimiter
from services.auth_svc.repository.models import RefreshFamilyRow
from services.auth_svc.repository.sql import SqlAuthUnitOfWork, SqlRefreshTokenRepository
from services.auth_svc.service.auth_service import AuthPolicy, AuthService
from shared.config.clock import SystemClock
from shared.data import migrations
from shared.data.db import make_engine, session_factory
from shared.rpc.errors import DomainError
from shared.security.tokens import Principal
from tests.helpers import FakeClock
from tests.integration.auth.races import DEADLINE, Gate, waiting_for_a_lock
from tests.unit.auth.fakes import FakeHasher, key_ring

EMAIL = "racer@example.com"
OLD = "the old password"
NEW = "the new password"


class _GatedTokens(SqlRefreshTokenRepository):
    def __init__(self, session: Session, gate: Gate) -> None:
        super().__init__(session)
        self._gate = gate

    def add_family(
        self, family_id: uuid.UUID, user_id: uuid.UUID, when: datetime, peer: str | None = None
    ) -> None:
        super().add_family(family_id, user_id, when, peer)
        self._gate.hold()


@dataclass
class World:
    engine: Engine
    service: AuthService
    hasher: FakeHasher
    gate: Gate
    postgres: bool

    def live_families(self) -> int:
        with self.engine.connect() as connection:
            query = select(func.count()).where(RefreshFamilyRow.revoked_time.is_(None))
            return int(connection.execute(query).scalar_one())

    def signed_in(self) -> Principal:
        user = self.service.register(email=EMAIL, password=OLD, display_name="")
        return Principal(user_id=str(user.id), roles=frozenset(user.roles))

    def change(self, principal: Principal) -> None:
        self.service.change_password(principal=principal, current_password=OLD, new_password=NEW)


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    url = str(request.getfixturevalue(f"{request.param}_url"))
    migrations.upgrade("auth", url)
    engine = make_engine(url, pool_size=3)
    gate = Gate()
    sessions = session_factory(engine)

    class _Uow(SqlAuthUnitOfWork):
        def _open_repositories(self, session: Session) -> None:
            super()._open_repositories(session)
            self.refresh_tokens = _GatedTokens(session, gate)

    clock = SystemClock()
    hasher = FakeHasher()
    service = AuthService(
        uow=lambda: _Uow(sessions),
        hasher=hasher,
        limiter=InMemoryLoginLimiter(max_failures=5, lockout_seconds=60, monotonic=clock.monotonic),
        tokens=key_ring(FakeClock()),
        clock=clock,
        policy=AuthPolicy(),
    )
    yield World(engine, service, hasher, gate, request.param == "postgres")
    gate.proceed.set()
    engine.dispose()


def assert_invalid_credentials(call: Callable[[], object]) -> None:
    with pytest.raises(DomainError) as excinfo:
        call()
    assert (excinfo.value.code, excinfo.value.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )


def test_a_change_between_the_login_check_and_its_transaction_ends_the_login(
    world: World,
) -> None:
    principal = world.signed_in()
    world.hasher.after_verify = lambda: world.change(principal)
    assert_invalid_credentials(lambda: world.service.login(email=EMAIL, password=OLD))
    assert world.live_families() == 0
    assert world.service.login(email=EMAIL, password=NEW)
    assert_invalid_credentials(lambda: world.service.login(email=EMAIL, password=OLD))


def test_a_rehash_never_puts_the_old_password_back_over_a_new_one(world: World) -> None:
    principal = world.signed_in()
    with world.engine.connect() as connection:
        stored = connection.execute(text("SELECT password_hash FROM auth_users")).scalar_one()
    world.hasher.stale_hashes.add(stored)  # a hash-parameter change: the login rehashes
    world.hasher.after_verify = lambda: world.change(principal)
    assert_invalid_credentials(lambda: world.service.login(email=EMAIL, password=OLD))
    assert world.service.login(email=EMAIL, password=NEW)
    assert_invalid_credentials(lambda: world.service.login(email=EMAIL, password=OLD))


def test_a_change_while_a_login_transaction_is_open_revokes_its_session(world: World) -> None:
    principal = world.signed_in()
    outcomes: dict[str, object] = {}

    def run(name: str, call: Callable[[], object]) -> threading.Thread:
        def target() -> None:
            try:
                outcomes[name] = call()
            except BaseException as error:  # reported by the assertions below
                outcomes[name] = error

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    world.gate.armed = True
    login = run("login", lambda: world.service.login(email=EMAIL, password=OLD))
    assert world.gate.reached.wait(DEADLINE)  # login's family exists, uncommitted
    change = run("change", lambda: world.change(principal))
    if world.postgres:  # let the login commit only once the change waits for its lock
        deadline = time.monotonic() + DEADLINE
        while change.is_alive() and not waiting_for_a_lock(world.engine):
            assert time.monotonic() < deadline, "the change neither waited nor finished"
            time.sleep(0.01)
    world.gate.proceed.set()
    login.join(DEADLINE)
    change.join(DEADLINE)

    assert outcomes["change"] is None, outcomes["change"]
    issued = outcomes["login"]
    assert not isinstance(issued, BaseException), issued
    assert world.live_families() == 0  # the login's session died with the change
    with pytest.raises(DomainError) as excinfo:
        world.service.refresh(refresh_token=issued.refresh_token)  # type: ignore[attr-defined]
    assert excinfo.value.reason == "INVALID_REFRESH_TOKEN"
