"""service accounts, their secrets and keys, used client assertions

Revision ID: auth_0003
Revises: auth_0002
Create Date: 2026-11-30 13:01:59.313670
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "auth_0003"
down_revision: str | None = "auth_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auth_service_accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_service_accounts")),
    )
    with op.batch_alter_table("auth_service_accounts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_auth_service_accounts_create_time_id", ["create_time", "id"], unique=False
        )

    op.create_table(
        "auth_used_assertions",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_auth_used_assertions")),
    )
    with op.batch_alter_table("auth_used_assertions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_auth_used_assertions_expire_time"), ["expire_time"], unique=False
        )

    op.create_table(
        "auth_service_account_keys",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("alg", sa.String(length=16), nullable=False),
        sa.Column("public_key_pem", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["auth_service_accounts.id"],
            name=op.f("fk_auth_service_account_keys_account_id_auth_service_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", "kid", name=op.f("pk_auth_service_account_keys")),
    )
    op.create_table(
        "auth_service_account_secrets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["auth_service_accounts.id"],
            name=op.f("fk_auth_service_account_secrets_account_id_auth_service_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_service_account_secrets")),
    )
    with op.batch_alter_table("auth_service_account_secrets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_auth_service_account_secrets_account_id"), ["account_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("auth_service_account_secrets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auth_service_account_secrets_account_id"))

    op.drop_table("auth_service_account_secrets")
    op.drop_table("auth_service_account_keys")
    with op.batch_alter_table("auth_used_assertions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auth_used_assertions_expire_time"))

    op.drop_table("auth_used_assertions")
    with op.batch_alter_table("auth_service_accounts", schema=None) as batch_op:
        batch_op.drop_index("ix_auth_service_accounts_create_time_id")

    op.drop_table("auth_service_accounts")
