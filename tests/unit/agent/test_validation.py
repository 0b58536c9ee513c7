"""Agent input rules: each limit on each field, reported with its field path, all at once."""

from __future__ import annotations

import math

import pytest

from services.agent_svc.domain import Tool
from services.agent_svc.service.validation import check_agent
from shared.rpc.errors import InvalidArgument
from tests.unit.agent.fakes import MODELS, agent_input


def violations(**overrides: object) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        check_agent(agent_input(**overrides), MODELS)
    return {v.field: v.description for v in caught.value.violations}


def tool(name: str = "t", description: str = "", **parameters: object) -> Tool:
    return Tool(name=name, description=description, parameters=dict(parameters))


def test_a_valid_agent_passes() -> None:
    check_agent(agent_input(), MODELS)


def test_limits_are_inclusive() -> None:
    check_agent(
        agent_input(
            name="n" * 256,
            description="d" * 512,
            instructions="i" * 256_000,
            tools=tuple(tool(f"t{i}", "x" * 1024) for i in range(128)),
            metadata={f"{i:064d}": "v" * 512 for i in range(16)},
            temperature=2.0,
            top_p=1.0,
        ),
        MODELS,
    )
    check_agent(agent_input(temperature=0.0, top_p=0.0, tools=(tool("a" * 64),)), MODELS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "required"),
        ("n" * 257, "at most 256"),
        ("tab\there", "control characters"),
        ("bell\x07", "control characters"),
        ("rtl\u202eoverride", "control characters"),
        ("   ", "blank"),
    ],
)
def test_name_rules(name: str, expected: str) -> None:
    assert expected in violations(name=name)["agent.name"]


def test_name_may_hold_unicode_and_emoji_sequences() -> None:
    check_agent(agent_input(name="Société 🧑\u200d💻 helper"), MODELS)


def test_description_and_instructions_lengths() -> None:
    found = violations(description="d" * 513, instructions="i" * 256_001)
    assert "at most 512" in found["agent.description"]
    assert "at most 256000" in found["agent.instructions"]


@pytest.mark.parametrize(("model", "expected"), [("", "required"), ("gpt-2", "not an allowed")])
def test_model_must_be_in_the_allow_list(model: str, expected: str) -> None:
    assert expected in violations(model=model)["agent.model"]


def test_tool_rules_name_each_tool_by_index() -> None:
    found = violations(
        tools=(
            tool("ok"),
            tool("has space"),
            tool("x" * 65),
            tool(""),
            tool("ok"),
            tool("fine", "d" * 1025),
            tool("nan", minimum=math.nan),
        )
    )
    assert set(found) == {
        "agent.tools[1].name",
        "agent.tools[2].name",
        "agent.tools[3].name",
        "agent.tools[4].name",
        "agent.tools[5].description",
        "agent.tools[6].parameters",
    }
    assert "duplicate" in found["agent.tools[4].name"]


def test_at_most_128_tools() -> None:
    found = violations(tools=tuple(tool(f"t{i}") for i in range(129)))
    assert found == {"agent.tools": "at most 128 tools"}


def test_metadata_rules_name_each_key() -> None:
    found = violations(metadata={"": "x", "k" * 65: "v", "long": "v" * 513, "fine": "ok"})
    assert set(found) == {
        'agent.metadata[""]',
        f'agent.metadata["{"k" * 65}"]',
        'agent.metadata["long"]',
    }
    assert "empty" in found['agent.metadata[""]']
    assert "value" in found['agent.metadata["long"]']


def test_at_most_16_metadata_pairs() -> None:
    found = violations(metadata={f"k{i}": "v" for i in range(17)})
    assert found == {"agent.metadata": "at most 16 pairs"}


@pytest.mark.parametrize("value", [-0.1, 2.01, math.inf, math.nan])
def test_temperature_range(value: float) -> None:
    assert "between 0 and 2" in violations(temperature=value)["agent.temperature"]


@pytest.mark.parametrize("value", [-0.01, 1.01, -math.inf, math.nan])
def test_top_p_range(value: float) -> None:
    assert "between 0 and 1" in violations(top_p=value)["agent.top_p"]


def test_every_violation_is_reported_at_once() -> None:
    found = violations(
        name="",
        description="d" * 600,
        model="nope",
        instructions="i" * 256_001,
        tools=(tool("bad name"),),
        metadata={"": "x"},
        temperature=3.0,
        top_p=2.0,
    )
    assert set(found) == {
        "agent.name",
        "agent.description",
        "agent.model",
        "agent.instructions",
        "agent.tools[0].name",
        'agent.metadata[""]',
        "agent.temperature",
        "agent.top_p",
    }
