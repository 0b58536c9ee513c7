"""agent_svc on a real database (fixtures in tests/integration/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.agent_svc.repository.sql import SqlAgentUnitOfWork


@pytest.fixture
def migrated_service() -> str:
    return "agent"


@pytest.fixture
def uow(sessions: sessionmaker[Session]) -> Callable[[], SqlAgentUnitOfWork]:
    """A factory of units of work, as the composition root hands it to the service."""
    return lambda: SqlAgentUnitOfWork(sessions)
