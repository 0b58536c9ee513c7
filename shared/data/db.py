"""Database engines and the unit of work that every repository runs in.

Calls and their deadlines (shared.config.deadlines): a call never waits for a pooled
connection longer than its caller still waits for the answer (the pool's wait is the
smaller of `POOL_WAIT_SECONDS` and the call's remaining time), a new connection is given
at most the remaining time to connect (libpq's floor is 2 s), and a statement of a call
that ends early (cancelled by the caller, past its deadline, ended at shutdown) is
cancelled on the server at once, so its connection returns to the pool instead of
serving a caller who is gone. `DB_STATEMENT_TIMEOUT_SECONDS` stays the server-side bound
for work outside any call.

Failover (a multi-host URL finds the new primary for each new connection): a statement
refused because its server is gone or no longer a primary (read-only, shutting down,
starting) is UNAVAILABLE and drops every connection of the pool made before it; a
connection idle over IDLE_PING_SECONDS is pinged at checkout; and with
target_session_attrs=read-write a connection whose server reported itself read-only is
replaced at checkout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from shared.config import deadlines
from shared.rpc.errors import Unavailable

__all__ = [
    "CallEnded",
    "SqlUnitOfWork",
    "make_engine",
    "normalize_url",
    "ping",
    "session_factory",
    "single_statement_sessions",
    "unavailable_database",
]

_log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """`postgresql://…` and `postgres://…` use psycopg 3; everything else is left alone.
    A libpq multi-host URL (`postgresql://u@h1:5432,h2:5432/db?target_session_attrs=
    read-write`: libpq tries the hosts in turn and keeps the one that accepts writes, so
    a new connection finds the primary after a failover) becomes the form SQLAlchemy
    parses, the hosts as repeated `host=` query parameters."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return _hosts_as_query("postgresql+psycopg://" + url[len(prefix) :])
    if url.startswith("postgresql+"):
        return _hosts_as_query(url)
    return url


def _hosts_as_query(url: str) -> str:
    scheme, _, rest = url.partition("://")
    authority, _, tail = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    if "," not in hosts:
        return url
    database, _, query = tail.partition("?")
    extra = "&".join(f"host={host.strip()}" for host in hosts.split(",") if host.strip())
    query = f"{extra}&{query}" if query else extra
    return f"{scheme}://{credentials}{at}/{database}?{query}"


POOL_WAIT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 5


class DeadlineQueuePool(QueuePool):
    """A QueuePool whose wait for a free connection ends with the current call's
    deadline (QueuePool reads `_timeout` at each wait)."""

    @property
    def _timeout(self) -> float:
        remaining = deadlines.remaining()
        if remaining is None:
            return self._configured_timeout
        return min(self._configured_timeout, remaining)

    @_timeout.setter
    def _timeout(self, value: float) -> None:
        self._configured_timeout = value


class CallEnded(Exception):
    """A statement of a call that is over (cancelled, past its deadline, ended at
    shutdown) was refused: the caller is gone, the work is abandoned and rolled back."""


