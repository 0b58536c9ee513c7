"""How many bytes an agent takes on the wire: its protobuf encoding, computed from the domain
objects (no message is built).

The byte limits of agents (validation) and the response budget of ListAgents (the service)
are stated in these bytes, the unit the gRPC message limits count. The figures are the
exact proto3 encoding of `agentplatform.agent.v1.Agent`: a string or message field costs
its tag (one byte: every field number is below 16), its length as a varint and its bytes;
empty strings and unset optionals cost nothing, except in a map entry, which always holds
its key and its value fields; a `google.protobuf.Value` costs its one set member (a number
always 8 bytes). tests/unit/agent/test_sizing.py holds the figures against ByteSize().
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from services.agent_svc.domain import Agent, AgentInput

__all__ = ["SERVER_FIELDS_MAX", "agent_size", "framed", "settable_size"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UUID_TEXT = 36
_ETAG_TEXT = 16
_DOUBLE = 9  # tag + 8 bytes
_TIMESTAMP_MAX = 2 + (1 + 10) + (1 + 5)  # seconds (any int64) and nanos (< 10**9)

_REVISION_ID_MAX = 3 + 18  # a two-byte tag (field 16), a length, up to 18 digits
SERVER_FIELDS_MAX = (
    2 * (2 + _UUID_TEXT)
    + 2 * _TIMESTAMP_MAX
    + (2 + _ETAG_TEXT)
    + _REVISION_ID_MAX
    + 3 * (1 + _TIMESTAMP_MAX)
)
"""The most that id, owner_id, create_time, update_time, etag, revision_id,
revision_create_time, delete_time and expire_time can add to the settable fields (for a
limit checked before the agent exists)."""


def _varint(value: int) -> int:
    """Bytes of an unsigned varint (a negative int64 takes 10)."""
    if value < 0:
        return 10
    return max(1, (value.bit_length() + 6) // 7)


def framed(size: int) -> int:
    """A length-delimited field of `size` bytes with its tag and length."""
    return size + 2 if size < 0x80 else 1 + _varint(size) + size


def _text(text: str) -> int:
    """A string field; empty strings are not encoded."""
    return framed(len(text.encode())) if text else 0


def _entry(key: str, value_size: int) -> int:
    """A map entry: its key and its value are encoded even when empty."""
    return framed(framed(len(key.encode())) + framed(value_size))


def _value(value: Any) -> int:
    """A google.protobuf.Value with one member set (its oneof is always encoded)."""
    kind = type(value)
    if kind is str:
        return framed(len(value.encode()))
    if kind is float or kind is int:
        return _DOUBLE
    if kind is dict:
        return framed(_struct(value))
    if kind is list:
        return framed(_list(value))
    if value is None or kind is bool:
        return 2
    raise TypeError(f"not a JSON value: {kind.__name__}")


# A scalar Value framed as a list element: a number is 9 bytes, true/false/null 2, plus
# the element's tag and length. Looked up instead of computed: a list of numbers is the
# bulk of a big Struct, and this keeps sizing one at about 0.1 us.
_FRAMED_SCALAR: dict[type, int] = {float: 11, int: 11, bool: 4, type(None): 4}


def _list(items: list[Any]) -> int:
    total = 0
    for item in items:
        total += _framed_value(item)
    return total


def _framed_value(value: Any) -> int:
    """A Value with its tag and length, as a list element or a map entry's value."""
    kind = type(value)
    size = _FRAMED_SCALAR.get(kind)
    if size is not None:
        return size
    if kind is str:
        length = len(value.encode())
        if length < 126:  # both lengths fit one byte
            return length + 4
    elif kind is dict:
        return framed(framed(_struct(value)))
    return framed(_value(value))


def _struct(fields: dict[str, Any]) -> int:
    """A google.protobuf.Struct: one map entry (key, Value) per field."""
    total = 0
    for key, value in fields.items():
        total += framed(framed(len(key.encode())) + _framed_value(value))
    return total


def settable_size(agent: AgentInput | Agent) -> int:
    """The bytes of the caller-settable fields of an Agent message."""
    size = (
        _text(agent.name)
        + _text(agent.description)
        + _text(agent.model)
        + _text(agent.instructions)
    )
    for tool in agent.tools:
        size += framed(
            _text(tool.name) + _text(tool.description) + framed(_struct(tool.parameters))
        )
    for key, value in agent.metadata.items():
        size += _entry(key, len(value.encode()))
    if agent.temperature is not None:
        size += _DOUBLE
    if agent.top_p is not None:
        size += _DOUBLE
    return size


def _timestamp(moment: datetime) -> int:
    delta = moment - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    nanos = delta.microseconds * 1_000
    return framed((1 + _varint(seconds) if seconds else 0) + (1 + _varint(nanos) if nanos else 0))


def _id(value: uuid.UUID) -> int:
    return framed(_UUID_TEXT)


def agent_size(agent: Agent) -> int:
    """The bytes of the agent as an Agent message (what GetAgent sends)."""
    return (
        settable_size(agent)
        + _id(agent.id)
        + _id(agent.owner_id)
        + _timestamp(agent.create_time)
        + _timestamp(agent.update_time)
        + _text(agent.etag)
        + _text(agent.updated_by)
        + _text(agent.updated_via)
        # Fields 16 to 19 have two-byte tags.
        + 1
        + _text(str(agent.revision_id))
        + 1
        + _timestamp(agent.update_time)
        + (1 + _timestamp(agent.delete_time) if agent.delete_time is not None else 0)
        + (1 + _timestamp(agent.expire_time) if agent.expire_time is not None else 0)
    )
