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
