"""Both services behind a real PgBouncer in transaction mode (DB_TRANSACTION_POOLER=true).

A private `pgbouncer` (tests/pgbouncer.py: own port and ini, pool_mode = transaction, two
server connections per database, so consecutive transactions of one client connection
land on different server connections) stands between the services and the shared
PostgreSQL, on databases the test creates. Proven here:

- the setting is needed: without it psycopg prepares a statement repeated five times on one
  server connection and runs it on another ("prepared statement does not exist"), and the
  `statement_timeout` startup option is refused by PgBouncer, so every call fails;
- with it, both services' migrations, the auth flow (register, login, refresh) and the
  agent calls (create, get, update, list, watch: the change log's advisory xact lock) work
  through PgBouncer, and so do the workers' passes (SELECT … FOR UPDATE SKIP LOCKED);
- the job locks exclude each other through PgBouncer (a session advisory lock does not: the
  next client on the same server connection would get it again);
- `statement_timeout` set on the database (where it must live behind a transaction pooler)
  cancels a long statement.

LISTEN/NOTIFY is not used (the watch wake-up goes through Redis or the process), nor are
session settings, temporary tables or cursors that outlive a transaction.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from google.protobuf import field_mask_pb2
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

from services.agent_svc.jobs import worker_for
from services.agent_svc.settings import load_agent_settings
from services.auth_svc import jobs as auth_jobs
from services.auth_svc.settings import load_auth_settings
from shared.config.clock import SystemClock
from shared.data.db import make_engine
from shared.data.jobs import PostgresJobLocks
from shared.rpc.observability import Observability
from tests.conftest import missing
from tests.integration.inprocess import PASSWORD, agent_service, auth_service
from tests.pgbouncer import PrivatePgBouncer, find_pgbouncer

TIMEOUT = 30.0  # a deadline for events, not a measured duration


@pytest.fixture(scope="module")
def pgbouncer_binary() -> str:
    binary = find_pgbouncer()
    if binary is None:
        missing(
            "pgbouncer",
            "not installed: apt-get install pgbouncer (scripts/ci_services.sh does it in CI)",
        )
    assert binary is not None
    return binary


@pytest.fixture
def bouncer(pgbouncer_binary: str, postgres_admin_url: str) -> Iterator[PrivatePgBouncer]:
    upstream = make_url(postgres_admin_url)
    private = PrivatePgBouncer(
        pgbouncer_binary,
        upstream_host=upstream.host or "127.0.0.1",
        upstream_port=upstream.port or 5432,
    )
    try:
        private.start()
        yield private
    finally:
        private.close()


@pytest.fixture
def database(new_postgres_database: Callable[[], str]) -> str:
    """A fresh database's name, with the statement timeout the services would set."""
    url = new_postgres_database()
    name = make_url(url).database
    assert name
    _on_database(url, f"ALTER DATABASE \"{name}\" SET statement_timeout = '10s'")
    return name


def _on_database(url: str, statement: str) -> None:
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(statement)


def _repeat_then_swap(engine: Any, bouncer: PrivatePgBouncer, database: str) -> int:
    """Runs one statement six times on one client connection (psycopg prepares it at the
    fifth), then once more while another client holds the server connection it ran on, so
    PgBouncer gives this transaction the other server connection."""
    with engine.connect() as connection:
        for value in range(6):
            connection.execute(text("SELECT CAST(:v AS integer)"), {"v": value})
            connection.commit()
        with psycopg.connect(bouncer.url(database)) as other:
            other.execute("SELECT 1")  # a transaction: holds its server connection
            found = connection.execute(text("SELECT CAST(:v AS integer)"), {"v": 42}).scalar()
            connection.commit()
        return int(found)


