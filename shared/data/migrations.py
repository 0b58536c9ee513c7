"""Run a service's own Alembic history (migrations/<service>/) against a database URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, create_engine
from sqlalchemy.pool import NullPool

from shared.data.db import make_engine, normalize_url

__all__ = ["MIGRATIONS_ROOT", "alembic_config", "downgrade", "run_env", "upgrade"]

MIGRATIONS_ROOT = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(service: str, database_url: str) -> Config:
    """An Alembic config for one service's history; no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_ROOT / service))
    config.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return config


def upgrade(service: str, database_url: str, revision: str = "head") -> None:
    make_engine(database_url).dispose()  # creates the SQLite folder if needed
    command.upgrade(alembic_config(service, database_url), revision)


def downgrade(service: str, database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(service, database_url), revision)


def run_env(metadata: MetaData, version_table: str) -> None:
    """The body of a service's Alembic env.py: its own version table, and only its own
    tables considered (so two services may share one database without touching each
    other's tables)."""
    from alembic import context

    own_tables = set(metadata.tables)

    def include_object(
        obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
    ) -> bool:
        if type_ == "table":
            return name in own_tables
        table = getattr(obj, "table", None)
        return table is None or table.name in own_tables

    options: dict[str, Any] = {
        "target_metadata": metadata,
        "version_table": version_table,
        "include_object": include_object,
        "render_as_batch": True,
        "compare_type": True,
    }
    if context.is_offline_mode():
        context.configure(url=context.config.get_main_option("sqlalchemy.url"), **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(
        context.config.get_main_option("sqlalchemy.url") or "", poolclass=NullPool
    )
    with engine.connect() as connection:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