class _Canceller:
    """Cancels the statements of calls that ended, from a thread of its own: the request
    comes from grpcio's polling thread, which must not block. A cancel that reaches the
    server between two statements finds nothing to cancel, so it is repeated (every
    0.25 s) while the call still holds the connection; and statements not yet started are
    refused (CallEnded). A server that does not answer the cancel within a second (frozen:
    stopped, or cut off without a reset) gets the connection's socket shut down instead:
    the call's thread, blocked on it, gets an error at once instead of waiting for the
    server to come back (and the pool drops the connection)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, dict[str, Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def cancel(self, dbapi_connection: Any, info: dict[str, Any]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="statement-canceller", daemon=True
                )
                self._thread.start()
        self._queue.put((dbapi_connection, info))

    def _run(self) -> None:
        pause = threading.Event()
        while True:
            connection, info = self._queue.get()
            started = time.monotonic()
            for _ in range(20):
                if not info.get(_CALL_ENDED):
                    break  # checked in: the work is over
                try:
                    if hasattr(connection, "cancel_safe"):  # psycopg 3
                        connection.cancel_safe(timeout=0.5)
                    elif hasattr(connection, "interrupt"):  # sqlite3
                        connection.interrupt()
                except Exception as exc:
                    _log.info("cancelling a statement failed: %s", type(exc).__name__)
                pause.wait(0.25)
                if info.get(_CALL_ENDED) and time.monotonic() - started >= SEVER_AFTER_SECONDS:
                    _sever(connection)
                    break


def _sever(connection: Any) -> None:
    """Shuts the socket of a psycopg connection whose server does not answer: the thread
    blocked reading it gets an error now (the connection is then discarded)."""
    pgconn = getattr(connection, "pgconn", None)
    fd = getattr(pgconn, "socket", -1) if pgconn is not None else -1
    if fd is None or fd < 0:
        return
    try:
        with socket.socket(fileno=os.dup(fd)) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
        _log.warning("the database did not answer a cancel: the connection was shut down")
    except OSError as exc:
        _log.info("shutting down a stuck connection failed: %s", exc)


SEVER_AFTER_SECONDS = 1.0
_canceller = _Canceller()
_END_HOOK = "agentplatform.end_hook"
_CALL_ENDED = "agentplatform.call_ended"


def _cancel_when_the_call_ends(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """At checkout, inside a call: if the call ends before the work does, cancel whatever
    statement runs then, and refuse the next ones (the work fails, rolls back, and the
    connection comes back)."""
    scope = deadlines.current_call.get()
    if scope is None:
        return
    info = record.info

    def ended() -> None:
        info[_CALL_ENDED] = True
        _canceller.cancel(dbapi_connection, info)

    info[_END_HOOK] = scope.on_end(ended)


def _forget_the_call(_dbapi_connection: Any, record: Any) -> None:
    unregister = record.info.pop(_END_HOOK, None)
    if unregister is not None:
        unregister()
    record.info.pop(_CALL_ENDED, None)


def _refuse_when_the_call_ended(connection: Any, *_args: Any) -> None:
    if connection.info.get(_CALL_ENDED):
        raise CallEnded("the call ended before its work: abandoned")


def _bounded_connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
    """A connection made for a call gets at most the call's remaining time."""
    remaining = deadlines.remaining()
    if remaining is not None:
        cparams["connect_timeout"] = max(
            2, min(CONNECT_TIMEOUT_SECONDS, math.ceil(remaining))
        )  # libpq's minimum is 2 s


IDLE_PING_SECONDS = 2.0
_CHECKED_IN = "agentplatform.checked_in"


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info[_CHECKED_IN] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """A connection that sat idle may have died with the server (a restart, a failover):
    one round trip proves it before a call gets it, and a dead one is replaced. One that
    was in use moments ago is handed out as is: pinging on every checkout (SQLAlchemy's
    pre-ping) cost a busy pod three round trips per call (BEGIN, SELECT 1, ROLLBACK).
    If the server died in between, the call's statement fails, the error is UNAVAILABLE
    (retry), and SQLAlchemy drops every connection older than the failure from the pool."""
    last = record.info.get(_CHECKED_IN)
    if last is not None and time.monotonic() - last < IDLE_PING_SECONDS:
        return
    autocommit = dbapi_connection.autocommit
    try:
        dbapi_connection.autocommit = True  # no BEGIN/ROLLBACK around the ping
        dbapi_connection.execute("SELECT 1")
    except Exception as exc:
        raise DisconnectionError(f"a pooled connection is dead: {type(exc).__name__}") from exc
    finally:
        with contextlib.suppress(Exception):
            dbapi_connection.autocommit = autocommit


# SQLSTATEs that say the server is no longer a primary this pool may use: a read-only
# server (a primary demoted in place, or a standby), a server shutting down or crashed
# (admin_shutdown, crash_shutdown: the session is over), or one that does not take
# connections yet (cannot_connect_now: starting, in recovery). Class 08 is a broken
# connection.
_FAILOVER_SQLSTATES = frozenset({"25006", "57P01", "57P02", "57P03"})


def _sqlstate(exc: BaseException | None) -> str:
    return str(getattr(exc, "sqlstate", None) or "")


def _server_gone(sqlstate: str) -> bool:
    return sqlstate in _FAILOVER_SQLSTATES or sqlstate.startswith("08")


def _drop_the_pool_on_failover(context: ExceptionContext) -> None:
    """A statement refused because the server is no longer a usable primary is handled
    as a disconnect: SQLAlchemy discards the connection and every connection of the pool
    made before the error (each is replaced at its next checkout, through the multi-host
    URL, so by the server that accepts writes now), and the error is UNAVAILABLE. Without
    this, a demoted primary's refusal (25006) kept its connection in the pool, and every
    write handed to it failed."""
    if _server_gone(_sqlstate(context.original_exception)):
        context.is_disconnect = True


