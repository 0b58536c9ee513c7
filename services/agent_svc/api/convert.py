"""Proto ⇄ domain for agents: messages, Timestamps and Structs, nothing else."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, TypeVar

from agentplatform.agent.v1 import agent_pb2
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.agent_svc.domain import Agent, AgentInput, Tool

__all__ = [
    "agent_input",
    "agent_message",
    "agent_to_proto",
    "get_agent_response",
    "serialized_size",
    "struct_to_dict",
]


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _value(value: struct_pb2.Value) -> Any:
    """One Struct value as plain Python; never raises (NaN stays NaN for validation)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _value(item) for key, item in struct.fields.items()}


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def agent_input(message: agent_pb2.Agent) -> AgentInput:
    """The caller-settable fields of a request's agent (output-only fields are dropped)."""
    return AgentInput(
        name=message.name,
        description=message.description,
        model=message.model,
        instructions=message.instructions,
        tools=tuple(
            Tool(
                name=tool.name,
                description=tool.description,
                parameters=struct_to_dict(tool.parameters),
            )
            for tool in message.tools
        ),
        metadata=dict(message.metadata),
        temperature=message.temperature if message.HasField("temperature") else None,
        top_p=message.top_p if message.HasField("top_p") else None,
    )


T = TypeVar("T")


class _VersionMemo(Generic[T]):
    """Values made from a version of an agent, by (id, revision, revision id): a version
    never changes (a past revision's view shows the agent's version it was read with and
    that revision's id, so it never takes the place of the current agent's entry).
    A hit is one dict lookup without a lock (the hot path of a cache hit); inserts take
    the lock and evict the oldest entries beyond `size`."""

    def __init__(self, size: int, make: Callable[[Agent], T]) -> None:
        self._size = size
        self._make = make
        self._values: dict[tuple[uuid.UUID, int, int], T] = {}
        self._lock = threading.Lock()

    def get(self, agent: Agent) -> T:
        key = (agent.id, agent.revision, agent.revision_id)
        value = self._values.get(key)
        if value is None:
            value = self._make(agent)
            with self._lock:
                self._values[key] = value
                while len(self._values) > self._size:
                    del self._values[next(iter(self._values))]
        return value


def agent_to_proto(agent: Agent) -> agent_pb2.Agent:
    """The agent as a message; shared, so callers embed it in a response and never mutate it."""
    return _messages.get(agent)


def agent_message(agent: Agent) -> agent_pb2.Agent:
    """The agent as a new message, not remembered: for an agent that was never stored (a
    dry run's), whose id and version the next real write will have with other content."""
    return _build(agent)


def get_agent_response(agent: Agent) -> bytes:
    """GetAgent's response for this version of the agent, encoded (the request path sends
    bytes as they are)."""
    return _get_responses.get(agent)


def serialized_size(agent: Agent) -> int:
    """The agent's size as a message, in bytes. ListAgents sizes each agent of a page this
    way before the servicer converts it: the message built here is the one the servicer
    then finds in the memo, so a page costs one encoding pass more, not a second build."""
    return int(agent_to_proto(agent).ByteSize())


def _build(agent: Agent) -> agent_pb2.Agent:
    return agent_pb2.Agent(
        id=str(agent.id),
        owner_id=str(agent.owner_id),
        name=agent.name,
        description=agent.description,
        model=agent.model,
        instructions=agent.instructions,
        tools=[
            agent_pb2.Tool(
                name=tool.name,
                description=tool.description,
                parameters=_struct(tool.parameters),
            )
            for tool in agent.tools
        ],
        metadata=agent.metadata,
        temperature=agent.temperature,
        top_p=agent.top_p,
        create_time=_timestamp(agent.create_time),
        update_time=_timestamp(agent.update_time),
        etag=agent.etag,
        updated_by=agent.updated_by,
        updated_via=agent.updated_via,
        revision_id=str(agent.revision_id),
        revision_create_time=_timestamp(agent.update_time),
        delete_time=_timestamp(agent.delete_time) if agent.delete_time else None,
        expire_time=_timestamp(agent.expire_time) if agent.expire_time else None,
    )


# Building a message (Timestamps, Structs) costs ~15 times more than copying it into a
# response; encoding GetAgent's whole response once per version saves the copy and the
# encoding on every cache hit.
_messages: _VersionMemo[agent_pb2.Agent] = _VersionMemo(10_000, _build)
_get_responses: _VersionMemo[bytes] = _VersionMemo(
    10_000, lambda a: agent_pb2.GetAgentResponse(agent=agent_to_proto(a)).SerializeToString()
)
