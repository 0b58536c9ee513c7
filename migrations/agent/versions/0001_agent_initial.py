"""agent initial schema

Revision ID: agent_0001
Revises:
Create Date: 2026-11-26 03:44:46.459775
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "agent_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_agents",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column(
            "name",
            sa.String(length=256).with_variant(sa.String(length=256, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("description", sa.String(length=512), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=False),
        sa.Column("tools", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("temperature", sa.Float(precision=53), nullable=True),
        sa.Column("top_p", sa.Float(precision=53), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_agents")),
        sa.UniqueConstraint("owner_id", "name", name=op.f("uq_agent_agents_owner_id_name")),
        sa.UniqueConstraint(
            "owner_id", "request_id", name=op.f("uq_agent_agents_owner_id_request_id")
        ),
    )
    with op.batch_alter_table("agent_agents", schema=None) as batch_op:
        batch_op.create_index("ix_agent_agents_create", ["create_time", "id"], unique=False)
        batch_op.create_index("ix_agent_agents_name", ["name", "id"], unique=False)
        batch_op.create_index(
            "ix_agent_agents_owner_create", ["owner_id", "create_time", "id"], unique=False
        )
        batch_op.create_index(
            "ix_agent_agents_owner_name", ["owner_id", "name", "id"], unique=False
        )
        batch_op.create_index(
            "ix_agent_agents_owner_update", ["owner_id", "update_time", "id"], unique=False
        )
        batch_op.create_index("ix_agent_agents_update", ["update_time", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("agent_agents", schema=None) as batch_op:
        batch_op.drop_index("ix_agent_agents_update")
        batch_op.drop_index("ix_agent_agents_owner_update")
        batch_op.drop_index("ix_agent_agents_owner_name")
        batch_op.drop_index("ix_agent_agents_owner_create")
        batch_op.drop_index("ix_agent_agents_name")
        batch_op.drop_index("ix_agent_agents_create")

    op.drop_table("agent_agents")
