"""AgentService rules over in-memory fakes: ownership, idempotent create, masks, etags,
listing and the cache's place in all of it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from services.agent_svc.domain import Agent, AgentInput, Tool
from services.agent_svc.service.agent_service import (
    LIST_RESPONSE_BUDGET,
    OUTPUT_ONLY_FIELDS,
    UPDATE_ATTEMPTS,
)
from services.agent_svc.service.filtering import MetadataEquals, OwnerEquals
from services.agent_svc.service.sizing import agent_size, framed
from shared.rpc.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
)
from shared.security.tokens import Principal
from tests.unit.agent.fakes import (
    World,
    acting_for,
    admin,
    agent_input,
    make_world,
    service_account,
    user,
)


@pytest.fixture
def world() -> World:
    return make_world()


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


def create(world: World, owner: Principal, **overrides: object) -> Agent:
    return world.service.create(principal=owner, agent=agent_input(**overrides))


# -- create ---------------------------------------------------------------------------------


def test_create_sets_the_server_fields(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    assert isinstance(agent.id, uuid.UUID)
    assert str(agent.owner_id) == owner.user_id
    assert agent.create_time == agent.update_time == world.clock.now()
    assert agent.etag
    assert world.database.committed.agents[agent.id] == agent


def test_create_keeps_every_field(world: World) -> None:
    sent = agent_input(top_p=0.9, metadata={"a": "1", "b": "2"})
    agent = world.service.create(principal=user(), agent=sent)
    assert (agent.name, agent.description, agent.model, agent.instructions) == (
        sent.name,
        sent.description,
        sent.model,
        sent.instructions,
    )
    assert (agent.tools, agent.metadata, agent.temperature, agent.top_p) == (
        sent.tools,
        {"a": "1", "b": "2"},
        0.2,
        0.9,
    )


def test_invalid_create_writes_nothing(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        create(world, user(), name="", model="gpt-1")
    assert fields_of(caught.value) == ["agent.name", "agent.model"]
    assert world.database.commits == 0


def test_a_repeated_request_id_returns_the_first_agent(world: World) -> None:
    owner, request = user(), str(uuid.uuid4())
    first = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    world.clock.advance(5)
    again = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    assert again == first
    assert len(world.database.committed.agents) == 1


def test_a_request_id_reused_for_a_different_agent_is_invalid(world: World) -> None:
    """AIP-155: a request id names one request; another request under it is a mistake
    to report, not a replay to answer with the first agent."""
    owner, request = user(), str(uuid.uuid4())
    first = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    for different in (
        agent_input(name="other"),
        agent_input(metadata={"team": "support", "x": "y"}),
        agent_input(temperature=None),
        agent_input(tools=()),
    ):
        with pytest.raises(InvalidArgument) as caught:
            world.service.create(principal=owner, agent=different, request_id=request)
        assert caught.value.reason == "REQUEST_ID_REUSED"
        assert [(v.field, v.description) for v in caught.value.violations] == [
            ("request_id", "already used for a different request")
        ]
    assert list(world.database.committed.agents) == [first.id]


def test_a_replay_after_an_update_returns_the_first_response(world: World) -> None:
    owner, request = user(), str(uuid.uuid4())
    first = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    world.clock.advance(1)
    update(world, owner, first, ("description",), description="changed since")
    again = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    assert again == first
    assert (again.revision, again.description) == (1, first.description)


def test_a_replay_after_a_delete_returns_the_first_response_and_creates_nothing(
    world: World,
) -> None:
    owner, request = user(), str(uuid.uuid4())
    first = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    world.service.delete(principal=owner, agent_id=str(first.id))
    again = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    assert again == first
    assert list(world.database.committed.agents) == [first.id]  # the deleted one, still
    assert world.database.committed.agents[first.id].deleted


def test_the_same_request_id_from_another_caller_creates_anew(world: World) -> None:
    request = str(uuid.uuid4())
    one = world.service.create(principal=user(), agent=agent_input(), request_id=request)
    two = world.service.create(principal=user(), agent=agent_input(), request_id=request)
    assert one.id != two.id


def test_a_replay_that_loses_the_race_returns_the_winner(world: World) -> None:
    """A concurrent create with the same request id commits between this one's replay
    check and its insert: the record's key decides, and the winner's response comes back."""
    owner, request = user(), uuid.uuid4()
    winner = Agent.new(agent_input(), owner_id=uuid.UUID(owner.user_id), now=world.clock.now())
    world.database.interfere(lambda: world.database.commit_agent(winner, request))
    got = world.service.create(principal=owner, agent=agent_input(), request_id=str(request))
    assert got == winner
    assert list(world.database.committed.agents) == [winner.id]


def test_a_different_request_that_loses_the_race_is_a_reused_request_id(world: World) -> None:
    owner, request = user(), uuid.uuid4()
    winner = Agent.new(agent_input(), owner_id=uuid.UUID(owner.user_id), now=world.clock.now())
    world.database.interfere(lambda: world.database.commit_agent(winner, request))
    with pytest.raises(InvalidArgument) as caught:
        world.service.create(
            principal=owner, agent=agent_input(name="other"), request_id=str(request)
        )
    assert caught.value.reason == "REQUEST_ID_REUSED"
    assert list(world.database.committed.agents) == [winner.id]


def test_a_request_id_is_honoured_for_its_ttl_then_used_afresh() -> None:
    world = make_world(request_id_ttl_seconds=60)
    owner, request = user(), str(uuid.uuid4())
    first = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    world.clock.advance(59.999)
    assert world.service.create(principal=owner, agent=agent_input(), request_id=request) == first
    world.clock.advance(0.001)  # 60 s old: expired
    fresh = world.service.create(
        principal=owner, agent=agent_input(name="fresh"), request_id=request
    )
    assert fresh.id != first.id
    again = world.service.create(
        principal=owner, agent=agent_input(name="fresh"), request_id=request
    )
    assert again == fresh
    assert len(world.database.committed.agents) == 2


def test_a_failed_create_leaves_its_request_id_unused(world: World) -> None:
    owner, request = user(), str(uuid.uuid4())
    create(world, owner, name="taken")
    with pytest.raises(AlreadyExists):
        world.service.create(principal=owner, agent=agent_input(name="taken"), request_id=request)
    created = world.service.create(
        principal=owner, agent=agent_input(name="free"), request_id=request
    )
    assert created.name == "free"


@pytest.mark.parametrize("request_id", ["nope", "1234", "g" * 32])
def test_a_malformed_request_id_is_invalid(world: World, request_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.service.create(principal=user(), agent=agent_input(), request_id=request_id)
    assert fields_of(caught.value) == ["request_id"]


def test_names_are_unique_per_owner(world: World) -> None:
    owner = user()
    create(world, owner, name="dup")
    with pytest.raises(AlreadyExists) as caught:
        create(world, owner, name="dup")
    assert caught.value.reason == "AGENT_NAME_TAKEN"
    create(world, user(), name="dup")  # another owner may use it


def test_an_owner_has_at_most_their_quota_of_agents() -> None:
    world = make_world(max_agents_per_owner=3)
    owner = user()
    kept = [create(world, owner, name=f"a{index}") for index in range(3)]
    with pytest.raises(ResourceExhausted) as caught:
        create(world, owner, name="one too many")
    assert caught.value.reason == "AGENT_QUOTA_EXCEEDED"
    assert caught.value.quota_violations == (
        QuotaViolation(f"owners/{owner.user_id}", "at most 3 agents per owner"),
    )
    assert {a.name for a in world.database.committed.agents.values()} == {"a0", "a1", "a2"}
    create(world, user(), name="another owner's")  # the quota is per owner
    world.service.delete(principal=owner, agent_id=str(kept[0].id))
    create(world, owner, name="after a delete")


def test_a_replay_at_the_quota_still_returns_the_first_response() -> None:
    world = make_world(max_agents_per_owner=1)
    owner, request = user(), str(uuid.uuid4())
    first = world.service.create(principal=owner, agent=agent_input(), request_id=request)
    assert world.service.create(principal=owner, agent=agent_input(), request_id=request) == first
    with pytest.raises(ResourceExhausted):
        world.service.create(
            principal=owner, agent=agent_input(name="new"), request_id=str(uuid.uuid4())
        )


def test_no_quota_when_it_is_zero(world: World) -> None:
    owner = user()
    for index in range(50):
        create(world, owner, name=f"a{index}")


def test_a_caller_that_is_not_a_user_cannot_create(world: World) -> None:
    with pytest.raises(PermissionDenied):
        world.service.create(
            principal=Principal(user_id="svc-reporting", roles=frozenset({"user"})),
            agent=agent_input(),
        )


# -- get ------------------------------------------------------------------------------------


def test_the_owner_gets_their_agent(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    assert world.service.get(principal=owner, agent_id=str(agent.id)) == agent


def test_another_owners_agent_is_not_found_like_a_missing_one(world: World) -> None:
    agent = create(world, user())
    with pytest.raises(NotFound) as theirs:
        world.service.get(principal=user(), agent_id=str(agent.id))
    with pytest.raises(NotFound) as missing:
        world.service.get(principal=user(), agent_id=str(uuid.uuid4()))
    assert theirs.value.reason == missing.value.reason
    assert type(theirs.value) is type(missing.value)


def test_a_cached_agent_is_never_handed_to_another_owner(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.service.get(principal=owner, agent_id=str(agent.id))  # now cached
    assert agent.id in world.cache.entries
    with pytest.raises(NotFound):
        world.service.get(principal=user(), agent_id=str(agent.id))


def test_reads_go_through_the_cache(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    for _ in range(3):
        world.service.get(principal=owner, agent_id=str(agent.id))
    assert world.cache.loads == 1


def test_an_admin_gets_anyones_agent(world: World) -> None:
    agent = create(world, user())
    assert world.service.get(principal=admin(), agent_id=str(agent.id)) == agent


@pytest.mark.parametrize(
    "agent_id",
    [
        "",
        "not-a-uuid",
        "123",
        # uuid.UUID() would take this (it drops every "-"): too long to be an id.
        "-" * 100_000 + "0123456789abcdef0123456789abcdef",
    ],
)
def test_a_malformed_id_is_invalid(world: World, agent_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.service.get(principal=user(), agent_id=agent_id)
    assert fields_of(caught.value) == ["id"]


def test_every_spelling_of_a_uuid_is_still_an_id(world: World) -> None:
    agent = create(world, user())
    owner = Principal(user_id=str(agent.owner_id), roles=frozenset({"user"}))
    for spelling in (str(agent.id), agent.id.hex, f"{{{agent.id}}}", agent.id.urn):
        assert world.service.get(principal=owner, agent_id=spelling) == agent


# -- update ---------------------------------------------------------------------------------


def update(
    world: World,
    principal: Principal,
    agent: Agent,
    mask: tuple[str, ...] = (),
    etag: str = "",
    **changes: object,
) -> Agent:
    return world.service.update(
        principal=principal,
        agent_id=str(agent.id),
        patch=AgentInput(**changes),  # type: ignore[arg-type]
        update_mask=mask,
        etag=etag,
    )


def test_update_with_a_mask_changes_only_the_named_fields(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.clock.advance(5)
    updated = update(world, owner, agent, ("description",), description="new", name="ignored")
    assert updated.description == "new"
    assert updated.name == agent.name
    assert updated.update_time == world.clock.now()
    assert updated.create_time == agent.create_time
    assert updated.etag != agent.etag
    assert world.database.committed.agents[agent.id] == updated


def test_an_empty_mask_updates_every_populated_field(world: World) -> None:
    owner = user()
    agent = create(world, owner, top_p=0.5)
    updated = update(world, owner, agent, model="gpt-4o-mini", temperature=0.0)
    assert updated.model == "gpt-4o-mini"
    assert updated.temperature == 0.0  # set, even though it is the zero value
    # Unpopulated fields keep their values.
    assert (updated.name, updated.description, updated.top_p) == (
        agent.name,
        agent.description,
        0.5,
    )
    assert (updated.tools, updated.metadata) == (agent.tools, agent.metadata)


def test_an_empty_mask_replaces_populated_lists_and_maps(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    new_tools = (Tool(name="other"),)
    updated = update(world, owner, agent, tools=new_tools, metadata={"x": "y"})
    assert updated.tools == new_tools
    assert updated.metadata == {"x": "y"}


def test_star_replaces_every_mutable_field(world: World) -> None:
    owner = user()
    agent = create(world, owner, top_p=0.5)
    updated = update(world, owner, agent, ("*",), name="fresh", model="gpt-4o")
    assert updated.name == "fresh"
    assert (updated.description, updated.instructions) == ("", "")
    assert (updated.tools, updated.metadata) == ((), {})
    assert (updated.temperature, updated.top_p) == (None, None)
    assert (updated.id, updated.owner_id, updated.create_time) == (
        agent.id,
        agent.owner_id,
        agent.create_time,
    )


def test_star_still_validates_the_result(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    with pytest.raises(InvalidArgument) as caught:
        update(world, owner, agent, ("*",), name="fresh")
    assert fields_of(caught.value) == ["agent.model"]


def test_star_must_stand_alone(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    with pytest.raises(InvalidArgument) as caught:
        update(world, owner, agent, ("*", "name"), name="x")
    assert fields_of(caught.value) == ["update_mask"]


def test_a_mask_path_clears_a_field_the_patch_leaves_unset(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    updated = update(world, owner, agent, ("temperature", "description", "metadata"))
    assert (updated.temperature, updated.description, updated.metadata) == (None, "", {})


@pytest.mark.parametrize("path", ["id", "owner_id"])
def test_immutable_paths_are_invalid(world: World, path: str) -> None:
    owner = user()
    agent = create(world, owner)
    with pytest.raises(InvalidArgument) as caught:
        update(world, owner, agent, (path,))
    assert fields_of(caught.value) == ["update_mask"]


@pytest.mark.parametrize("path", ["nickname", "tools.name", "tools[0]", "Name", "metadata."])
def test_unknown_paths_are_invalid(world: World, path: str) -> None:
    owner = user()
    agent = create(world, owner)
    with pytest.raises(InvalidArgument) as caught:
        update(world, owner, agent, (path,), name="x")
    assert fields_of(caught.value) == ["update_mask"]


def test_every_bad_path_is_reported(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    with pytest.raises(InvalidArgument) as caught:
        update(world, owner, agent, ("owner_id", "description", "colour"), description="x")
    assert fields_of(caught.value) == ["update_mask", "update_mask"]
    assert world.database.committed.agents[agent.id] == agent


def test_a_mask_error_stays_small_however_many_and_long_the_paths(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    with pytest.raises(InvalidArgument) as caught:
        update(world, owner, agent, tuple(f"{i}{'x' * 100_000}" for i in range(1_000)))
    assert len(caught.value.violations) == 11
    assert len(caught.value.message) < 2_000


def test_output_only_paths_are_ignored(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    updated = update(
        world, owner, agent, ("create_time", "update_time", "etag", "name"), name="renamed"
    )
    assert updated.name == "renamed"
    assert updated.create_time == agent.create_time


def test_every_output_only_field_of_the_proto_is_ignored_in_a_mask(world: World) -> None:
    """AIP-134: a mask naming an output-only field (as agent.proto marks them) ignores
    it; `owner_id` is immutable instead (INVALID_ARGUMENT), `etag` is an input of its own."""
    from agentplatform.agent.v1 import agent_pb2
    from google.api import field_behavior_pb2  # type: ignore[import-untyped]

    marked = {
        field.name
        for field in agent_pb2.Agent.DESCRIPTOR.fields
        if field_behavior_pb2.OUTPUT_ONLY
        in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    }
    assert marked - {"owner_id"} <= OUTPUT_ONLY_FIELDS
    owner = user()
    agent = create(world, owner)
    paths = (*sorted(marked - {"owner_id"}), "name")
    assert update(world, owner, agent, paths, name="renamed").name == "renamed"


def test_an_update_that_changes_nothing_writes_nothing(world: World) -> None:
    owner = user()
    agent = create(world, owner, description="same")
    unchanged = update(world, owner, agent, ("create_time", "etag"))
    assert unchanged == agent  # same revision, etag and update_time
    again = update(world, owner, agent, ("description",), description="same")
    assert again.etag == agent.etag
    assert world.database.committed.agents[agent.id] == agent


def test_metadata_entries_can_be_set_and_removed_by_key(world: World) -> None:
    owner = user()
    agent = create(world, owner, metadata={"keep": "1", "drop": "2", "change": "3"})
    updated = update(
        world,
        owner,
        agent,
        ("metadata.change", "metadata.drop", "metadata.add"),
        metadata={"change": "new", "add": "4"},
    )
    assert updated.metadata == {"keep": "1", "change": "new", "add": "4"}


def test_the_merged_agent_is_validated(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    with pytest.raises(InvalidArgument) as caught:
        update(world, owner, agent, ("name", "top_p"), name="", top_p=7.0)
    assert fields_of(caught.value) == ["agent.name", "agent.top_p"]
    assert world.database.committed.agents[agent.id] == agent


def test_an_update_that_would_make_the_agent_too_big_is_invalid_on_agent(world: World) -> None:
    owner = user()
    agent = create(world, owner, instructions="😀" * 256_000)
    with pytest.raises(InvalidArgument) as caught:
        update(
            world, owner, agent, ("metadata",), metadata={f"k{i}": "😀" * 512 for i in range(16)}
        )
    assert fields_of(caught.value) == ["agent"]
    assert world.database.committed.agents[agent.id] == agent


def test_renaming_onto_another_agents_name_already_exists(world: World) -> None:
    owner = user()
    create(world, owner, name="taken")
    agent = create(world, owner, name="mine")
    with pytest.raises(AlreadyExists):
        update(world, owner, agent, ("name",), name="taken")


def test_a_matching_etag_updates(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    updated = update(world, owner, agent, ("description",), agent.etag, description="x")
    assert updated.description == "x"


def test_a_stale_etag_is_aborted(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    update(world, owner, agent, ("description",), agent.etag, description="first")
    with pytest.raises(Aborted) as caught:
        update(world, owner, agent, ("description",), agent.etag, description="second")
    assert caught.value.reason == "ETAG_MISMATCH"
    assert world.database.committed.agents[agent.id].description == "first"


def test_an_etag_that_loses_the_race_is_aborted(world: World) -> None:
    """Another writer commits between this update's read and its compare-and-set."""
    owner = user()
    agent = create(world, owner)
    world.database.interfere(lambda: world.database.bump(agent.id))
    with pytest.raises(Aborted) as caught:
        update(world, owner, agent, ("description",), agent.etag, description="late")
    assert caught.value.reason == "ETAG_MISMATCH"
    assert world.cache.invalidated == []


