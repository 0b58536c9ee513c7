"""AgentService rules for revisions and aliases (AIP-162) and soft delete (AIP-164),
over in-memory fakes."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest

from services.agent_svc.domain import Agent
from services.agent_svc.service.agent_service import MAX_ALIASES
from shared.rpc.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from shared.security.tokens import Principal
from tests.unit.agent.fakes import (
    FakeAgents,
    World,
    acting_for,
    admin,
    agent_input,
    make_world,
    user,
)


@pytest.fixture
def world() -> World:
    return make_world()


def edit(world: World, owner: Principal, agent: Agent, description: str) -> Agent:
    return world.service.update(
        principal=owner,
        agent_id=str(agent.id),
        patch=agent_input(description=description),
        update_mask=["description"],
    )


def edited_three_times(world: World, owner: Principal) -> list[Agent]:
    versions = [world.service.create(principal=owner, agent=agent_input(description="v1"))]
    for number in (2, 3, 4):
        world.clock.advance(60)
        versions.append(edit(world, owner, versions[-1], f"v{number}"))
    return versions


def get(world: World, who: Principal, ref: str) -> Agent:
    return world.service.get(principal=who, agent_id=ref)


# -- revisions --------------------------------------------------------------------------------


def test_each_change_of_configuration_is_a_revision_and_a_no_op_is_none(world: World) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    assert [v.revision_id for v in versions] == [1, 2, 3, 4]
    same = edit(world, owner, versions[-1], "v4")
    assert same == versions[-1]
    stored = world.database.committed.revisions
    assert sorted(number for _, number in stored) == [1, 2, 3, 4]
    assert stored[(versions[1].id, 2)].fields.description == "v2"
    assert stored[(versions[1].id, 2)].created_by == f"users/{owner.user_id}"


def test_a_revision_records_the_delegating_service(world: World) -> None:
    person = user()
    agent = world.service.create(principal=person, agent=agent_input())
    token, actor = acting_for(person, "agents.write", "agents.read")
    edit(world, token, agent, "by the runtime")
    revision = world.database.committed.revisions[(agent.id, 2)]
    assert (revision.created_by, revision.created_via) == (
        f"users/{person.user_id}",
        f"serviceAccounts/{actor}",
    )


def test_get_at_a_revision_shows_that_configuration_and_the_agents_identity(
    world: World,
) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    old = get(world, owner, f"{versions[0].id}@2")
    assert old.description == "v2"
    assert (old.id, old.owner_id, old.create_time) == (
        versions[0].id,
        versions[0].owner_id,
        versions[0].create_time,
    )
    assert old.update_time == versions[1].update_time  # the revision's create time
    assert old.revision_id == 2
    assert old.etag == ""  # a past revision is not written
    assert get(world, owner, f"{versions[0].id}@4") == versions[-1]  # current: the agent


def test_revisions_are_read_once_then_from_memory(world: World) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    for _ in range(3):
        get(world, owner, f"{versions[0].id}@2")
    assert world.database.revision_reads == 1


@pytest.mark.parametrize(
    "ref",
    [
        "@",
        "@prod",
        "x@prod",
        "{id}@",
        "{id}@Prod",
        "{id}@0",
        "{id}@01",
        "{id}@-1",
        "{id}@a b",
        "{id}@prod@1",
        "{id}@é",
        "{id}@" + "a" * 64,
        "{id}@" + "9" * 19,
        "{id}@" + "x" * 100_000,
        "{id}@\x00",
        "{id}@1.5",
    ],
)
def test_malformed_refs_are_invalid_argument_on_id(world: World, ref: str) -> None:
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input())
    with pytest.raises(InvalidArgument) as caught:
        get(world, owner, ref.replace("{id}", str(agent.id)))
    assert [v.field for v in caught.value.violations] == ["id"]


def test_a_revision_never_made_or_pruned_is_not_found(world: World) -> None:
    world = make_world(revisions_kept=2)
    owner = user()
    versions = edited_three_times(world, owner)
    for ref in ("1", "5", "99"):
        with pytest.raises(NotFound) as caught:
            get(world, owner, f"{versions[0].id}@{ref}")
        assert caught.value.reason == "REVISION_NOT_FOUND"
    assert get(world, owner, f"{versions[0].id}@3").description == "v3"
    with pytest.raises(NotFound) as tagging:
        world.service.tag(principal=owner, agent_id=str(versions[0].id), revision_id="1", alias="a")
    assert tagging.value.reason == "REVISION_NOT_FOUND"


def test_a_revision_cached_before_it_was_pruned_is_not_served(world: World) -> None:
    world = make_world(revisions_kept=2)
    owner = user()
    versions = edited_three_times(world, owner)
    assert get(world, owner, f"{versions[0].id}@3").description == "v3"  # now in memory
    edit(world, owner, versions[-1], "v5")  # prunes 3
    with pytest.raises(NotFound):
        get(world, owner, f"{versions[0].id}@3")


def ids_listed(world: World, who: Principal, agent: Agent, page_size: int = 0) -> list[int]:
    listed, token = [], ""
    while True:
        page = world.service.list_revisions(
            principal=who, agent_id=str(agent.id), page_size=page_size, page_token=token
        )
        listed += [revision.revision_id for revision in page.agents]
        token = page.next_page_token
        if not token:
            return listed


def test_an_untagged_revision_past_the_retention_is_gone_everywhere_at_once() -> None:
    """Untagging the only alias of a revision past the retention prunes it: the list,
    GetAgent id@rev and TagAgentRevision agree (before, the list still showed it and a tag
    brought it back while reads said NOT_FOUND)."""
    world = make_world(revisions_kept=2)
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input(description="v1"))
    agent = edit(world, owner, agent, "v2")
    world.service.tag(principal=owner, agent_id=str(agent.id), revision_id="2", alias="keep")
    for number in (3, 4, 5):
        agent = edit(world, owner, agent, f"v{number}")
    assert ids_listed(world, owner, agent) == [5, 4, 2]
    world.service.untag(principal=owner, agent_id=str(agent.id), alias="keep")
    assert (agent.id, 2) not in world.database.committed.revisions
    assert ids_listed(world, owner, agent) == [5, 4]
    attempts: list[Callable[[], object]] = [
        lambda: get(world, owner, f"{agent.id}@2"),
        lambda: world.service.tag(
            principal=owner, agent_id=str(agent.id), revision_id="2", alias="again"
        ),
        lambda: world.service.rollback(principal=owner, agent_id=str(agent.id), revision_id="2"),
    ]
    for attempt in attempts:
        with pytest.raises(NotFound) as caught:
            attempt()
        assert caught.value.reason == "REVISION_NOT_FOUND"


def test_revisions_past_a_lowered_retention_are_not_shown_nor_tagged() -> None:
    """AGENT_REVISIONS_KEPT lowered across a restart: the revisions past the new window
    are not pruned until the next write, but no call shows or uses them meanwhile."""
    before = make_world(revisions_kept=100)
    owner = user()
    versions = edited_three_times(before, owner)  # revisions 1..4
    after = make_world(revisions_kept=2)
    after.database.committed = before.database.committed
    agent = versions[-1]
    assert ids_listed(after, owner, agent, page_size=1) == [4, 3]
    with pytest.raises(NotFound):
        after.service.tag(principal=owner, agent_id=str(agent.id), revision_id="1", alias="x")
    with pytest.raises(NotFound):
        after.service.rollback(principal=owner, agent_id=str(agent.id), revision_id="2")


def test_an_agent_has_at_most_max_aliases(world: World) -> None:
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input())
    for number in range(MAX_ALIASES):
        world.service.tag(
            principal=owner, agent_id=str(agent.id), revision_id="1", alias=f"a{number}"
        )
    with pytest.raises(ResourceExhausted) as caught:
        world.service.tag(principal=owner, agent_id=str(agent.id), revision_id="1", alias="more")
    assert caught.value.reason == "ALIAS_LIMIT_REACHED"
    # Moving an existing alias is not a new one.
    world.service.tag(principal=owner, agent_id=str(agent.id), revision_id="1", alias="a0")


def test_list_revisions_pages_newest_first_with_the_aliases(world: World) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    agent_id = str(versions[0].id)
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="2", alias="prod")
    first = world.service.list_revisions(principal=owner, agent_id=agent_id, page_size=3)
    assert [a.description for a in first.agents] == ["v4", "v3", "v2"]
    assert first.agents[0] == versions[-1]
    assert first.aliases == {"prod": 2}
    rest = world.service.list_revisions(
        principal=owner, agent_id=agent_id, page_size=3, page_token=first.next_page_token
    )
    assert [a.revision_id for a in rest.agents] == [1]
    assert rest.next_page_token == ""
    with pytest.raises(InvalidArgument):  # a token is bound to the agent and the caller
        world.service.list_revisions(
            principal=admin(), agent_id=agent_id, page_token=first.next_page_token
        )


def test_someone_elses_revisions_and_aliases_are_not_found(world: World) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    agent_id = str(versions[0].id)
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="2", alias="prod")
    stranger = user()
    calls: list[Callable[[], object]] = [
        lambda: get(world, stranger, f"{agent_id}@2"),
        lambda: get(world, stranger, f"{agent_id}@prod"),
        lambda: world.service.list_revisions(principal=stranger, agent_id=agent_id),
        lambda: world.service.rollback(principal=stranger, agent_id=agent_id, revision_id="1"),
        lambda: world.service.tag(
            principal=stranger, agent_id=agent_id, revision_id="1", alias="mine"
        ),
        lambda: world.service.untag(principal=stranger, agent_id=agent_id, alias="prod"),
    ]
    for call in calls:
        with pytest.raises(NotFound) as caught:
            call()
        assert caught.value.reason == "AGENT_NOT_FOUND"
    assert get(world, admin(), f"{agent_id}@prod").description == "v2"


# -- aliases ----------------------------------------------------------------------------------


def test_an_alias_pins_a_revision_and_moves_on_promotion(world: World) -> None:
    owner, reader = user(), None
    versions = edited_three_times(world, owner)
    agent_id = str(versions[0].id)
    tagged = world.service.tag(principal=owner, agent_id=agent_id, revision_id="2", alias="prod")
    assert tagged.revision_id == 2
    reader = owner
    assert get(world, reader, f"{agent_id}@prod").description == "v2"
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="4", alias="staging")
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="staging", alias="prod")
    assert get(world, reader, f"{agent_id}@prod") == versions[-1]
    assert world.database.events[-1] == f"invalidate aliases {agent_id}"


def test_a_tagged_revision_is_never_pruned(world: World) -> None:
    world = make_world(revisions_kept=1)
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input(description="v1"))
    world.service.tag(principal=owner, agent_id=str(agent.id), revision_id="1", alias="prod")
    latest = agent
    for number in range(2, 6):
        latest = edit(world, owner, latest, f"v{number}")
    kept = sorted(number for _, number in world.database.committed.revisions)
    assert kept == [1, 5]
    assert get(world, owner, f"{agent.id}@prod").description == "v1"
    world.service.untag(principal=owner, agent_id=str(agent.id), alias="prod")
    edit(world, owner, latest, "v6")
    assert sorted(number for _, number in world.database.committed.revisions) == [6]


@pytest.mark.parametrize("alias", ["", "Prod", "1abc", "-x", "a" * 64, "prod!", "\uff50rod", "a b"])
def test_a_bad_alias_name_is_invalid_argument_on_alias(world: World, alias: str) -> None:
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input())
    with pytest.raises(InvalidArgument) as caught:
        world.service.tag(principal=owner, agent_id=str(agent.id), revision_id="1", alias=alias)
    assert [v.field for v in caught.value.violations] == ["alias"]


def test_unknown_aliases_are_not_found(world: World) -> None:
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input())
    for call in (
        lambda: get(world, owner, f"{agent.id}@prod"),
        lambda: world.service.untag(principal=owner, agent_id=str(agent.id), alias="prod"),
        lambda: world.service.tag(
            principal=owner, agent_id=str(agent.id), revision_id="staging", alias="prod"
        ),
    ):
        with pytest.raises(NotFound) as caught:
            call()
        assert caught.value.reason == "ALIAS_NOT_FOUND"


# -- rollback ---------------------------------------------------------------------------------


def test_rollback_makes_a_new_revision_with_the_old_content(world: World) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    rolled = world.service.rollback(
        principal=owner, agent_id=str(versions[0].id), revision_id="2", etag=versions[-1].etag
    )
    assert (rolled.revision_id, rolled.description) == (5, "v2")
    assert world.cache.invalidated[-1] == versions[0].id
    again = world.service.rollback(principal=owner, agent_id=str(versions[0].id), revision_id="5")
    assert again == rolled  # nothing changes: no revision


def test_rollback_with_a_stale_etag_is_aborted(world: World) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    with pytest.raises(Aborted) as caught:
        world.service.rollback(
            principal=owner, agent_id=str(versions[0].id), revision_id="1", etag=versions[0].etag
        )
    assert caught.value.reason == "ETAG_MISMATCH"


def test_rollback_to_a_name_another_agent_took_is_already_exists(world: World) -> None:
    owner = user()
    first = world.service.create(principal=owner, agent=agent_input(name="old"))
    renamed = world.service.update(
        principal=owner,
        agent_id=str(first.id),
        patch=agent_input(name="new"),
        update_mask=["name"],
    )
    world.service.create(principal=owner, agent=agent_input(name="old"))
    with pytest.raises(AlreadyExists):
        world.service.rollback(principal=owner, agent_id=str(renamed.id), revision_id="1")


# -- soft delete ------------------------------------------------------------------------------


def test_deleted_agents_leave_lists_unless_asked_and_keep_their_revisions(world: World) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    kept = world.service.create(principal=owner, agent=agent_input(name="kept"))
    deleted = world.service.delete(principal=owner, agent_id=str(versions[0].id))
    assert [a.id for a in world.service.list(principal=owner).agents] == [kept.id]
    shown = world.service.list(principal=owner, show_deleted=True).agents
    assert {a.id for a in shown} == {kept.id, deleted.id}
    assert get(world, owner, f"{deleted.id}@2").delete_time == deleted.delete_time
    assert world.service.list_revisions(principal=owner, agent_id=str(deleted.id)).agents


def test_a_deleted_agent_cannot_be_changed(world: World) -> None:
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input())
    world.service.delete(principal=owner, agent_id=str(agent.id))
    agent_id = str(agent.id)
    for call in (
        lambda: edit(world, owner, agent, "late"),
        lambda: world.service.rollback(principal=owner, agent_id=agent_id, revision_id="1"),
        lambda: world.service.tag(principal=owner, agent_id=agent_id, revision_id="1", alias="a"),
        lambda: world.service.untag(principal=owner, agent_id=agent_id, alias="a"),
    ):
        with pytest.raises(FailedPrecondition) as caught:
            call()
        assert caught.value.reason == "AGENT_DELETED"
    with pytest.raises(NotFound):
        world.service.delete(principal=owner, agent_id=agent_id)


def test_undelete_restores_and_is_already_exists_when_not_deleted(world: World) -> None:
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input())
    with pytest.raises(AlreadyExists) as caught:
        world.service.undelete(principal=owner, agent_id=str(agent.id))
    assert caught.value.reason == "AGENT_NOT_DELETED"
    deleted = world.service.delete(principal=owner, agent_id=str(agent.id))
    with pytest.raises(Aborted):
        world.service.undelete(principal=owner, agent_id=str(agent.id), etag=agent.etag)
    with pytest.raises(NotFound):
        world.service.undelete(principal=user(), agent_id=str(agent.id))
    restored = world.service.undelete(principal=owner, agent_id=str(agent.id), etag=deleted.etag)
    assert (restored.delete_time, restored.expire_time) == (None, None)
    assert restored.settable == agent.settable
    assert restored.etag not in (agent.etag, deleted.etag)
    assert world.service.list(principal=owner).agents == (restored,)


def test_a_deleted_agent_keeps_its_name_but_not_its_quota_place(world: World) -> None:
    world = make_world(max_agents_per_owner=1)
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input(name="one"))
    world.service.delete(principal=owner, agent_id=str(agent.id))
    with pytest.raises(AlreadyExists) as taken:
        world.service.create(principal=owner, agent=agent_input(name="one"))
    assert taken.value.reason == "AGENT_NAME_TAKEN"
    world.service.create(principal=owner, agent=agent_input(name="two"))
    with pytest.raises(ResourceExhausted) as full:
        world.service.undelete(principal=owner, agent_id=str(agent.id))
    assert full.value.reason == "AGENT_QUOTA_EXCEEDED"


def test_the_expire_time_follows_the_retention(world: World) -> None:
    world = make_world(deleted_retention_seconds=3600)
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input())
    deleted = world.service.delete(principal=owner, agent_id=str(agent.id))
    assert deleted.expire_time == world.clock.now() + timedelta(hours=1)


def test_an_agent_past_its_expire_time_is_gone_before_the_purge() -> None:
    """AIP-164: past expire_time the agent is gone — Get, BatchGet, List(show_deleted)
    and Undelete say NOT_FOUND even while the worker has not purged it yet."""
    world = make_world(deleted_retention_seconds=3600)
    owner = user()
    agent = world.service.create(principal=owner, agent=agent_input())
    world.service.delete(principal=owner, agent_id=str(agent.id))
    world.clock.advance(3599)
    listed = world.service.list(principal=owner, show_deleted=True).agents
    assert [a.id for a in listed] == [agent.id]
    world.clock.advance(1)
    assert agent.id in world.database.committed.agents  # not purged yet
    assert world.service.list(principal=owner, show_deleted=True).agents == ()
    attempts: list[Callable[[], object]] = [
        lambda: world.service.get(principal=owner, agent_id=str(agent.id)),
        lambda: world.service.batch_get(principal=owner, agent_ids=[str(agent.id)]),
        lambda: world.service.undelete(principal=owner, agent_id=str(agent.id)),
    ]
    for attempt in attempts:
        with pytest.raises(NotFound) as caught:
            attempt()
        assert caught.value.reason == "AGENT_NOT_FOUND"


def test_purge_needs_the_admin_scope_and_removes_everything(world: World) -> None:
    owner = user()
    versions = edited_three_times(world, owner)
    agent_id = str(versions[0].id)
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="2", alias="prod")
    with pytest.raises(PermissionDenied) as denied:
        world.service.purge(principal=owner, agent_id=agent_id)
    assert denied.value.reason == "MISSING_SCOPE"
    with pytest.raises(Aborted):
        world.service.purge(principal=admin(), agent_id=agent_id, etag=versions[0].etag)
    world.service.purge(principal=admin(), agent_id=agent_id, etag=versions[-1].etag)
    assert world.database.committed.agents == {}
    assert world.database.committed.revisions == {}
    assert world.database.committed.aliases == {}
    assert world.database.events[-2:] == [
        f"invalidate {agent_id}",
        f"invalidate aliases {agent_id}",
    ]
    for ref in (agent_id, f"{agent_id}@2", f"{agent_id}@prod"):
        with pytest.raises(NotFound):
            get(world, owner, ref)
    with pytest.raises(NotFound):
        world.service.purge(principal=admin(), agent_id=str(uuid.uuid4()))


# -- the change feed ------------------------------------------------------------------------


def test_every_lifecycle_change_is_an_event_of_the_change_log_in_its_transaction(
    world: World,
) -> None:
    """WatchAgents' log gets an event, in the change's own unit of work, for each create,
    update, rollback, delete, undelete and purge, and each alias set, moved or removed
    (a runtime pinned to `id@prod` hears of a promotion); a refused change, and tagging the
    revision an alias names already, log nothing."""
    owner, root = user(), admin()
    versions = edited_three_times(world, owner)
    agent_id = str(versions[0].id)
    world.service.rollback(principal=owner, agent_id=agent_id, revision_id="1")
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="2", alias="prod")
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="2", alias="prod")
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="3", alias="prod")
    world.service.tag(principal=owner, agent_id=agent_id, revision_id="prod", alias="canary")
    world.service.untag(principal=owner, agent_id=agent_id, alias="canary")
    with pytest.raises(NotFound):  # not an alias it has
        world.service.untag(principal=owner, agent_id=agent_id, alias="canary")
    world.service.delete(principal=owner, agent_id=agent_id)
    with pytest.raises(FailedPrecondition):  # a deleted agent cannot be rolled back
        world.service.rollback(principal=owner, agent_id=agent_id, revision_id="2")
    world.service.undelete(principal=owner, agent_id=agent_id)
    world.service.purge(principal=root, agent_id=agent_id)
    changes = world.database.committed.changes
    assert [c.kind.value for c in changes] == [
        "created",
        *["updated"] * 4,  # three edits and the rollback
        "tagged",  # prod -> 2 (tagging 2 again: nothing)
        "tagged",  # prod -> 3
        "tagged",  # canary -> what prod names
        "untagged",
        "deleted",
        "undeleted",
        "purged",
    ]
    assert {c.agent.id for c in changes} == {versions[0].id}
    assert changes[4].agent.description == "v1"  # the rollback's content
    assert [(c.alias, c.alias_revision) for c in changes[5:9]] == [
        ("prod", 2),
        ("prod", 3),
        ("canary", 3),
        ("canary", None),
    ]
    # An alias event carries the agent as it is (its latest revision, the rollback's).
    assert {c.agent.revision_id for c in changes[5:9]} == {5}
    assert all(c.alias == "" and c.alias_revision is None for c in changes[:5] + changes[9:])
    assert changes[9].agent.delete_time is not None
    assert changes[10].agent.delete_time is None
    assert [c.seq for c in changes] == sorted(c.seq for c in changes)


def test_a_name_the_worker_frees_meanwhile_is_taken_not_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker purges the expired holder of a name at the moment a create wants it: the
    create's own purge then removes nothing, and the name is free all the same (it was
    ALREADY_EXISTS); a name held by an agent that can still be undeleted stays taken."""
    world = make_world(deleted_retention_seconds=60)
    owner = user()
    old = world.service.create(principal=owner, agent=agent_input(name="contested"))
    world.service.delete(principal=owner, agent_id=str(old.id))
    with pytest.raises(AlreadyExists):
        world.service.create(principal=owner, agent=agent_input(name="contested"))
    world.clock.advance(61)
    purge = FakeAgents.purge

    def purged_by_the_worker_first(self: FakeAgents, agent_id: uuid.UUID, **kw: object) -> None:
        purge(self, agent_id, **kw)  # type: ignore[arg-type]
        # (the worker's own PURGED change is its business)

    monkeypatch.setattr(FakeAgents, "purge", purged_by_the_worker_first)
    new = world.service.create(principal=owner, agent=agent_input(name="contested"))
    assert new.name == "contested"
    assert new.id != old.id