def _read_only(dbapi_connection: Any) -> bool:
    """What the server last reported of itself (PostgreSQL 14+ reports
    default_transaction_read_only and in_hot_standby to the client whenever they change:
    no round trip)."""
    pgconn = getattr(dbapi_connection, "pgconn", None)
    if pgconn is None:
        return False
    return b"on" in (
        pgconn.parameter_status(b"default_transaction_read_only"),
        pgconn.parameter_status(b"in_hot_standby"),
    )


def _refuse_a_read_only_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """For an engine whose URL asks for a server that accepts writes
    (target_session_attrs=read-write): a pooled connection to a server that has since
    become read-only (demoted) is replaced before a call gets it."""
    if _read_only(dbapi_connection):
        raise DisconnectionError("the server of a pooled connection is read-only now")


def _follow_calls(engine: Engine) -> Engine:
    event.listen(engine.pool, "checkout", _cancel_when_the_call_ends)
    event.listen(engine.pool, "checkin", _forget_the_call)
    event.listen(engine, "before_cursor_execute", _refuse_when_the_call_ended)
    return engine


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    statement_timeout: float = 0.0,
    transaction_pooler: bool = False,
) -> Engine:
    """An engine sized for the worker pool, bound by each call's deadline (see the module
    docstring); SQLite gets WAL, foreign keys and a busy timeout. `transaction_pooler`:
    PostgreSQL is reached through PgBouncer in transaction mode (or a pooler like it),
    where consecutive transactions of one client connection may run on different server
    connections: no server-side prepared statements (psycopg's `prepare_threshold=None`)
    and no session setting at startup (`statement_timeout` belongs on the role then)."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=DeadlineQueuePool,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=POOL_WAIT_SECONDS,
            hide_parameters=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return _follow_calls(engine)
    engine = create_engine(
        url,
        poolclass=DeadlineQueuePool,
        pool_size=pool_size,
        max_overflow=pool_size // 2,
        pool_timeout=POOL_WAIT_SECONDS,
        pool_recycle=1800,
        # A statement that runs (or waits for a lock) longer than `statement_timeout`
        # seconds is cancelled by PostgreSQL, so no worker thread waits on it forever
        # (0: no limit). The cancellation is an OperationalError: UNAVAILABLE, retry.
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            **(
                {"options": f"-c statement_timeout={int(statement_timeout * 1000)}"}
                if statement_timeout > 0 and not transaction_pooler
                else {}
            ),
            **({"prepare_threshold": None} if transaction_pooler else {}),
        },
        # Errors (and so logs) never show bound values: password hashes, token hashes, emails.
        hide_parameters=True,
    )
    event.listen(engine, "do_connect", _bounded_connect)
    # The call is followed first, so that the idle ping is under its deadline too (a ping
    # to a frozen server is cancelled, then its connection shut down, like a statement).
    _follow_calls(engine)
    event.listen(engine.pool, "checkout", _ping_if_idle)
    event.listen(engine.pool, "checkin", _note_checkin)
    event.listen(engine, "handle_error", _drop_the_pool_on_failover)
    # Only with read-write: libpq then never connects to a read-only server, so a fresh
    # connection passes the check (`primary` accepts one with default_transaction_read_only).
    if parsed.query.get("target_session_attrs") == "read-write":
        event.listen(engine.pool, "checkout", _refuse_a_read_only_server)
    return engine


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
    """A database that cannot be reached, a pool with no connection free in time, or a
    server that is no longer the primary (a demoted one refuses writes: read-only; one
    shutting down ends the session) is UNAVAILABLE (retry later: the next connection
    finds the primary), not INTERNAL; for the error-mapping interceptor."""
    retryable = isinstance(exc, SqlTimeoutError | OperationalError | InterfaceError | CallEnded)
    if retryable or (
        isinstance(exc, DBAPIError)
        and (exc.connection_invalidated or _server_gone(_sqlstate(exc.orig)))
    ):
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


def single_statement_sessions(engine: Engine) -> sessionmaker[Session]:
    """Sessions for work of one read-only statement: autocommit on PostgreSQL, so the
    statement is its own transaction (one round trip instead of BEGIN, statement and
    ROLLBACK: two thirds of the database time of a cache miss or a page). Never for
    writes, nor for reads that must see each other's snapshot."""
    if engine.dialect.name == "sqlite":
        return session_factory(engine)  # BEGIN IMMEDIATE there is local, and serializes
    return sessionmaker(
        bind=engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
    )
