"""agent_svc's background jobs on SQLite and PostgreSQL: request ids past their window go,
the others stay (a replay within the window still gets its first response); change-log rows
past the watch retention (and its margin) go, the others stay."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.agent_svc.domain import Agent, AgentInput
from services.agent_svc.jobs import agent_jobs
from services.agent_svc.repository.models import (
    AgentAliasRow,
    AgentRevisionRow,
    AgentRow,
    ChangeRow,
    CreateRequestRow,
)
from services.agent_svc.repository.sql import SqlAgentUnitOfWork
from services.agent_svc.service.watch import PURGE_MARGIN
from tests.helpers import FakeClock

NOW = datetime(2031, 6, 1, 12, 0, tzinfo=UTC)


def test_request_ids_past_their_window_are_purged(sessions: sessionmaker[Session]) -> None:
    owner = uuid.uuid4()
    ages = {"old": 2 * 86_400, "just past": 86_400 + 1, "recent": 60}
    ids = {name: uuid.uuid4() for name in ages}
    with sessions.begin() as session:
        session.add_all(
            CreateRequestRow(
                owner_id=owner,
                request_id=ids[name],
                fingerprint=None,
                agent_id=uuid.uuid4(),
                response="{}",
                create_time=NOW - timedelta(seconds=age),
            )
            for name, age in ages.items()
        )
    job, *_ = agent_jobs(sessions, clock=FakeClock(NOW), request_id_ttl_seconds=86_400)
    assert job.name == "agent.request_ids.purge"
    assert dict(job.run()) == {"deleted": 2}
    with sessions() as session:
        assert session.scalars(select(CreateRequestRow.request_id)).all() == [ids["recent"]]
    assert dict(job.run()) == {"deleted": 0}


def test_deleted_agents_past_their_expire_time_go_with_their_revisions(
    sessions: sessionmaker[Session],
) -> None:
    owner = uuid.uuid4()
    agents = {
        name: Agent.new(AgentInput(name=name, model="gpt-4o"), owner_id=owner, now=NOW)
        for name in ("expired", "pending", "alive")
    }
    with SqlAgentUnitOfWork(sessions) as uow:
        for agent in agents.values():
            uow.agents.add(agent)
            uow.revisions.add(agent.current_revision, keep=10)
        for name, purge_in in (("expired", -1), ("pending", 3600)):
            agent = agents[name]
            gone = agent.soft_deleted(now=NOW, expire_time=NOW + timedelta(seconds=purge_in))
            assert uow.agents.soft_delete(gone, expected_revision=agent.revision)
        uow.revisions.set_alias(agents["expired"].id, "prod", 1, now=NOW, by="")
        uow.commit()
    purged: list[uuid.UUID] = []
    _, job, _ = agent_jobs(
        sessions, clock=FakeClock(NOW), request_id_ttl_seconds=86_400, on_purged=purged.extend
    )
    assert job.name == "agent.deleted.purge"
    assert dict(job.run()) == {"purged": 1}
    assert purged == [agents["expired"].id]
    with sessions() as session:
        assert set(session.scalars(select(AgentRow.name))) == {"pending", "alive"}
        assert set(session.scalars(select(AgentRevisionRow.agent_id))) == {
            agents["pending"].id,
            agents["alive"].id,
        }
        assert session.scalars(select(AgentAliasRow.alias)).all() == []
        # Each purge is a WatchAgents event, committed with it.
        assert session.execute(select(ChangeRow.kind, ChangeRow.agent_id)).all() == [
            ("purged", agents["expired"].id)
        ]
    assert dict(job.run()) == {"purged": 0}


def test_changes_past_the_watch_retention_and_its_margin_are_purged(
    sessions: sessionmaker[Session],
) -> None:
    window = timedelta(seconds=3600) + PURGE_MARGIN
    ages = {"old": window * 2, "just past": window + timedelta(seconds=1), "kept": window / 2}
    with sessions.begin() as session:
        session.add_all(
            ChangeRow(
                kind="created",
                agent_id=uuid.uuid4(),
                owner_id=uuid.uuid4(),
                agent="{}",
                change_time=NOW - age,
            )
            for age in ages.values()
        )
    _request_ids, _deleted, job = agent_jobs(
        sessions, clock=FakeClock(NOW), request_id_ttl_seconds=86_400, watch_retention_seconds=3600
    )
    assert job.name == "agent.changes.purge"
    assert dict(job.run()) == {"deleted": 2}
    with sessions() as session:
        assert len(session.scalars(select(ChangeRow.seq)).all()) == 1
    assert dict(job.run()) == {"deleted": 0}
    # The newest change stays however old: the log's head never goes back (a resume
    # token at it must not look ahead of the log).
    with sessions.begin() as session:
        session.add_all(
            ChangeRow(
                kind="created",
                agent_id=uuid.uuid4(),
                owner_id=uuid.uuid4(),
                agent="{}",
                change_time=NOW - window * 2,
            )
            for _ in range(2)
        )
    assert dict(job.run()) == {"deleted": 1}
    with sessions() as session:
        newest = session.scalar(select(func.max(ChangeRow.seq)))
        assert newest in session.scalars(select(ChangeRow.seq)).all()
