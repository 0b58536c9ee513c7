"""What the agent service layer needs from the outside world, as Protocols.

The SQLAlchemy repository and the two-level cache (services.agent_svc.infra) implement
these; unit tests pass in-memory fakes.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.agent_svc.domain import Agent, AgentRevision
from services.agent_svc.service.filtering import AgentFilter, Ordering
from services.agent_svc.service.paging import Cursor
from shared.data.uow import UnitOfWork

__all__ = [
    "AgentAliases",
    "AgentCache",
    "AgentQuery",
    "AgentRepository",
    "AgentUnitOfWork",
    "AliasCache",
    "Change",
    "ChangeKind",
    "ChangeLogRepository",
    "ChangeSignal",
    "CreateRecord",
    "CreateRequestRepository",
    "FilterFields",
    "NameTaken",
    "QuotaExceeded",
    "RequestReplayed",
    "RevisionCache",
    "RevisionRepository",
]


class NameTaken(Exception):
    """The owner already has an agent with that name (raised by add and update)."""


class QuotaExceeded(Exception):
    """The owner has as many agents as they may have (raised by add)."""


class RequestReplayed(Exception):
    """A live record of a create with that request id exists (raised by
    CreateRequestRepository.add: a concurrent create with the id committed first)."""


@dataclass(frozen=True, slots=True)
class CreateRecord:
    """What a CreateAgent with a request id left behind (AIP-155), kept for replays."""

    fingerprint: str | None
    """AgentInput.fingerprint of the request; None for ids recorded before fingerprints
    were kept (any replay of those gets `agent`)."""
    agent: Agent
    """The response: the agent as created (revision 1). Its create_time is the record's."""


@dataclass(frozen=True, slots=True)
class AgentQuery:
    """One page of a list: whose agents, which ones, in what order, after which row."""

    owner_id: uuid.UUID | None
    """Only this owner's agents; None means everyone's (admins)."""
    filter: AgentFilter
    ordering: Ordering
    after: Cursor | None
    limit: int
    show_deleted: bool = False
    """Soft-deleted agents too (AIP-164); by default they are left out."""
    now: datetime | None = None
    """With `show_deleted`: the deleted agents whose expire_time is later than this."""


@dataclass(frozen=True, slots=True)
class AgentAliases:
    """An agent's aliases: alias → revision id (empty when it has none)."""

    agent_id: uuid.UUID
    aliases: dict[str, int]


class AgentRepository(Protocol):
    def named(self, owner_id: uuid.UUID, name: str) -> Agent | None:
        """The owner's agent called `name` (deleted or not): what holds the name."""
        ...

    def count_by_model(self, owner_id: uuid.UUID | None) -> dict[str, int]:
        """How many agents (not deleted) name each model: an owner's, or (None) everyone's."""
        ...

    def add(self, agent: Agent, *, max_per_owner: int = 0) -> None:
        """Stores a new agent and counts it for its owner; QuotaExceeded if the owner has
        `max_per_owner` agents already (0: no limit), NameTaken if they have one of that
        name. Concurrent adds never take an owner past the limit."""
        ...

    def get(self, agent_id: uuid.UUID, *, for_update: bool = False) -> Agent | None:
        """The agent (deleted or not); `for_update` locks its row until the transaction
        ends (writes of one agent that do not change its row take turns on it)."""
        ...

    def list_page(self, query: AgentQuery) -> list[Agent]:
        """Up to `query.limit` agents in (sort key, id) order strictly after the cursor."""
        ...

    def update(self, agent: Agent, *, expected_revision: int) -> bool:
        """Stores `agent` (carrying its new revision) if the stored revision is still
        `expected_revision` (compare-and-set); False if it is not, or the agent is gone.
        Raises NameTaken if the new name is in use."""
        ...

    def soft_delete(self, agent: Agent, *, expected_revision: int) -> bool:
        """Stores `agent` (marked deleted) if the stored revision is still
        `expected_revision`, and uncounts it for its owner; False if it is not."""
        ...

    def undelete(self, agent: Agent, *, expected_revision: int, max_per_owner: int = 0) -> bool:
        """Stores `agent` (no longer deleted) if the stored revision is still
        `expected_revision`, and counts it for its owner again; QuotaExceeded if that
        would pass `max_per_owner` (0: no limit); False if the revision moved."""
        ...

    def purge(self, agent_id: uuid.UUID, *, expected_revision: int | None = None) -> Agent | None:
        """Removes the agent for good (only at that revision, if given) with its revisions
        and aliases, uncounting it if it was not deleted; the removed agent, or None."""
        ...

    def purge_expired(self, *, now: datetime, limit: int) -> list[Agent]:
        """Removes up to `limit` deleted agents whose expire_time is before `now`, with
        their revisions and aliases; the removed agents. Concurrent purgers never remove
        (nor return) the same agent twice."""
        ...


