"""The SQLAlchemy agent repository on SQLite and PostgreSQL (each test: a fresh database)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from services.agent_svc.domain import Agent, ChangeAuthor, Tool
from services.agent_svc.repository.models import OwnerCountRow
from services.agent_svc.repository.sql import SqlAgentUnitOfWork
from services.agent_svc.service.filtering import (
    AgentFilter,
    Condition,
    MetadataEquals,
    ModelEquals,
    NameEquals,
    NamePrefix,
    Ordering,
    OwnerEquals,
    SortField,
)
from services.agent_svc.service.paging import Cursor
from services.agent_svc.service.ports import (
    AgentQuery,
    CreateRecord,
    NameTaken,
    QuotaExceeded,
    RequestReplayed,
)

UowFactory = Callable[[], SqlAgentUnitOfWork]
BY_NAME = Ordering(SortField.NAME, descending=False)
T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
ALICE = uuid.UUID("00000000-0000-4000-8000-00000000000a")
BOB = uuid.UUID("00000000-0000-4000-8000-00000000000b")
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def an_agent(name: str = "support bot", owner: uuid.UUID = ALICE, **changes: Any) -> Agent:
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "owner_id": owner,
        "name": name,
        "description": "answers questions",
        "model": "gpt-4o",
        "instructions": "Be helpful. " * 50,
        "tools": (
            Tool(
                name="search",
                description="Searches",
                parameters={
                    "type": "object",
                    "properties": {"q": {"type": "string"}, "n": {"type": "number"}},
                    "required": ["q"],
                    "default": {"n": 10.0, "exact": True, "none": None},
                },
            ),
        ),
        "metadata": {"team": "search", "tier": "gold"},
        "temperature": 0.1,
        "top_p": None,
        "create_time": T0,
        "update_time": T0,
        "revision": 1,
    }
    fields.update(changes)
    return Agent(**fields)


def add(uow: UowFactory, *agents: Agent) -> None:
    with uow() as work:
        for agent in agents:
            work.agents.add(agent)
        work.commit()


def get(uow: UowFactory, agent_id: uuid.UUID) -> Agent | None:
    with uow() as work:
        return work.agents.get(agent_id)


def query(
    uow: UowFactory,
    *conditions: Condition,
    owner: uuid.UUID | None = ALICE,
    order: Ordering = BY_NAME,
    after: Cursor | None = None,
    limit: int = 100,
) -> list[str]:
    with uow() as work:
        rows = work.agents.list_page(
            AgentQuery(owner, AgentFilter(conditions), order, after, limit)
        )
    return [row.name for row in rows]


SERVICE = "serviceAccounts/00000000-0000-4000-8000-0000000000cc"


def test_an_agent_round_trips_exactly(uow: UowFactory) -> None:
    agent = an_agent(
        temperature=1 / 3,
        top_p=0.0,
        description='Zoë ✨ "quoted"\nline',
        updated_by=f"users/{ALICE}",
        updated_via=SERVICE,
    )
    add(uow, agent)
    assert get(uow, agent.id) == agent
    bare = an_agent("bare", tools=(), metadata={}, temperature=None, top_p=None)
    add(uow, bare)
    stored = get(uow, bare.id)
    assert stored == bare
    assert stored is not None
    assert stored.create_time.tzinfo is not None
    assert get(uow, uuid.uuid4()) is None


def test_names_are_unique_per_owner(uow: UowFactory) -> None:
    add(uow, an_agent("dup"))
    with uow() as work:
        with pytest.raises(NameTaken):
            work.agents.add(an_agent("dup"))
        # The failed insert rolled back to its savepoint: the unit of work goes on.
        work.agents.add(an_agent("dup", owner=BOB))
        work.agents.add(an_agent("other"))
        work.commit()
    assert query(uow) == ["dup", "other"]
    assert query(uow, owner=BOB) == ["dup"]


def record(uow: UowFactory, owner: uuid.UUID, request: uuid.UUID, agent: Agent) -> None:
    with uow() as work:
        work.create_requests.add(
            owner, request, CreateRecord("f" * 64, agent), created_after=LONG_AGO
        )
        work.commit()


def recorded(
    uow: UowFactory, owner: uuid.UUID, request: uuid.UUID, after: datetime = LONG_AGO
) -> CreateRecord | None:
    with uow() as work:
        return work.create_requests.get(owner, request, created_after=after)


def test_a_create_record_round_trips_the_response_exactly(uow: UowFactory) -> None:
    request = uuid.uuid4()
    agent = an_agent(
        temperature=1 / 3,
        top_p=0.0,
        description='Zoë ✨ "quoted"\nline',
        updated_by=f"users/{ALICE}",
        updated_via=SERVICE,
    )
    record(uow, ALICE, request, agent)
    assert recorded(uow, ALICE, request) == CreateRecord("f" * 64, agent)
    bare = an_agent("bare", tools=(), metadata={}, temperature=None, top_p=None)
    with uow() as work:
        work.create_requests.add(ALICE, uuid.uuid4(), CreateRecord(None, bare), created_after=T0)
        work.commit()
    assert recorded(uow, BOB, request) is None  # another owner's ids are theirs
    assert recorded(uow, ALICE, uuid.uuid4()) is None


def test_a_live_record_is_never_replaced(uow: UowFactory) -> None:
    request, first = uuid.uuid4(), an_agent("first")
    record(uow, ALICE, request, first)
    with uow() as work:
        with pytest.raises(RequestReplayed):
            work.create_requests.add(
                ALICE, request, CreateRecord(None, an_agent("second")), created_after=LONG_AGO
            )
        # The failed insert rolled back to its savepoint: the unit of work goes on.
        work.create_requests.add(BOB, request, CreateRecord(None, first), created_after=LONG_AGO)
        work.commit()
    assert recorded(uow, ALICE, request) == CreateRecord("f" * 64, first)


def test_an_expired_record_is_invisible_and_replaced_by_the_next_create(uow: UowFactory) -> None:
    request, first = uuid.uuid4(), an_agent("first")
    record(uow, ALICE, request, first)  # made at T0
    assert recorded(uow, ALICE, request, after=T0 - timedelta(microseconds=1)) is not None
    assert recorded(uow, ALICE, request, after=T0) is None  # expired at T0 + TTL
    later = an_agent("later", create_time=T0 + timedelta(days=2), update_time=T0)
    with uow() as work:
        work.create_requests.add(ALICE, request, CreateRecord("e" * 64, later), created_after=T0)
        work.commit()
    assert recorded(uow, ALICE, request) == CreateRecord("e" * 64, later)


def test_purge_deletes_records_made_before_a_time_a_batch_at_a_time(uow: UowFactory) -> None:
    for index in range(5):
        moment = T0 + timedelta(seconds=index)
        agent = an_agent(f"a{index}", create_time=moment, update_time=moment)
        record(uow, ALICE, uuid.uuid4(), agent)
    cutoff = T0 + timedelta(seconds=3)  # records 0, 1 and 2 were made before it
    with uow() as work:
        assert work.create_requests.purge(created_before=cutoff, limit=2) == 2
        assert work.create_requests.purge(created_before=cutoff, limit=2) == 1
        assert work.create_requests.purge(created_before=cutoff, limit=2) == 0
        work.commit()
    with uow() as work:
        left = work.create_requests.purge(created_before=T0 + timedelta(days=1), limit=100)
    assert left == 2


def test_update_is_a_compare_and_set_on_the_revision(uow: UowFactory) -> None:
    agent = an_agent()
    add(uow, agent)
    later = T0 + timedelta(seconds=5)
    changed = an_agent(
        id=agent.id,
        name="renamed",
        description="",
        metadata={"k": "v"},
        tools=(),
        temperature=None,
        top_p=0.5,
        update_time=later,
        revision=2,
        updated_by=SERVICE,
    )
    with uow() as work:
        assert not work.agents.update(changed, expected_revision=7)
        assert work.agents.update(changed, expected_revision=1)
        work.commit()
    assert get(uow, agent.id) == changed
    with uow() as work:
        assert not work.agents.update(changed, expected_revision=1)  # stale now
        assert not work.agents.update(an_agent(), expected_revision=1)  # no such agent


def test_renaming_onto_a_taken_name_is_name_taken(uow: UowFactory) -> None:
    taken, mine = an_agent("taken"), an_agent("mine")
    add(uow, taken, mine)
    with uow() as work:
        with pytest.raises(NameTaken):
            work.agents.update(an_agent("taken", id=mine.id, revision=2), expected_revision=1)
        assert work.agents.update(an_agent("fine", id=mine.id, revision=2), expected_revision=1)
        work.commit()
    assert query(uow) == ["fine", "taken"]


def deleted(agent: Agent) -> Agent:
    return agent.soft_deleted(now=T0, expire_time=T0 + timedelta(days=30))


def test_soft_delete_is_a_compare_and_set_and_keeps_the_row(uow: UowFactory) -> None:
    one = an_agent("one")
    add(uow, one)
    with uow() as work:
        assert not work.agents.soft_delete(deleted(one), expected_revision=2)
        assert work.agents.soft_delete(deleted(one), expected_revision=1)
        work.commit()
    assert query(uow) == []  # left out of lists by default
    with uow() as work:
        page = work.agents.list_page(
            AgentQuery(ALICE, AgentFilter(()), BY_NAME, None, 10, show_deleted=True)
        )
        assert [agent.name for agent in page] == ["one"]
        for now, names in ((T0 + timedelta(days=29), ["one"]), (T0 + timedelta(days=30), [])):
            shown = work.agents.list_page(
                AgentQuery(ALICE, AgentFilter(()), BY_NAME, None, 10, show_deleted=True, now=now)
            )
            assert [agent.name for agent in shown] == names  # none past its expire_time
        stored = work.agents.get(one.id)
    assert stored == deleted(one)
    assert (stored.delete_time, stored.expire_time) == (T0, T0 + timedelta(days=30))


def test_purge_removes_the_agent_its_revisions_and_aliases(uow: UowFactory) -> None:
    one, other = an_agent("one"), an_agent("other")
    add(uow, one, other)
    with uow() as work:
        for agent in (one, other):
            work.revisions.add(agent.current_revision, keep=10)
        work.revisions.set_alias(one.id, "prod", 1, now=T0, by="users/x")
        work.commit()
    with uow() as work:
        assert work.agents.purge(one.id, expected_revision=2) is None
        assert work.agents.purge(one.id, expected_revision=1) == one
        assert work.agents.purge(one.id) is None
        work.commit()
    with uow() as work:
        assert work.agents.get(one.id) is None
        assert work.revisions.get(one.id, 1) is None
        assert work.revisions.aliases(one.id) == {}
        assert work.revisions.get(other.id, 1) == other.current_revision


def counts(uow: UowFactory) -> dict[uuid.UUID, int]:
    with uow() as work:
        rows = work.session.execute(select(OwnerCountRow.owner_id, OwnerCountRow.agents))
        return {row.owner_id: row.agents for row in rows}


def test_adds_deletes_undeletes_and_purges_keep_each_owners_count(uow: UowFactory) -> None:
    first, second, bobs = an_agent("first"), an_agent("second"), an_agent("bobs", owner=BOB)
    add(uow, first, second, bobs)
    assert counts(uow) == {ALICE: 2, BOB: 1}
    with uow() as work:
        assert not work.agents.soft_delete(deleted(first), expected_revision=9)
        assert work.agents.purge(uuid.uuid4()) is None
        work.commit()
    assert counts(uow) == {ALICE: 2, BOB: 1}  # nothing deleted, nothing uncounted
    with uow() as work:
        assert work.agents.soft_delete(deleted(first), expected_revision=1)
        work.commit()
    assert counts(uow) == {ALICE: 1, BOB: 1}  # a deleted agent frees its place
    with uow() as work:
        with pytest.raises(QuotaExceeded):
            work.agents.undelete(deleted(first).undeleted(), expected_revision=2, max_per_owner=1)
        assert not work.agents.undelete(deleted(first).undeleted(), expected_revision=7)
        assert work.agents.undelete(deleted(first).undeleted(), expected_revision=2)
        work.commit()
    assert counts(uow) == {ALICE: 2, BOB: 1}
    with uow() as work:
        assert work.agents.purge(second.id) == second  # not deleted: uncounted now
        work.commit()
    assert counts(uow) == {ALICE: 1, BOB: 1}
    with uow() as work:
        assert work.agents.soft_delete(deleted(bobs), expected_revision=1)
        work.commit()
    with uow() as work:
        assert work.agents.purge(bobs.id) is not None  # deleted: uncounted already
        work.commit()
    assert counts(uow) == {ALICE: 1, BOB: 0}
    with uow() as work:
        work.agents.add(an_agent("rolled back"))
    assert counts(uow) == {ALICE: 1, BOB: 0}  # counted in the transaction, or not at all


def test_a_count_that_fell_behind_never_goes_below_zero(uow: UowFactory) -> None:
    """Agents the previous release created during a rollout were never counted."""
    one, two = an_agent("one"), an_agent("two")
    add(uow, one, two)
    with uow() as work:
        work.session.execute(update(OwnerCountRow).values(agents=0))
        assert work.agents.soft_delete(deleted(one), expected_revision=1)
        assert work.agents.purge(two.id) == two
        work.commit()
    assert counts(uow) == {ALICE: 0}


def test_purge_expired_takes_only_agents_past_their_expire_time(uow: UowFactory) -> None:
    due, later, alive = an_agent("due"), an_agent("later"), an_agent("alive")
    add(uow, due, later, alive)
    with uow() as work:
        for agent in (due, later, alive):
            work.revisions.add(agent.current_revision, keep=10)
        work.agents.soft_delete(
            due.soft_deleted(now=T0, expire_time=T0 + timedelta(hours=1)), expected_revision=1
        )
        work.agents.soft_delete(
            later.soft_deleted(now=T0, expire_time=T0 + timedelta(days=9)), expected_revision=1
        )
        work.commit()
    with uow() as work:
        purged = work.agents.purge_expired(now=T0 + timedelta(days=1), limit=10)
        work.commit()
    assert [agent.id for agent in purged] == [due.id]
    with uow() as work:
        assert work.agents.get(due.id) is None
        assert work.revisions.get(due.id, 1) is None
        assert work.agents.get(later.id) is not None
        assert work.agents.purge_expired(now=T0 + timedelta(days=1), limit=10) == []


def test_revisions_round_trip_page_newest_first_and_prune_all_but_tagged(
    uow: UowFactory,
) -> None:
    agent = an_agent("versions", temperature=0.30000000000000004, top_p=None)
    add(uow, agent)
    versions = [agent]
    with uow() as work:
        work.revisions.add(agent.current_revision, keep=3)
        work.commit()
    for number in range(2, 7):
        latest = versions[-1]
        changed = latest.revised(
            replace(latest.settable, description=f"v{number}"),
            now=T0 + timedelta(minutes=number),
            author=ChangeAuthor("users/a", "serviceAccounts/b"),
        )
        with uow() as work:
            assert work.agents.update(changed, expected_revision=latest.revision)
            if number == 3:
                work.revisions.set_alias(agent.id, "prod", 2, now=T0, by="users/a")
            work.revisions.add(changed.current_revision, keep=3)
            work.commit()
        versions.append(changed)
    with uow() as work:
        kept = work.revisions.list_page(agent.id, before=None, limit=10)
        assert [r.revision_id for r in kept] == [6, 5, 4, 2]  # the last 3, and the tagged one
        assert work.revisions.list_page(agent.id, before=5, limit=1)[0].revision_id == 4
        assert work.revisions.get(agent.id, 1) is None
        assert work.revisions.get(agent.id, 6) == versions[-1].current_revision
        assert work.revisions.get(agent.id, 2) == versions[1].current_revision
        assert work.revisions.aliases(agent.id) == {"prod": 2}
        work.revisions.set_alias(agent.id, "prod", 6, now=T0, by="users/a")  # moves
        work.revisions.set_alias(agent.id, "staging", 5, now=T0, by="")
        assert work.revisions.aliases(agent.id) == {"prod": 6, "staging": 5}
        assert work.revisions.remove_alias(agent.id, "staging")
        assert not work.revisions.remove_alias(agent.id, "staging")
        work.commit()
        stored = work.agents.get(agent.id)
    assert stored is not None
    assert stored.revision_id == 6


def test_add_refuses_an_owner_at_the_limit_and_leaves_the_count(uow: UowFactory) -> None:
    with uow() as work:
        for index in range(3):
            work.agents.add(an_agent(f"a{index}"), max_per_owner=3)
        with pytest.raises(QuotaExceeded):
            work.agents.add(an_agent("a3"), max_per_owner=3)
        work.agents.add(an_agent("bobs", owner=BOB), max_per_owner=3)
        work.agents.add(an_agent("unlimited"))  # 0: no limit
        work.commit()
    assert counts(uow) == {ALICE: 4, BOB: 1}
    with uow() as work, pytest.raises(QuotaExceeded):
        work.agents.add(an_agent("a4"), max_per_owner=4)


def test_a_name_taken_after_counting_leaves_the_count_to_the_rollback(uow: UowFactory) -> None:
    add(uow, an_agent("taken"))
    with uow() as work, pytest.raises(NameTaken):
        work.agents.add(an_agent("taken"), max_per_owner=10)
    assert counts(uow) == {ALICE: 1}


def test_a_metadata_key_any_agent_may_hold_can_be_filtered_on(uow: UowFactory) -> None:
    """Keys a bare filter field cannot spell (`metadata."kéy"`): unicode, spaces, quotes,
    a backslash, JSON-path punctuation."""
    keys = ["kéy", "a b", 'say "hi"', "back\\slash", "$[0]", "a.b", "*"]
    add(uow, *[an_agent(f"k{i}", metadata={key: "v"}) for i, key in enumerate(keys)])
    for index, key in enumerate(keys):
        assert query(uow, MetadataEquals(key, "v")) == [f"k{index}"], key
        assert query(uow, MetadataEquals(key, "other")) == [], key


def test_each_filter(uow: UowFactory) -> None:
    add(
        uow,
        an_agent("Support", model="gpt-4o-mini", metadata={"team": "search"}),
        an_agent("support bot", metadata={"team": "Search", "cost.center": "42"}),
        an_agent("support_x", metadata={}),
        an_agent("supportXbot", metadata={"team": "search"}),
        an_agent("50% off", metadata={"team": "sales"}),
        an_agent("500 off", metadata={"team": "sales"}),
        an_agent("bobs support", owner=BOB, metadata={"team": "search"}),
    )
    assert query(uow, ModelEquals("gpt-4o-mini")) == ["Support"]
    assert query(uow, NameEquals("support bot")) == ["support bot"]
    assert query(uow, NameEquals("support")) == []  # exact and case-sensitive
    # Prefixes are case-sensitive on both databases and LIKE wildcards are literal.
    assert query(uow, NamePrefix("support")) == ["support bot", "supportXbot", "support_x"]
    assert query(uow, NamePrefix("support_")) == ["support_x"]
    assert query(uow, NamePrefix("50%")) == ["50% off"]
    assert query(uow, NamePrefix("")) == query(uow)
    assert query(uow, MetadataEquals("team", "search")) == ["Support", "supportXbot"]
    assert query(uow, MetadataEquals("cost.center", "42")) == ["support bot"]
    assert query(uow, MetadataEquals("team", "nothing")) == []
    assert query(uow, MetadataEquals("missing", "")) == []
    assert query(uow, NamePrefix("support"), MetadataEquals("team", "search")) == ["supportXbot"]
    assert query(uow, MetadataEquals("team", "search"), owner=None) == [
        "Support",
        "bobs support",
        "supportXbot",
    ]
    assert query(uow, OwnerEquals(BOB), owner=None) == ["bobs support"]
    assert query(uow, OwnerEquals(BOB)) == []  # the owner scope still applies


def test_each_order(uow: UowFactory) -> None:
    names = ["c", "a", "d", "b"]
    for index, name in enumerate(names):
        add(
            uow,
            an_agent(
                name,
                create_time=T0 + timedelta(seconds=index),
                update_time=T0 - timedelta(seconds=index),
            ),
        )
    orders = {
        (SortField.CREATE_TIME, False): ["c", "a", "d", "b"],
        (SortField.CREATE_TIME, True): ["b", "d", "a", "c"],
        (SortField.UPDATE_TIME, False): ["b", "d", "a", "c"],
        (SortField.UPDATE_TIME, True): ["c", "a", "d", "b"],
        (SortField.NAME, False): ["a", "b", "c", "d"],
        (SortField.NAME, True): ["d", "c", "b", "a"],
    }
    for (field, descending), expected in orders.items():
        assert query(uow, order=Ordering(field, descending)) == expected, (field, descending)


@pytest.mark.parametrize("descending", [False, True])
def test_keyset_pages_break_ties_by_id(uow: UowFactory, descending: bool) -> None:
    """Many rows share one create_time: the id decides, and no row is lost or repeated."""
    agents = [an_agent(f"a{index:02d}") for index in range(11)]
    add(uow, *agents)
    order = Ordering(SortField.CREATE_TIME, descending)
    expected = [a.name for a in sorted(agents, key=lambda a: a.id, reverse=descending)]
    seen: list[str] = []
    after: Cursor | None = None
    while True:
        with uow() as work:
            rows = work.agents.list_page(AgentQuery(ALICE, AgentFilter(), order, after, 3))
        seen += [row.name for row in rows]
        if len(rows) < 3:
            break
        after = Cursor(rows[-1].create_time, rows[-1].id)
    assert seen == expected


def test_two_compare_and_sets_on_one_revision_one_wins(uow: UowFactory) -> None:
    agent = an_agent()
    add(uow, agent)
    start = threading.Barrier(2)
    results: list[bool] = []
    errors: list[BaseException] = []

    def writer(description: str) -> None:
        try:
            start.wait(timeout=10)
            with uow() as work:
                changed = an_agent(id=agent.id, description=description, revision=2)
                won = work.agents.update(changed, expected_revision=1)
                if won:
                    work.commit()
                results.append(won)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(d,)) for d in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert sorted(results) == [False, True]
    stored = get(uow, agent.id)
    assert stored is not None
    assert stored.revision == 2


def test_agents_are_counted_by_model_for_an_owner_or_everyone(uow: UowFactory) -> None:
    other = uuid.uuid4()
    add(
        uow,
        an_agent("a", model="gpt-4o"),
        an_agent("b", model="gpt-4o"),
        an_agent("c", model="gpt-4.1"),
        an_agent("d", owner=other, model="gpt-4o"),
    )
    with uow() as work:
        assert work.agents.count_by_model(ALICE) == {"gpt-4o": 2, "gpt-4.1": 1}
        assert work.agents.count_by_model(None) == {"gpt-4o": 3, "gpt-4.1": 1}
        assert work.agents.count_by_model(uuid.uuid4()) == {}
