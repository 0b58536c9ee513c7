"""Database engines and the unit of work that every repository runs in."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from shared.rpc.errors import Unavailable

__all__ = [
    "SqlUnitOfWork",
    "make_engine",
    "normalize_url",
    "ping",
    "session_factory",
    "unavailable_database",
]

_log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """`postgresql://…` and `postgres://…` use psycopg 3; everything else is left alone."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, *, pool_size: int = 10, statement_timeout: float = 0.0) -> Engine:
    """An engine sized for the worker pool; SQLite gets WAL, foreign keys and a busy timeout."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=pool_size,
            hide_parameters=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size // 2,
        pool_timeout=5,
        pool_pre_ping=True,
        pool_recycle=1800,
        # A statement that runs (or waits for a lock) longer than `statement_timeout`
        # seconds is cancelled by PostgreSQL, so no worker thread waits on it forever
        # (0: no limit). The cancellation is an OperationalError: UNAVAILABLE, retry.
        connect_args={
            "connect_timeout": 5,
            **(
                {"options": f"-c statement_timeout={int(statement_timeout * 1000)}"}
                if statement_timeout > 0
                else {}
            ),
        },
        # Errors (and so logs) never show bound values: password hashes, token hashes, emails.
        hide_parameters=True,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Leave transaction control to SQLAlchemy's "begin" event below (pysqlite would
    # otherwise defer BEGIN and let two writers deadlock on lock upgrade).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    # One writer at a time, taken at BEGIN: concurrent read-modify-write sequences
    # serialize instead of failing with "database is locked" on upgrade.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def unavailable_database(exc: Exception) -> Unavailable | None:
    """A database that cannot be reached, or a pool with no connection free in time, is
    UNAVAILABLE (retry later), not INTERNAL; for the error-mapping interceptor."""
    if isinstance(exc, SqlTimeoutError | OperationalError | InterfaceError):
        return Unavailable(
            "the database is not available; retry",
            retry_after_seconds=1.0,
            reason="DATABASE_UNAVAILABLE",
        )
    return None


def ping(engine: Engine) -> bool:
    """True if the database answers a trivial query."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception as exc:  # any driver error means "not reachable now"
        _log.warning("database not reachable: %s", type(exc).__name__)
        return False


class SqlUnitOfWork:
    """One session and transaction per RPC: rolls back unless `commit()` was called."""

    def __init__(self, session_factory: Callable[[], Session]) -> None:
        self._session_factory = session_factory
        self.session: Session

    def __enter__(self) -> Self:
        self.session = self._session_factory()
        self._open_repositories(self.session)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.session.rollback()
        finally:
            self.session.close()

    def _open_repositories(self, session: Session) -> None:
        """Subclasses create their repositories on the session here."""

    def commit(self) -> None:
        self.session.commit()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)
