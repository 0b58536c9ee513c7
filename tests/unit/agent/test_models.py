"""The model catalogue: active, deprecated (works, says so), retired (refused, names the
replacement), and counts of agents by model for planning a migration."""

from __future__ import annotations

from datetime import date

import pytest

from services.agent_svc.domain import AgentInput
from services.agent_svc.service.models import (
    ACTIVE,
    DEPRECATED,
    RETIRED,
    ModelCatalogue,
    ModelEntry,
    parse_entries,
)
from services.agent_svc.settings import load_agent_settings
from shared.config.settings import ConfigError
from shared.rpc.errors import InvalidArgument
from tests.unit.agent.fakes import World, admin, agent_input, make_world, user

CATALOGUE = ModelCatalogue(
    [
        ModelEntry("gpt-4.1", ACTIVE),
        ModelEntry("gpt-4o", DEPRECATED, date(2027, 3, 1), "gpt-4.1"),
        ModelEntry("gpt-3.5", RETIRED, None, "gpt-4.1"),
    ]
)


@pytest.fixture
def world() -> World:
    return make_world(catalogue=CATALOGUE)


def test_a_deprecated_model_works_and_the_service_says_so(world: World) -> None:
    agent = world.service.create(principal=user(), agent=agent_input(model="gpt-4o"))
    assert agent.model == "gpt-4o"
    notice = world.service.model_notice(agent.model)
    assert notice == ModelEntry("gpt-4o", DEPRECATED, date(2027, 3, 1), "gpt-4.1")
    assert world.service.model_notice("gpt-4.1") is None


def test_a_retired_model_is_refused_naming_its_replacement(world: World) -> None:
    owner = user()
    with pytest.raises(InvalidArgument) as caught:
        world.service.create(principal=owner, agent=agent_input(model="gpt-3.5"))
    violation = caught.value.violations[0]
    assert violation.field == "agent.model"
    assert violation.description == "gpt-3.5 is retired; use gpt-4.1"
    agent = world.service.create(principal=owner, agent=agent_input(model="gpt-4.1"))
    with pytest.raises(InvalidArgument):
        world.service.update(
            principal=owner,
            agent_id=str(agent.id),
            patch=AgentInput(model="gpt-3.5"),
            update_mask=["model"],
        )


def test_models_are_listed_with_the_agents_using_them(world: World) -> None:
    alice, bob = user(), user()
    for n, model in enumerate(("gpt-4o", "gpt-4o", "gpt-4.1")):
        world.service.create(principal=alice, agent=agent_input(model=model, name=f"a{n}"))
    world.service.create(principal=bob, agent=agent_input(model="gpt-4o", name="b"))
    mine = {entry.name: count for entry, count in world.service.models(principal=alice)}
    assert mine == {"gpt-4.1": 1, "gpt-4o": 2, "gpt-3.5": 0}
    everyone = {entry.name: count for entry, count in world.service.models(principal=admin())}
    assert everyone == {"gpt-4.1": 1, "gpt-4o": 3, "gpt-3.5": 0}


