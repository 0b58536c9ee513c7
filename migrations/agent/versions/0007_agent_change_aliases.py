"""alias moves in the change log: agent_changes.alias, alias_revision

Two nullable columns: the previous release neither reads nor writes them. Its watch hubs do
not know the new kinds (tagged, untagged), so during a rollout a hub of the previous release
that reads such a row fails that read (logged) until its pod is replaced; the streams it
serves wait meanwhile, then end with the pod (UNAVAILABLE) and resume on a new one without
losing a change (docs/watch.md "Upgrading").

Revision ID: agent_0007
Revises: agent_0006
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "agent_0007"
down_revision: str | None = "agent_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("agent_changes", sa.Column("alias", sa.String(length=63), nullable=True))
    op.add_column("agent_changes", sa.Column("alias_revision", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # The previous release does not know alias moves: they become updates of the agent (as
    # it was then). Not deleted: the log's highest number must never go back (a resume
    # token would look ahead of the log).
    op.execute("UPDATE agent_changes SET kind = 'updated' WHERE kind IN ('tagged', 'untagged')")
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_column("agent_changes", "alias_revision")
        op.drop_column("agent_changes", "alias")
        return
    # SQLite rebuilds the table to drop a column: keep it AUTOINCREMENT and keep its high
    # mark (sqlite_sequence), or numbers of rows the purge removed would be handed out again.
    high = bind.execute(
        sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'agent_changes'")
    ).scalar()
    with op.batch_alter_table(
        "agent_changes", table_kwargs={"sqlite_autoincrement": True}
    ) as batch:
        batch.drop_column("alias_revision")
        batch.drop_column("alias")
    if high is not None:
        bind.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'agent_changes'"))
        bind.execute(
            sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('agent_changes', :seq)"),
            {"seq": high},
        )
