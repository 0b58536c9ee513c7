"""agent_svc tables (its own metadata; auth_svc never reads these).

- `agent_agents`: one row per agent, its current version; a soft-deleted one (AIP-164)
  has `delete_time` and `expire_time` set, and keeps its row (and its name) until purged.
- `agent_revisions`: each configuration an agent had (AIP-162), by (agent, revision id),
  immutable; the last AGENT_REVISIONS_KEPT and every aliased one are kept.
- `agent_aliases`: named pointers (`prod`) from an agent to one of its revisions.
- `agent_owner_counts`: how many agents each owner has, kept by every insert and delete
  of an agent in the same transaction, so the per-owner quota is one row's compare and
  increment instead of a count over up to 100,000 rows.
- `agent_create_requests`: one row per (owner, request id) of a CreateAgent sent with a
  request id (AIP-155): the request's fingerprint and the response, the agent as created,
  encoded. Kept apart from the agents so a replay still finds it after the agent was
  updated or deleted; expired rows are deleted by `create_time`.
- `agent_changes`: the change log WatchAgents streams (service/watch.py): one row per
  committed change of an agent, written in the change's own transaction, numbered by
  `seq` in commit order (on PostgreSQL each append first takes a transaction-level
  advisory lock, so sequence numbers are handed out, and become visible, in the order
  the transactions commit; SQLite has one writer at a time anyway; AUTOINCREMENT there so
  a number is never reused after the newest rows are purged). Rows older than the
  retention window are deleted by `change_time`.

Indexes follow the list queries: a user's list filters on owner_id and orders by
(create_time | update_time | name, id) with a keyset condition `(column, id) > (…)`, so
each order has an (owner_id, column, id) index (the unique (owner_id, name) index cannot
take the row comparison as an index condition); an admin's list orders the same columns
across owners. Names use the "C" collation on PostgreSQL, so the order (and prefix
matching) is the same as on SQLite.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AgentAliasRow",
    "AgentBase",
    "AgentRevisionRow",
    "AgentRow",
    "ChangeRow",
    "CreateRequestRow",
    "OwnerCountRow",
]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class AgentBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


Timestamp = DateTime(timezone=True)
# Names compare and sort by code point on both databases (SQLite's BINARY collation is
# that already); it also lets PostgreSQL serve `LIKE 'prefix%'` from the plain index.
NAME_TYPE = String(256).with_variant(String(256, collation="C"), "postgresql")


class AgentRow(AgentBase):
    __tablename__ = "agent_agents"
    __table_args__ = (
        UniqueConstraint("owner_id", "name"),
        UniqueConstraint("owner_id", "request_id"),
        Index("ix_agent_agents_owner_create", "owner_id", "create_time", "id"),
        Index("ix_agent_agents_owner_update", "owner_id", "update_time", "id"),
        Index("ix_agent_agents_owner_name", "owner_id", "name", "id"),
        Index("ix_agent_agents_create", "create_time", "id"),
        Index("ix_agent_agents_update", "update_time", "id"),
        Index("ix_agent_agents_name", "name", "id"),
        Index("ix_agent_agents_expire_time", "expire_time"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    name: Mapped[str] = mapped_column(NAME_TYPE)
    description: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(128))
    instructions: Mapped[str] = mapped_column(Text)
    tools: Mapped[list[Any]] = mapped_column(JSON)
    # `metadata` is taken by the declarative base; the column keeps the domain's name.
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON)
    temperature: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    top_p: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    revision: Mapped[int] = mapped_column(Integer)
    # No longer written: request ids live in agent_create_requests (migration agent_0002).
    # Kept while the previous release, which reads and writes it, may still be serving;
    # a later release drops it.
    request_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    update_time: Mapped[datetime] = mapped_column(Timestamp)
    # Who made the current version ("users/<id>" / "serviceAccounts/<id>") and the service
    # that acted for them; null for versions made before this was kept.
    updated_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_via: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The configuration revision this row shows (agent_revisions.revision_id).
    revision_id: Mapped[int] = mapped_column(Integer, server_default="1")
    # Soft delete (AIP-164): both set, or both null.
    delete_time: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    expire_time: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class AgentRevisionRow(AgentBase):
    __tablename__ = "agent_revisions"

    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    revision_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(NAME_TYPE)
    description: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(128))
    instructions: Mapped[str] = mapped_column(Text)
    tools: Mapped[list[Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON)
    temperature: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    top_p: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_via: Mapped[str | None] = mapped_column(String(64), nullable=True)


class AgentAliasRow(AgentBase):
    __tablename__ = "agent_aliases"

    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    alias: Mapped[str] = mapped_column(String(63), primary_key=True)
    revision_id: Mapped[int] = mapped_column(Integer)
    update_time: Mapped[datetime] = mapped_column(Timestamp)
    updated_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class OwnerCountRow(AgentBase):
    __tablename__ = "agent_owner_counts"

    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    agents: Mapped[int] = mapped_column(Integer)


class CreateRequestRow(AgentBase):
    __tablename__ = "agent_create_requests"
    __table_args__ = (Index("ix_agent_create_requests_create_time", "create_time"),)

    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    request_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    # Hex SHA-256 of the request's settable fields; NULL for ids recorded before
    # fingerprints were kept (migration agent_0002).
    fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    response: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(Timestamp)


# BIGINT on PostgreSQL; SQLite needs INTEGER for its rowid alias (AUTOINCREMENT).
SEQ_TYPE = BigInteger().with_variant(Integer, "sqlite")


class ChangeRow(AgentBase):
    __tablename__ = "agent_changes"
    __table_args__ = (
        Index("ix_agent_changes_change_time", "change_time"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(SEQ_TYPE, primary_key=True, autoincrement=True)
    # created, updated, deleted, undeleted, purged, tagged, untagged (ChangeKind's values).
    kind: Mapped[str] = mapped_column(String(16))
    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    # The agent after the change (the last known one for a purge), as the versioned JSON
    # of agent_create_requests.response; the filterable fields before an update ("name",
    # "model", "metadata"), null when unknown.
    agent: Mapped[str] = mapped_column(Text)
    previous: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    change_time: Mapped[datetime] = mapped_column(Timestamp)
    # tagged and untagged: the alias; tagged: the revision it names now (null otherwise).
    alias: Mapped[str | None] = mapped_column(String(63), nullable=True)
    alias_revision: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