def test_the_catalogue_is_configured_from_the_environment() -> None:
    settings = load_agent_settings(
        {
            "AGENT_ALLOWED_MODELS": "gpt-4.1",
            "AGENT_DEPRECATED_MODELS": "gpt-4o@2027-03-01>gpt-4.1, o1",
            "AGENT_RETIRED_MODELS": "gpt-3.5>gpt-4.1",
        }
    )
    catalogue = settings.catalogue
    assert catalogue.usable == ("gpt-4.1", "gpt-4o", "o1")
    assert catalogue.get("o1") == ModelEntry("o1", DEPRECATED)
    assert catalogue.retired("gpt-3.5") == ModelEntry("gpt-3.5", RETIRED, None, "gpt-4.1")
    for bad, why in (
        ({"AGENT_DEPRECATED_MODELS": "x@tomorrow"}, "YYYY-MM-DD"),
        ({"AGENT_RETIRED_MODELS": "x@2027-01-01"}, "only a deprecated model"),
        ({"AGENT_DEPRECATED_MODELS": "o1", "AGENT_RETIRED_MODELS": "o1"}, "listed twice"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_agent_settings(bad)
    assert parse_entries(" , ", RETIRED) == []


def test_a_deprecated_model_past_its_sunset_is_refused_naming_its_replacement() -> None:
    """ "Usable until its sunset date": from that date on it is refused like a retired one,
    and ListModels shows it retired."""
    world = make_world(catalogue=CATALOGUE)
    owner = user()
    world.service.create(principal=owner, agent=agent_input(model="gpt-4o", name="before"))
    world.clock.advance((date(2027, 3, 1) - world.clock.now().date()).days * 86_400.0)
    with pytest.raises(InvalidArgument) as caught:
        world.service.create(principal=owner, agent=agent_input(model="gpt-4o", name="after"))
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("agent.model", "gpt-4o reached its sunset date 2027-03-01; use gpt-4.1")
    ]
    states = {entry.name: entry.state for entry, _ in world.service.models(principal=owner)}
    assert states["gpt-4o"] == RETIRED


def test_a_retired_model_is_reported_with_the_agents_other_problems(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.service.create(principal=user(), agent=agent_input(model="gpt-3.5", name=""))
    assert sorted((v.field, v.description) for v in caught.value.violations)[0][0] == "agent.model"
    fields = [v.field for v in caught.value.violations]
    assert sorted(fields) == ["agent.model", "agent.name"]
    assert "gpt-3.5 is retired; use gpt-4.1" in [v.description for v in caught.value.violations]


def test_a_default_model_can_be_deprecated_or_retired_without_restating_the_list() -> None:
    settings = load_agent_settings(
        {"AGENT_DEPRECATED_MODELS": "gpt-4o@2027-03-01>gpt-4.1", "AGENT_RETIRED_MODELS": "o1"}
    )
    assert settings.catalogue.get("gpt-4o") == ModelEntry(
        "gpt-4o", DEPRECATED, date(2027, 3, 1), "gpt-4.1"
    )
    assert settings.catalogue.retired("o1") == ModelEntry("o1", RETIRED)
    assert "o1" not in settings.catalogue.usable


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"AGENT_DEPRECATED_MODELS": "gpt-4o>nonexistent"}, "'nonexistent', is not a usable model"),
        ({"AGENT_RETIRED_MODELS": "old>gpt-3.5"}, "'gpt-3.5', is not a usable model"),
        ({"AGENT_RETIRED_MODELS": "a>b, b>gpt-4.1"}, "'b', is not a usable model"),
        ({"AGENT_DEPRECATED_MODELS": "m" * 129}, "at most 128 characters"),
        ({"AGENT_RETIRED_MODELS": "x, x"}, "listed twice"),
    ],
)
def test_the_catalogue_refuses_what_cannot_work(env: dict[str, str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_agent_settings(env)


def test_a_model_past_its_sunset_is_neither_offered_nor_named_as_a_replacement() -> None:
    """The catalogue is written once; sunsets pass later. From a deprecated model's sunset
    date on, an unknown model's refusal no longer lists it, and a refusal (or a notice, or
    ListModels) that would name it as the replacement names its own replacement instead
    (nothing when that chain ends in no usable model)."""
    catalogue = ModelCatalogue(
        [
            ModelEntry("gpt-5", ACTIVE),
            ModelEntry("gemini-2.5-pro", DEPRECATED, date(2027, 1, 1), "gpt-5"),
            ModelEntry("gpt-4o-mini", DEPRECATED, date(2027, 6, 1), "gemini-2.5-pro"),
            ModelEntry("gpt-3.5", RETIRED, None, "gemini-2.5-pro"),
            ModelEntry("o1", RETIRED, None, "o1-mini"),
            ModelEntry("o1-mini", DEPRECATED, date(2027, 1, 1), None),
        ]
    )
    world = make_world(catalogue=catalogue)
    owner = user()
    world.clock.advance((date(2027, 1, 1) - world.clock.now().date()).days * 86_400.0)
    with pytest.raises(InvalidArgument) as caught:
        world.service.create(principal=owner, agent=agent_input(model="claude-9"))
    (unknown,) = caught.value.violations
    assert unknown.field == "agent.model"
    assert "gemini-2.5-pro" not in unknown.description
    assert "o1-mini" not in unknown.description
    assert "gpt-5" in unknown.description
    with pytest.raises(InvalidArgument) as caught:
        world.service.create(principal=owner, agent=agent_input(model="gpt-3.5"))
    assert caught.value.violations[0].description == "gpt-3.5 is retired; use gpt-5"
    with pytest.raises(InvalidArgument) as caught:
        world.service.create(principal=owner, agent=agent_input(model="o1"))
    assert caught.value.violations[0].description == "o1 is retired"
    notice = world.service.model_notice("gpt-4o-mini")
    assert notice is not None
    assert notice.replacement == "gpt-5"
    # An agent still on a model past its sunset (an update that changes nothing replies
    # with its notice) is told it is retired, as ListModels says.
    past = world.service.model_notice("gemini-2.5-pro")
    assert past == ModelEntry("gemini-2.5-pro", RETIRED, date(2027, 1, 1), "gpt-5")
    listed = {entry.name: entry.replacement for entry, _ in world.service.models(principal=owner)}
    assert listed == {
        "gpt-5": None,
        "gemini-2.5-pro": "gpt-5",
        "gpt-4o-mini": "gpt-5",
        "gpt-3.5": "gpt-5",
        "o1": None,
        "o1-mini": None,
    }
