"""AgentService on a real database (SQLite and PostgreSQL): paging under concurrent inserts
and the races the unique keys and the compare-and-set decide."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, text

from services.agent_svc.domain import Agent, AgentInput
from services.agent_svc.infra.nocache import NoCache
from services.agent_svc.repository.models import OwnerCountRow
from services.agent_svc.repository.sql import SqlAgentUnitOfWork
from services.agent_svc.service.agent_service import AgentService
from services.agent_svc.service.paging import PageTokens
from shared.config.clock import SystemClock
from shared.rpc.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from shared.security.tokens import Principal
from tests.helpers import FakeClock
from tests.unit.agent.fakes import MODELS, SECRET, agent_input

UowFactory = Callable[[], SqlAgentUnitOfWork]


def service(uow: UowFactory, clock: Any = None, **options: Any) -> AgentService:
    return AgentService(
        uow=uow,
        cache=NoCache(),
        clock=clock or SystemClock(),
        allowed_models=MODELS,
        page_tokens=PageTokens(SECRET),
        **options,
    )


def a_user() -> Principal:
    return Principal(user_id=str(uuid.uuid4()), roles=frozenset({"user"}))


def run_together(*calls: Callable[[], Any]) -> list[Any]:
    """Starts the calls at once on threads; each result is a value or the exception."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int, call: Callable[[], Any]) -> None:
        barrier.wait(timeout=10)
        try:
            results[index] = call()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.mark.parametrize("order_by", ["", "name", "update_time desc"])
def test_paging_while_others_insert_neither_repeats_nor_skips(
    uow: UowFactory, order_by: str
) -> None:
    clock = FakeClock()
    agents = service(uow, clock)
    me = a_user()
    existing: set[uuid.UUID] = set()
    for index in range(17):
        existing.add(agents.create(principal=me, agent=agent_input(name=f"m-{index:02d}")).id)
        if index % 3 == 0:  # some rows share their create and update times
            clock.advance(0.001)
    seen: list[uuid.UUID] = []
    token, inserted = "", 0
    while True:
        page = agents.list(principal=me, page_size=4, page_token=token, order_by=order_by)
        seen += [a.id for a in page.agents]
        token = page.next_page_token
        if not token:
            break
        for name in (f"a-{inserted}", f"m-{inserted:02d}x", f"z-{inserted}"):  # everywhere
            agents.create(principal=me, agent=agent_input(name=name))
        inserted += 1
        clock.advance(0.001)
    assert len(seen) == len(set(seen)), "a row came twice"
    assert existing <= set(seen), "a row that existed at the start was skipped"


def test_two_updates_with_one_etag_exactly_one_wins(uow: UowFactory) -> None:
    agents, me = service(uow), a_user()
    for round_ in range(4):
        agent = agents.create(principal=me, agent=agent_input(name=f"raced-{round_}"))

        def update(description: str, agent: Agent = agent) -> Agent:
            return agents.update(
                principal=me,
                agent_id=str(agent.id),
                patch=AgentInput(description=description),
                update_mask=["description"],
                etag=agent.etag,
            )

        results = run_together(lambda: update("left"), lambda: update("right"))
        winners = [r for r in results if isinstance(r, Agent)]
        losers = [r for r in results if isinstance(r, Aborted)]
        assert (len(winners), len(losers)) == (1, 1), results
        assert losers[0].reason == "ETAG_MISMATCH"
        stored = agents.get(principal=me, agent_id=str(agent.id))
        assert stored == winners[0]
        assert stored.revision == agent.revision + 1


def test_concurrent_updates_without_etag_all_apply(uow: UowFactory) -> None:
    agents, me = service(uow), a_user()
    agent = agents.create(principal=me, agent=agent_input())

    def set_entry(key: str) -> Agent:
        return agents.update(
            principal=me,
            agent_id=str(agent.id),
            patch=AgentInput(metadata={key: "1"}),
            update_mask=[f"metadata.{key}"],
        )

    results = run_together(*[lambda k=f"k{i}": set_entry(k) for i in range(3)])
    assert all(isinstance(r, Agent) for r in results), results
    stored = agents.get(principal=me, agent_id=str(agent.id))
    assert {"k0", "k1", "k2"} <= set(stored.metadata)
    assert stored.revision == agent.revision + 3


