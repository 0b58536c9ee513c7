"""The agent migrations that move data, on SQLite and PostgreSQL:

- agent_0002 copies the request ids of agent_agents into agent_create_requests: a replay
  of an id recorded before it still returns its agent and creates nothing, and a
  downgrade puts the ids recorded since back on their agents;
- agent_0003 counts each owner's agents into agent_owner_counts, so the quota holds for
  the agents that existed before it;
- agent_0005 makes each existing agent's configuration its revision 1 (made at its
  update_time by its updated_by), so `id@1`, tags and rollbacks work on old agents."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    Text,
    Uuid,
    column,
    create_engine,
    select,
    table,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from services.agent_svc.domain import AgentInput, Tool
from services.agent_svc.infra.nocache import NoCache
from services.agent_svc.repository.sql import SqlAgentUnitOfWork
from services.agent_svc.service.agent_service import AgentService
from services.agent_svc.service.paging import PageTokens
from shared.config.clock import SystemClock
from shared.data import migrations
from shared.data.db import make_engine, normalize_url, session_factory
from shared.rpc.errors import ResourceExhausted
from shared.security.tokens import Principal
from tests.unit.agent.fakes import MODELS, SECRET, agent_input

OWNER = uuid.uuid4()
# agent_agents as revision agent_0001 left it (reflection would not bring back the types).
OLD_AGENTS = table(
    "agent_agents",
    column("id", Uuid()),
    column("owner_id", Uuid()),
    column("name", String()),
    column("description", String()),
    column("model", String()),
    column("instructions", Text()),
    column("tools", JSON()),
    column("metadata", JSON()),
    column("temperature", Float()),
    column("top_p", Float()),
    column("revision", Integer()),
    column("request_id", Uuid()),
    column("create_time", DateTime(timezone=True)),
    column("update_time", DateTime(timezone=True)),
)


@pytest.fixture
def raw(database_url: str) -> Iterator[Engine]:
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    yield engine
    engine.dispose()


def old_row(
    name: str,
    request_id: uuid.UUID | None,
    revision: int,
    age: timedelta = timedelta(minutes=5),
    owner: uuid.UUID = OWNER,
) -> dict[str, Any]:
    created = datetime.now(UTC) - age
    return {
        "id": uuid.uuid4(),
        "owner_id": owner,
        "name": name,
        "description": "as created" if revision == 1 else "changed since",
        "model": "gpt-4o",
        "instructions": "Be brief. Zoë ✨",
        "tools": [{"name": "t", "description": "d", "parameters": {"n": 1.5, "x": [None]}}],
        "metadata": {"team": "search"},
        "temperature": 1 / 3,
        "top_p": None,
        "revision": revision,
        "request_id": request_id,
        "create_time": created,
        "update_time": created + timedelta(seconds=revision - 1),
    }


def service(sessions: sessionmaker[Session], max_agents_per_owner: int = 0) -> AgentService:
    return AgentService(
        uow=lambda: SqlAgentUnitOfWork(sessions),
        cache=NoCache(),
        clock=SystemClock(),
        allowed_models=MODELS,
        page_tokens=PageTokens(SECRET),
        max_agents_per_owner=max_agents_per_owner,
    )


def test_request_ids_recorded_before_the_migration_keep_working(
    database_url: str, raw: Engine
) -> None:
    migrations.upgrade("agent", database_url, "agent_0001")
    fresh, updated, expired = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rows = [
        old_row("fresh", fresh, 1),
        old_row("updated", updated, 3),
        old_row("plain", None, 1),
        old_row("expired", expired, 1, age=timedelta(days=2)),
    ]
    with raw.begin() as connection:
        connection.execute(OLD_AGENTS.insert(), rows)

    migrations.upgrade("agent", database_url)
    engine = make_engine(database_url, pool_size=1)
    try:
        sessions = session_factory(engine)
        agents = service(sessions)
        me = Principal(user_id=str(OWNER), roles=frozenset({"user"}))
        stored = {a.name: a for a in agents.list(principal=me).agents}
        assert set(stored) == {"fresh", "updated", "plain", "expired"}
        # No fingerprint was kept for these ids: a replay gets the recorded agent, as before.
        for name, request in (("fresh", fresh), ("updated", updated)):
            for sent in (agent_input(name=name), AgentInput(name="x", model="gpt-4o")):
                replay = agents.create(principal=me, agent=sent, request_id=str(request))
                assert replay == stored[name]
        assert replay.tools == (Tool("t", "d", {"n": 1.5, "x": [None]}),)
        since = uuid.uuid4()
        agents.create(principal=me, agent=agent_input(name="since"), request_id=str(since))
        # An id older than the TTL is free again: it creates anew.
        agents.create(principal=me, agent=agent_input(name="anew"), request_id=str(expired))
        assert len(agents.list(principal=me).agents) == 6
    finally:
        engine.dispose()

    migrations.downgrade("agent", database_url, "agent_0001")
    with raw.connect() as connection:
        names = select(OLD_AGENTS.c.name, OLD_AGENTS.c.request_id)
        ids = {row.name: row.request_id for row in connection.execute(names)}
    # Each id back on the agent it was recorded for, unless another agent holds it still.
    assert ids == {
        "fresh": fresh,
        "updated": updated,
        "plain": None,
        "expired": expired,
        "since": since,
        "anew": None,
    }


def test_the_agents_that_exist_count_against_the_quota(database_url: str, raw: Engine) -> None:
    migrations.upgrade("agent", database_url, "agent_0002")
    other = uuid.uuid4()
    rows = [old_row(f"a{index}", None, 1) for index in range(3)] + [
        old_row("b0", None, 1, owner=other)
    ]
    with raw.begin() as connection:
        connection.execute(OLD_AGENTS.insert(), rows)

    migrations.upgrade("agent", database_url)
    engine = make_engine(database_url, pool_size=1)
    try:
        agents = service(session_factory(engine), max_agents_per_owner=4)
        me = Principal(user_id=str(OWNER), roles=frozenset({"user"}))
        agents.create(principal=me, agent=agent_input(name="a3"))
        with pytest.raises(ResourceExhausted):
            agents.create(principal=me, agent=agent_input(name="a4"))
        them = Principal(user_id=str(other), roles=frozenset({"user"}))
        for index in range(1, 4):
            agents.create(principal=them, agent=agent_input(name=f"b{index}"))
        with pytest.raises(ResourceExhausted):
            agents.create(principal=them, agent=agent_input(name="b4"))
    finally:
        engine.dispose()


def test_existing_agents_get_their_configuration_as_revision_one(
    database_url: str, raw: Engine
) -> None:
    migrations.upgrade("agent", database_url, "agent_0004")
    rows = [old_row("old", None, 3), old_row("older", None, 1)]
    with raw.begin() as connection:
        connection.execute(OLD_AGENTS.insert(), rows)

    migrations.upgrade("agent", database_url)
    engine = make_engine(database_url, pool_size=1)
    try:
        agents = service(session_factory(engine))
        me = Principal(user_id=str(OWNER), roles=frozenset({"user"}))
        for row in rows:
            current = agents.get(principal=me, agent_id=str(row["id"]))
            assert (current.revision_id, current.delete_time) == (1, None)
            assert agents.get(principal=me, agent_id=f"{row['id']}@1") == current
        old_id = str(rows[0]["id"])
        agents.tag(principal=me, agent_id=old_id, revision_id="1", alias="prod")
        changed = agents.update(
            principal=me,
            agent_id=old_id,
            patch=AgentInput(description="after the migration"),
            update_mask=["description"],
        )
        assert changed.revision_id == 2
        rolled = agents.rollback(principal=me, agent_id=old_id, revision_id="prod")
        assert (rolled.revision_id, rolled.description) == (3, "changed since")
        assert rolled.tools == (Tool("t", "d", {"n": 1.5, "x": [None]}),)
    finally:
        engine.dispose()
    migrations.downgrade("agent", database_url, "agent_0004")