def test_without_the_setting_a_prepared_statement_meets_another_server_connection(
    bouncer: PrivatePgBouncer, database: str
) -> None:
    engine = make_engine(bouncer.url(database), pool_size=1, statement_timeout=0)
    try:
        with pytest.raises(ProgrammingError) as caught:
            _repeat_then_swap(engine, bouncer, database)
        assert "prepared statement" in str(caught.value)
        assert "does not exist" in str(caught.value)
    finally:
        engine.dispose()


def test_with_the_setting_the_same_statements_run_on_any_server_connection(
    bouncer: PrivatePgBouncer, database: str
) -> None:
    engine = make_engine(bouncer.url(database), pool_size=1, transaction_pooler=True)
    try:
        assert _repeat_then_swap(engine, bouncer, database) == 42
        assert bouncer.server_connections(database) == 2  # the swap really happened
    finally:
        engine.dispose()


def test_without_the_setting_pgbouncer_refuses_the_statement_timeout_option(
    bouncer: PrivatePgBouncer, database: str
) -> None:
    engine = make_engine(bouncer.url(database), pool_size=1, statement_timeout=5)
    try:
        with pytest.raises(OperationalError) as caught, engine.connect():
            pass
        assert "unsupported startup parameter: options" in str(caught.value)
    finally:
        engine.dispose()


def test_the_statement_timeout_set_on_the_database_applies_through_pgbouncer(
    bouncer: PrivatePgBouncer, new_postgres_database: Callable[[], str]
) -> None:
    url = new_postgres_database()
    name = make_url(url).database
    assert name
    _on_database(url, f"ALTER DATABASE \"{name}\" SET statement_timeout = '200ms'")
    engine = make_engine(bouncer.url(name), pool_size=1, transaction_pooler=True)
    try:
        with engine.connect() as connection:
            shown = connection.execute(text("SHOW statement_timeout")).scalar()
            assert shown == "200ms"
            with pytest.raises(OperationalError) as caught:
                connection.execute(text("SELECT pg_sleep(5)"))
            assert "canceling statement due to statement timeout" in str(caught.value)
    finally:
        engine.dispose()


def test_a_job_lock_held_through_pgbouncer_excludes_every_other_client(
    bouncer: PrivatePgBouncer, database: str
) -> None:
    # Two engines, as two worker pods: each has its own client connections to PgBouncer.
    first = make_engine(bouncer.url(database), pool_size=2, transaction_pooler=True)
    second = make_engine(bouncer.url(database), pool_size=2, transaction_pooler=True)
    try:
        with PostgresJobLocks(first).hold("agent.test.job") as got:
            assert got
            # A session lock would be held by the server connection the first client has
            # given back; the second pod would get that connection, and the lock, again.
            with PostgresJobLocks(second).hold("agent.test.job") as also:
                assert not also
        with PostgresJobLocks(second).hold("agent.test.job") as after:
            assert after  # released at the end of the first holder's pass
    finally:
        first.dispose()
        second.dispose()


