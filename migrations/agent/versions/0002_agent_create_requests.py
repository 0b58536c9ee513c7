"""request ids move to their own table: agent_create_requests

A create with a request id now keeps, per (owner, request id), the fingerprint of the
request and the response (the agent as created), so a replay gets the first response even
after the agent changed or was deleted (AIP-155). The request ids already in agent_agents
are copied there, so replays of them keep working: without a fingerprint (a replay of one
gets the recorded agent whatever it carries, as before) and with the agent as it is now as
the response (the agent as created is not known any more once it was updated). They
expire like any record, counted from the agent's create time.

Expand/contract (docs/operations.md, Migrate): agent_agents.request_id and its unique key
stay, because the previous release still reads and writes them while it serves during the
rollout; this release no longer writes them. A later release copies the ids the previous
one wrote meanwhile (the same copy, skipping ids already recorded) and drops the column.
Until then, a retry that reaches this release for a create the previous one made during
the rollout finds no record: it creates anew (or is ALREADY_EXISTS, since a retry carries
the same name).

Downgrade puts the ids recorded by this release back on their agents (where the owner has
no other agent holding the id already) and drops the table.

Revision ID: agent_0002
Revises: agent_0001
Create Date: 2026-12-01 09:00:00
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "agent_0002"
down_revision: str | None = "agent_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 1_000

_agents = sa.table(
    "agent_agents",
    sa.column("id", sa.Uuid()),
    sa.column("owner_id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("description", sa.String()),
    sa.column("model", sa.String()),
    sa.column("instructions", sa.Text()),
    sa.column("tools", sa.JSON()),
    sa.column("metadata", sa.JSON()),
    sa.column("temperature", sa.Float()),
    sa.column("top_p", sa.Float()),
    sa.column("revision", sa.Integer()),
    sa.column("request_id", sa.Uuid()),
    sa.column("create_time", sa.DateTime(timezone=True)),
    sa.column("update_time", sa.DateTime(timezone=True)),
)
_requests = sa.table(
    "agent_create_requests",
    sa.column("owner_id", sa.Uuid()),
    sa.column("request_id", sa.Uuid()),
    sa.column("fingerprint", sa.String()),
    sa.column("agent_id", sa.Uuid()),
    sa.column("response", sa.Text()),
    sa.column("create_time", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    op.create_table(
        "agent_create_requests",
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner_id", "request_id", name=op.f("pk_agent_create_requests")),
    )
    with op.batch_alter_table("agent_create_requests", schema=None) as batch_op:
        batch_op.create_index("ix_agent_create_requests_create_time", ["create_time"], unique=False)
    _copy_request_ids()


def _copy_request_ids() -> None:
    connection = op.get_bind()
    after: Any = None
    while True:
        query = sa.select(_agents).where(_agents.c.request_id.is_not(None))
        if after is not None:
            query = query.where(_agents.c.id > after)
        rows = connection.execute(query.order_by(_agents.c.id).limit(_BATCH)).all()
        if not rows:
            return
        connection.execute(
            _requests.insert(),
            [
                {
                    "owner_id": row.owner_id,
                    "request_id": row.request_id,
                    "fingerprint": None,
                    "agent_id": row.id,
                    "response": _response(row),
                    "create_time": row.create_time,
                }
                for row in rows
            ],
        )
        after = rows[-1].id


def _utc(moment: datetime) -> str:
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.isoformat()


def _response(row: Any) -> str:
    """Version 1 of the response encoding (services/agent_svc/repository/sql.py), written
    out here so this migration stays what it is when the application's code changes."""
    document = {
        "v": 1,
        "id": row.id.hex,
        "owner_id": row.owner_id.hex,
        "name": row.name,
        "description": row.description,
        "model": row.model,
        "instructions": row.instructions,
        "tools": row.tools,
        "metadata": row._mapping["metadata"],
        "temperature": row.temperature,
        "top_p": row.top_p,
        "revision": row.revision,
        "create_time": _utc(row.create_time),
        "update_time": _utc(row.update_time),
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def downgrade() -> None:
    # The id recorded for the agent being updated (correlated to it at any depth).
    recorded = (
        sa.select(_requests.c.request_id)
        .where(_requests.c.agent_id == _agents.c.id, _requests.c.owner_id == _agents.c.owner_id)
        .correlate(_agents)
        .limit(1)
        .scalar_subquery()
    )
    held = sa.alias(_agents, "held")
    taken = (
        sa.select(held.c.id)
        .where(held.c.owner_id == _agents.c.owner_id, held.c.request_id == recorded)
        .exists()
    )
    op.get_bind().execute(
        _agents.update().where(_agents.c.request_id.is_(None), ~taken).values(request_id=recorded)
    )
    with op.batch_alter_table("agent_create_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_agent_create_requests_create_time")
    op.drop_table("agent_create_requests")
