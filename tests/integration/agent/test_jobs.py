"""agent_svc's background jobs on SQLite and PostgreSQL: request ids past their window go,
the others stay (a replay within the window still gets its first response); change-log rows
past the watch retention (and its margin) go, the others stay."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.agent_svc.jobs import agent_jobs
from services.agent_svc.repository.models import ChangeRow, CreateRequestRow
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
    job, _changes = agent_jobs(sessions, clock=FakeClock(NOW), request_id_ttl_seconds=86_400)
    assert job.name == "agent.request_ids.purge"
    assert dict(job.run()) == {"deleted": 2}
    with sessions() as session:
        assert session.scalars(select(CreateRequestRow.request_id)).all() == [ids["recent"]]
    assert dict(job.run()) == {"deleted": 0}


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
    _request_ids, job = agent_jobs(
        sessions, clock=FakeClock(NOW), request_id_ttl_seconds=86_400, watch_retention_seconds=3600
    )
    assert job.name == "agent.changes.purge"
    assert dict(job.run()) == {"deleted": 2}
    with sessions() as session:
        assert len(session.scalars(select(ChangeRow.seq)).all()) == 1
    assert dict(job.run()) == {"deleted": 0}
