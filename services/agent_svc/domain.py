"""The agent domain: agents, their function tools, and what callers send to change them.

An agent's version is its `revision`, a counter the database bumps on every update; the
`etag` handed to callers is derived from it (and the id), so it changes on every update
and one agent's etag never matches another's.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Agent", "AgentInput", "AgentPage", "Tool", "etag_for"]


def etag_for(agent_id: uuid.UUID, revision: int) -> str:
    """An opaque, short version tag: 16 base64url characters of SHA-256(id, revision)."""
    digest = hashlib.sha256(f"{agent_id}:{revision}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:12]).decode()


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the agent may call; `parameters` is its arguments' JSON Schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Agent:
    id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    description: str
    model: str
    instructions: str
    tools: tuple[Tool, ...]
    metadata: dict[str, str]
    temperature: float | None
    top_p: float | None
    create_time: datetime
    update_time: datetime
    revision: int = 1

    @property
    def etag(self) -> str:
        return etag_for(self.id, self.revision)


@dataclass(frozen=True, slots=True)
class AgentInput:
    """The caller-settable fields of an agent as sent: "" and None mean "not populated"."""

    name: str = ""
    description: str = ""
    model: str = ""
    instructions: str = ""
    tools: tuple[Tool, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    temperature: float | None = None
    top_p: float | None = None


@dataclass(frozen=True, slots=True)
class AgentPage:
    agents: tuple[Agent, ...]
    next_page_token: str
