"""agent revisions and aliases (AIP-162), soft delete (AIP-164)

- agent_agents gains revision_id (the configuration revision it shows; 1 for every
  existing agent), delete_time and expire_time (null: not deleted), and an index on
  expire_time for the worker's purge.
- agent_revisions: one row per configuration of an agent; each existing agent's current
  configuration becomes its revision 1, made at its update_time by its updated_by.
- agent_aliases: named pointers to revisions.

The previous release, while it still serves during the rollout, neither records
revisions nor soft-deletes: its updates leave revision_id as it was (the revision then
shows the configuration it had, until the next update by this release) and its deletes
remove rows at once (their revisions stay behind, unreachable, until a purge of the id).
revision_id has a server default so its inserts still work.

Revision ID: agent_0005
Revises: agent_0004
Create Date: 2026-11-30 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "agent_0005"
down_revision: str | None = "agent_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = sa.String(length=256).with_variant(sa.String(length=256, collation="C"), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("agent_agents", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("revision_id", sa.Integer(), server_default="1", nullable=False)
        )
        batch_op.add_column(sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_agent_agents_expire_time", ["expire_time"], unique=False)
    op.create_table(
        "agent_revisions",
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("revision_id", sa.Integer(), nullable=False),
        sa.Column("name", _NAME, nullable=False),
        sa.Column("description", sa.String(length=512), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=False),
        sa.Column("tools", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("temperature", sa.Float(precision=53), nullable=True),
        sa.Column("top_p", sa.Float(precision=53), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.Column("created_via", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("agent_id", "revision_id", name=op.f("pk_agent_revisions")),
    )
    op.create_table(
        "agent_aliases",
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("alias", sa.String(length=63), nullable=False),
        sa.Column("revision_id", sa.Integer(), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("agent_id", "alias", name=op.f("pk_agent_aliases")),
    )
    op.execute(
        "INSERT INTO agent_revisions (agent_id, revision_id, name, description, model,"
        " instructions, tools, metadata, temperature, top_p, create_time, created_by,"
        " created_via) SELECT id, 1, name, description, model, instructions, tools,"
        " metadata, temperature, top_p, update_time, updated_by, updated_via"
        " FROM agent_agents"
    )


def downgrade() -> None:
    op.drop_table("agent_aliases")
    op.drop_table("agent_revisions")
    with op.batch_alter_table("agent_agents", schema=None) as batch_op:
        batch_op.drop_index("ix_agent_agents_expire_time")
        batch_op.drop_column("expire_time")
        batch_op.drop_column("delete_time")
        batch_op.drop_column("revision_id")