def test_a_create_replayed_concurrently_creates_once_and_answers_alike(uow: UowFactory) -> None:
    agents, me = service(uow), a_user()
    for round_ in range(3):
        request = str(uuid.uuid4())
        sent = agent_input(name=f"replayed-{round_}")
        results = run_together(
            *[lambda: agents.create(principal=me, agent=sent, request_id=request)] * 4  # noqa: B023
        )
        assert all(isinstance(r, Agent) for r in results), results
        assert all(r == results[0] for r in results), "every caller gets the same response"
    assert len(agents.list(principal=me).agents) == 3


def test_concurrent_creates_of_one_request_id_with_different_agents(uow: UowFactory) -> None:
    agents, me, request = service(uow), a_user(), str(uuid.uuid4())
    results = run_together(
        *[
            lambda name=name: agents.create(
                principal=me, agent=agent_input(name=name), request_id=request
            )
            for name in ("one", "two", "three")
        ]
    )
    created = [r for r in results if isinstance(r, Agent)]
    reused = [r for r in results if isinstance(r, InvalidArgument)]
    assert (len(created), len(reused)) == (1, 2), results
    assert {r.reason for r in reused} == {"REQUEST_ID_REUSED"}
    assert agents.list(principal=me).agents == (created[0],)


def test_a_replay_returns_the_first_response_after_updates_and_a_delete(uow: UowFactory) -> None:
    agents, me, request = service(uow), a_user(), str(uuid.uuid4())
    first = agents.create(principal=me, agent=agent_input(), request_id=request)
    changed = agents.update(
        principal=me,
        agent_id=str(first.id),
        patch=AgentInput(description="changed"),
        update_mask=["description"],
    )
    assert agents.create(principal=me, agent=agent_input(), request_id=request) == first
    agents.delete(principal=me, agent_id=str(changed.id))
    assert agents.create(principal=me, agent=agent_input(), request_id=request) == first
    assert agents.list(principal=me).agents == ()
    with pytest.raises(InvalidArgument) as caught:
        agents.create(principal=me, agent=agent_input(name="other"), request_id=request)
    assert caught.value.reason == "REQUEST_ID_REUSED"


def test_an_expired_request_id_creates_anew(uow: UowFactory) -> None:
    clock = FakeClock()
    agents, me, request = (
        service(uow, clock, request_id_ttl_seconds=60),
        a_user(),
        str(uuid.uuid4()),
    )
    first = agents.create(principal=me, agent=agent_input(name="first"), request_id=request)
    clock.advance(60)
    second = agents.create(principal=me, agent=agent_input(name="second"), request_id=request)
    assert second.id != first.id
    assert agents.create(principal=me, agent=agent_input(name="second"), request_id=request) == (
        second
    )


def test_concurrent_creates_of_one_name_one_wins(uow: UowFactory) -> None:
    agents, me = service(uow), a_user()
    results = run_together(
        *[lambda: agents.create(principal=me, agent=agent_input(name="same"))] * 2
    )
    assert sorted(type(r).__name__ for r in results) == ["Agent", "AlreadyExists"], results
    assert all(isinstance(r, Agent | AlreadyExists) for r in results)
    assert not any(isinstance(r, DomainError) and not isinstance(r, AlreadyExists) for r in results)


