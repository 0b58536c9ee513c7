"""What the agent service layer needs from the outside world, as Protocols.

The SQLAlchemy repository and the two-level cache (services.agent_svc.infra) implement
these; unit tests pass in-memory fakes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.agent_svc.domain import Agent
from services.agent_svc.service.filtering import AgentFilter, Ordering
from services.agent_svc.service.paging import Cursor
from shared.data.uow import UnitOfWork

__all__ = [
    "AgentCache",
    "AgentQuery",
    "AgentRepository",
    "AgentUnitOfWork",
    "NameTaken",
    "RequestReplayed",
]


class NameTaken(Exception):
    """The owner already has an agent with that name (raised by add and update)."""


class RequestReplayed(Exception):
    """The owner already created an agent with that request id (raised by add)."""


@dataclass(frozen=True, slots=True)
class AgentQuery:
    """One page of a list: whose agents, which ones, in what order, after which row."""

    owner_id: uuid.UUID | None
    """Only this owner's agents; None means everyone's (admins)."""
    filter: AgentFilter
    ordering: Ordering
    after: Cursor | None
    limit: int


class AgentRepository(Protocol):
    def add(self, agent: Agent, *, request_id: uuid.UUID | None = None) -> None:
        """Stores a new agent; NameTaken or RequestReplayed if a unique key is in use."""
        ...

    def get(self, agent_id: uuid.UUID) -> Agent | None: ...

    def get_by_request_id(self, owner_id: uuid.UUID, request_id: uuid.UUID) -> Agent | None:
        """The agent this owner created with this request id, if any."""
        ...

    def list_page(self, query: AgentQuery) -> list[Agent]:
        """Up to `query.limit` agents in (sort key, id) order strictly after the cursor."""
        ...

    def update(self, agent: Agent, *, expected_revision: int) -> bool:
        """Stores `agent` (carrying its new revision) if the stored revision is still
        `expected_revision` (compare-and-set); False if it is not, or the agent is gone.
        Raises NameTaken if the new name is in use."""
        ...

    def delete(self, agent_id: uuid.UUID, *, expected_revision: int | None = None) -> bool:
        """Deletes the agent (only at that revision, if given); False if nothing matched."""
        ...


class AgentUnitOfWork(UnitOfWork, Protocol):
    """One transaction over the agent repositories (see shared.data.uow.UnitOfWork)."""

    @property
    def agents(self) -> AgentRepository: ...


class AgentCache(Protocol):
    def get(self, agent_id: uuid.UUID, load: Callable[[], Agent | None]) -> Agent | None:
        """L1 → L2 → load() (the database), filling on the way back; concurrent misses
        for one id call load once; never raises for Redis trouble."""
        ...

    def invalidate(self, agent_id: uuid.UUID) -> None:
        """Drops the id from L1 and L2 and tells every replica to drop its L1 entry."""
        ...

    def close(self) -> None: ...
