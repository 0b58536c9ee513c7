"""A migrated fresh database per test (SQLite and PostgreSQL) for the service a test folder
names with its `migrated_service` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.data import migrations
from shared.data.db import make_engine, session_factory


@pytest.fixture
def migrated_url(database_url: str, migrated_service: str) -> str:
    migrations.upgrade(migrated_service, database_url)
    return database_url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url, pool_size=4)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)
