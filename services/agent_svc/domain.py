"""The agent domain: agents, their function tools, and what callers send to change them.

An agent's version is its `revision`, a counter bumped on every write of the agent row
(an update, a rollback, a delete, an undelete); the `etag` handed to callers is derived
from it (and the id), so it changes on every write and one agent's etag never matches
another's.

Its configuration has revisions of its own (AIP-162): `revision_id` counts the changes
of configuration only (the create is 1; each update that changes something, and each
rollback, is one more; a delete or an undelete is none), and each is kept as an
`AgentRevision`, immutable. Revision ids are decimal digits and aliases start with a
letter, so `id@5` and `id@prod` never mean the same thing.

A soft-deleted agent (AIP-164) has a `delete_time` and a `expire_time`, after which the
worker removes it with its revisions.

A create's `fingerprint` tells a replay (same request id, same agent: answered with the
first response) from a reuse of the id for something else (AIP-155).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

__all__ = [
    "Agent",
    "AgentInput",
    "AgentPage",
    "AgentRevision",
    "ChangeAuthor",
    "RevisionPage",
    "Tool",
    "etag_for",
]


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
    updated_by: str = ""
    """Who made this version: `users/<id>` or `serviceAccounts/<id>` ("" before it was kept)."""
    updated_via: str = ""
    """The service that acted for `updated_by` (a delegated token), or ""."""
    revision_id: int = 1
    """The configuration revision this version shows (AIP-162); `update_time` is its
    create time."""
    delete_time: datetime | None = None
    """When it was soft-deleted (AIP-164); None while it is not deleted."""
    expire_time: datetime | None = None
    """When the worker removes it for good (set with delete_time)."""
    snapshot: bool = False
    """A past revision's view (`id@revision`): it has no etag, and is never written."""

    @property
    def etag(self) -> str:
        return "" if self.snapshot else etag_for(self.id, self.revision)

    def expired(self, now: datetime) -> bool:
        """Soft-deleted and past its expire_time: gone for every call (AIP-164), even
        before the worker's purge removes it."""
        return self.expire_time is not None and self.expire_time <= now

    @property
    def deleted(self) -> bool:
        return self.delete_time is not None

    @classmethod
    def new(
        cls,
        fields: AgentInput,
        *,
        owner_id: uuid.UUID,
        now: datetime,
        author: ChangeAuthor | None = None,
    ) -> Agent:
        """A first version, owned by `owner_id`, with a fresh id, made by `author`."""
        author = author or ChangeAuthor()
        return cls(
            id=uuid.uuid4(),
            owner_id=owner_id,
            create_time=now,
            update_time=now,
            revision=1,
            updated_by=author.by,
            updated_via=author.via,
            **_settable(fields),
        )

    @property
    def settable(self) -> AgentInput:
        """The caller-settable fields of this version."""
        return AgentInput(**_settable(self))

    def revised(
        self, fields: AgentInput, *, now: datetime, author: ChangeAuthor | None = None
    ) -> Agent:
        """The next version with these settable fields, made by `author` (update_time
        never goes back)."""
        author = author or ChangeAuthor()
        return replace(
            self,
            update_time=max(now, self.update_time),
            revision=self.revision + 1,
            revision_id=self.revision_id + 1,
            updated_by=author.by,
            updated_via=author.via,
            **_settable(fields),
        )

    def soft_deleted(self, *, now: datetime, expire_time: datetime) -> Agent:
        """This version, marked deleted (a new etag; the configuration is unchanged)."""
        return replace(self, revision=self.revision + 1, delete_time=now, expire_time=expire_time)

    def undeleted(self) -> Agent:
        """This version, no longer deleted (a new etag; the configuration is unchanged)."""
        return replace(self, revision=self.revision + 1, delete_time=None, expire_time=None)

    @property
    def current_revision(self) -> AgentRevision:
        """The revision record of this version's configuration."""
        return AgentRevision(
            agent_id=self.id,
            revision_id=self.revision_id,
            create_time=self.update_time,
            fields=self.settable,
            created_by=self.updated_by,
            created_via=self.updated_via,
        )

    def at(self, revision: AgentRevision) -> Agent:
        """The agent as it was at `revision`: its configuration and author, `update_time`
        the revision's create time; id, owner, create time and deletion state are the
        agent's. The current revision is the agent itself (with its etag)."""
        if revision.revision_id == self.revision_id and not self.snapshot:
            return self
        return replace(
            self,
            update_time=revision.create_time,
            revision_id=revision.revision_id,
            updated_by=revision.created_by,
            updated_via=revision.created_via,
            snapshot=True,
            **_settable(revision.fields),
        )


@dataclass(frozen=True, slots=True)
class AgentRevision:
    """One configuration of an agent, as recorded when it was made (immutable)."""

    agent_id: uuid.UUID
    revision_id: int
    create_time: datetime
    fields: AgentInput
    created_by: str = ""
    created_via: str = ""


@dataclass(frozen=True, slots=True)
class ChangeAuthor:
    """Who makes a change: the account (`users/<id>` or `serviceAccounts/<id>`) and, when a
    service acts for a user, that service (`serviceAccounts/<id>`)."""

    by: str = ""
    via: str = ""


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

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of a deterministic serialization of these fields: JSON with sorted
        keys and no spaces; tools in their order, each as [name, description, parameters]."""
        document = {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "instructions": self.instructions,
            "tools": [[t.name, t.description, t.parameters] for t in self.tools],
            "metadata": dict(self.metadata),
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_SETTABLE = ("name", "description", "model", "instructions", "tools", "temperature", "top_p")


def _settable(source: Agent | AgentInput) -> dict[str, Any]:
    fields = {name: getattr(source, name) for name in _SETTABLE}
    fields["metadata"] = dict(source.metadata)
    return fields


@dataclass(frozen=True, slots=True)
class AgentPage:
    agents: tuple[Agent, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class RevisionPage:
    """A page of an agent's revisions, newest first, and all its aliases."""

    agents: tuple[Agent, ...]
    next_page_token: str
    aliases: Mapping[str, int]
