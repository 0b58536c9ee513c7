"""audit actor and call, session peer, revocations

Revision ID: auth_0004
Revises: auth_0003
Create Date: 2026-11-30 13:20:06.971080
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "auth_0004"
down_revision: str | None = "auth_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auth_revocations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_revocations")),
    )
    with op.batch_alter_table("auth_revocations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_auth_revocations_create_time"), ["create_time"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_auth_revocations_expire_time"), ["expire_time"], unique=False
        )

    with op.batch_alter_table("auth_audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("actor", sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column("actor_via", sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column("peer", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("request_id", sa.String(length=128), nullable=True))
        batch_op.create_index("ix_auth_audit_events_kind_time", ["kind", "time"], unique=False)

    with op.batch_alter_table("auth_refresh_families", schema=None) as batch_op:
        batch_op.add_column(sa.Column("peer", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("auth_refresh_families", schema=None) as batch_op:
        batch_op.drop_column("peer")

    with op.batch_alter_table("auth_audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_auth_audit_events_kind_time")
        batch_op.drop_column("request_id")
        batch_op.drop_column("peer")
        batch_op.drop_column("actor_via")
        batch_op.drop_column("actor")

    with op.batch_alter_table("auth_revocations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auth_revocations_expire_time"))
        batch_op.drop_index(batch_op.f("ix_auth_revocations_create_time"))

    op.drop_table("auth_revocations")
