"""auth_svc on a real database: a migrated fresh database per test (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from shared import migrations
from shared.db import make_engine, session_factory


@pytest.fixture
def migrated_url(database_url: str) -> str:
    migrations.upgrade("auth", database_url)
    return database_url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url, pool_size=4)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def uow(sessions: sessionmaker[Session]) -> Callable[[], SqlAuthUnitOfWork]:
    """A factory of units of work, as the composition root hands it to the service."""
    return lambda: SqlAuthUnitOfWork(sessions)
