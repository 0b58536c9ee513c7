"""auth_svc on a real database (fixtures in tests/integration/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.auth_svc.repository.sql import SqlAuthUnitOfWork


@pytest.fixture
def migrated_service() -> str:
    return "auth"


@pytest.fixture
def uow(sessions: sessionmaker[Session]) -> Callable[[], SqlAuthUnitOfWork]:
    """A factory of units of work, as the composition root hands it to the service."""
    return lambda: SqlAuthUnitOfWork(sessions)
