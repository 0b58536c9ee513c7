"""agents per owner: agent_owner_counts, backfilled from agent_agents

The per-owner quota (AGENT_MAX_AGENTS_PER_OWNER) is checked by a conditional increment of
one row per owner, kept in the transaction of every insert and delete of an agent. This
revision creates the table and counts the agents that exist.

The previous release does not keep the counts: the agents it creates or deletes while it
still serves during the rollout are not counted (nor uncounted), so an owner's count can
end off by those few. A recount that is safe while creates run (an upsert per owner) is
left to the worker that will purge expired request ids.

Revision ID: agent_0003
Revises: agent_0002
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "agent_0003"
down_revision: str | None = "agent_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_owner_counts",
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("agents", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("owner_id", name=op.f("pk_agent_owner_counts")),
    )
    op.execute(
        "INSERT INTO agent_owner_counts (owner_id, agents) "
        "SELECT owner_id, count(*) FROM agent_agents GROUP BY owner_id"
    )


def downgrade() -> None:
    op.drop_table("agent_owner_counts")
