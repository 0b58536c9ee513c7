"""agent_svc's Alembic history on SQLite and PostgreSQL: up, down, up again; own tables only;
the migrated schema is the models' schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from services.agent_svc.repository.models import AgentBase
from shared import migrations
from shared.db import normalize_url

AGENT_TABLES = {"agent_agents"}
VERSION_TABLE = "alembic_version_agent"
LIST_INDEXES = {
    ("owner_id", "create_time", "id"),
    ("owner_id", "update_time", "id"),
    ("owner_id", "name", "id"),
    ("create_time", "id"),
    ("update_time", "id"),
    ("name", "id"),
}


def tables(url: str) -> set[str]:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def version(url: str) -> list[str]:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            query = text("SELECT version_num FROM alembic_version_agent")
            return list(connection.execute(query).scalars())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    migrations.upgrade("agent", database_url)
    assert tables(database_url) == AGENT_TABLES | {VERSION_TABLE}
    assert version(database_url) == ["agent_0001"]

    migrations.downgrade("agent", database_url)
    assert tables(database_url) == {VERSION_TABLE}
    assert version(database_url) == []

    migrations.upgrade("agent", database_url)
    assert version(database_url) == ["agent_0001"]


def test_the_list_queries_have_their_indexes_and_keys(database_url: str) -> None:
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
    assert indexes >= LIST_INDEXES
    assert uniques == {("owner_id", "name"), ("owner_id", "request_id")}


def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    migrations.upgrade("agent", database_url)
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "include_object": lambda obj, name, type_, reflected, compare_to: (
                        type_ != "table" or name in AgentBase.metadata.tables
                    ),
                },
            )
            differences = compare_metadata(context, AgentBase.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_auth_and_agent_histories_share_a_database_without_touching_each_other(
    database_url: str,
) -> None:
    migrations.upgrade("auth", database_url)
    migrations.upgrade("agent", database_url)
    both = tables(database_url)
    assert {"agent_agents", "auth_users", VERSION_TABLE, "alembic_version_auth"} <= both
    migrations.downgrade("agent", database_url)
    remaining = tables(database_url)
    assert "agent_agents" not in remaining
    assert {"auth_users", "alembic_version_auth"} <= remaining
    assert "alembic_version" not in remaining
