"""The wire size computed from domain objects is the generated code's ByteSize(), exactly:
over a few thousand seeded random agents (multi-byte text, empty keys and strings, nested
Structs and lists, every kind of Value, times on and off whole seconds) and the edges."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.agent_svc.api.convert import agent_to_proto, serialized_size
from services.agent_svc.domain import Agent, Tool
from services.agent_svc.service.sizing import SERVER_FIELDS_MAX, agent_size, settable_size

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PIECES = ["a", "é", "€", "😀", "\n", '"', "\\", ""]


class RandomAgents:
    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def text(self, longest: int) -> str:
        return "".join(self.random.choice(PIECES) for _ in range(self.random.randrange(longest)))

    def value(self, depth: int) -> Any:
        kind = self.random.randrange(6 if depth < 5 else 4)
        if kind == 0:
            return self.random.choice([None, True, False])
        if kind == 1:
            return self.random.choice([0.0, 1.0, -2.5, 1e300, 3.0, 7])
        if kind in (2, 3):
            return self.text(self.random.choice([3, 300]))
        if kind == 4:
            return {self.text(5): self.value(depth + 1) for _ in range(self.random.randrange(4))}
        return [self.value(depth + 1) for _ in range(self.random.randrange(4))]

    def moment(self) -> datetime:
        micros = self.random.choice([0, 1, 10**6, self.random.randrange(10**17)])
        return EPOCH + timedelta(microseconds=micros)

    def agent(self) -> Agent:
        choice, span = self.random.choice, self.random.randrange
        created = self.moment()
        return Agent(
            id=uuid.uuid4(),
            owner_id=uuid.uuid4(),
            name=self.text(20),
            description=self.text(200),
            model=self.text(5),
            instructions=self.text(choice([10, 3_000, 20_000])),
            tools=tuple(
                Tool(
                    self.text(5),
                    self.text(5),
                    {self.text(4): self.value(0) for _ in range(span(4))},
                )
                for _ in range(span(4))
            ),
            metadata={self.text(6): self.text(6) for _ in range(span(4))},
            temperature=choice([None, 0.0, 1.5]),
            top_p=choice([None, 0.0, 0.25]),
            create_time=created,
            update_time=created + timedelta(seconds=span(5)),
            revision=span(1, 300),
        )


@pytest.mark.parametrize("seed", range(4))
def test_the_size_is_the_encoded_size_exactly(seed: int) -> None:
    agents = RandomAgents(seed)
    for _ in range(250):
        agent = agents.agent()
        assert agent_size(agent) == agent_to_proto(agent).ByteSize(), agent


def test_the_servicers_sizing_function_agrees() -> None:
    agent = RandomAgents(9).agent()
    assert serialized_size(agent) == agent_size(agent)


@pytest.mark.parametrize(
    "parameters",
    [{}, {"": ""}, {"": None}, {"k": {}}, {"k": []}, {"k": [[]]}, {"k": [{}, None, ""]}],
)
def test_empty_keys_strings_and_containers_are_counted_as_encoded(
    parameters: dict[str, Any],
) -> None:
    agent = RandomAgents(1).agent()
    bare = Agent(
        id=agent.id,
        owner_id=agent.owner_id,
        name="",
        description="",
        model="",
        instructions="",
        tools=(Tool("", "", parameters),),
        metadata={"": ""},
        temperature=None,
        top_p=None,
        create_time=EPOCH,
        update_time=EPOCH,
    )
    assert agent_size(bare) == agent_to_proto(bare).ByteSize()


def test_server_fields_never_add_more_than_their_bound() -> None:
    agents = RandomAgents(5)
    for _ in range(200):
        agent = agents.agent()
        assert agent_size(agent) - settable_size(agent) <= SERVER_FIELDS_MAX
    far = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    latest = Agent(**{**_fields(agents.agent()), "create_time": far, "update_time": far})
    assert agent_size(latest) - settable_size(latest) <= SERVER_FIELDS_MAX


def _fields(agent: Agent) -> dict[str, Any]:
    return {name: getattr(agent, name) for name in Agent.__slots__}
