"""failed-login counts while Redis is down

The login limiter's database fallback (services/auth_svc/infra/limiter.py): one row per
account being counted while Redis is unreachable, shared by every replica.

Revision ID: auth_0002
Revises: auth_0001
Create Date: 2026-11-30 10:03:06.408654
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "auth_0002"
down_revision: str | None = "auth_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auth_login_attempts",
        sa.Column("key_digest", sa.String(length=64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_digest", name=op.f("pk_auth_login_attempts")),
    )
    with op.batch_alter_table("auth_login_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_auth_login_attempts_expire_time"), ["expire_time"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("auth_login_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auth_login_attempts_expire_time"))

    op.drop_table("auth_login_attempts")
