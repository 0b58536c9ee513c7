"""Hostile input through the service layer on SQLite and PostgreSQL.

PostgreSQL refuses NUL in text and values longer than a column; if such a value reached a
query (the user lookup, the audit row of a failed login) the caller would get INTERNAL.
Each case must be refused as the caller's error before any statement runs: the tests
count the statements the engine executes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, event

from services.auth_svc.infra.limiter import InMemoryLoginLimiter
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from services.auth_svc.service.auth_service import AuthPolicy, AuthService
from services.auth_svc.service.validation import normalize_email
from shared.config.clock import SystemClock
from shared.rpc.errors import DomainError, InvalidArgument
from shared.security.tokens import Principal
from tests.helpers import FakeClock
from tests.unit.auth.fakes import FakeHasher, key_ring

EMAIL = "ada@example.com"
PASSWORD = "correct horse battery"


class Statements:
    """Counts the statements the engine sends while `counting` is on."""

    def __init__(self, engine: Engine) -> None:
        self.counting = False
        self.seen: list[str] = []
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self.counting:
            self.seen.append(statement)


@pytest.fixture
def service(uow: Callable[[], SqlAuthUnitOfWork]) -> AuthService:
    clock = SystemClock()
    return AuthService(
        uow=uow,
        hasher=FakeHasher(),
        # One attempt per account: anything counted would lock it.
        limiter=InMemoryLoginLimiter(max_failures=1, lockout_seconds=60, monotonic=clock.monotonic),
        tokens=key_ring(FakeClock()),
        clock=clock,
        policy=AuthPolicy(),
    )


@pytest.fixture
def statements(engine: Engine, service: AuthService) -> Iterator[Statements]:
    service.register(email=EMAIL, password=PASSWORD, display_name="Ada")
    counter = Statements(engine)
    counter.counting = True
    yield counter
    counter.counting = False


def refused_field(call: Callable[[], object]) -> set[str]:
    with pytest.raises(InvalidArgument) as excinfo:
        call()
    assert excinfo.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return {v.field for v in excinfo.value.violations}


LONG_EMAIL = "a" * 64 + "@" + "b" * 300 + ".com"


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        (LONG_EMAIL, PASSWORD, "email"),
        ("x" * 10_000, PASSWORD, "email"),
        ("ada\x00@example.com", PASSWORD, "email"),
        ("\x00", PASSWORD, "email"),
        ("ada@example.com\x1b[2K", PASSWORD, "email"),
        ("ada@exa\u202emple.com", PASSWORD, "email"),
        (EMAIL, "x" * 129, "password"),
        (EMAIL, "x" * 1_000_000, "password"),
        (EMAIL, PASSWORD + "\x00", "password"),
    ],
)
def test_login_refuses_hostile_input_before_any_query(
    service: AuthService, statements: Statements, email: str, password: str, field: str
) -> None:
    assert refused_field(lambda: service.login(email=email, password=password)) == {field}
    assert statements.seen == []
    # Nothing was counted either (the limiter allows one attempt per account).
    assert service._limiter.acquire(normalize_email(email)).allowed


def test_a_login_email_of_254_characters_is_an_ordinary_failure(
    service: AuthService, statements: Statements
) -> None:
    email = "a" * 64 + "@" + "b" * 185 + ".com"
    assert len(email) == 254
    with pytest.raises(DomainError) as excinfo:
        service.login(email=email, password=PASSWORD)
    assert (excinfo.value.code, excinfo.value.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"email": LONG_EMAIL}, "email"),
        ({"email": "new\x00@example.com"}, "email"),
        ({"password": PASSWORD + "\x00"}, "password"),
        ({"password": "x" * 129}, "password"),
        ({"display_name": "Ada\x00"}, "display_name"),
        ({"display_name": "x" * 10_000}, "display_name"),
        ({"display_name": "Ada\x1b[31m"}, "display_name"),
    ],
)
def test_register_refuses_hostile_input_before_any_query(
    service: AuthService, statements: Statements, fields: dict[str, str], field: str
) -> None:
    request = {"email": "new@example.com", "password": PASSWORD, "display_name": "", **fields}
    assert refused_field(
        lambda: service.register(
            email=request["email"],
            password=request["password"],
            display_name=request["display_name"],
        )
    ) == {field}
    assert statements.seen == []


@pytest.mark.parametrize(
    ("current", "new", "field"),
    [
        ("x" * 129, "a brand new password", "current_password"),
        (PASSWORD + "\x00", "a brand new password", "current_password"),
        ("", "a brand new password", "current_password"),
        (PASSWORD, "a brand new password\x00", "new_password"),
        (PASSWORD, "x" * 129, "new_password"),
    ],
)
def test_change_password_refuses_hostile_input_before_any_query(
    service: AuthService, statements: Statements, current: str, new: str, field: str
) -> None:
    statements.counting = False
    user = service.login(email=EMAIL, password=PASSWORD).user
    principal = Principal(user_id=str(user.id), roles=frozenset(user.roles))
    statements.counting = True
    assert refused_field(
        lambda: service.change_password(
            principal=principal, current_password=current, new_password=new
        )
    ) == {field}
    assert statements.seen == []


@pytest.mark.parametrize(
    "token",
    [
        "x" * 129,
        "x" * 1_000_000,
        "a" * 42 + "!",
        "a" * 42 + "=",
        "a" * 42 + "\x00",
        "\x00" * 43,
        "é" * 43,
        "a" * 20 + " " + "a" * 22,
    ],
)
@pytest.mark.parametrize("method", ["refresh", "logout"])
def test_a_token_that_was_never_issued_is_refused_without_a_query(
    service: AuthService, statements: Statements, token: str, method: str
) -> None:
    with pytest.raises(DomainError) as excinfo:
        getattr(service, method)(refresh_token=token)
    assert (excinfo.value.code, excinfo.value.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_REFRESH_TOKEN",
    )
    assert statements.seen == []


def test_an_issued_token_has_the_accepted_shape(
    service: AuthService, statements: Statements
) -> None:
    issued = service.login(email=EMAIL, password=PASSWORD)
    assert len(issued.refresh_token) == 43
    rotated = service.refresh(refresh_token=issued.refresh_token)
    service.logout(refresh_token=rotated.refresh_token)
