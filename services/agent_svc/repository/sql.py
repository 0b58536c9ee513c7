"""SQLAlchemy implementation of the agent repositories and unit of work.

Everything reaches the database as bound parameters. The same SQL runs on PostgreSQL and
SQLite: keyset paging compares row values `(sort column, id)`, metadata filters use the
JSON path operators SQLAlchemy compiles for each dialect, and a name prefix is matched by
an escaped LIKE (which can use an index) confirmed by an exact, case-sensitive substring
comparison (SQLite's LIKE ignores ASCII case).

The records of creates with a request id keep the response as compact JSON of the agent's
columns (`_encode_response`), versioned, decoded by the same mapping as an agent row: the
round trip is exact (floats, microseconds, UTC, tool parameters, the revision).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Uuid,
    and_,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from services.agent_svc.domain import Agent, AgentInput, AgentRevision, Tool
from services.agent_svc.repository.models import (
    AgentAliasRow,
    AgentRevisionRow,
    AgentRow,
    ChangeRow,
    CreateRequestRow,
    OwnerCountRow,
)
from services.agent_svc.service.filtering import (
    Condition,
    MetadataEquals,
    ModelEquals,
    NameEquals,
    NamePrefix,
    OwnerEquals,
    SortField,
)
from services.agent_svc.service.ports import (
    AgentQuery,
    Change,
    ChangeKind,
    CreateRecord,
    FilterFields,
    NameTaken,
    QuotaExceeded,
    RequestReplayed,
)
from shared.config.clock import utc
from shared.data.db import SqlUnitOfWork

_log = logging.getLogger(__name__)

__all__ = [
    "SqlAgentRepository",
    "SqlAgentUnitOfWork",
    "SqlChangeLogRepository",
    "SqlCreateRequestRepository",
    "SqlRevisionRepository",
]

_SORT_COLUMNS: dict[SortField, InstrumentedAttribute[Any]] = {
    SortField.CREATE_TIME: AgentRow.create_time,
    SortField.UPDATE_TIME: AgentRow.update_time,
    SortField.NAME: AgentRow.name,
}


# Reads select the table's columns, not ORM entities: the rows become immutable domain
# objects at once, so identity-map bookkeeping would be pure cost (a third of a page's).
_AGENTS = AgentRow.__table__


# The columns an agent is read from, in the order `_agent_from_row` unpacks them.
_AGENT_COLUMNS = (
    _AGENTS.c.id,
    _AGENTS.c.owner_id,
    _AGENTS.c.name,
    _AGENTS.c.description,
    _AGENTS.c.model,
    _AGENTS.c.instructions,
    _AGENTS.c.tools,
    _AGENTS.c.metadata,
    _AGENTS.c.temperature,
    _AGENTS.c.top_p,
    _AGENTS.c.create_time,
    _AGENTS.c.update_time,
    _AGENTS.c.revision,
    _AGENTS.c.updated_by,
    _AGENTS.c.updated_via,
    _AGENTS.c.revision_id,
    _AGENTS.c.delete_time,
    _AGENTS.c.expire_time,
)


def _read() -> Select[Any]:
    return select(*_AGENT_COLUMNS)


def _agent_from_row(row: Any) -> Agent:
    """An agent from a row of `_read()`: positional, the hot path of every page (a
    mapping per row cost a fifth of a page's time)."""
    (
        agent_id,
        owner_id,
        name,
        description,
        model,
        instructions,
        tools,
        metadata,
        temperature,
        top_p,
        create_time,
        update_time,
        revision,
        updated_by,
        updated_via,
        revision_id,
        delete_time,
        expire_time,
    ) = row
    return Agent(
        id=agent_id,
        owner_id=owner_id,
        name=name,
        description=description,
        model=model,
        instructions=instructions,
        tools=tuple(Tool(t["name"], t["description"], t["parameters"]) for t in tools),
        metadata=dict(metadata),
        temperature=temperature,
        top_p=top_p,
        create_time=_utc(create_time),
        update_time=_utc(update_time),
        revision=revision,
        updated_by=updated_by or "",
        updated_via=updated_via or "",
        revision_id=revision_id,
        delete_time=_utc(delete_time) if delete_time is not None else None,
        expire_time=_utc(expire_time) if expire_time is not None else None,
    )


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is UTC else utc(moment)


def _agent(column: Mapping[Any, Any]) -> Agent:
    """An agent from its columns (a row's mapping, or a decoded response)."""
    return Agent(
        id=column["id"],
        owner_id=column["owner_id"],
        name=column["name"],
        description=column["description"],
        model=column["model"],
        instructions=column["instructions"],
        tools=tuple(
            Tool(name=t["name"], description=t["description"], parameters=t["parameters"])
            for t in column["tools"]
        ),
        metadata=dict(column["metadata"]),
        temperature=column["temperature"],
        top_p=column["top_p"],
        create_time=utc(column["create_time"]),
        update_time=utc(column["update_time"]),
        revision=column["revision"],
        updated_by=column.get("updated_by") or "",
        updated_via=column.get("updated_via") or "",
        revision_id=column.get("revision_id", 1),
    )


def _tools(agent: Agent) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "description": t.description, "parameters": t.parameters}
        for t in agent.tools
    ]


