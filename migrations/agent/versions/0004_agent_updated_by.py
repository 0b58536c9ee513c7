"""agents keep who made the current version: agent_agents.updated_by, updated_via

Two nullable columns: the previous release neither reads nor writes them, so it keeps
serving during the rollout (a version it writes has them null, shown as "" — unknown).

Revision ID: agent_0004
Revises: agent_0003
Create Date: 2026-11-30 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "agent_0004"
down_revision: str | None = "agent_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agent_agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("updated_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("updated_via", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agent_agents", schema=None) as batch_op:
        batch_op.drop_column("updated_via")
        batch_op.drop_column("updated_by")
