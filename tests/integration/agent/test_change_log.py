"""The change log on SQLite and PostgreSQL: a change and its row commit or roll back
together; under concurrent writers a reader that follows the log (as the watch hub does)
gets every change exactly once, in commit order; a hub resumed from a position reads the
rest from the log."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from services.agent_svc.repository.models import ChangeRow
from services.agent_svc.repository.sql import SqlAgentUnitOfWork
from services.agent_svc.service.ports import ChangeKind
from services.agent_svc.service.watch import ChangeHub, Position, Watchers, encode_token
from shared.config.clock import SystemClock
from shared.rpc.errors import AlreadyExists
from shared.security.tokens import Principal
from tests.integration.agent.test_service_on_db import service
from tests.unit.agent.fakes import agent_input

UowFactory = Callable[[], SqlAgentUnitOfWork]


def a_user() -> Principal:
    return Principal(user_id=str(uuid.uuid4()), roles=frozenset({"user"}))


def rows(sessions: sessionmaker[Session]) -> list[tuple[int, str, uuid.UUID]]:
    with sessions() as session:
        return [
            (r.seq, r.kind, r.agent_id)
            for r in session.execute(
                select(ChangeRow.seq, ChangeRow.kind, ChangeRow.agent_id).order_by(ChangeRow.seq)
            )
        ]


def test_a_change_and_its_row_commit_together_and_a_rollback_leaves_none(
    uow: UowFactory, sessions: sessionmaker[Session]
) -> None:
    agents = service(uow)
    me = a_user()
    agent = agents.create(principal=me, agent=agent_input(name="logged"))
    try:
        agents.create(principal=me, agent=agent_input(name="logged"))  # name taken: rolls back
        raise AssertionError("the second create should have failed")
    except AlreadyExists:
        pass
    with uow() as work:  # a unit of work that appends and does not commit
        work.changes.append(ChangeKind.UPDATED, agent)
    agents.update(
        principal=me,
        agent_id=str(agent.id),
        patch=agent_input(model="claude-sonnet-4"),
        update_mask=["model"],
    )
    agents.delete(principal=me, agent_id=str(agent.id))
    assert [(kind, agent_id) for _, kind, agent_id in rows(sessions)] == [
        ("created", agent.id),
        ("updated", agent.id),
        ("deleted", agent.id),
    ]
    with uow() as work:
        (_, updated, _) = work.changes.after(0, limit=10)
    assert updated.agent.model == "claude-sonnet-4"
    assert updated.previous is not None
    assert updated.previous.model == "gpt-4o"


def test_alias_moves_are_logged_with_the_alias_and_read_back(uow: UowFactory) -> None:
    agents = service(uow)
    me = a_user()
    agent = agents.create(principal=me, agent=agent_input(name="pinned"))
    agents.tag(principal=me, agent_id=str(agent.id), revision_id="1", alias="prod")
    agents.untag(principal=me, agent_id=str(agent.id), alias="prod")
    with uow() as work:
        changes = work.changes.after(0, limit=10)
    assert [(c.kind, c.alias, c.alias_revision) for c in changes] == [
        (ChangeKind.CREATED, "", None),
        (ChangeKind.TAGGED, "prod", 1),
        (ChangeKind.UNTAGGED, "prod", None),
    ]
    assert {c.agent.id for c in changes} == {agent.id}


def test_a_follower_of_the_log_gets_every_concurrent_change_once_in_commit_order(
    uow: UowFactory, sessions: sessionmaker[Session]
) -> None:
    agents = service(uow)
    writers, per_writer = 4, 15
    done = threading.Event()
    seen: list[int] = []

    def follow() -> None:
        last = 0
        while True:
            finished = done.is_set()  # read before the query: a last pass after the writers
            with uow() as work:
                page = work.changes.after(last, limit=7)
            seen.extend(change.seq for change in page)
            if page:
                last = page[-1].seq
            elif finished:
                return

    def write() -> None:
        me = a_user()
        for index in range(per_writer):
            agents.create(principal=me, agent=agent_input(name=f"w{index}"))

    follower = threading.Thread(target=follow)
    follower.start()
    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    done.set()
    follower.join(timeout=120)
    committed = [seq for seq, _, _ in rows(sessions)]
    assert len(committed) == writers * per_writer
    assert seen == committed  # each once, none skipped, in order
    # And a stream resumed from the start (an admin's: every owner) reads them all again,
    # once each, in order, through a hub of its own.
    hub = ChangeHub(read_uow=uow, clock=SystemClock(), page_size=7)
    hub.read_new()
    watchers = Watchers(
        hub, clock=SystemClock(), retention_seconds=3600, heartbeat_seconds=30, max_streams=1
    )
    token = encode_token(Position(0, SystemClock().now()))
    stream = iter(watchers.open(viewer=uuid.uuid4(), is_admin=True, filter="", resume_token=token))
    resumed: list[int] = []
    while len(resumed) < len(committed):
        resumed += [change.seq for change, _ in next(stream).changes]
    assert resumed == committed


def test_a_stream_resumed_on_a_fresh_hub_reads_the_rest_from_the_log(uow: UowFactory) -> None:
    agents = service(uow)
    me = a_user()
    first = agents.create(principal=me, agent=agent_input(name="before"))
    with uow() as work:
        position = work.changes.head()
    names = [f"after-{n}" for n in range(5)]
    for name in names:
        agents.create(principal=me, agent=agent_input(name=name))
    hub = ChangeHub(read_uow=uow, clock=SystemClock(), page_size=2)
    hub.read_new()
    watchers = Watchers(
        hub, clock=SystemClock(), retention_seconds=3600, heartbeat_seconds=30, max_streams=5
    )
    token = encode_token(Position(position, SystemClock().now()))
    stream = iter(
        watchers.open(viewer=first.owner_id, is_admin=False, filter="", resume_token=token)
    )
    got: list[str] = []
    while len(got) < len(names):
        got += [change.agent.name for change, _ in next(stream).changes]
    assert got == names


def test_a_kind_this_release_does_not_know_is_read_as_an_update(
    uow: UowFactory, sessions: sessionmaker[Session]
) -> None:
    """A later release's kind, written during a rolling update: read as an update of the
    agent it carries, so the hub's reads go on (they failed on every read until the pod
    was replaced)."""
    agents = service(uow)
    me = a_user()
    agent = agents.create(principal=me, agent=agent_input(name="from-the-future"))
    with sessions() as session:
        session.execute(update(ChangeRow).values(kind="renamed-v9"))
        session.commit()
    with uow() as work:
        (change,) = work.changes.after(0, limit=10)
    assert (change.kind, change.agent.id) == (ChangeKind.UPDATED, agent.id)
