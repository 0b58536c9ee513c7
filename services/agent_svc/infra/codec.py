"""Agents as bytes for the shared (Redis) cache: compact UTF-8 JSON, versioned.

The round trip is exact: optional floats stay None or keep their value, times come back
as the same timezone-aware UTC instants (microseconds included), tool parameter dicts are
unchanged, and the revision (hence the etag) travels with the agent.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from services.agent_svc.domain import Agent, Tool

__all__ = ["AgentCodec", "CodecError"]

_VERSION = 1


class CodecError(ValueError):
    """The bytes are not an agent this codec wrote (treat as a cache miss)."""


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _moment(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None


class AgentCodec:
    """`encode(agent) -> bytes`, `decode(bytes) -> Agent`."""

    @staticmethod
    def encode(agent: Agent) -> bytes:
        document: dict[str, Any] = {
            "v": _VERSION,
            "id": agent.id.hex,
            "owner_id": agent.owner_id.hex,
            "name": agent.name,
            "description": agent.description,
            "model": agent.model,
            "instructions": agent.instructions,
            "tools": [[t.name, t.description, t.parameters] for t in agent.tools],
            "metadata": agent.metadata,
            "temperature": agent.temperature,
            "top_p": agent.top_p,
            "create_time": _time(agent.create_time),
            "update_time": _time(agent.update_time),
            "revision": agent.revision,
            "updated_by": agent.updated_by,
            "updated_via": agent.updated_via,
            "revision_id": agent.revision_id,
        }
        if agent.delete_time is not None and agent.expire_time is not None:
            document["delete_time"] = _time(agent.delete_time)
            document["expire_time"] = _time(agent.expire_time)
        return json.dumps(
            document, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()

    @staticmethod
    def decode(data: bytes) -> Agent:
        try:
            document = json.loads(data)
            if document.get("v") != _VERSION:
                raise CodecError(f"unknown codec version {document.get('v')!r}")
            return Agent(
                id=uuid.UUID(hex=document["id"]),
                owner_id=uuid.UUID(hex=document["owner_id"]),
                name=document["name"],
                description=document["description"],
                model=document["model"],
                instructions=document["instructions"],
                tools=tuple(
                    Tool(name=name, description=description, parameters=parameters)
                    for name, description, parameters in document["tools"]
                ),
                metadata=dict(document["metadata"]),
                temperature=document["temperature"],
                top_p=document["top_p"],
                create_time=datetime.fromisoformat(document["create_time"]),
                update_time=datetime.fromisoformat(document["update_time"]),
                revision=int(document["revision"]),
                # Absent from entries written before they were kept: "" (unknown).
                updated_by=document.get("updated_by", ""),
                updated_via=document.get("updated_via", ""),
                # Absent from entries written before revisions were kept.
                revision_id=int(document.get("revision_id", 1)),
                delete_time=_moment(document.get("delete_time")),
                expire_time=_moment(document.get("expire_time")),
            )
        except CodecError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CodecError(f"not an encoded agent: {type(exc).__name__}") from exc