def test_an_update_without_etag_retries_a_lost_race(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.database.interfere(
        lambda: world.database.bump(agent.id), lambda: world.database.bump(agent.id)
    )
    updated = update(world, owner, agent, ("description",), description="eventually")
    assert updated.description == "eventually"
    assert updated.revision == agent.revision + 3


def test_an_update_without_etag_gives_up_after_a_few_lost_races(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.database.interfere(*[lambda: world.database.bump(agent.id)] * UPDATE_ATTEMPTS)
    with pytest.raises(Aborted) as caught:
        update(world, owner, agent, ("description",), description="never")
    assert caught.value.reason == "CONCURRENT_UPDATE"


def test_update_invalidates_the_cache_after_commit(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.service.get(principal=owner, agent_id=str(agent.id))
    updated = update(world, owner, agent, ("description",), description="fresh")
    assert world.cache.invalidated == [agent.id]
    assert world.service.get(principal=owner, agent_id=str(agent.id)) == updated


def _update_description(world: World, owner: Principal, agent: Agent) -> None:
    update(world, owner, agent, ("description",), agent.etag, description="changed")


def _update_after_a_lost_race(world: World, owner: Principal, agent: Agent) -> None:
    world.database.interfere(lambda: world.database.bump(agent.id))
    update(world, owner, agent, ("description",), description="retried")


def _delete(world: World, owner: Principal, agent: Agent) -> None:
    world.service.delete(principal=owner, agent_id=str(agent.id))


def _delete_with_etag(world: World, owner: Principal, agent: Agent) -> None:
    world.service.delete(principal=owner, agent_id=str(agent.id), etag=agent.etag)


@pytest.mark.parametrize(
    "write", [_update_description, _update_after_a_lost_race, _delete, _delete_with_etag]
)
def test_every_write_invalidates_the_cache_only_after_its_commit(
    world: World, write: Callable[[World, Principal, Agent], None]
) -> None:
    """Invalidating before the commit would let a concurrent read put the old version back
    into the cache, where it would stay until its TTL."""
    owner = user()
    agent = create(world, owner)
    world.service.get(principal=owner, agent_id=str(agent.id))  # cached
    world.database.events.clear()
    write(world, owner, agent)
    assert world.database.events == ["commit", f"invalidate {agent.id}"]


def test_another_owner_cannot_update_and_learns_nothing(world: World) -> None:
    agent = create(world, user())
    with pytest.raises(NotFound):
        update(world, user(), agent, ("description",), description="mine now")
    with pytest.raises(NotFound):  # even with the right etag
        update(world, user(), agent, ("description",), agent.etag, description="mine now")


def test_an_admin_updates_anyones_agent(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    updated = update(world, admin(), agent, ("description",), description="by admin")
    assert updated.description == "by admin"
    assert str(updated.owner_id) == owner.user_id


def test_update_needs_a_well_formed_agent_id(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.service.update(
            principal=user(), agent_id="nope", patch=AgentInput(name="x"), update_mask=()
        )
    assert fields_of(caught.value) == ["agent.id"]


def test_updating_a_missing_agent_is_not_found(world: World) -> None:
    with pytest.raises(NotFound):
        world.service.update(
            principal=user(), agent_id=str(uuid.uuid4()), patch=AgentInput(name="x")
        )


# -- delete ---------------------------------------------------------------------------------


def test_delete_marks_deleted_and_invalidates(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.service.get(principal=owner, agent_id=str(agent.id))
    world.clock.advance(5)
    deleted = world.service.delete(principal=owner, agent_id=str(agent.id))
    assert world.database.committed.agents[agent.id] == deleted
    assert deleted.delete_time == world.clock.now()
    assert deleted.expire_time == world.clock.now() + timedelta(days=30)
    assert deleted.etag != agent.etag
    assert (deleted.settable, deleted.revision_id, deleted.update_time) == (
        agent.settable,
        agent.revision_id,
        agent.update_time,
    )
    assert world.cache.invalidated == [agent.id]
    assert world.service.get(principal=owner, agent_id=str(agent.id)) == deleted  # AIP-164


def test_delete_with_the_current_etag(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.service.delete(principal=owner, agent_id=str(agent.id), etag=agent.etag)
    assert world.database.committed.agents[agent.id].deleted


def test_delete_with_a_stale_etag_is_aborted(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    update(world, owner, agent, ("description",), description="changed")
    with pytest.raises(Aborted) as caught:
        world.service.delete(principal=owner, agent_id=str(agent.id), etag=agent.etag)
    assert caught.value.reason == "ETAG_MISMATCH"
    assert agent.id in world.database.committed.agents


def test_delete_with_an_etag_that_loses_the_race_is_aborted(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.database.interfere(lambda: world.database.bump(agent.id))
    with pytest.raises(Aborted):
        world.service.delete(principal=owner, agent_id=str(agent.id), etag=agent.etag)


def test_delete_without_etag_is_unconditional(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.database.interfere(lambda: world.database.bump(agent.id))
    world.service.delete(principal=owner, agent_id=str(agent.id))
    assert world.database.committed.agents[agent.id].deleted


def test_delete_of_someone_elses_or_a_missing_agent_is_not_found(world: World) -> None:
    agent = create(world, user())
    with pytest.raises(NotFound):
        world.service.delete(principal=user(), agent_id=str(agent.id))
    with pytest.raises(NotFound):
        world.service.delete(principal=user(), agent_id=str(uuid.uuid4()))
    assert agent.id in world.database.committed.agents
    assert world.cache.invalidated == []


def test_an_admin_deletes_anyones_agent(world: World) -> None:
    agent = create(world, user())
    world.service.delete(principal=admin(), agent_id=str(agent.id))
    assert world.database.committed.agents[agent.id].deleted


def test_delete_needs_a_well_formed_id(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.service.delete(principal=user(), agent_id="x")
    assert fields_of(caught.value) == ["id"]


# -- list -----------------------------------------------------------------------------------


def names(agents: tuple[Agent, ...]) -> list[str]:
    return [a.name for a in agents]


def test_list_shows_only_the_callers_agents(world: World) -> None:
    me, other = user(), user()
    create(world, me, name="mine")
    create(world, other, name="theirs")
    page = world.service.list(principal=me)
    assert names(page.agents) == ["mine"]
    assert page.next_page_token == ""


def test_an_admin_lists_everyones_or_one_owners(world: World) -> None:
    me, other = user(), user()
    create(world, me, name="mine")
    create(world, other, name="theirs")
    assert sorted(names(world.service.list(principal=admin()).agents)) == ["mine", "theirs"]
    only = world.service.list(principal=admin(), filter=f'owner_id = "{other.user_id}"')
    assert names(only.agents) == ["theirs"]
    assert world.database.queries[-1].filter.conditions == (OwnerEquals(uuid.UUID(other.user_id)),)


@pytest.mark.parametrize(
    "filter_text",
    ['owner_id = "{me}"', 'owner_id = "{other}"', 'model = "gpt-4o" AND owner_id = "{me}"'],
)
def test_a_user_filtering_by_owner_is_denied_not_invalid(world: World, filter_text: str) -> None:
    """The filter is well formed; the caller lacks the right to use it (PERMISSION_DENIED)."""
    me = user()
    with pytest.raises(PermissionDenied) as caught:
        world.service.list(
            principal=me, filter=filter_text.format(me=me.user_id, other=uuid.uuid4())
        )
    assert caught.value.reason == "OWNER_FILTER_NOT_ALLOWED"


def test_the_default_order_is_newest_first(world: World) -> None:
    me = user()
    for name in ("a", "b", "c"):
        create(world, me, name=name)
        world.clock.advance(1)
    assert names(world.service.list(principal=me).agents) == ["c", "b", "a"]
    assert names(world.service.list(principal=me, order_by="name desc").agents) == [
        "c",
        "b",
        "a",
    ]
    assert names(world.service.list(principal=me, order_by="create_time").agents) == [
        "a",
        "b",
        "c",
    ]


def test_the_filter_reaches_the_repository(world: World) -> None:
    me = user()
    create(world, me, name="a", metadata={"team": "x"})
    create(world, me, name="b", metadata={"team": "y"})
    page = world.service.list(principal=me, filter='metadata.team = "y"')
    assert names(page.agents) == ["b"]
    assert world.database.queries[-1].filter.conditions == (MetadataEquals("team", "y"),)
    assert world.database.queries[-1].owner_id == uuid.UUID(me.user_id)


def test_paging_walks_every_agent_once(world: World) -> None:
    me = user()
    for index in range(7):
        create(world, me, name=f"agent-{index}")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = world.service.list(principal=me, page_size=3, page_token=token, order_by="name")
        seen += names(page.agents)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"agent-{i}" for i in range(7)]
    assert pages == 3
    assert world.database.queries[-1].limit == 4  # page size + 1 to know if more follow


def test_a_full_last_page_has_no_next_token(world: World) -> None:
    me = user()
    for index in range(4):
        create(world, me, name=f"agent-{index}")
    first = world.service.list(principal=me, page_size=2)
    last = world.service.list(principal=me, page_size=2, page_token=first.next_page_token)
    assert len(last.agents) == 2
    assert last.next_page_token == ""


def test_page_size_defaults_and_clamps(world: World) -> None:
    me = user()
    world.service.list(principal=me)
    assert world.database.queries[-1].limit == 51
    world.service.list(principal=me, page_size=5000)
    assert world.database.queries[-1].limit == 1001
    with pytest.raises(InvalidArgument) as caught:
        world.service.list(principal=me, page_size=-1)
    assert fields_of(caught.value) == ["page_size"]


def all_pages(world: World, me: Principal, page_size: int) -> list[tuple[Agent, ...]]:
    pages: list[tuple[Agent, ...]] = []
    token = ""
    while True:
        page = world.service.list(
            principal=me, page_size=page_size, page_token=token, order_by="name"
        )
        pages.append(page.agents)
        token = page.next_page_token
        if not token:
            return pages


def test_a_page_of_big_agents_ends_early_within_the_response_budget(world: World) -> None:
    me = user()
    names = [f"big-{index:02d}" for index in range(20)]
    for name in names:  # ~600 KB each: 20 would make a 12 MB page
        create(world, me, name=name, instructions="€" * 200_000)
    pages = all_pages(world, me, page_size=20)
    assert [a.name for page in pages for a in page] == names  # none lost or repeated
    assert len(pages) == 4
    for page in pages:
        assert 1 <= len(page) <= 5
        assert sum(framed(agent_size(a)) for a in page) <= LIST_RESPONSE_BUDGET


def test_an_agent_bigger_than_the_budget_still_makes_a_page_of_its_own() -> None:
    world = make_world(agent_size=lambda agent: LIST_RESPONSE_BUDGET + 1)
    me = user()
    for index in range(3):
        create(world, me, name=f"huge-{index}")
    pages = all_pages(world, me, page_size=50)
    assert [[a.name for a in page] for page in pages] == [["huge-0"], ["huge-1"], ["huge-2"]]


def test_small_agents_fill_the_page_size(world: World) -> None:
    me = user()
    for index in range(30):
        create(world, me, name=f"small-{index:02d}")
    assert [len(page) for page in all_pages(world, me, page_size=25)] == [25, 5]


def _first_token(world: World, me: Principal, **query: Any) -> str:
    for index in range(3):
        create(world, me, name=f"n{index}")
    token = world.service.list(principal=me, page_size=1, **query).next_page_token
    assert token
    return token


@pytest.mark.parametrize(
    "changed",
    [
        {"filter": 'name = "n*"', "order_by": "name desc"},
        {"filter": 'name = "m*"', "order_by": "name"},
        {"filter": "", "order_by": "name"},
        {"filter": 'name = "n*"', "order_by": "create_time"},
    ],
)
def test_a_token_from_another_query_is_invalid(world: World, changed: dict[str, Any]) -> None:
    me = user()
    token = _first_token(world, me, filter='name = "n*"', order_by="name")
    with pytest.raises(InvalidArgument) as caught:
        world.service.list(principal=me, page_size=1, page_token=token, **changed)
    assert fields_of(caught.value) == ["page_token"]


def test_a_token_survives_an_equivalent_spelling_of_the_query(world: World) -> None:
    me = user()
    token = _first_token(world, me, filter='name = "n*" AND model = "gpt-4o"', order_by="name")
    page = world.service.list(
        principal=me,
        page_size=1,
        page_token=token,
        filter='model="gpt-4o"  AND name="n*"',
        order_by="name asc",
    )
    assert names(page.agents) == ["n1"]


def test_a_token_from_another_caller_is_invalid(world: World) -> None:
    me = user()
    token = _first_token(world, me)
    with pytest.raises(InvalidArgument) as caught:
        world.service.list(principal=user(), page_size=1, page_token=token)
    assert fields_of(caught.value) == ["page_token"]


def test_a_token_does_not_carry_over_when_the_callers_scope_changes(world: World) -> None:
    me = user()
    token = _first_token(world, me)
    promoted = Principal(user_id=me.user_id, roles=frozenset({"user", "admin"}))
    with pytest.raises(InvalidArgument):
        world.service.list(principal=promoted, page_size=1, page_token=token)


def test_a_tampered_token_is_invalid(world: World) -> None:
    me = user()
    token = _first_token(world, me)
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with pytest.raises(InvalidArgument) as caught:
        world.service.list(principal=me, page_size=1, page_token=forged)
    assert fields_of(caught.value) == ["page_token"]


def test_a_token_from_another_secret_is_invalid() -> None:
    one, two = make_world(), make_world(secret=b"another-secret-another-secret-!!")
    me = user()
    token = _first_token(one, me)
    with pytest.raises(InvalidArgument):
        two.service.list(principal=me, page_size=1, page_token=token)


@pytest.mark.parametrize(
    ("query", "field"),
    [({"filter": 'model = "a" OR model = "b"'}, "filter"), ({"order_by": "model"}, "order_by")],
)
def test_bad_queries_are_invalid(world: World, query: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.service.list(principal=user(), **query)  # type: ignore[arg-type]
    assert fields_of(caught.value) == [field]


def test_every_error_is_a_domain_error(world: World) -> None:
    """The servicer relies on this: nothing else may leave the service layer."""
    with pytest.raises(DomainError):
        world.service.get(principal=user(), agent_id="x")


# -- scopes and authorship ------------------------------------------------------------------

READ, WRITE, ADMIN = "agents.read", "agents.write", "agents.admin"


def _missing_scope(call: Callable[[], object]) -> str:
    with pytest.raises(PermissionDenied) as caught:
        call()
    assert caught.value.reason == "MISSING_SCOPE"
    return caught.value.metadata["scope"]


def test_reading_needs_agents_read(world: World) -> None:
    writer = service_account(WRITE)
    agent = create(world, writer)
    assert (
        _missing_scope(lambda: world.service.get(principal=writer, agent_id=str(agent.id))) == READ
    )
    assert _missing_scope(lambda: world.service.list(principal=writer)) == READ


def test_changing_needs_agents_write_and_writes_nothing_without_it(world: World) -> None:
    reader = service_account(READ)
    owner = Principal(
        user_id=reader.user_id,
        roles=frozenset(),
        scopes=frozenset({READ, WRITE}),
        client_id=reader.client_id,
    )
    agent = create(world, owner)
    commits = world.database.commits
    assert _missing_scope(lambda: create(world, reader)) == WRITE
    assert (
        _missing_scope(
            lambda: world.service.update(
                principal=reader,
                agent_id=str(agent.id),
                patch=AgentInput(name="x"),
                update_mask=["name"],
            )
        )
        == WRITE
    )
    assert (
        _missing_scope(lambda: world.service.delete(principal=reader, agent_id=str(agent.id)))
        == WRITE
    )
    assert world.database.commits == commits
    assert world.service.get(principal=reader, agent_id=str(agent.id)) == agent


def test_a_token_without_scopes_may_do_what_its_roles_allowed() -> None:
    world = make_world()
    legacy_user, legacy_admin = user(), admin()
    assert legacy_user.scopes is None
    assert legacy_admin.scopes is None
    mine = create(world, legacy_user)
    assert world.service.get(principal=legacy_user, agent_id=str(mine.id)) == mine
    assert [a.id for a in world.service.list(principal=legacy_admin).agents] == [mine.id]
    with pytest.raises(NotFound):
        world.service.get(principal=user(), agent_id=str(mine.id))


def test_a_service_account_owns_what_it_creates_and_sees_only_that(world: World) -> None:
    account = service_account(READ, WRITE)
    someone = create(world, user(), name="theirs")
    ours = create(world, account, name="ours")
    assert str(ours.owner_id) == account.user_id
    assert ours.updated_by == f"serviceAccounts/{account.user_id}"
    assert ours.updated_via == ""
    assert [a.id for a in world.service.list(principal=account).agents] == [ours.id]
    with pytest.raises(NotFound):
        world.service.get(principal=account, agent_id=str(someone.id))


def test_agents_admin_sees_every_agent_and_the_admin_role_alone_does_not(world: World) -> None:
    theirs = create(world, user())
    auditor = service_account(READ, ADMIN)
    assert world.service.get(principal=auditor, agent_id=str(theirs.id)) == theirs
    # An administrator's token narrowed to read and write (no agents.admin) is an owner's.
    narrowed = Principal(
        user_id=str(uuid.uuid4()),
        roles=frozenset({"user", "admin"}),
        scopes=frozenset({READ, WRITE}),
    )
    with pytest.raises(NotFound):
        world.service.get(principal=narrowed, agent_id=str(theirs.id))


def test_a_service_acting_for_a_user_acts_as_the_user_and_is_recorded(world: World) -> None:
    person = user()
    agent = create(world, person)
    assert agent.updated_by == f"users/{person.user_id}"
    assert agent.updated_via == ""
    runtime, actor = acting_for(person, READ, WRITE)
    assert world.service.get(principal=runtime, agent_id=str(agent.id)) == agent
    changed = world.service.update(
        principal=runtime,
        agent_id=str(agent.id),
        patch=AgentInput(description="tuned"),
        update_mask=["description"],
    )
    assert changed.owner_id == agent.owner_id
    assert changed.updated_by == f"users/{person.user_id}"
    assert changed.updated_via == f"serviceAccounts/{actor}"
    assert world.database.committed.agents[agent.id] == changed
    made, _ = acting_for(person, WRITE)
    created = create(world, made, name="made for them")
    assert str(created.owner_id) == person.user_id


def test_a_delegated_token_sees_only_its_users_agents(world: World) -> None:
    other = create(world, user())
    runtime, _ = acting_for(user(), READ)
    with pytest.raises(NotFound):
        world.service.get(principal=runtime, agent_id=str(other.id))


# -- batch reads and dry runs (AIP-231, AIP-163) ----------------------------------------------


def test_a_batch_comes_back_in_the_order_asked_through_the_cache(world: World) -> None:
    owner = user()
    first, second = create(world, owner, name="a"), create(world, owner, name="b")
    ids = [str(second.id), str(first.id), str(second.id)]
    assert world.service.batch_get(principal=owner, agent_ids=ids) == [second, first, second]
    assert world.cache.loads == 2  # each agent loaded once, repeats included
    assert world.service.batch_get(principal=admin(), agent_ids=ids[:1]) == [second]


def test_a_batch_is_all_or_nothing(world: World) -> None:
    owner = user()
    mine = create(world, owner, name="mine")
    theirs = create(world, user(), name="theirs")
    for missing in (theirs.id, uuid.uuid4()):
        with pytest.raises(NotFound) as caught:
            world.service.batch_get(principal=owner, agent_ids=[str(mine.id), str(missing)])
        assert str(missing) in caught.value.message


def test_a_bad_batch_names_every_bad_id_and_its_size_limits(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.service.batch_get(principal=user(), agent_ids=[str(uuid.uuid4()), "x", "", "y"])
    assert fields_of(caught.value) == ["ids[1]", "ids[2]", "ids[3]"]
    for ids in ([], [str(uuid.uuid4())] * 101):
        with pytest.raises(InvalidArgument) as caught:
            world.service.batch_get(principal=user(), agent_ids=ids)
        assert fields_of(caught.value) == ["ids"]
    with pytest.raises(PermissionDenied):
        world.service.batch_get(principal=service_account("agents.write"), agent_ids=["x"])


def test_a_batch_too_big_for_one_response_is_refused() -> None:
    world = make_world()
    owner = user()
    big = "x" * 250_000
    count = LIST_RESPONSE_BUDGET // len(big) + 1  # together just past the budget
    ids = [str(create(world, owner, name=f"big-{n}", instructions=big).id) for n in range(count)]
    assert world.service.batch_get(principal=owner, agent_ids=ids[:-2])  # under it: fine
    with pytest.raises(InvalidArgument) as caught:
        world.service.batch_get(principal=owner, agent_ids=ids)
    assert "ask for fewer" in caught.value.violations[0].description


def test_validate_only_create_checks_everything_and_stores_nothing(world: World) -> None:
    owner = user()
    would = world.service.create(principal=owner, agent=agent_input(), validate_only=True)
    assert would.name == agent_input().name
    assert world.database.committed.agents == {}
    with pytest.raises(InvalidArgument):
        world.service.create(principal=owner, agent=agent_input(name=""), validate_only=True)
    with pytest.raises(PermissionDenied):
        world.service.create(
            principal=service_account("agents.read"), agent=agent_input(), validate_only=True
        )


def test_validate_only_update_checks_the_etag_and_changes_nothing(world: World) -> None:
    owner = user()
    agent = create(world, owner)
    world.clock.advance(5)
    would = world.service.update(
        principal=owner,
        agent_id=str(agent.id),
        patch=AgentInput(description="new"),
        update_mask=["description"],
        etag=agent.etag,
        validate_only=True,
    )
    assert would.description == "new"
    assert would.revision == agent.revision + 1
    assert world.database.committed.agents[agent.id] == agent
    with pytest.raises(Aborted):
        world.service.update(
            principal=owner,
            agent_id=str(agent.id),
            patch=AgentInput(description="new"),
            update_mask=["description"],
            etag="stale",
            validate_only=True,
        )
    with pytest.raises(NotFound):
        world.service.update(
            principal=user(),
            agent_id=str(agent.id),
            patch=AgentInput(description="new"),
            update_mask=["description"],
            validate_only=True,
        )


def test_validate_only_fails_as_the_live_create_would() -> None:
    """AIP-163: a dry run answers what the real request would, taken names, the quota and
    a reused request id included; and it still stores nothing."""
    world = make_world(max_agents_per_owner=2)
    owner, request = user(), str(uuid.uuid4())
    world.service.create(principal=owner, agent=agent_input(name="taken"), request_id=request)
    with pytest.raises(AlreadyExists) as taken:
        world.service.create(principal=owner, agent=agent_input(name="taken"), validate_only=True)
    assert taken.value.reason == "AGENT_NAME_TAKEN"
    with pytest.raises(InvalidArgument) as reused:
        world.service.create(
            principal=owner, agent=agent_input(name="other"), request_id=request, validate_only=True
        )
    assert reused.value.reason == "REQUEST_ID_REUSED"
    deleted = create(world, owner, name="deleted")
    world.service.delete(principal=owner, agent_id=str(deleted.id))
    with pytest.raises(AlreadyExists):  # a deleted agent keeps its name (AIP-164)
        world.service.create(principal=owner, agent=agent_input(name="deleted"), validate_only=True)
    create(world, owner, name="second")
    with pytest.raises(ResourceExhausted) as quota:
        world.service.create(principal=owner, agent=agent_input(name="third"), validate_only=True)
    assert quota.value.reason == "AGENT_QUOTA_EXCEEDED"
    before = world.database.committed
    fresh = user()
    world.service.create(principal=fresh, agent=agent_input(name="dry"), validate_only=True)
    assert world.database.committed == before
    assert {a.name for a in world.database.committed.agents.values()} == {
        "taken",
        "deleted",
        "second",
    }


def test_validate_only_update_refuses_a_taken_name_and_stores_nothing(world: World) -> None:
    owner = user()
    create(world, owner, name="taken")
    agent = create(world, owner, name="mine")
    with pytest.raises(AlreadyExists) as caught:
        world.service.update(
            principal=owner,
            agent_id=str(agent.id),
            patch=AgentInput(name="taken"),
            update_mask=["name"],
            validate_only=True,
        )
    assert caught.value.reason == "AGENT_NAME_TAKEN"
    would = world.service.update(
        principal=owner,
        agent_id=str(agent.id),
        patch=AgentInput(name="renamed"),
        update_mask=["name"],
        validate_only=True,
    )
    assert would.name == "renamed"
    assert world.database.committed.agents[agent.id] == agent
    assert world.service.get(principal=owner, agent_id=str(agent.id)) == agent