def _values(agent: Agent) -> dict[str, Any]:
    """The columns an update rewrites (owner, id and create time never change)."""
    return {
        "name": agent.name,
        "description": agent.description,
        "model": agent.model,
        "instructions": agent.instructions,
        "tools": _tools(agent),
        "metadata_": dict(agent.metadata),
        "temperature": agent.temperature,
        "top_p": agent.top_p,
        "revision": agent.revision,
        "update_time": agent.update_time,
        "updated_by": agent.updated_by or None,
        "updated_via": agent.updated_via or None,
        "revision_id": agent.revision_id,
        "delete_time": agent.delete_time,
        "expire_time": agent.expire_time,
    }


_REVISIONS = AgentRevisionRow.__table__
_REVISION_COLUMNS = (
    _REVISIONS.c.agent_id,
    _REVISIONS.c.revision_id,
    _REVISIONS.c.create_time,
    _REVISIONS.c.name,
    _REVISIONS.c.description,
    _REVISIONS.c.model,
    _REVISIONS.c.instructions,
    _REVISIONS.c.tools,
    _REVISIONS.c.metadata,
    _REVISIONS.c.temperature,
    _REVISIONS.c.top_p,
    _REVISIONS.c.created_by,
    _REVISIONS.c.created_via,
)


def _revision_from_row(row: Any) -> AgentRevision:
    (
        agent_id,
        revision_id,
        create_time,
        name,
        description,
        model,
        instructions,
        tools,
        metadata,
        temperature,
        top_p,
        created_by,
        created_via,
    ) = row
    fields = AgentInput(
        name=name,
        description=description,
        model=model,
        instructions=instructions,
        tools=tuple(Tool(t["name"], t["description"], t["parameters"]) for t in tools),
        metadata=dict(metadata),
        temperature=temperature,
        top_p=top_p,
    )
    return AgentRevision(
        agent_id=agent_id,
        revision_id=revision_id,
        create_time=_utc(create_time),
        fields=fields,
        created_by=created_by or "",
        created_via=created_via or "",
    )