@pytest.mark.parametrize("existing", [0, 2])
def test_concurrent_creates_at_the_quota_exactly_the_quota_succeed(
    uow: UowFactory, existing: int
) -> None:
    """With no count row yet (the insert race) and with one (the conditional increment)."""
    agents, me = service(uow, max_agents_per_owner=5), a_user()
    for index in range(existing):
        agents.create(principal=me, agent=agent_input(name=f"before-{index}"))
    results = run_together(
        *[
            lambda name=f"racer-{index}": agents.create(principal=me, agent=agent_input(name=name))
            for index in range(8)
        ]
    )
    created = [r for r in results if isinstance(r, Agent)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert (len(created), len(refused)) == (5 - existing, 3 + existing), results
    assert {r.reason for r in refused} == {"AGENT_QUOTA_EXCEEDED"}
    assert len(agents.list(principal=me).agents) == 5


def test_concurrent_creates_and_deletes_keep_the_count_exact(uow: UowFactory) -> None:
    agents, me = service(uow, max_agents_per_owner=100), a_user()
    doomed = [agents.create(principal=me, agent=agent_input(name=f"d{i}")) for i in range(4)]
    results = run_together(
        *[lambda a=a: agents.delete(principal=me, agent_id=str(a.id)) for a in doomed],
        *[
            lambda name=f"n{index}": agents.create(principal=me, agent=agent_input(name=name))
            for index in range(4)
        ],
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    with uow() as work:
        counted = work.session.scalar(
            select(OwnerCountRow.agents).where(OwnerCountRow.owner_id == uuid.UUID(me.user_id))
        )
    assert counted == len(agents.list(principal=me).agents) == 4


def _waiting_on_a_lock(uow: UowFactory) -> int:
    """Sessions of this database waiting for a row lock (PostgreSQL)."""
    with uow() as work:
        return int(
            work.session.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def test_a_revision_tagged_while_an_update_would_prune_it_is_kept(
    uow: UowFactory, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("row locks: PostgreSQL (SQLite has one writer at a time)")
    agents = service(uow, revisions_kept=1)
    owner = a_user()
    agent = agents.create(principal=owner, agent=agent_input(description="v1"))
    with uow() as tagger:
        # The tag's transaction holds the agent's row, as TagAgentRevision does...
        assert tagger.agents.get(agent.id, for_update=True) is not None
        done: list[Any] = []
        updater = threading.Thread(
            target=lambda: done.append(
                agents.update(
                    principal=owner,
                    agent_id=str(agent.id),
                    patch=AgentInput(description="v2"),
                    update_mask=["description"],
                )
            )
        )
        updater.start()
        # ...while the update that would prune revision 1 waits for it.
        deadline = time.monotonic() + 30
        while _waiting_on_a_lock(uow) == 0:
            assert time.monotonic() < deadline, "the update never waited for the row"
            time.sleep(0.01)
        tagger.revisions.set_alias(agent.id, "prod", 1, now=agent.create_time, by="")
        tagger.commit()
    updater.join(timeout=30)
    assert [a.revision_id for a in done] == [2]
    with uow() as work:
        kept = work.revisions.list_page(agent.id, before=None, limit=10)
    assert [r.revision_id for r in kept] == [2, 1]
    pinned = agents.get(principal=owner, agent_id=f"{agent.id}@prod")
    assert pinned.description == "v1"


def test_tagging_a_revision_an_update_pruned_first_is_not_found(uow: UowFactory) -> None:
    agents = service(uow, revisions_kept=1)
    owner = a_user()
    agent = agents.create(principal=owner, agent=agent_input(description="v1"))
    agents.update(
        principal=owner,
        agent_id=str(agent.id),
        patch=AgentInput(description="v2"),
        update_mask=["description"],
    )
    with pytest.raises(NotFound) as caught:
        agents.tag(principal=owner, agent_id=str(agent.id), revision_id="1", alias="prod")
    assert caught.value.reason == "REVISION_NOT_FOUND"


def test_a_name_held_by_an_expired_agent_is_free_before_the_worker_purges_it(
    uow: UowFactory,
) -> None:
    """Past its expire_time a deleted agent is gone for every call (AIP-164); its name was
    still taken (ALREADY_EXISTS) until the worker's next pass. A create or a rename that
    finds it so purges it in its own transaction; a name held by an agent that can still be
    undeleted stays taken; a refused create leaves the owner's count as it was."""
    clock = FakeClock()
    agents, me = (
        service(uow, clock, deleted_retention_seconds=60, max_agents_per_owner=10),
        a_user(),
    )
    old = agents.create(principal=me, agent=agent_input(name="reused"))
    other = agents.create(principal=me, agent=agent_input(name="other"))
    agents.delete(principal=me, agent_id=str(old.id))
    with pytest.raises(AlreadyExists):  # deleted, not expired: undeletable, name kept
        agents.create(principal=me, agent=agent_input(name="reused"))
    clock.advance(61)
    new = agents.create(principal=me, agent=agent_input(name="reused"))
    assert new.id != old.id
    with pytest.raises(NotFound):
        agents.get(principal=me, agent_id=str(old.id))
    # A rename onto an expired agent's name, likewise.
    gone = agents.create(principal=me, agent=agent_input(name="renamed-onto"))
    agents.delete(principal=me, agent_id=str(gone.id))
    clock.advance(61)
    renamed = agents.update(
        principal=me,
        agent_id=str(other.id),
        patch=agent_input(name="renamed-onto"),
        update_mask=["name"],
    )
    assert renamed.name == "renamed-onto"
    with uow() as work:
        kinds = [(c.kind.value, c.agent.id) for c in work.changes.after(0, limit=100)]
        counted = work.session.scalar(
            select(OwnerCountRow.agents).where(OwnerCountRow.owner_id == uuid.UUID(me.user_id))
        )
    assert ("purged", old.id) in kinds
    assert kinds.index(("purged", old.id)) < kinds.index(("created", new.id))
    assert ("purged", gone.id) in kinds
    assert counted == len(agents.list(principal=me).agents) == 2
