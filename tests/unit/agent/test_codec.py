"""The cache codec round-trips an agent exactly."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from services.agent_svc.domain import Agent, Tool
from services.agent_svc.infra.codec import AgentCodec, CodecError


def agent(**overrides: object) -> Agent:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "owner_id": uuid.uuid4(),
        "name": 'Zoë "the bot" ✨',
        "description": "line one\nline two",
        "model": "gpt-4o",
        "instructions": "Be brief. " * 10,
        "tools": (
            Tool(
                name="search",
                description="Searches",
                parameters={
                    "type": "object",
                    "properties": {"q": {"type": "string"}, "n": {"type": "number"}},
                    "required": ["q"],
                    "default": {"n": 10.0, "exact": True, "none": None, "list": [1.5, "x"]},
                },
            ),
            Tool(name="noop"),
        ),
        "metadata": {"team": "search", "empty": ""},
        "temperature": 0.1,
        "top_p": None,
        "create_time": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "update_time": datetime(2026, 1, 2, 3, 4, 6, 1, tzinfo=UTC),
        "revision": 7,
    }
    values.update(overrides)
    return Agent(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "original",
    [
        agent(),
        agent(temperature=None, top_p=0.0),
        agent(temperature=0.0, top_p=1.0),
        agent(temperature=1 / 3, tools=(), metadata={}),
        agent(updated_by="users/u-1", updated_via="serviceAccounts/s-2"),
    ],
)
def test_round_trip_is_exact(original: Agent) -> None:
    decoded = AgentCodec.decode(AgentCodec.encode(original))
    assert decoded == original
    assert decoded.etag == original.etag
    assert decoded.create_time.tzinfo is not None
    assert decoded.create_time.utcoffset() == original.create_time.utcoffset()
    assert type(decoded.temperature) is type(original.temperature)


def test_an_entry_from_before_authors_were_kept_decodes_as_unknown() -> None:
    original = agent(updated_by="users/u-1", updated_via="serviceAccounts/s-2")
    document = json.loads(AgentCodec.encode(original))
    del document["updated_by"], document["updated_via"]
    decoded = AgentCodec.decode(json.dumps(document).encode())
    assert decoded == replace(original, updated_by="", updated_via="")


def test_encoding_is_compact() -> None:
    encoded = AgentCodec.encode(agent(name="n", description="d", instructions="", tools=()))
    assert len(encoded) < 420
    assert b" " not in encoded


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"[]", b'{"v":2}', b'{"v":1}', b'{"v":1,"id":"x"}']
)
def test_foreign_bytes_are_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        AgentCodec.decode(data)