class RevisionRepository(Protocol):
    """Agents' configuration revisions (AIP-162) and their aliases."""

    def add(self, revision: AgentRevision, *, keep: int) -> None:
        """Records the revision, then prunes (see `prune`) up to it."""
        ...

    def prune(self, agent_id: uuid.UUID, *, newest: int, keep: int) -> None:
        """Removes the agent's revisions older than the last `keep` up to `newest` that no
        alias names."""
        ...

    def get(self, agent_id: uuid.UUID, revision_id: int) -> AgentRevision | None: ...

    def list_page(
        self, agent_id: uuid.UUID, *, before: int | None, limit: int
    ) -> list[AgentRevision]:
        """Up to `limit` revisions, newest first, with ids below `before` (if given)."""
        ...

    def aliases(self, agent_id: uuid.UUID) -> dict[str, int]:
        """alias → revision id."""
        ...

    def set_alias(
        self, agent_id: uuid.UUID, alias: str, revision_id: int, *, now: datetime, by: str
    ) -> None:
        """Points `alias` at the revision (creating or moving it)."""
        ...

    def remove_alias(self, agent_id: uuid.UUID, alias: str) -> bool:
        """Removes the alias; whether it existed."""
        ...


class CreateRequestRepository(Protocol):
    """The records of creates made with a request id, per (owner, request id)."""

    def get(
        self, owner_id: uuid.UUID, request_id: uuid.UUID, *, created_after: datetime
    ) -> CreateRecord | None:
        """The record, if made after `created_after` (older ones have expired)."""
        ...

    def add(
        self,
        owner_id: uuid.UUID,
        request_id: uuid.UUID,
        record: CreateRecord,
        *,
        created_after: datetime,
    ) -> None:
        """Keeps the record, replacing one made at or before `created_after` (expired);
        RequestReplayed if one made after it exists."""
        ...

    def purge(self, *, created_before: datetime, limit: int) -> int:
        """Deletes up to `limit` records made before `created_before`; how many it did."""
        ...


class ChangeKind(enum.Enum):
    """What happened to an agent (a row of the change log WatchAgents streams)."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    UNDELETED = "undeleted"
    PURGED = "purged"
    TAGGED = "tagged"
    """An alias set or moved: `Change.alias` names `Change.alias_revision` now."""
    UNTAGGED = "untagged"
    """An alias removed."""


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change, as the change log gives it back."""

    seq: int
    """Its place in commit order (increasing; gaps are possible)."""
    kind: ChangeKind
    agent: Agent
    """The agent after the change (PURGED: the last known one)."""
    time: datetime
    previous: FilterFields | None = None
    """UPDATED: the filterable fields before the change, when known."""
    alias: str = ""
    """TAGGED and UNTAGGED: the alias."""
    alias_revision: int | None = None
    """TAGGED: the revision the alias names now."""


@dataclass(frozen=True, slots=True)
class FilterFields:
    """What a watch filter looks at, besides the owner (which never changes)."""

    name: str
    model: str
    metadata: dict[str, str]


class ChangeLogRepository(Protocol):
    """The change log: appended in the changing transaction, read in commit order."""

    def append(
        self,
        kind: ChangeKind,
        agent: Agent,
        *,
        previous: Agent | None = None,
        alias: str = "",
        alias_revision: int | None = None,
    ) -> None:
        """Logs a change of `agent` (as it is after the change; PURGED: the last known
        one) in this unit of work's transaction: it exists if and only if the transaction
        commits. `previous`: the agent before an update, when the caller has it (an update
        that takes an agent out of a watcher's filter still reaches that watcher).
        `alias` (TAGGED, UNTAGGED) and `alias_revision` (TAGGED): the alias moved."""
        ...

    def after(self, seq: int, *, limit: int) -> list[Change]:
        """Up to `limit` committed changes with a sequence number above `seq`, in order.
        Never skips one: a change that commits later always has a higher number."""
        ...

    def head(self) -> int:
        """The highest committed sequence number (0: none yet)."""
        ...

    def purge(self, *, changed_before: datetime, limit: int) -> int:
        """Deletes up to `limit` changes made before `changed_before`; how many."""
        ...


class ChangeSignal(Protocol):
    """Tells the watch hubs of every replica that the change log has new rows."""

    def changed(self) -> None: ...


class AgentUnitOfWork(UnitOfWork, Protocol):
    """One transaction over the agent repositories (see shared.data.uow.UnitOfWork)."""

    @property
    def agents(self) -> AgentRepository: ...

    @property
    def create_requests(self) -> CreateRequestRepository: ...

    @property
    def revisions(self) -> RevisionRepository: ...

    @property
    def changes(self) -> ChangeLogRepository: ...


class AgentCache(Protocol):
    def get(
        self,
        agent_id: uuid.UUID,
        load: Callable[[], Agent | None],
        *,
        load_lagging: Callable[[], Agent | None] | None = None,
    ) -> Agent | None:
        """L1 → L2 → load() (the database), filling on the way back; concurrent misses
        for one id call load once; never raises for Redis trouble. `load_lagging` reads
        a copy that may lag (a read replica): used instead of `load` only when the cache
        knows no write of the id can be missing from it, never to refill after a write."""
        ...

    def invalidate(self, agent_id: uuid.UUID) -> None:
        """Drops the id from L1 and L2 and tells every replica to drop its L1 entry."""
        ...

    def close(self) -> None: ...


class AliasCache(Protocol):
    """Aliases per agent id, read through and invalidated like AgentCache."""

    def get(
        self, agent_id: uuid.UUID, load: Callable[[], AgentAliases | None]
    ) -> AgentAliases | None: ...

    def invalidate(self, agent_id: uuid.UUID) -> None: ...

    def close(self) -> None: ...


class RevisionCache(Protocol):
    """Revisions by (agent id, revision id): immutable, so never invalidated."""

    def get(
        self, agent_id: uuid.UUID, revision_id: int, load: Callable[[], AgentRevision | None]
    ) -> AgentRevision | None: ...
