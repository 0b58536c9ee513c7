"""In-memory implementations of the agent ports (services/agent_svc/service/ports.py).

The fake unit of work keeps the semantics the rules depend on: changes are visible to
other units of work only after `commit()`; a unit of work left without committing rolls
back; `update` is a compare-and-set against the latest committed revision (as the SQL
`UPDATE … WHERE revision = ?` is), and `interfere` lets a test slip a concurrent writer
in between a unit of work's read and its write.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from services.agent_svc.domain import Agent, AgentInput, AgentRevision, Tool
from services.agent_svc.infra.revisions import RevisionMemory
from services.agent_svc.service.agent_service import AgentService
from services.agent_svc.service.filtering import (
    Condition,
    MetadataEquals,
    ModelEquals,
    NameEquals,
    NamePrefix,
    OwnerEquals,
    SortField,
)
from services.agent_svc.service.models import ModelCatalogue
from services.agent_svc.service.paging import PageTokens
from services.agent_svc.service.ports import (
    AgentAliases,
    AgentQuery,
    Change,
    ChangeKind,
    CreateRecord,
    FilterFields,
    NameTaken,
    QuotaExceeded,
    RequestReplayed,
)
from services.agent_svc.service.sizing import agent_size
from shared.security.tokens import Principal
from tests.fakes import SnapshotDatabase, SnapshotUnitOfWork
from tests.helpers import FakeClock

MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")
SECRET = b"unit-test-page-token-secret-0123456789"


@dataclass
class State:
    """What a database would hold."""

    agents: dict[uuid.UUID, Agent] = field(default_factory=dict)
    create_requests: dict[tuple[uuid.UUID, uuid.UUID], CreateRecord] = field(default_factory=dict)
    revisions: dict[tuple[uuid.UUID, int], AgentRevision] = field(default_factory=dict)
    aliases: dict[uuid.UUID, dict[str, int]] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)


def _matches(agent: Agent, condition: Condition) -> bool:
    match condition:
        case ModelEquals(model):
            return agent.model == model
        case NameEquals(name):
            return agent.name == name
        case NamePrefix(prefix):
            return agent.name.startswith(prefix)
        case MetadataEquals(key, value):
            return agent.metadata.get(key) == value
        case OwnerEquals(owner_id):
            return agent.owner_id == owner_id
    raise AssertionError(condition)


def _sort_key(agent: Agent, field: SortField) -> tuple[Any, uuid.UUID]:
    value = {
        SortField.CREATE_TIME: agent.create_time,
        SortField.UPDATE_TIME: agent.update_time,
        SortField.NAME: agent.name,
    }[field]
    return (value, agent.id)


class FakeAgents:
    def __init__(self, state: State, database: FakeDatabase) -> None:
        self._state = state
        self._database = database

    def _name_taken(self, agent: Agent) -> bool:
        return any(
            a.owner_id == agent.owner_id and a.name == agent.name and a.id != agent.id
            for a in self._state.agents.values()
        )

    def _owned(self, owner_id: uuid.UUID) -> int:
        """The owner's agents that count for the quota (deleted ones do not)."""
        return sum(a.owner_id == owner_id and not a.deleted for a in self._state.agents.values())

    def add(self, agent: Agent, *, max_per_owner: int = 0) -> None:
        self._database.run_interference()
        if max_per_owner and self._owned(agent.owner_id) >= max_per_owner:
            raise QuotaExceeded(str(agent.owner_id))
        if self._name_taken(agent):
            raise NameTaken(agent.name)
        self._state.agents[agent.id] = agent

    def get(self, agent_id: uuid.UUID, *, for_update: bool = False) -> Agent | None:
        self._database.reads += 1
        return self._state.agents.get(agent_id)

    def named(self, owner_id: uuid.UUID, name: str) -> Agent | None:
        self._database.reads += 1
        for agent in self._state.agents.values():
            if agent.owner_id == owner_id and agent.name == name:
                return agent
        return None

    def count_by_model(self, owner_id: uuid.UUID | None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for agent in self._state.agents.values():
            if not agent.deleted and (owner_id is None or agent.owner_id == owner_id):
                counts[agent.model] = counts.get(agent.model, 0) + 1
        return counts

    def list_page(self, query: AgentQuery) -> list[Agent]:
        self._database.queries.append(query)
        rows = [
            a
            for a in self._state.agents.values()
            if (query.owner_id is None or a.owner_id == query.owner_id)
            and (query.show_deleted or not a.deleted)
            and (query.now is None or not a.expired(query.now))
            and all(_matches(a, c) for c in query.filter.conditions)
        ]
        field, descending = query.ordering.field, query.ordering.descending
        rows.sort(key=lambda a: _sort_key(a, field), reverse=descending)
        if query.after is not None:
            last: tuple[Any, uuid.UUID] = (query.after.value, query.after.id)
            rows = [
                a
                for a in rows
                if (_sort_key(a, field) < last if descending else _sort_key(a, field) > last)
            ]
        return rows[: query.limit]

    def update(self, agent: Agent, *, expected_revision: int) -> bool:
        self._database.run_interference()
        latest = self._database.committed.agents.get(agent.id)
        mine = self._state.agents.get(agent.id)
        if latest is None or mine is None or latest.revision != expected_revision:
            return False
        if self._name_taken(agent):
            raise NameTaken(agent.name)
        self._state.agents[agent.id] = agent
        return True

    def _store(self, agent: Agent, expected_revision: int) -> bool:
        self._database.run_interference()
        latest = self._database.committed.agents.get(agent.id)
        if latest is None or agent.id not in self._state.agents:
            return False
        if latest.revision != expected_revision:
            return False
        self._state.agents[agent.id] = agent
        return True

    def soft_delete(self, agent: Agent, *, expected_revision: int) -> bool:
        return self._store(agent, expected_revision)

    def undelete(self, agent: Agent, *, expected_revision: int, max_per_owner: int = 0) -> bool:
        if max_per_owner and self._owned(agent.owner_id) >= max_per_owner:
            raise QuotaExceeded(str(agent.owner_id))
        return self._store(agent, expected_revision)

    def purge(self, agent_id: uuid.UUID, *, expected_revision: int | None = None) -> Agent | None:
        self._database.run_interference()
        latest = self._database.committed.agents.get(agent_id)
        if latest is None or agent_id not in self._state.agents:
            return None
        if expected_revision is not None and latest.revision != expected_revision:
            return None
        self._remove(agent_id)
        return latest

    def purge_expired(self, *, now: datetime, limit: int) -> list[Agent]:
        expired = sorted(
            (a for a in self._state.agents.values() if a.expire_time and a.expire_time < now),
            key=lambda a: (a.expire_time, a.id),
        )[:limit]
        for agent in expired:
            self._remove(agent.id)
        return expired

    def _remove(self, agent_id: uuid.UUID) -> None:
        del self._state.agents[agent_id]
        self._state.aliases.pop(agent_id, None)
        for key in [key for key in self._state.revisions if key[0] == agent_id]:
            del self._state.revisions[key]


class FakeRevisions:
    def __init__(self, state: State, database: FakeDatabase) -> None:
        self._state = state
        self._database = database

    def add(self, revision: AgentRevision, *, keep: int) -> None:
        key = (revision.agent_id, revision.revision_id)
        assert key not in self._state.revisions, f"revision {key} recorded twice"
        self._state.revisions[key] = revision
        self.prune(revision.agent_id, newest=revision.revision_id, keep=keep)

    def prune(self, agent_id: uuid.UUID, *, newest: int, keep: int) -> None:
        tagged = set(self._state.aliases.get(agent_id, {}).values())
        for owner, revision_id in list(self._state.revisions):
            if owner == agent_id and revision_id <= newest - keep and revision_id not in tagged:
                del self._state.revisions[(owner, revision_id)]

    def get(self, agent_id: uuid.UUID, revision_id: int) -> AgentRevision | None:
        self._database.revision_reads += 1
        return self._state.revisions.get((agent_id, revision_id))

    def list_page(
        self, agent_id: uuid.UUID, *, before: int | None, limit: int
    ) -> list[AgentRevision]:
        rows = sorted(
            (
                r
                for (owner, number), r in self._state.revisions.items()
                if owner == agent_id and (before is None or number < before)
            ),
            key=lambda r: -r.revision_id,
        )
        return rows[:limit]

    def aliases(self, agent_id: uuid.UUID) -> dict[str, int]:
        self._database.alias_reads += 1
        return dict(sorted(self._state.aliases.get(agent_id, {}).items()))

    def set_alias(
        self, agent_id: uuid.UUID, alias: str, revision_id: int, *, now: datetime, by: str
    ) -> None:
        self._state.aliases.setdefault(agent_id, {})[alias] = revision_id

    def remove_alias(self, agent_id: uuid.UUID, alias: str) -> bool:
        return self._state.aliases.get(agent_id, {}).pop(alias, None) is not None


class FakeChanges:
    """The change log: numbered at append (a rolled-back unit of work drops its rows with
    the rest of its state, so numbers of a rollback are gaps, as with a sequence)."""

    def __init__(self, state: State, database: FakeDatabase) -> None:
        self._state = state
        self._database = database

    def append(
        self,
        kind: ChangeKind,
        agent: Agent,
        *,
        previous: Agent | None = None,
        alias: str = "",
        alias_revision: int | None = None,
    ) -> None:
        self._database.last_seq += 1
        before = (
            FilterFields(previous.name, previous.model, dict(previous.metadata))
            if previous is not None
            else None
        )
        time = self._database.clock_now() if self._database.clock_now else agent.update_time
        self._state.changes.append(
            Change(self._database.last_seq, kind, agent, time, before, alias, alias_revision)
        )

    def after(self, seq: int, *, limit: int) -> list[Change]:
        return [c for c in self._state.changes if c.seq > seq][:limit]

    def head(self) -> int:
        return max((c.seq for c in self._state.changes), default=0)

    def purge(self, *, changed_before: datetime, limit: int) -> int:
        newest = max((c.seq for c in self._state.changes), default=0)
        old = [c for c in self._state.changes if c.time < changed_before and c.seq < newest]
        old = old[:limit]
        for change in old:
            self._state.changes.remove(change)
        return len(old)


class FakeCreateRequests:
    def __init__(self, state: State, database: FakeDatabase) -> None:
        self._state = state
        self._database = database

    def _live(
        self, key: tuple[uuid.UUID, uuid.UUID], created_after: datetime
    ) -> CreateRecord | None:
        # READ COMMITTED, and a unique key sees what other transactions committed.
        for state in (self._state, self._database.committed):
            record = state.create_requests.get(key)
            if record is not None and record.agent.create_time > created_after:
                return record
        return None

    def get(
        self, owner_id: uuid.UUID, request_id: uuid.UUID, *, created_after: datetime
    ) -> CreateRecord | None:
        return self._live((owner_id, request_id), created_after)

    def add(
        self,
        owner_id: uuid.UUID,
        request_id: uuid.UUID,
        record: CreateRecord,
        *,
        created_after: datetime,
    ) -> None:
        self._database.run_interference()
        if self._live((owner_id, request_id), created_after) is not None:
            raise RequestReplayed(str(request_id))
        self._state.create_requests[(owner_id, request_id)] = record

    def purge(self, *, created_before: datetime, limit: int) -> int:
        expired = [
            key
            for key, record in self._state.create_requests.items()
            if record.agent.create_time < created_before
        ][:limit]
        for key in expired:
            del self._state.create_requests[key]
        return len(expired)


class FakeDatabase(SnapshotDatabase[State]):
    """The committed state, and units of work that each change a private copy of it."""

    def __init__(self) -> None:
        super().__init__(State)
        self.reads = 0
        self.revision_reads = 0
        self.alias_reads = 0
        self.queries: list[AgentQuery] = []
        # Commits and cache invalidations in the order they happened ("commit",
        # "invalidate <id>"): RecordingCache writes here too when it is given this list.
        self.events: list[str] = []
        self.interference: list[Callable[[], None]] = []
        self.last_seq = 0
        self.clock_now: Callable[[], datetime] | None = None

    def unit_of_work(self) -> FakeUnitOfWork:
        return FakeUnitOfWork(self)

    def interfere(self, *writers: Callable[[], None]) -> None:
        """Each following write first runs the next of these (a concurrent writer)."""
        self.interference.extend(writers)

    def run_interference(self) -> None:
        if self.interference:
            self.interference.pop(0)()

    def commit_agent(self, agent: Agent, request_id: uuid.UUID | None = None) -> None:
        """A concurrent writer's committed create (with that request id)."""
        self.committed.agents[agent.id] = agent
        if request_id is not None:
            record = CreateRecord(agent.settable.fingerprint, agent)
            self.committed.create_requests[(agent.owner_id, request_id)] = record
        self.commits += 1

    def bump(self, agent_id: uuid.UUID) -> None:
        """A concurrent writer's committed update of the agent."""
        agent = self.committed.agents[agent_id]
        self.committed.agents[agent_id] = replace(agent, revision=agent.revision + 1)
        self.commits += 1


class FakeUnitOfWork(SnapshotUnitOfWork[State]):
    _database: FakeDatabase

    def commit(self) -> None:
        super().commit()
        self._database.events.append("commit")

    @property
    def agents(self) -> FakeAgents:
        return FakeAgents(self._state, self._database)

    @property
    def create_requests(self) -> FakeCreateRequests:
        return FakeCreateRequests(self._state, self._database)

    @property
    def revisions(self) -> FakeRevisions:
        return FakeRevisions(self._state, self._database)

    @property
    def changes(self) -> FakeChanges:
        return FakeChanges(self._state, self._database)


class RecordingCache:
    """An AgentCache that really caches (by id only, like the real one) and records
    invalidations, so tests can prove the service never trusts a cached owner. Given the
    database's event list, it logs each invalidation there, in order with the commits."""

    def __init__(self, events: list[str] | None = None) -> None:
        self.entries: dict[uuid.UUID, Agent] = {}
        self.invalidated: list[uuid.UUID] = []
        self.loads = 0
        self._events = events if events is not None else []

    def get(
        self,
        agent_id: uuid.UUID,
        load: Callable[[], Agent | None],
        *,
        load_lagging: Callable[[], Agent | None] | None = None,
    ) -> Agent | None:
        if agent_id in self.entries:
            return self.entries[agent_id]
        self.loads += 1
        value = load()
        if value is not None:
            self.entries[agent_id] = value
        return value

    def invalidate(self, agent_id: uuid.UUID) -> None:
        self.invalidated.append(agent_id)
        self._events.append(f"invalidate {agent_id}")
        self.entries.pop(agent_id, None)

    def close(self) -> None:
        self.entries.clear()


class RecordingAliasCache:
    """An AliasCache that caches by agent id and logs its invalidations (as
    RecordingCache does, with an "aliases" prefix)."""

    def __init__(self, events: list[str]) -> None:
        self.entries: dict[uuid.UUID, AgentAliases] = {}
        self._events = events

    def get(
        self, agent_id: uuid.UUID, load: Callable[[], AgentAliases | None]
    ) -> AgentAliases | None:
        if agent_id not in self.entries:
            value = load()
            if value is None:
                return None
            self.entries[agent_id] = value
        return self.entries[agent_id]

    def invalidate(self, agent_id: uuid.UUID) -> None:
        self._events.append(f"invalidate aliases {agent_id}")
        self.entries.pop(agent_id, None)

    def close(self) -> None:
        self.entries.clear()


def user(*roles: str) -> Principal:
    return Principal(user_id=str(uuid.uuid4()), roles=frozenset(roles or ("user",)))


def admin() -> Principal:
    return user("user", "admin")


def service_account(*scopes: str) -> Principal:
    """A service account's own token (client credentials) granting `scopes`."""
    account = str(uuid.uuid4())
    return Principal(
        user_id=account, roles=frozenset(), scopes=frozenset(scopes), client_id=account
    )


def acting_for(person: Principal, *scopes: str) -> tuple[Principal, str]:
    """A delegated token: a service account acting for `person`, and the account's id."""
    actor = str(uuid.uuid4())
    token = Principal(
        user_id=person.user_id,
        roles=person.roles,
        scopes=frozenset(scopes),
        client_id=actor,
        actor=actor,
    )
    return token, actor


def agent_input(**overrides: object) -> AgentInput:
    values: dict[str, object] = {
        "name": "support bot",
        "description": "answers support questions",
        "model": "gpt-4o",
        "instructions": "Be helpful.",
        "tools": (
            Tool(
                name="lookup_order",
                description="Finds an order",
                parameters={
                    "type": "object",
                    "properties": {"order_id": {"type": "string"}},
                    "required": ["order_id"],
                },
            ),
        ),
        "metadata": {"team": "support"},
        "temperature": 0.2,
        "top_p": None,
    }
    values.update(overrides)
    return AgentInput(**values)  # type: ignore[arg-type]


@dataclass
class World:
    """An AgentService over fakes, and the fakes themselves."""

    service: AgentService
    database: FakeDatabase
    cache: RecordingCache
    clock: FakeClock
    alias_cache: RecordingAliasCache
    revision_cache: RevisionMemory


def make_world(
    *,
    models: tuple[str, ...] = MODELS,
    secret: bytes = SECRET,
    agent_size: Callable[[Agent], int] = agent_size,
    request_id_ttl_seconds: float = 86_400.0,
    max_agents_per_owner: int = 0,
    catalogue: ModelCatalogue | None = None,
    revisions_kept: int = 100,
    deleted_retention_seconds: float = 30 * 86_400.0,
) -> World:
    database = FakeDatabase()
    cache = RecordingCache(database.events)
    world_alias_cache = RecordingAliasCache(database.events)
    revision_cache = RevisionMemory()
    clock = FakeClock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    service = AgentService(
        uow=database.unit_of_work,
        cache=cache,
        clock=clock,
        allowed_models=models,
        page_tokens=PageTokens(secret),
        agent_size=agent_size,
        request_id_ttl_seconds=request_id_ttl_seconds,
        max_agents_per_owner=max_agents_per_owner,
        catalogue=catalogue,
        revisions_kept=revisions_kept,
        deleted_retention_seconds=deleted_retention_seconds,
        alias_cache=world_alias_cache,
        revision_cache=revision_cache,
    )
    return World(service, database, cache, clock, world_alias_cache, revision_cache)
