"""The database layer and the calls it serves: no wait for a connection past the caller's
deadline, and a statement of a call that ended early cancelled at once (its connection
back in the pool), on PostgreSQL and SQLite, and through a real server."""

from __future__ import annotations

import contextvars
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from google.protobuf import field_mask_pb2
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from shared.config import deadlines
from shared.data.db import CallEnded, make_engine
from tests.integration.inprocess import agent_service, auth_service, register_and_login

GENEROUS = 30.0  # a deadline for events, not a measured duration


class Scope:
    """A call as the data layer sees it (shared.config.deadlines.CallScope)."""

    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining
        self._hooks: list[Callable[[], None]] = []

    def remaining(self) -> float | None:
        return self._remaining

    def on_end(self, hook: Callable[[], None]) -> Callable[[], None]:
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook) if hook in self._hooks else None

    def end(self) -> None:
        """The caller cancels, or the deadline passes."""
        for hook in list(self._hooks):
            hook()


def in_call(scope: Scope, work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Runs `work` on a thread, as part of the call `scope`; returns the thread and a list
    that receives the outcome (a value or the exception)."""
    outcome: list[Any] = []

    def run() -> None:
        deadlines.current_call.set(scope)
        try:
            outcome.append(work())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,))
    thread.start()
    return thread, outcome


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> Any:
    url = request.getfixturevalue(f"{request.param}_url")
    made = make_engine(url, pool_size=1)
    yield made
    made.dispose()


def test_no_wait_for_a_connection_past_the_callers_deadline(engine: Engine) -> None:
    pool: Any = engine.pool
    # Every connection the pool may make (its size and overflow) taken.
    held = [engine.connect() for _ in range(pool.size() + max(pool._max_overflow, 0))]
    try:
        thread, outcome = in_call(Scope(remaining=0.2), engine.connect)
        thread.join(GENEROUS)
        # It gave up while the connection was still taken: the configured wait (5 s) was
        # cut to what the caller had left, so it did not outlive its caller.
        assert not thread.is_alive()
        assert isinstance(outcome[0], PoolTimeout)
    finally:
        for connection in held:
            connection.close()


def test_outside_a_call_the_configured_wait_applies(engine: Engine) -> None:
    pool: Any = engine.pool
    assert pool._timeout == 5.0


SLOW = {
    "postgresql": "SELECT pg_sleep(60)",
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "LIMIT 5000000000) SELECT count(*) FROM c",
}


def test_the_statement_of_a_call_that_ended_is_cancelled_and_its_connection_returned(
    engine: Engine,
) -> None:
    scope = Scope(remaining=None)
    running = threading.Event()

    def work() -> Any:
        with engine.connect() as connection:
            running.set()
            return connection.execute(text(SLOW[engine.dialect.name])).scalar()

    thread, outcome = in_call(scope, work)
    assert running.wait(GENEROUS)
    pool: Any = engine.pool
    scope.end()  # whether the statement is on the server yet or about to be
    thread.join(GENEROUS)
    assert not thread.is_alive()
    assert isinstance(outcome[0], OperationalError | CallEnded)
    assert pool.checkedout() == 0
    with engine.connect() as connection:  # and the connection is good for the next call
        assert connection.execute(text("SELECT 1")).scalar() == 1


@pytest.mark.postgres
def test_a_call_past_its_deadline_releases_its_connection_while_the_lock_it_waits_for_is_held(
    tmp_path: Path, postgres_url: str
) -> None:
    # No server-side statement timeout: only the call ending can release the connection.
    env = {
        "AGENT_DATABASE_URL": postgres_url,
        "AGENT_DB_POOL_SIZE": "2",
        "AGENT_DB_STATEMENT_TIMEOUT_SECONDS": "0",
    }
    with auth_service(tmp_path) as auth:
        with grpc.insecure_channel(auth.address) as channel:
            token = register_and_login(channel, f"{uuid.uuid4().hex}@example.com").access_token
        with (
            agent_service(tmp_path, {**env, "AGENT_AUTH_TARGET": auth.address}) as agent,
            grpc.insecure_channel(agent.address) as channel,
        ):
            metadata = (("authorization", f"Bearer {token}"),)
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            created = stub.CreateAgent(
                agent_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name="locked", model="gpt-4o")),
                metadata=metadata,
                timeout=10,
            ).agent
            outside = make_engine(postgres_url, pool_size=1)
            locker = outside.connect()
            transaction = locker.begin()
            locker.execute(
                text("SELECT 1 FROM agent_agents WHERE id = :id FOR UPDATE"),
                {"id": uuid.UUID(created.id)},
            )
            try:
                update = agent_pb2.UpdateAgentRequest(
                    agent=agent_pb2.Agent(id=created.id, description="waits for the lock"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                )
                with pytest.raises(grpc.RpcError) as caught:
                    stub.UpdateAgent(update, metadata=metadata, timeout=1.0)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                pool: Any = agent.app.engine.pool
                waited = threading.Event()
                for _ in range(int(GENEROUS / 0.05)):
                    if pool.checkedout() == 0:
                        break
                    waited.wait(0.05)
                # Released while the row lock is still held: cancelled, not finished.
                assert pool.checkedout() == 0
            finally:
                transaction.rollback()
                locker.close()
                outside.dispose()
            # Nothing was written by the call that gave up.
            read = stub.GetAgent(agent_pb2.GetAgentRequest(id=created.id), metadata=metadata)
            assert read.agent.description == ""
