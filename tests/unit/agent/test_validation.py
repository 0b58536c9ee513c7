"""Agent input rules: each limit on each field, reported with its field path, all at once."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from services.agent_svc.domain import AgentInput, Tool
from services.agent_svc.service.sizing import SERVER_FIELDS_MAX, settable_size
from services.agent_svc.service.validation import MAX_AGENT_BYTES, check_agent
from shared.rpc.errors import InvalidArgument
from shared.rpc.request_path import status_for
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


NUL = "\x00"
# (field path, the agent_input override that puts the text there)
ONE_LINE_FIELDS = [
    ("agent.name", lambda text: {"name": f"bot{text}"}),
    ("agent.model", lambda text: {"model": f"gpt-4o{text}"}),
    ("agent.tools[0].name", lambda text: {"tools": (tool(f"lookup{text}"),)}),
    ('agent.metadata["te{}am"]', lambda text: {"metadata": {f"te{text}am": "x"}}),
]
FREE_TEXT_FIELDS = [
    ("agent.description", lambda text: {"description": f"a{text}b"}),
    ("agent.instructions", lambda text: {"instructions": f"a{text}b"}),
    ("agent.tools[0].description", lambda text: {"tools": (tool("t", f"a{text}b"),)}),
    ('agent.metadata["team"]', lambda text: {"metadata": {"team": f"a{text}b"}}),
]


def _path(template: str, text: str) -> str:
    # Metadata paths quote the key as JSON with every unprintable character escaped.
    return template.format(json.dumps(text)[1:-1]) if "{}" in template else template


@pytest.mark.parametrize(("field", "put"), ONE_LINE_FIELDS + FREE_TEXT_FIELDS)
@pytest.mark.parametrize("text", [NUL, "\x07", "\x1b[31m", "\x7f", "\x85"])
def test_no_field_takes_nul_or_control_characters(
    field: str, put: Callable[[str], dict[str, object]], text: str
) -> None:
    assert "control characters" in violations(**put(text))[_path(field, text)]


@pytest.mark.parametrize(("field", "put"), ONE_LINE_FIELDS)
@pytest.mark.parametrize("text", ["\t", "\n", "\r", "\u202e", "\u200b", "\ud800"])
def test_one_line_fields_take_no_line_breaks_tabs_or_format_characters(
    field: str, put: Callable[[str], dict[str, object]], text: str
) -> None:
    assert violations(**put(text))[_path(field, text)]


@pytest.mark.parametrize(("field", "put"), FREE_TEXT_FIELDS)
def test_free_text_takes_tabs_line_breaks_and_any_printable_character(
    field: str, put: Callable[[str], dict[str, object]]
) -> None:
    check_agent(agent_input(**put("\tline\r\nnext « Zoë » \u202e 🧑\u200d💻")), MODELS)


def test_a_tool_name_ending_in_a_line_feed_is_refused() -> None:
    """`$` in a Python regex also matches before a final line feed."""
    assert violations(tools=(tool("lookup\n"),))["agent.tools[0].name"]


def nested(depth: int, leaf: object = "x") -> dict[str, Any]:
    """Parameters `depth` levels deep: {"a": {"a": … {"a": leaf}}} (the outer dict is level 1),
    with a list as one of the levels."""
    value: Any = leaf
    for level in range(depth - 1):
        value = [value] if level == 3 else {"a": value}
    return {"a": value}


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": f"obj{NUL}ect"},
        {f"ty{NUL}pe": "object"},
        {"properties": {"q": {"enum": ["a", f"b{NUL}"]}}},
        {"properties": {"q": {"default": {f"k{NUL}": 1.0}}}},
        nested(30, leaf=f"deep{NUL}"),
    ],
)
def test_tool_parameters_take_no_nul_in_any_key_or_string(parameters: dict[str, Any]) -> None:
    found = violations(tools=(Tool("t", parameters=parameters),))
    assert found == {"agent.tools[0].parameters": "must not contain NUL characters"}


def test_tool_parameters_may_hold_other_control_characters_in_strings() -> None:
    check_agent(agent_input(tools=(Tool("t", parameters={"pattern": "^\\d+\t$"}),)), MODELS)


def test_tool_parameters_are_at_most_32_levels_deep() -> None:
    check_agent(agent_input(tools=(Tool("t", parameters=nested(32)),)), MODELS)
    for too_deep in (nested(33), nested(33, leaf={}), nested(33, leaf=[]), nested(5_000)):
        found = violations(tools=(Tool("t", parameters=too_deep),))
        assert "deeper than 32 levels" in found["agent.tools[0].parameters"]


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
        f'agent.metadata["{"k" * 40}…"]',  # a key is cut to 40 characters in a path
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


def test_at_most_10_violations_are_listed_and_one_more_says_there_are_more() -> None:
    found = violations(tools=tuple(tool(f"bad name {i}") for i in range(20)))
    assert len(found) == 11
    assert found["agent"] == "has more problems than listed here"


def trailer_bytes(error: InvalidArgument) -> int:
    """What the error costs in a response's trailers: the status message (percent-encoded
    outside printable ASCII) and the binary details (base64), plus the 32 bytes HTTP/2
    counts per header."""
    status = status_for(error, "agent.agentplatform")
    message = sum(
        1 if 0x20 <= byte < 0x7F and byte != 0x25 else 3 for byte in status.details.encode()
    )
    message += len("grpc-message") + 32
    details = sum(
        len(key) + 4 * (len(value) + 2) // 3 + 32 for key, value in status.trailing_metadata
    )
    return message + details


BIG = "\u202e" * 100_000


@pytest.mark.parametrize(
    "worst",
    [
        agent_input(
            name=BIG,
            description=BIG,
            model=BIG,
            instructions=BIG * 3,
            tools=tuple(Tool(BIG + str(i), BIG, {BIG: [math.nan]}) for i in range(300)),
            metadata={BIG + str(i): BIG for i in range(300)},
            temperature=math.inf,
            top_p=-1.0,
        ),
        agent_input(metadata={f"{BIG}{i}": f"{NUL}{BIG}" for i in range(16)}),
        agent_input(metadata={f"{'k' * 100}{i}": NUL for i in range(16)}),
    ],
    ids=["every-field", "escaped-metadata-paths", "long-metadata-paths"],
)
def test_the_error_of_the_worst_agent_fits_a_default_clients_trailer_limit(
    worst: AgentInput,
) -> None:
    """Above 8 KiB of trailers a default client sees RESOURCE_EXHAUSTED ("received
    metadata size exceeds soft limit") instead of the INVALID_ARGUMENT that was sent."""
    with pytest.raises(InvalidArgument) as caught:
        check_agent(worst, MODELS)
    assert trailer_bytes(caught.value) < 6_144


def parameters_of_json_size(size: int) -> dict[str, Any]:
    """Parameters whose compact JSON is exactly `size` bytes: {"d":"€€…x"}."""
    filler = size - len('{"d":""}')
    return {"d": "€" * (filler // 3) + "x" * (filler % 3)}


def test_tool_parameters_are_at_most_16_kib_as_compact_json() -> None:
    at_limit = parameters_of_json_size(16 * 1024)
    check_agent(agent_input(tools=(Tool("t", parameters=at_limit),)), MODELS)
    found = violations(tools=(Tool("t", parameters=parameters_of_json_size(16 * 1024 + 1)),))
    assert found == {"agent.tools[0].parameters": "must be at most 16,384 bytes as compact JSON"}


def test_instructions_within_their_character_limit_can_still_make_the_agent_too_big() -> None:
    """256,000 characters of instructions are 1,024,000 bytes when each takes four, and
    128 tool descriptions within their limit add half a megabyte more."""
    heavy = agent_input(
        instructions="😀" * 256_000,
        tools=tuple(tool(f"t{i}", "😀" * 1_024) for i in range(128)),
    )
    found = violations(**{k: getattr(heavy, k) for k in ("instructions", "tools")})
    assert list(found) == ["agent"]
    assert found["agent"].startswith("must be at most 1,048,576 bytes serialized")


def test_the_agent_limit_counts_bytes_with_room_for_the_server_fields() -> None:
    base = agent_input(instructions="", metadata={f"k{i}": "😀" * 512 for i in range(16)})
    # Instructions of n bytes (n >= 2**14) add a tag byte and a 3-byte length.
    room = MAX_AGENT_BYTES - SERVER_FIELDS_MAX - settable_size(base) - 4
    at_limit = "😀" * (room // 4) + "x" * (room % 4)
    check_agent(replace(base, instructions=at_limit), MODELS)
    with pytest.raises(InvalidArgument) as caught:
        check_agent(replace(base, instructions=at_limit + "x"), MODELS)
    assert [v.field for v in caught.value.violations] == ["agent"]


def test_the_size_is_checked_once_every_other_rule_holds() -> None:
    found = violations(name="", instructions="😀" * 300_000)
    assert set(found) == {"agent.name", "agent.instructions"}
