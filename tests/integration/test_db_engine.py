"""The service engines on a real PostgreSQL: a statement that runs too long is cancelled
and reaches the caller as UNAVAILABLE, not as a worker thread blocked for good."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, OperationalError

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


def _backend_pid(connection: Connection) -> int:
    return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_write_refused_by_a_read_only_server_is_unavailable_and_drops_the_pool(
    postgres_url: str,
) -> None:
    """A demoted primary stays up and refuses writes (SQLSTATE 25006). The caller gets
    UNAVAILABLE (retry: the next connection finds the new primary through the multi-host
    URL), and neither that connection nor any other one made before it serves another
    call. Before: psycopg's InternalError was answered INTERNAL, and the connection went
    back to the pool, to fail every write handed to it."""
    engine = make_engine(postgres_url, pool_size=2)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE notes (body text)"))
        with engine.connect() as first, engine.connect() as second:
            before = {_backend_pid(first), _backend_pid(second)}
            # The server becomes read-only under the open connection, as a primary
            # demoted in place (default_transaction_read_only=on and a reload) does.
            first.execute(text("SET SESSION default_transaction_read_only = on"))
            first.commit()
            with pytest.raises(DBAPIError) as caught:
                first.execute(text("INSERT INTO notes VALUES ('lost')"))
        assert caught.value.orig is not None
        assert getattr(caught.value.orig, "sqlstate", None) == "25006"
        translated = unavailable_database(caught.value)
        assert isinstance(translated, Unavailable)
        assert translated.reason == "DATABASE_UNAVAILABLE"
        assert translated.retry_after_seconds is not None
        # Both pooled connections were made before the refusal: neither comes back.
        with engine.connect() as first, engine.connect() as second:
            after = {_backend_pid(first), _backend_pid(second)}
            first.execute(text("INSERT INTO notes VALUES ('kept')"))
            first.commit()
        assert not before & after, "a connection made before the refusal was handed out again"
    finally:
        engine.dispose()


def test_a_connection_that_reports_a_read_only_server_is_not_handed_out(
    postgres_url: str,
) -> None:
    """With target_session_attrs=read-write (the multi-host URL's promise of a server that
    accepts writes), a pooled connection whose server has since reported itself read-only
    (PostgreSQL reports default_transaction_read_only and in_hot_standby to the client
    when they change) is replaced at checkout, before a read is served from a demoted
    server or a write fails on it."""
    engine = make_engine(postgres_url + "?target_session_attrs=read-write", pool_size=1)
    try:
        with engine.connect() as connection:
            demoted = _backend_pid(connection)
            connection.execute(text("SET SESSION default_transaction_read_only = on"))
            connection.commit()
        with engine.connect() as connection:
            assert _backend_pid(connection) != demoted
            assert connection.execute(text("SHOW transaction_read_only")).scalar() == "off"
    finally:
        engine.dispose()
