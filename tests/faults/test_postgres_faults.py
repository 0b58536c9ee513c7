"""PostgreSQL stopped for seconds, and restarted at once, under mixed load on both services.

auth_svc and agent_svc run on the private cluster (pools of 4, no Redis) while clients log
in (LOGIN_CLIENTS obedient clients of one account, say the devices of one user: each sleeps
what RetryInfo says and sends again), read their account,
create agents with a request_id (obedient, same request_id on every attempt), read, list
and update agents (obedient, description "v<N>"). Then the database goes away. What a
caller may see, and what must hold afterwards:

- every failed call is UNAVAILABLE with RetryInfo: never INTERNAL, UNKNOWN, or
  DEADLINE_EXCEEDED for a call with a 5 s deadline;
- each service answers a database call successfully within 2 s of the database accepting
  connections again (measured from the first successful connect of the test itself);
- every create and update that was acknowledged is there afterwards with its content;
- no account is locked by the outage: the obedient login succeeds right after, and a
  fresh login with the right password succeeds (RESOURCE_EXHAUSTED / LOGIN_LOCKED would be
  the defect of counting attempts that never reached the password check).
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from tests.faults.load import Call, Load, summarize
from tests.faults.servers import PostgresCluster
from tests.faults.services import (
    AGENT_SERVICE,
    AUTH_SERVICE,
    CALL_TIMEOUT,
    PASSWORD,
    Caller,
    Fleet,
    agent_env,
    auth_env,
    create_agent,
    describe,
    register_and_login,
)
from tests.helpers import free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.postgres]

SEEDED = 4
LOGIN_CLIENTS = 4
OUTAGE_SECONDS = 3.0
RECOVERY_LIMIT = 2.0  # seconds from "PostgreSQL accepts connections" to a successful call
DB_METHODS = {
    "auth": {"Login", "GetCurrentUser"},
    "agent": {"CreateAgent", "UpdateAgent", "ListAgents"},
}
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass
class PgStack:
    auth: auth_pb2_grpc.AuthServiceStub
    agents: agent_pb2_grpc.AgentServiceStub
    login_user: Caller
    owner: Caller
    seeded: list[str]


@pytest.fixture
def pg_stack(pg: PostgresCluster, fleet: Fleet, tmp_path: Path) -> Iterator[PgStack]:
    auth = fleet.start("auth_svc", auth_env(free_port(), tmp_path / "auth", pg.create_database()))
    auth.wait_serving(AUTH_SERVICE, timeout=60)  # then agent_svc finds the keys at once
    agent = fleet.start(
        "agent_svc",
        agent_env(free_port(), tmp_path / "agent", auth.address, pg.create_database()),
    )
    agent.wait_serving(AGENT_SERVICE, timeout=60)
    with (
        grpc.insecure_channel(auth.address) as auth_channel,
        grpc.insecure_channel(agent.address) as agent_channel,
    ):
        auth_stub = auth_pb2_grpc.AuthServiceStub(auth_channel)
        agents = agent_pb2_grpc.AgentServiceStub(agent_channel)
        owner = register_and_login(auth_stub)
        seeded = [
            create_agent(agents, owner, f"pg-seed-{i}", description="v0").id for i in range(SEEDED)
        ]
        yield PgStack(auth_stub, agents, register_and_login(auth_stub), owner, seeded)


def start_load(stack: PgStack) -> Load:
    load = Load()
    owner = stack.owner.metadata
    timeout = CALL_TIMEOUT

    def log_in() -> None:
        request = auth_pb2.LoginRequest(email=stack.login_user.email, password=PASSWORD)
        load.obedient("Login", "auth", lambda: stack.auth.Login(request, timeout=timeout))
        load.pause(0.2)  # argon2id: a login a few times a second is load enough

    creates = itertools.count()

    def create() -> None:
        n = next(creates)
        request = agent_pb2.CreateAgentRequest(
            agent=agent_pb2.Agent(name=f"pg-new-{n}", model="gpt-4o", description=f"made {n}"),
            request_id=str(uuid.uuid4()),  # the same on every retry: one agent at most
        )
        load.obedient(
            "CreateAgent",
            "agent",
            lambda: stack.agents.CreateAgent(request, metadata=owner, timeout=timeout),
            lambda reply: (reply.agent.id, reply.agent.name, reply.agent.description),
        )
        load.pause(0.02)

    versions = itertools.count(1)

    def update() -> None:
        n = next(versions)
        agent_id = stack.seeded[n % SEEDED]
        load.obedient(
            "UpdateAgent",
            "agent",
            lambda: stack.agents.UpdateAgent(
                describe(agent_id, f"v{n}"), metadata=owner, timeout=timeout
            ),
            lambda _reply: (agent_id, n),
        )
        load.pause(0.02)

    for i in range(LOGIN_CLIENTS):
        load.worker(f"login-{i}", log_in)
    load.worker("create", create)
    load.worker("update", update)
    auth, agents = stack.auth, stack.agents
    load.steady(
        "whoami",
        "GetCurrentUser",
        "auth",
        lambda: auth.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=owner, timeout=timeout
        ),
        pause=0.02,
    )
    load.steady(
        "get",
        "GetAgent",
        "agent",
        lambda: agents.GetAgent(
            agent_pb2.GetAgentRequest(id=random.choice(stack.seeded)),
            metadata=owner,
            timeout=timeout,
        ),
        pause=0.01,
    )
    load.steady(
        "list",
        "ListAgents",
        "agent",
        lambda: agents.ListAgents(
            agent_pb2.ListAgentsRequest(page_size=50), metadata=owner, timeout=timeout
        ),
        pause=0.02,
    )
    return load


def _wrong(call: Call) -> bool:
    """Failed otherwise than UNAVAILABLE + RetryInfo."""
    return not call.ok and not (call.code == UNAVAILABLE and call.has_retry_info)


def _ok_after(calls: list[Call], methods: set[str], moment: float) -> list[Call]:
    return [c for c in calls if c.ok and c.method in methods and c.ended >= moment]


def stop_for_seconds(pg: PostgresCluster, load: Load) -> None:
    pg.stop("fast")
    load.keep_going(OUTAGE_SECONDS)
    pg.start()


def restart_immediately(pg: PostgresCluster, load: Load) -> None:
    pg.stop("immediate")
    pg.start()


OUTAGES: dict[str, Callable[[PostgresCluster, Load], None]] = {
    "stop-fast-3s": stop_for_seconds,
    "restart-immediate": restart_immediately,
}


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_database_outage_costs_only_retryable_calls_and_no_acknowledged_write(
    pg: PostgresCluster,
    pg_stack: PgStack,
    outage: str,
    record_property: Callable[[str, object], None],
) -> None:
    all_methods = set().union(*DB_METHODS.values()) | {"GetAgent"}
    with start_load(pg_stack) as load:
        load.wait_for(
            lambda calls: all(
                sum(1 for c in calls if c.ok and c.method == m) >= 3 for m in all_methods
            ),
            timeout=60,
            what="every kind of call to succeed before the outage",
        )
        down = time.monotonic()
        OUTAGES[outage](pg, load)
        up = pg.wait_accepting()
        load.wait_for(
            lambda calls: (
                all(_ok_after(calls, {m}, up) for m in all_methods) or any(_wrong(c) for c in calls)
            ),  # reported below
            timeout=60,
            what="every kind of call to succeed after the outage",
        )
        load.stop()
    calls = load.calls
    during = [c for c in calls if down <= c.started <= up]
    record_property("calls", summarize(calls))
    record_property("calls_during_outage", summarize(during))
    assert during, "no call was made during the outage"

    wrong = [c for c in calls if _wrong(c)]
    assert not wrong, (
        f"{len(wrong)} calls failed otherwise than UNAVAILABLE + RetryInfo"
        f" ({summarize(wrong)}); first: " + "; ".join(str(c) for c in wrong[:5])
    )

    for service, methods in DB_METHODS.items():
        first = min(c.ended for c in _ok_after(calls, methods, up))
        record_property(f"{service}_first_success_after_db_up_s", round(first - up, 3))
        assert first - up <= RECOVERY_LIMIT, (
            f"{service}: first successful database call {first - up:.2f}s after PostgreSQL"
            f" accepted connections again; calls in between: "
            + summarize(c for c in calls if up <= c.started <= first)
        )

    # Every acknowledged create is there with its content; every acknowledged update is
    # there or was superseded by a later one of the same writer.
    stored = {}
    token = ""
    while True:
        page = pg_stack.agents.ListAgents(
            agent_pb2.ListAgentsRequest(page_size=1000, page_token=token),
            metadata=pg_stack.owner.metadata,
            timeout=30,
        )
        stored.update({a.id: a for a in page.agents})
        token = page.next_page_token
        if not token:
            break
    created = [c.payload for c in calls if c.ok and c.method == "CreateAgent"]
    lost = [
        (agent_id, name)
        for agent_id, name, description in created
        if agent_id not in stored
        or (stored[agent_id].name, stored[agent_id].description) != (name, description)
    ]
    assert not lost, f"{len(lost)} of {len(created)} acknowledged creates are missing: {lost}"
    for agent_id in pg_stack.seeded:
        acknowledged = [
            c.payload[1]
            for c in calls
            if c.ok and c.method == "UpdateAgent" and c.payload[0] == agent_id
        ]
        final = int(stored[agent_id].description.removeprefix("v"))
        assert final >= max(acknowledged, default=0), (
            f"agent {agent_id}: v{max(acknowledged)} was acknowledged, v{final} is stored"
        )

    # No account locked by the outage.
    locked = [c for c in calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert not locked, f"the outage locked an account: {locked[:3]}"
    assert _ok_after(calls, {"Login"}, up), "the obedient login never succeeded after the outage"
    fresh = pg_stack.auth.Login(
        auth_pb2.LoginRequest(email=pg_stack.login_user.email, password=PASSWORD), timeout=30
    )
    assert fresh.access_token


def test_a_frozen_database_holds_no_thread_past_its_call(
    pg: PostgresCluster, fleet: Fleet, tmp_path: Path
) -> None:
    """PostgreSQL frozen (SIGSTOP: connections open, nothing answers, cancels neither):
    calls past their deadline must give their worker threads back, so calls that need no
    database (GetJwks, which every verifier depends on) are still answered while it is
    frozen. Before: the threads waited for the server to come back, and GetJwks with them."""
    auth = fleet.start(
        "auth_svc",
        auth_env(free_port(), tmp_path / "auth", pg.create_database(), MAX_WORKERS="4"),
    )
    auth.wait_serving(AUTH_SERVICE, timeout=60)
    with grpc.insecure_channel(auth.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        caller = register_and_login(stub)

        def current_users(timeout: float) -> list[Any]:
            return [
                stub.GetCurrentUser.future(
                    auth_pb2.GetCurrentUserRequest(), metadata=caller.metadata, timeout=timeout
                )
                for _ in range(8)
            ]

        # Every worker thread has its pooled connection (used just now: no idle ping), so
        # the calls below block in statements on the frozen server, not in connecting.
        assert all(f.result() for f in current_users(30.0))
        pg.freeze()
        try:
            # Twice as many database-bound calls as worker threads, 1 s deadline each.
            futures = current_users(1.0)
            codes = {f.exception().code() for f in futures if f.exception() is not None}
            assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
            assert codes, "a call succeeded against a frozen database"
            started = time.monotonic()
            reply = stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=20.0)
            waited = time.monotonic() - started
            assert reply.keys
            assert pg.postmaster_pid() is not None  # still frozen: answered without it
        finally:
            pg.thaw()
    print(f"\nGetJwks answered {waited:.1f}s after the stuck calls' deadlines, PostgreSQL frozen")
