"""The service engines on a real PostgreSQL: a statement that runs too long is cancelled
and reaches the caller as UNAVAILABLE, not as a worker thread blocked for good."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from shared.data.db import make_engine, unavailable_database
from shared.rpc.errors import Unavailable


def test_a_statement_over_the_timeout_is_cancelled_and_maps_to_unavailable(
    postgres_url: str,
) -> None:
    engine = make_engine(postgres_url, pool_size=1, statement_timeout=0.2)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "200ms"
        # PostgreSQL cancels the statement for its timeout (it says so), long before the
        # minute it asked for; without the timeout this test would hang for that minute.
        with pytest.raises(OperationalError) as caught, engine.connect() as connection:
            connection.execute(text("SELECT pg_sleep(60)"))
        assert "canceling statement due to statement timeout" in str(caught.value.orig)
        translated = unavailable_database(caught.value)
        assert isinstance(translated, Unavailable)
        assert translated.reason == "DATABASE_UNAVAILABLE"
        # The connection is still good for the next call.
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_no_timeout_leaves_statements_alone(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_size=1)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
            connection.execute(text("SELECT pg_sleep(0.3)"))
    finally:
        engine.dispose()


def test_a_multi_host_url_finds_the_server_that_accepts_writes(postgres_url: str) -> None:
    """libpq's multi-host URL through the engine: the first host is down (as a failed
    primary is), the next one that accepts writes is used."""
    scheme, _, rest = postgres_url.partition("://")
    credentials, _, location = rest.rpartition("@")
    _host, _, database = location.partition("/")
    address = location.partition("/")[0]
    url = (
        f"{scheme}://{credentials}@127.0.0.1:1,{address}/{database}"
        f"{'&' if '?' in database else '?'}target_session_attrs=read-write"
    )
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT NOT pg_is_in_recovery()")).scalar() is True
            assert connection.execute(text("SHOW transaction_read_only")).scalar() == "off"
    finally:
        engine.dispose()


def test_behind_a_transaction_pooler_no_statement_is_prepared_and_no_option_is_sent(
    postgres_url: str,
) -> None:
    engine = make_engine(postgres_url, pool_size=1, statement_timeout=5, transaction_pooler=True)
    try:
        with engine.connect() as connection:
            for _ in range(10):  # psycopg prepares a statement from its 5th run by default
                connection.execute(text("SELECT 1")).scalar()
            prepared = connection.execute(text("SELECT count(*) FROM pg_prepared_statements"))
            assert prepared.scalar() == 0
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
    finally:
        engine.dispose()
