"""an index on revocations by subject

Revision ID: auth_0006
Revises: auth_0005
Create Date: 2026-11-30 16:50:00

Every admin call and every token exchange asks whether a revocation covers the caller's
token (subject, not_before): without it that was a scan of the table.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "auth_0006"
down_revision: str | None = "auth_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("auth_revocations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_auth_revocations_subject", ["subject", "not_before"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("auth_revocations", schema=None) as batch_op:
        batch_op.drop_index("ix_auth_revocations_subject")
