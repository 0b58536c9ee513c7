"""auth_svc's Alembic history on SQLite and PostgreSQL: up, down, up again; own tables only."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text
from sqlalchemy.pool import NullPool

from services.auth_svc.repository.models import AuthBase
from shared import migrations
from shared.db import normalize_url

AUTH_TABLES = {"auth_users", "auth_refresh_families", "auth_refresh_tokens", "auth_audit_events"}
VERSION_TABLE = "alembic_version_auth"


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
            query = text("SELECT version_num FROM alembic_version_auth")
            return list(connection.execute(query).scalars())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_uses_only_its_own_tables(database_url: str) -> None:
    migrations.upgrade("auth", database_url)
    assert tables(database_url) == AUTH_TABLES | {VERSION_TABLE}
    assert version(database_url) == ["auth_0001"]

    migrations.downgrade("auth", database_url)
    assert tables(database_url) == {VERSION_TABLE}
    assert version(database_url) == []

    migrations.upgrade("auth", database_url)
    assert tables(database_url) == AUTH_TABLES | {VERSION_TABLE}
    assert version(database_url) == ["auth_0001"]


def test_upgrade_twice_is_a_no_op(database_url: str) -> None:
    migrations.upgrade("auth", database_url)
    migrations.upgrade("auth", database_url)
    assert version(database_url) == ["auth_0001"]


def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    migrations.upgrade("auth", database_url)
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "include_object": lambda obj, name, type_, reflected, compare_to: (
                        type_ != "table" or name in AuthBase.metadata.tables
                    ),
                },
            )
            differences = compare_metadata(context, AuthBase.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_another_services_tables_are_left_alone(database_url: str) -> None:
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    neighbour = Table("agent_things", MetaData(), Column("id", Integer, primary_key=True))
    try:
        neighbour.create(engine)
        with engine.begin() as connection:
            connection.execute(neighbour.insert().values(id=7))
        migrations.upgrade("auth", database_url)
        migrations.downgrade("auth", database_url)
        migrations.upgrade("auth", database_url)
        with engine.connect() as connection:
            assert list(connection.execute(neighbour.select()).scalars()) == [7]
    finally:
        engine.dispose()
    assert "agent_things" in tables(database_url)
    assert "alembic_version" not in tables(database_url)


@pytest.mark.parametrize("target", ["auth_0001", "head"])
def test_named_revisions_resolve(sqlite_url: str, target: str) -> None:
    migrations.upgrade("auth", sqlite_url, target)
    assert version(sqlite_url) == ["auth_0001"]
