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
        ({"AGENT_RETIRED_MODELS": "gpt-4o"}, "listed twice"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_agent_settings(bad)
    assert parse_entries(" , ", RETIRED) == []
