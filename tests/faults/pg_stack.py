"""auth_svc and agent_svc on a PostgreSQL under fault, the mixed load the PostgreSQL fault
tests run against them, and the checks of what the load saw.

The load: LOGIN_CLIENTS obedient clients of one account log in (the devices of one user:
each sleeps what RetryInfo says and sends again), a client reads its account, creates
agents with a request_id (obedient, the same request_id on every attempt), reads, lists
and updates agents (obedient, description "v<N>"). The checks: every failed call is
UNAVAILABLE with RetryInfo (`wrong`), and every acknowledged create and update is stored
with its content (`lost_writes`).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from tests.faults.load import Call, Load
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

__all__ = [
    "DB_METHODS",
    "WRITES",
    "PgStack",
    "lost_writes",
    "ok_after",
    "open_pg_stack",
    "start_load",
    "stored_agents",
    "wrong",
]

SEEDED = 4
LOGIN_CLIENTS = 4
# The calls of each service that need the database (GetAgent may be a cache hit).
DB_METHODS = {
    "auth": {"Login", "GetCurrentUser"},
    "agent": {"CreateAgent", "UpdateAgent", "ListAgents"},
}
WRITES = {"auth": {"Login"}, "agent": {"CreateAgent", "UpdateAgent"}}
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass
class PgStack:
    auth: auth_pb2_grpc.AuthServiceStub
    agents: agent_pb2_grpc.AgentServiceStub
    login_user: Caller
    owner: Caller
    seeded: list[str]


@contextlib.contextmanager
def open_pg_stack(
    fleet: Fleet, tmp_path: Path, auth_database_url: str, agent_database_url: str
) -> Iterator[PgStack]:
    """auth_svc and agent_svc on these databases (configured by environment alone), an
    owner with SEEDED agents ("v0"), and a second account for the logins."""
    auth = fleet.start("auth_svc", auth_env(free_port(), tmp_path / "auth", auth_database_url))
    auth.wait_serving(AUTH_SERVICE, timeout=60)  # then agent_svc finds the keys at once
    agent = fleet.start(
        "agent_svc",
        agent_env(free_port(), tmp_path / "agent", auth.address, agent_database_url),
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
    """The mixed load on both services. Payloads: CreateAgent (id, name, description),
    UpdateAgent (id, version N, etag)."""
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
            lambda reply: (agent_id, n, reply.agent.etag),
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


def wrong(call: Call) -> bool:
    """Failed otherwise than UNAVAILABLE + RetryInfo."""
    return not call.ok and not (call.code == UNAVAILABLE and call.has_retry_info)


def ok_after(calls: list[Call], methods: set[str], moment: float) -> list[Call]:
    return [c for c in calls if c.ok and c.method in methods and c.ended >= moment]


def stored_agents(stack: PgStack) -> dict[str, agent_pb2.Agent]:
    """Every agent of the owner, read through agent_svc (ListAgents pages)."""
    stored = {}
    token = ""
    while True:
        page = stack.agents.ListAgents(
            agent_pb2.ListAgentsRequest(page_size=1000, page_token=token),
            metadata=stack.owner.metadata,
            timeout=30,
        )
        stored.update({a.id: a for a in page.agents})
        token = page.next_page_token
        if not token:
            return stored


def lost_writes(stack: PgStack, calls: list[Call], stored: dict[str, agent_pb2.Agent]) -> list[str]:
    """The acknowledged writes `stored` does not hold: a create missing or with other
    content; an update superseded by nothing later yet not stored (the stored version is
    older than the newest acknowledged one, or is that one with another etag). A later
    version than the newest acknowledged one may be stored: a write whose answer was lost
    in the switch may have committed (the caller saw UNAVAILABLE)."""
    lost = []
    for agent_id, name, description in (
        c.payload for c in calls if c.ok and c.method == "CreateAgent"
    ):
        agent = stored.get(agent_id)
        if agent is None or (agent.name, agent.description) != (name, description):
            lost.append(f"create {agent_id} {name!r}: stored {agent and agent.description!r}")
    for agent_id in stack.seeded:
        acknowledged = [
            c.payload
            for c in calls
            if c.ok and c.method == "UpdateAgent" and c.payload[0] == agent_id
        ]
        if not acknowledged:
            continue
        _, newest, etag = max(acknowledged, key=lambda payload: payload[1])
        agent = stored[agent_id]
        final = int(agent.description.removeprefix("v"))
        if final < newest or (final == newest and agent.etag != etag):
            lost.append(
                f"update {agent_id}: v{newest} (etag {etag}) acknowledged,"
                f" v{final} (etag {agent.etag}) stored"
            )
    return lost
