"""the change log WatchAgents streams: agent_changes

A new table only: the previous release neither reads nor writes it (its changes during the
rollout produce no events, which a watcher started after the rollout never asks for).

Revision ID: agent_0006
Revises: agent_0005
Create Date: 2026-11-30 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "agent_0006"
down_revision: str | None = "agent_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_changes",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("agent", sa.Text(), nullable=False),
        sa.Column("previous", sa.JSON(), nullable=True),
        sa.Column("change_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_agent_changes")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_agent_changes_change_time", "agent_changes", ["change_time"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_agent_changes_change_time", table_name="agent_changes")
    op.drop_table("agent_changes")