def _metadata(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


class Watch:
    """A WatchAgents stream read on a thread: its messages arrive on a queue."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceStub, token: str) -> None:
        self.call = stub.WatchAgents(agent_pb2.WatchAgentsRequest(), metadata=_metadata(token))
        self.messages: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError as error:
            self.messages.put(error)

    def changes(self, count: int) -> list[agent_pb2.AgentChange]:
        found: list[agent_pb2.AgentChange] = []
        while len(found) < count:
            message = self.messages.get(timeout=TIMEOUT)
            assert not isinstance(message, grpc.RpcError), message
            found.extend(message.changes)
        return found


def test_both_services_work_through_pgbouncer_with_the_setting(
    tmp_path: Path,
    bouncer: PrivatePgBouncer,
    database: str,
    new_postgres_database: Callable[[], str],
) -> None:
    agent_database = make_url(new_postgres_database()).database
    assert agent_database
    auth_env = {
        "AUTH_DATABASE_URL": bouncer.url(database),
        "AUTH_DB_TRANSACTION_POOLER": "true",
    }
    with auth_service(tmp_path, auth_env) as auth, grpc.insecure_channel(auth.address) as channel:
        accounts = auth_pb2_grpc.AuthServiceStub(channel)
        email = f"{uuid.uuid4().hex}@example.com"
        accounts.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD), timeout=10)
        login = accounts.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD), timeout=10)
        refresh = login.refresh_token
        for _ in range(6):  # more than psycopg's prepare threshold, one token family
            refreshed = accounts.RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=refresh), timeout=10
            )
            assert refreshed.access_token
            assert refreshed.refresh_token != refresh
            refresh = refreshed.refresh_token
        token = refreshed.access_token
        agent_env = {
            "AGENT_DATABASE_URL": bouncer.url(agent_database),
            "AGENT_DB_TRANSACTION_POOLER": "true",
            "AGENT_AUTH_TARGET": auth.address,
        }
        with (
            agent_service(tmp_path, agent_env) as agent,
            grpc.insecure_channel(agent.address) as agent_channel,
        ):
            stub = agent_pb2_grpc.AgentServiceStub(agent_channel)
            watch = Watch(stub, token)
            created = [
                stub.CreateAgent(
                    agent_pb2.CreateAgentRequest(
                        agent=agent_pb2.Agent(name=f"pooled-{index}", model="gpt-4o")
                    ),
                    metadata=_metadata(token),
                    timeout=10,
                ).agent
                for index in range(6)
            ]
            updated = [
                stub.UpdateAgent(
                    agent_pb2.UpdateAgentRequest(
                        agent=agent_pb2.Agent(id=made.id, description="through pgbouncer"),
                        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                    ),
                    metadata=_metadata(token),
                    timeout=10,
                ).agent
                for made in created
            ]
            for made in updated:
                read = stub.GetAgent(
                    agent_pb2.GetAgentRequest(id=made.id), metadata=_metadata(token), timeout=10
                ).agent
                assert read.description == "through pgbouncer"
                assert read.etag == made.etag
            listed = stub.ListAgents(
                agent_pb2.ListAgentsRequest(page_size=3), metadata=_metadata(token), timeout=10
            )
            rest = stub.ListAgents(
                agent_pb2.ListAgentsRequest(page_size=3, page_token=listed.next_page_token),
                metadata=_metadata(token),
                timeout=10,
            )
            names = {a.name for a in [*listed.agents, *rest.agents]}
            assert names == {f"pooled-{index}" for index in range(6)}
            changes = watch.changes(12)
            assert [c.kind for c in changes] == [agent_pb2.AgentChange.KIND_CREATED] * 6 + [
                agent_pb2.AgentChange.KIND_UPDATED
            ] * 6
            assert [c.agent_id for c in changes[6:]] == [a.id for a in created]
            watch.call.cancel()
            # Both pools really were shared: PgBouncer held at most its two per database.
            assert bouncer.server_connections(agent_database) <= 2
            _run_workers_once(dict(auth.env), dict(agent.env))


def _run_workers_once(auth_env: dict[str, str], agent_env: dict[str, str]) -> None:
    """Both services' jobs, one pass each through PgBouncer, all succeeding (the agent
    purges take rows with SELECT … FOR UPDATE SKIP LOCKED, each job its lock)."""
    for settings, worker_of in (
        (load_agent_settings(agent_env, role="worker"), _agent_worker),
        (load_auth_settings(auth_env, role="worker"), _auth_worker),
    ):
        common = settings.common
        engine = make_engine(common.database_url, pool_size=2, transaction_pooler=True)
        observability = Observability.from_settings(common)
        try:
            results = worker_of(settings, engine, observability).run_once()
            assert results
            assert set(results.values()) == {"success"}, results
        finally:
            observability.close()
            engine.dispose()


def _agent_worker(settings: Any, engine: Any, observability: Observability) -> Any:
    return worker_for(settings, engine, observability, SystemClock())


def _auth_worker(settings: Any, engine: Any, observability: Observability) -> Any:
    return auth_jobs.worker_for(settings, engine, observability, SystemClock())