def _condition(condition: Condition, dialect: str) -> ColumnElement[bool]:
    match condition:
        case ModelEquals(model):
            return AgentRow.model == model
        case NameEquals(name):
            return AgentRow.name == name
        case NamePrefix(prefix):
            return and_(
                AgentRow.name.startswith(prefix, autoescape=True),
                func.substr(AgentRow.name, 1, len(prefix)) == prefix,
            )
        case MetadataEquals(key, value):
            if dialect == "sqlite":
                # Not a JSON path: SQLAlchemy writes a non-ASCII key into SQLite's path as a
                # \u escape, which SQLite does not read back (and a path cannot hold `"`).
                pairs = func.json_each(AgentRow.metadata_).table_valued("key", "value")
                return exists(
                    select(literal(1))
                    .select_from(pairs)
                    .where(pairs.c.key == key, pairs.c.value == value)
                )
            entry: ColumnElement[str] = AgentRow.metadata_[key].as_string()
            return entry == value
        case OwnerEquals(owner_id):
            return AgentRow.owner_id == owner_id
    raise AssertionError(f"unhandled condition {condition!r}")  # pragma: no cover


class SqlAgentRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, agent: Agent, *, max_per_owner: int = 0) -> None:
        if not self._count_in(agent.owner_id, max_per_owner):
            raise QuotaExceeded(str(agent.owner_id))
        row = AgentRow(
            id=agent.id, owner_id=agent.owner_id, create_time=agent.create_time, **_values(agent)
        )
        try:
            # The row joins the session inside the savepoint (begin_nested flushes what is
            # already pending first), so a unique violation rolls back only this insert.
            with self._session.begin_nested():
                self._session.add(row)
                self._session.flush()
        except IntegrityError:
            self._count(agent.owner_id, -1)  # the one counted above: a refused add leaves none
            raise NameTaken(agent.name) from None

    def get(self, agent_id: uuid.UUID, *, for_update: bool = False) -> Agent | None:
        statement = _read().where(AgentRow.id == agent_id)
        if for_update:
            statement = statement.with_for_update()
        row = self._session.execute(statement).one_or_none()
        return _agent_from_row(row) if row else None

    def named(self, owner_id: uuid.UUID, name: str) -> Agent | None:
        statement = _read().where(AgentRow.owner_id == owner_id, AgentRow.name == name)
        row = self._session.execute(statement).one_or_none()
        return _agent_from_row(row) if row else None

    def count_by_model(self, owner_id: uuid.UUID | None) -> dict[str, int]:
        statement = (
            select(AgentRow.model, func.count())
            .where(AgentRow.delete_time.is_(None))
            .group_by(AgentRow.model)
        )
        if owner_id is not None:
            statement = statement.where(AgentRow.owner_id == owner_id)
        return {model: int(count) for model, count in self._session.execute(statement)}

    def list_page(self, query: AgentQuery) -> list[Agent]:
        column = _SORT_COLUMNS[query.ordering.field]
        statement = _read()
        if query.owner_id is not None:
            statement = statement.where(AgentRow.owner_id == query.owner_id)
        if not query.show_deleted:
            statement = statement.where(AgentRow.delete_time.is_(None))
        elif query.now is not None:
            statement = statement.where(
                or_(AgentRow.expire_time.is_(None), AgentRow.expire_time > query.now)
            )
        dialect = self._session.get_bind().dialect.name
        for condition in query.filter.conditions:
            statement = statement.where(_condition(condition, dialect))
        if query.after is not None:
            key = tuple_(column, AgentRow.id)
            last = tuple_(literal(query.after.value, column.type), literal(query.after.id, Uuid()))
            statement = statement.where(key < last if query.ordering.descending else key > last)
        if query.ordering.descending:
            statement = statement.order_by(column.desc(), AgentRow.id.desc())
        else:
            statement = statement.order_by(column.asc(), AgentRow.id.asc())
        # Core, not the ORM's execution: the rows are plain tuples, made into agents here.
        rows = self._session.connection().execute(statement.limit(query.limit))
        return [_agent_from_row(row) for row in rows]

    def update(self, agent: Agent, *, expected_revision: int) -> bool:
        statement = (
            update(AgentRow)
            .where(AgentRow.id == agent.id, AgentRow.revision == expected_revision)
            .values(**_values(agent))
            .execution_options(synchronize_session=False)
        )
        try:
            with self._session.begin_nested():
                result = self._session.execute(statement)
        except IntegrityError:
            raise NameTaken(agent.name) from None
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def _store(self, agent: Agent, expected_revision: int) -> bool:
        statement = (
            update(AgentRow)
            .where(AgentRow.id == agent.id, AgentRow.revision == expected_revision)
            .values(**_values(agent))
            .execution_options(synchronize_session=False)
        )
        return bool(self._session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def soft_delete(self, agent: Agent, *, expected_revision: int) -> bool:
        # The count row first, as add does: a create and a delete of one owner's agents
        # then lock in the same order and cannot deadlock.
        uncounted = self._count(agent.owner_id, -1)
        if self._store(agent, expected_revision):
            return True
        if uncounted:
            self._count(agent.owner_id, +1)
        return False

    def undelete(self, agent: Agent, *, expected_revision: int, max_per_owner: int = 0) -> bool:
        if not self._count_in(agent.owner_id, max_per_owner):
            raise QuotaExceeded(str(agent.owner_id))
        if self._store(agent, expected_revision):
            return True
        self._count(agent.owner_id, -1)
        return False

    def purge(self, agent_id: uuid.UUID, *, expected_revision: int | None = None) -> Agent | None:
        current = self.get(agent_id)
        if current is None:
            return None
        if not current.deleted:
            self._count(current.owner_id, -1)  # the count row first (see soft_delete)
        statement = delete(AgentRow).where(AgentRow.id == agent_id)
        if expected_revision is not None:
            statement = statement.where(AgentRow.revision == expected_revision)
        else:
            statement = statement.where(AgentRow.revision == current.revision)
        result = self._session.execute(statement.execution_options(synchronize_session=False))
        if not result.rowcount:  # type: ignore[attr-defined]
            if not current.deleted:
                self._count(current.owner_id, +1)
            return None
        self._remove_history([agent_id])
        return current

    def purge_expired(self, *, now: datetime, limit: int) -> list[Agent]:
        # Rows another purger has locked are skipped (PostgreSQL), so replicas of the
        # worker share the work instead of queueing on it; SQLite has one writer anyway.
        expired = (
            _read()
            .where(AgentRow.expire_time < now)
            .order_by(AgentRow.expire_time)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        agents = [_agent_from_row(row) for row in self._session.execute(expired)]
        if not agents:
            return []
        ids = [agent.id for agent in agents]
        self._session.execute(
            delete(AgentRow)
            .where(AgentRow.id.in_(ids))
            .execution_options(synchronize_session=False)
        )
        self._remove_history(ids)
        return agents

    def _remove_history(self, ids: list[uuid.UUID]) -> None:
        for table in (AgentRevisionRow, AgentAliasRow):
            self._session.execute(
                delete(table)
                .where(table.agent_id.in_(ids))
                .execution_options(synchronize_session=False)
            )

    def _count_in(self, owner_id: uuid.UUID, limit: int) -> bool:
        """Counts one more agent for the owner unless that would pass `limit` (0: none):
        one conditional increment, atomic under concurrent creates."""
        if self._count(owner_id, +1, below=limit):
            return True
        try:  # no count row yet (or the owner is at the limit: the insert tells)
            with self._session.begin_nested():
                self._session.execute(insert(OwnerCountRow).values(owner_id=owner_id, agents=1))
            return True
        except IntegrityError:  # the row exists, maybe just committed by a concurrent create
            return self._count(owner_id, +1, below=limit)

    def _count(self, owner_id: uuid.UUID, change: int, *, below: int = 0) -> bool:
        """Changes the owner's count by one (never below 0, nor to `below` or more when
        set); whether it did."""
        statement = (
            update(OwnerCountRow)
            .where(OwnerCountRow.owner_id == owner_id)
            .values(agents=OwnerCountRow.agents + change)
            .execution_options(synchronize_session=False)
        )
        if change < 0:
            statement = statement.where(OwnerCountRow.agents > 0)
        if below:
            statement = statement.where(OwnerCountRow.agents < below)
        return bool(self._session.execute(statement).rowcount)  # type: ignore[attr-defined]


_RESPONSE_VERSION = 1


def _encode_response(agent: Agent) -> str:
    """The agent as compact JSON of its columns (ids as hex, times as ISO 8601 UTC)."""
    document = {
        "v": _RESPONSE_VERSION,
        "id": agent.id.hex,
        "owner_id": agent.owner_id.hex,
        "name": agent.name,
        "description": agent.description,
        "model": agent.model,
        "instructions": agent.instructions,
        "tools": _tools(agent),
        "metadata": dict(agent.metadata),
        "temperature": agent.temperature,
        "top_p": agent.top_p,
        "revision": agent.revision,
        "revision_id": agent.revision_id,
        "updated_by": agent.updated_by,
        "updated_via": agent.updated_via,
        "create_time": agent.create_time.astimezone(UTC).isoformat(),
        "update_time": agent.update_time.astimezone(UTC).isoformat(),
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _decode_response(text: str) -> Agent:
    document = json.loads(text)
    if document.get("v") != _RESPONSE_VERSION:
        raise ValueError(f"unknown response encoding {document.get('v')!r}")
    return _agent(
        {
            **document,
            "id": uuid.UUID(hex=document["id"]),
            "owner_id": uuid.UUID(hex=document["owner_id"]),
            "create_time": datetime.fromisoformat(document["create_time"]),
            "update_time": datetime.fromisoformat(document["update_time"]),
        }
    )


class SqlCreateRequestRepository:
    """Records of creates with a request id; a record's time is its agent's create time."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def get(
        self, owner_id: uuid.UUID, request_id: uuid.UUID, *, created_after: datetime
    ) -> CreateRecord | None:
        row = self._session.execute(
            select(CreateRequestRow.fingerprint, CreateRequestRow.response).where(
                CreateRequestRow.owner_id == owner_id,
                CreateRequestRow.request_id == request_id,
                CreateRequestRow.create_time > created_after,
            )
        ).one_or_none()
        return CreateRecord(row.fingerprint, _decode_response(row.response)) if row else None

    def add(
        self,
        owner_id: uuid.UUID,
        request_id: uuid.UUID,
        record: CreateRecord,
        *,
        created_after: datetime,
    ) -> None:
        agent = record.agent
        expired = delete(CreateRequestRow).where(
            CreateRequestRow.owner_id == owner_id,
            CreateRequestRow.request_id == request_id,
            CreateRequestRow.create_time <= created_after,
        )
        row = CreateRequestRow(
            owner_id=owner_id,
            request_id=request_id,
            fingerprint=record.fingerprint,
            agent_id=agent.id,
            response=_encode_response(agent),
            create_time=agent.create_time,
        )
        try:
            with self._session.begin_nested():
                self._session.execute(expired.execution_options(synchronize_session=False))
                self._session.add(row)
                self._session.flush()
        except IntegrityError:
            raise RequestReplayed(str(request_id)) from None

    def purge(self, *, created_before: datetime, limit: int) -> int:
        key = tuple_(CreateRequestRow.owner_id, CreateRequestRow.request_id)
        oldest = (
            select(CreateRequestRow.owner_id, CreateRequestRow.request_id)
            .where(CreateRequestRow.create_time < created_before)
            .limit(limit)
        )
        result = self._session.execute(
            delete(CreateRequestRow)
            .where(key.in_(oldest))
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


class SqlRevisionRepository:
    """Configuration revisions (immutable rows) and the aliases that name them."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, revision: AgentRevision, *, keep: int) -> None:
        fields = revision.fields
        self._session.execute(
            insert(AgentRevisionRow).values(
                agent_id=revision.agent_id,
                revision_id=revision.revision_id,
                create_time=revision.create_time,
                name=fields.name,
                description=fields.description,
                model=fields.model,
                instructions=fields.instructions,
                tools=[
                    {"name": t.name, "description": t.description, "parameters": t.parameters}
                    for t in fields.tools
                ],
                metadata_=dict(fields.metadata),
                temperature=fields.temperature,
                top_p=fields.top_p,
                created_by=revision.created_by or None,
                created_via=revision.created_via or None,
            )
        )
        self.prune(revision.agent_id, newest=revision.revision_id, keep=keep)

    def prune(self, agent_id: uuid.UUID, *, newest: int, keep: int) -> None:
        aliased = exists().where(
            AgentAliasRow.agent_id == AgentRevisionRow.agent_id,
            AgentAliasRow.revision_id == AgentRevisionRow.revision_id,
        )
        self._session.execute(
            delete(AgentRevisionRow)
            .where(
                AgentRevisionRow.agent_id == agent_id,
                AgentRevisionRow.revision_id <= newest - keep,
                ~aliased,
            )
            .execution_options(synchronize_session=False)
        )

    def get(self, agent_id: uuid.UUID, revision_id: int) -> AgentRevision | None:
        row = self._session.execute(
            select(*_REVISION_COLUMNS).where(
                AgentRevisionRow.agent_id == agent_id, AgentRevisionRow.revision_id == revision_id
            )
        ).one_or_none()
        return _revision_from_row(row) if row else None

    def list_page(
        self, agent_id: uuid.UUID, *, before: int | None, limit: int
    ) -> list[AgentRevision]:
        statement = select(*_REVISION_COLUMNS).where(AgentRevisionRow.agent_id == agent_id)
        if before is not None:
            statement = statement.where(AgentRevisionRow.revision_id < before)
        statement = statement.order_by(AgentRevisionRow.revision_id.desc()).limit(limit)
        return [_revision_from_row(row) for row in self._session.execute(statement)]

    def aliases(self, agent_id: uuid.UUID) -> dict[str, int]:
        rows = self._session.execute(
            select(AgentAliasRow.alias, AgentAliasRow.revision_id)
            .where(AgentAliasRow.agent_id == agent_id)
            .order_by(AgentAliasRow.alias)
        )
        return {row.alias: row.revision_id for row in rows}

    def set_alias(
        self, agent_id: uuid.UUID, alias: str, revision_id: int, *, now: datetime, by: str
    ) -> None:
        # The agent's row is locked by the caller: no concurrent tag of this agent, so a
        # delete-then-insert cannot race another insert of the same key.
        self.remove_alias(agent_id, alias)
        self._session.execute(
            insert(AgentAliasRow).values(
                agent_id=agent_id,
                alias=alias,
                revision_id=revision_id,
                update_time=now,
                updated_by=by or None,
            )
        )

    def remove_alias(self, agent_id: uuid.UUID, alias: str) -> bool:
        result = self._session.execute(
            delete(AgentAliasRow)
            .where(AgentAliasRow.agent_id == agent_id, AgentAliasRow.alias == alias)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


# The key of the transaction-level advisory lock every append takes on PostgreSQL (any
# constant of our own: "agchange" in ASCII).
CHANGE_LOG_LOCK = 0x61676368616E6765
_CHANGES = ChangeRow.__table__
_KINDS = {kind.value: kind for kind in ChangeKind}


def _kind(value: str) -> ChangeKind:
    """A row's kind. One this release does not know (a later release's, written during a
    rolling update) is read as an update of the agent it carries: watchers re-read the
    agent, and the hub does not fail every read until this pod is replaced (as a hub
    without this rule does on the rows of alias moves: docs/watch.md "Upgrading")."""
    kind = _KINDS.get(value)
    if kind is None:
        if value not in _UNKNOWN_KINDS and len(_UNKNOWN_KINDS) < 16:  # once each, not per row
            _UNKNOWN_KINDS.add(value)
            _log.warning("change log: unknown kind %r read as an update", value[:32])
        return ChangeKind.UPDATED
    return kind


_UNKNOWN_KINDS: set[str] = set()


class SqlChangeLogRepository:
    """The change log (agent_changes). Commit order on PostgreSQL: a sequence hands out
    numbers when rows are inserted, not when transactions commit, so without more a
    reader could see 8 committed while 7, taken earlier, is still in flight, move past
    it, and never deliver it. Each append therefore first takes one transaction-level
    advisory lock (released at commit or rollback): the appending transactions of the
    whole cluster take their numbers one at a time and commit in that order (PostgreSQL
    makes a commit visible before it releases the transaction's locks), so the committed
    rows are always a prefix of the numbers handed out and `after(seq)` never skips one.
    The cost: appends are serialized from the append to the commit (services append as
    their last statement, so that is the commit itself). SQLite has one writer anyway."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def append(
        self,
        kind: ChangeKind,
        agent: Agent,
        *,
        previous: Agent | None = None,
        alias: str = "",
        alias_revision: int | None = None,
    ) -> None:
        session = self._session
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_LOG_LOCK})
        session.execute(
            insert(ChangeRow).values(
                kind=kind.value,
                agent_id=agent.id,
                owner_id=agent.owner_id,
                agent=_encode_response(agent),
                previous=(
                    {
                        "name": previous.name,
                        "model": previous.model,
                        "metadata": dict(previous.metadata),
                    }
                    if previous is not None
                    else None
                ),
                change_time=utc_now(),  # the writer's clock: what the retention window counts
                alias=alias or None,
                alias_revision=alias_revision,
            )
        )

    def after(self, seq: int, *, limit: int) -> list[Change]:
        rows = self._session.connection().execute(
            select(
                _CHANGES.c.seq,
                _CHANGES.c.kind,
                _CHANGES.c.agent,
                _CHANGES.c.previous,
                _CHANGES.c.change_time,
                _CHANGES.c.alias,
                _CHANGES.c.alias_revision,
            )
            .where(_CHANGES.c.seq > seq)
            .order_by(_CHANGES.c.seq)
            .limit(limit)
        )
        return [
            Change(
                seq=row_seq,
                kind=_kind(kind),
                agent=_decode_response(agent),
                time=_utc(change_time),
                previous=(
                    FilterFields(previous["name"], previous["model"], dict(previous["metadata"]))
                    if previous
                    else None
                ),
                alias=alias or "",
                alias_revision=alias_revision,
            )
            for row_seq, kind, agent, previous, change_time, alias, alias_revision in rows
        ]

    def head(self) -> int:
        value = self._session.execute(select(func.max(ChangeRow.seq))).scalar()
        return int(value or 0)

    def purge(self, *, changed_before: datetime, limit: int) -> int:
        # The newest row stays, however old: the log's head (its highest number) must never
        # go back, or a resume token would look ahead of the log (see service/watch.py).
        newest = select(func.max(ChangeRow.seq)).scalar_subquery()
        oldest = (
            select(ChangeRow.seq)
            .where(ChangeRow.change_time < changed_before, ChangeRow.seq < newest)
            .limit(limit)
        )
        result = self._session.execute(
            delete(ChangeRow)
            .where(ChangeRow.seq.in_(oldest))
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def utc_now() -> datetime:
    return datetime.now(UTC)


class SqlAgentUnitOfWork(SqlUnitOfWork):
    agents: SqlAgentRepository
    create_requests: SqlCreateRequestRepository
    revisions: SqlRevisionRepository
    changes: SqlChangeLogRepository

    def _open_repositories(self, session: Session) -> None:
        self.agents = SqlAgentRepository(session)
        self.create_requests = SqlCreateRequestRepository(session)
        self.revisions = SqlRevisionRepository(session)
        self.changes = SqlChangeLogRepository(session)
