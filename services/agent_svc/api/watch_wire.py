"""WatchAgents' messages, encoded once per change for every stream of the process.

A WatchAgentsResponse is `repeated AgentChange changes = 1; string resume_token = 2`: its
encoding is the concatenation of each change's field (tag, length, bytes) and the token's.
Each change is encoded once (per `matches_filter` value) and the bytes are shared by every
stream that gets it; a stream's message is then a join of byte strings.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from agentplatform.agent.v1 import agent_pb2
from google.protobuf.internal.encoder import _VarintBytes  # type: ignore[attr-defined]

from services.agent_svc.api.convert import _timestamp, agent_to_proto
from services.agent_svc.service.ports import Change, ChangeKind
from services.agent_svc.service.watch import Position, WatchBatch, encode_token

__all__ = ["ChangeEncoder"]

_KINDS = {
    ChangeKind.CREATED: agent_pb2.AgentChange.KIND_CREATED,
    ChangeKind.UPDATED: agent_pb2.AgentChange.KIND_UPDATED,
    ChangeKind.DELETED: agent_pb2.AgentChange.KIND_DELETED,
    ChangeKind.UNDELETED: agent_pb2.AgentChange.KIND_UNDELETED,
    ChangeKind.PURGED: agent_pb2.AgentChange.KIND_PURGED,
    ChangeKind.TAGGED: agent_pb2.AgentChange.KIND_TAGGED,
    ChangeKind.UNTAGGED: agent_pb2.AgentChange.KIND_UNTAGGED,
}
_CHANGES_TAG = b"\x0a"  # field 1, length-delimited
_TOKEN_TAG = b"\x12"  # field 2, length-delimited


def _field(tag: bytes, data: bytes) -> bytes:
    length: bytes = _VarintBytes(len(data))
    return tag + length + data


def change_to_proto(change: Change, matches_filter: bool) -> agent_pb2.AgentChange:
    message = agent_pb2.AgentChange(
        kind=_KINDS[change.kind],
        agent_id=str(change.agent.id),
        change_time=_timestamp(change.time),
        resume_token=encode_token(Position(change.seq, change.time)),
        matches_filter=matches_filter,
        alias=change.alias,
        alias_revision_id="" if change.alias_revision is None else str(change.alias_revision),
    )
    if change.kind is not ChangeKind.PURGED:
        message.agent.CopyFrom(agent_to_proto(change.agent))
    else:  # only who owned it: a purged agent's content is not sent again
        message.agent.id = str(change.agent.id)
        message.agent.owner_id = str(change.agent.owner_id)
    return message


class ChangeEncoder:
    """Encodes batches; remembers the latest `capacity` changes' encodings."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._capacity = capacity
        self._encoded: OrderedDict[tuple[int, bool], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _change(self, change: Change, matches_filter: bool) -> bytes:
        key = (change.seq, matches_filter)
        data = self._encoded.get(key)
        if data is None:
            data = _field(_CHANGES_TAG, change_to_proto(change, matches_filter).SerializeToString())
            with self._lock:
                self._encoded[key] = data
                if len(self._encoded) > self._capacity:
                    self._encoded.popitem(last=False)
        return data

    def batch(self, batch: WatchBatch) -> bytes:
        """The WatchAgentsResponse of a batch, encoded."""
        parts = [self._change(change, matched) for change, matched in batch.changes]
        parts.append(_field(_TOKEN_TAG, encode_token(batch.position).encode()))
        return b"".join(parts)
