"""SQLAlchemy implementation of the agent repository and unit of work.

Everything reaches the database as bound parameters. The same SQL runs on PostgreSQL and
SQLite: keyset paging compares row values `(sort column, id)`, metadata filters use the
JSON path operators SQLAlchemy compiles for each dialect, and a name prefix is matched by
an escaped LIKE (which can use an index) confirmed by an exact, case-sensitive substring
comparison (SQLite's LIKE ignores ASCII case).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    Uuid,
    and_,
    delete,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from services.agent_svc.domain import Agent, Tool
from services.agent_svc.repository.models import AgentRow
from services.agent_svc.service.filtering import (
    Condition,
    MetadataEquals,
    ModelEquals,
    NameEquals,
    NamePrefix,
    OwnerEquals,
    SortField,
)
from services.agent_svc.service.ports import AgentQuery, NameTaken, RequestReplayed
from shared.config.clock import utc
from shared.data.db import SqlUnitOfWork

__all__ = ["SqlAgentRepository", "SqlAgentUnitOfWork"]

_SORT_COLUMNS: dict[SortField, InstrumentedAttribute[Any]] = {
    SortField.CREATE_TIME: AgentRow.create_time,
    SortField.UPDATE_TIME: AgentRow.update_time,
    SortField.NAME: AgentRow.name,
}


# Reads select the table's columns, not ORM entities: the rows become immutable domain
# objects at once, so identity-map bookkeeping would be pure cost (a third of a page's).
_AGENTS = AgentRow.__table__


def _read() -> Select[Any]:
    return select(_AGENTS)


def _agent(row: Row[Any]) -> Agent:
    column = row._mapping
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
    }


def _condition(condition: Condition) -> ColumnElement[bool]:
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
            entry: ColumnElement[str] = AgentRow.metadata_[key].as_string()
            return entry == value
        case OwnerEquals(owner_id):
            return AgentRow.owner_id == owner_id
    raise AssertionError(f"unhandled condition {condition!r}")  # pragma: no cover


class SqlAgentRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, agent: Agent, *, request_id: uuid.UUID | None = None) -> None:
        row = AgentRow(
            id=agent.id,
            owner_id=agent.owner_id,
            request_id=request_id,
            create_time=agent.create_time,
            **_values(agent),
        )
        try:
            # The row joins the session inside the savepoint (begin_nested flushes what is
            # already pending first), so a unique violation rolls back only this insert.
            with self._session.begin_nested():
                self._session.add(row)
                self._session.flush()
        except IntegrityError:
            # A replayed create collides on both keys; the request id decides.
            if request_id is not None and self.get_by_request_id(agent.owner_id, request_id):
                raise RequestReplayed(str(request_id)) from None
            raise NameTaken(agent.name) from None

    def get(self, agent_id: uuid.UUID) -> Agent | None:
        row = self._session.execute(_read().where(AgentRow.id == agent_id)).one_or_none()
        return _agent(row) if row else None

    def get_by_request_id(self, owner_id: uuid.UUID, request_id: uuid.UUID) -> Agent | None:
        row = self._session.execute(
            _read().where(AgentRow.owner_id == owner_id, AgentRow.request_id == request_id)
        ).one_or_none()
        return _agent(row) if row else None

    def list_page(self, query: AgentQuery) -> list[Agent]:
        column = _SORT_COLUMNS[query.ordering.field]
        statement = _read()
        if query.owner_id is not None:
            statement = statement.where(AgentRow.owner_id == query.owner_id)
        for condition in query.filter.conditions:
            statement = statement.where(_condition(condition))
        if query.after is not None:
            key = tuple_(column, AgentRow.id)
            last = tuple_(literal(query.after.value, column.type), literal(query.after.id, Uuid()))
            statement = statement.where(key < last if query.ordering.descending else key > last)
        if query.ordering.descending:
            statement = statement.order_by(column.desc(), AgentRow.id.desc())
        else:
            statement = statement.order_by(column.asc(), AgentRow.id.asc())
        rows = self._session.execute(statement.limit(query.limit))
        return [_agent(row) for row in rows]

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

    def delete(self, agent_id: uuid.UUID, *, expected_revision: int | None = None) -> bool:
        statement = delete(AgentRow).where(AgentRow.id == agent_id)
        if expected_revision is not None:
            statement = statement.where(AgentRow.revision == expected_revision)
        result = self._session.execute(statement.execution_options(synchronize_session=False))
        return bool(result.rowcount)  # type: ignore[attr-defined]


class SqlAgentUnitOfWork(SqlUnitOfWork):
    agents: SqlAgentRepository

    def _open_repositories(self, session: Session) -> None:
        self.agents = SqlAgentRepository(session)
