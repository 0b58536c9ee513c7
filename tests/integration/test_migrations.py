"""Each service's Alembic history on SQLite and PostgreSQL: up, down, up again; its own
version table and tables only; the migrated schema is the models' schema."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text
from sqlalchemy.pool import NullPool

from services.agent_svc.repository.models import AgentBase
from services.auth_svc.repository.models import AuthBase
from shared.data import migrations
from shared.data.db import normalize_url


@dataclass(frozen=True)
class History:
    service: str
    metadata: MetaData
    head: str

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.service}"

    @property
    def tables(self) -> set[str]:
        return set(self.metadata.tables)


AUTH = History("auth", AuthBase.metadata, "auth_0006")
AGENT = History("agent", AgentBase.metadata, "agent_0007")
HISTORIES = [pytest.param(AUTH, id="auth"), pytest.param(AGENT, id="agent")]


def tables(url: str) -> set[str]:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def version(url: str, history: History) -> list[str]:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            query = text(f"SELECT version_num FROM {history.version_table}")  # noqa: S608
            return list(connection.execute(query).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("history", HISTORIES)
def test_upgrade_downgrade_upgrade_uses_only_its_own_tables(
    database_url: str, history: History
) -> None:
    migrations.upgrade(history.service, database_url)
    assert tables(database_url) == history.tables | {history.version_table}
    assert version(database_url, history) == [history.head]

    migrations.downgrade(history.service, database_url)
    assert tables(database_url) == {history.version_table}
    assert version(database_url, history) == []

    migrations.upgrade(history.service, database_url)
    assert tables(database_url) == history.tables | {history.version_table}
    assert version(database_url, history) == [history.head]
    migrations.upgrade(history.service, database_url)  # a second upgrade is a no-op
    assert version(database_url, history) == [history.head]


@pytest.mark.parametrize("history", HISTORIES)
def test_the_migrated_schema_matches_the_models(database_url: str, history: History) -> None:
    migrations.upgrade(history.service, database_url)
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "include_object": lambda obj, name, type_, reflected, compare_to: (
                        type_ != "table" or name in history.tables
                    ),
                },
            )
            differences = compare_metadata(context, history.metadata)
    finally:
        engine.dispose()
    assert differences == []


@pytest.mark.parametrize("history", HISTORIES)
def test_another_services_tables_are_left_alone(database_url: str, history: History) -> None:
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    neighbour = Table("other_things", MetaData(), Column("id", Integer, primary_key=True))
    try:
        neighbour.create(engine)
        with engine.begin() as connection:
            connection.execute(neighbour.insert().values(id=7))
        migrations.upgrade(history.service, database_url)
        migrations.downgrade(history.service, database_url)
        migrations.upgrade(history.service, database_url)
        with engine.connect() as connection:
            assert list(connection.execute(neighbour.select()).scalars()) == [7]
    finally:
        engine.dispose()
    assert "other_things" in tables(database_url)
    assert "alembic_version" not in tables(database_url)


def test_both_histories_share_a_database_without_touching_each_other(database_url: str) -> None:
    migrations.upgrade("auth", database_url)
    migrations.upgrade("agent", database_url)
    assert AUTH.tables | AGENT.tables | {AUTH.version_table, AGENT.version_table} == tables(
        database_url
    )
    migrations.downgrade("agent", database_url)
    assert tables(database_url) == AUTH.tables | {AUTH.version_table, AGENT.version_table}


def test_the_agent_list_queries_have_their_indexes_and_keys(database_url: str) -> None:
    migrations.upgrade("agent", database_url)
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    try:
        inspector = inspect(engine)
        indexes = {tuple(i["column_names"]) for i in inspector.get_indexes("agent_agents")}
        uniques = {
            tuple(u["column_names"]) for u in inspector.get_unique_constraints("agent_agents")
        }
    finally:
        engine.dispose()
    assert indexes >= {
        ("owner_id", "create_time", "id"),
        ("owner_id", "update_time", "id"),
        ("owner_id", "name", "id"),
        ("create_time", "id"),
        ("update_time", "id"),
        ("name", "id"),
    }
    assert uniques == {("owner_id", "name"), ("owner_id", "request_id")}


@pytest.mark.parametrize("history", HISTORIES)
def test_named_revisions_resolve(sqlite_url: str, history: History) -> None:
    migrations.upgrade(history.service, sqlite_url, history.head)
    assert version(sqlite_url, history) == [history.head]


def test_undoing_the_alias_columns_keeps_the_change_logs_numbers_going_up(
    database_url: str,
) -> None:
    """agent_0007 down (SQLite rebuilds the table for it): a number the log handed out is
    never handed out again, even when the purge removed every row (resume tokens would
    look ahead of the log or skip changes), and alias moves become updates."""
    migrations.upgrade("agent", database_url)
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    row = (
        "INSERT INTO agent_changes (kind, agent_id, owner_id, agent, change_time) "
        "VALUES (:kind, :id, :id, '{}', CURRENT_TIMESTAMP)"
    )
    some_id = "6f1c8a52-2f0e-4a8e-9c1e-0d8f5b1e2a3c"
    try:
        with engine.begin() as connection:
            for kind in ("created", "tagged", "updated", "untagged", "deleted"):
                connection.execute(text(row), {"kind": kind, "id": some_id})
            high = connection.execute(text("SELECT max(seq) FROM agent_changes")).scalar_one()
            # The purge leaves the newest rows (here the untag and the delete).
            purge = text("DELETE FROM agent_changes WHERE seq < :high - 1")
            connection.execute(purge, {"high": high})
        migrations.downgrade("agent", database_url, "agent_0006")
        with engine.begin() as connection:
            kinds = connection.execute(text("SELECT kind FROM agent_changes ORDER BY seq"))
            assert list(kinds.scalars()) == ["updated", "deleted"]
            connection.execute(text("DELETE FROM agent_changes"))
            connection.execute(text(row), {"kind": "created", "id": some_id})
            after = connection.execute(text("SELECT max(seq) FROM agent_changes")).scalar_one()
        assert after > high
        migrations.upgrade("agent", database_url)
        with engine.begin() as connection:
            connection.execute(text(row), {"kind": "created", "id": some_id})
            again = connection.execute(text("SELECT max(seq) FROM agent_changes")).scalar_one()
        assert again > after
    finally:
        engine.dispose()
