"""agent_svc and auth_svc as real processes, over real channels, through the generated stubs.

Most tests run on both backends, each a pair of processes started once for the module:

- `embedded`: the dev defaults (SQLite files, no Redis, L1 only);
- `postgres_redis`: PostgreSQL (a fresh database for auth and another for agent: the two
  services never share tables) and Redis (the database of TEST_REDIS_URL, the session's
  own, which no test of this module flushes; skipped without them, failing with CI=true).

Tests that need a backend of their own start extra processes: Redis cut off mid-test behind
a TCP proxy, a second agent replica sharing PostgreSQL + Redis, and agent_svc started while
auth_svc is down. The admin is created the way an operator does it, with
`python -m services.auth_svc.cli --email admin@example.com` (password in AUTH_ADMIN_PASSWORD).

The grpcurl session (`test_an_operator_session_through_grpcurl`) runs these commands, with
the test's ports in place of the default ones (auth 50051, agent 50052), and `$TOKEN`, `$ID`,
`$ETAG` standing for values read from earlier replies::

    grpcurl -plaintext -d '{"email": "ada@example.com", "password": "correct horse battery"}' \\
        127.0.0.1:50051 agentplatform.auth.v1.AuthService/Register
    TOKEN=$(grpcurl -plaintext \\
        -d '{"email": "ada@example.com", "password": "correct horse battery"}' \\
        127.0.0.1:50051 agentplatform.auth.v1.AuthService/Login | jq -r .access_token)
    grpcurl -plaintext 127.0.0.1:50052 list
    grpcurl -plaintext -H "authorization: Bearer $TOKEN" \\
        -d '{"agent": {"name": "support-bot", "model": "gpt-4o",
             "description": "Answers support tickets", "metadata": {"team": "search"},
             "temperature": 0.2,
             "tools": [{"name": "search_kb", "description": "Search the knowledge base",
                        "parameters": {"type": "object",
                                       "properties": {"query": {"type": "string"}}}}]},
             "request_id": "7b0c4c1e-2f7c-4a55-9d55-1f6f1d0f3a10"}' \\
        127.0.0.1:50052 agentplatform.agent.v1.AgentService/CreateAgent
    grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"id": "'$ID'"}' \\
        127.0.0.1:50052 agentplatform.agent.v1.AgentService/GetAgent
    grpcurl -plaintext -H "authorization: Bearer $TOKEN" \\
        -d '{"filter": "model = \\"gpt-4o\\" AND name = \\"sup*\\"", "order_by": "name asc",
             "page_size": 10}' \\
        127.0.0.1:50052 agentplatform.agent.v1.AgentService/ListAgents
    grpcurl -plaintext -H "authorization: Bearer $TOKEN" \\
        -d '{"agent": {"id": "'$ID'", "description": "Answers tickets in English and French",
             "etag": "'$ETAG'"}, "update_mask": {"paths": ["description"]}}' \\
        127.0.0.1:50052 agentplatform.agent.v1.AgentService/UpdateAgent
    grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"id": "'$ID'", "etag": "'$ETAG'"}' \\
        127.0.0.1:50052 agentplatform.agent.v1.AgentService/DeleteAgent
    grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"id": "not-a-uuid"}' \\
        127.0.0.1:50052 agentplatform.agent.v1.AgentService/GetAgent; echo $?   # 67 = 64 + 3

(grpcurl 1.8.6 prints proto field names, int64 values as strings, takes the FieldMask only as
`{"paths": [...]}` and exits with 64 + the status code on an RPC error.)
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import jwt
import pytest
import redis
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.agent_svc import SERVICE_NAME as AGENT_SERVICE
from services.agent_svc.infra.codec import AgentCodec
from services.auth_svc import SERVICE_NAME as AUTH_SERVICE
from tests.conftest import GENEROUS_RATE_LIMITS
from tests.helpers import ROOT, STARTUP_DEADLINE, ServiceProcess, error_detail
from tests.tcp_proxy import TcpProxy

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "the e2e admin's password"
USER_PASSWORD = "an e2e user's password"
# Shared by every agent process of the module: replicas accept each other's page tokens.
PAGE_TOKEN_SECRET = "e2e-page-token-secret-0123456789abcdef"
ISSUER, AUDIENCE = "agentplatform-auth", "agentplatform"
TIMEOUT = 30.0  # per call, generous: a 2-core machine shared with other test runs
L1_TTL_SECONDS = 30  # long enough that convergence within seconds is the invalidation's doing
# How long R2 may take to drop its copy: generous for a loaded machine, and still a third
# of the L1 TTL, so a copy that goes away in time was dropped by the invalidation.
INVALIDATION_DEADLINE = L1_TTL_SECONDS / 3

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
ABORTED = grpc.StatusCode.ABORTED
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# -- callers and calls ------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    user_id: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def register_and_login(
    stub: auth_pb2_grpc.AuthServiceStub, email: str | None = None, password: str = USER_PASSWORD
) -> Caller:
    email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
    stub.Register(auth_pb2.RegisterRequest(email=email, password=password), timeout=TIMEOUT)
    return login(stub, email, password)


def login(stub: auth_pb2_grpc.AuthServiceStub, email: str, password: str) -> Caller:
    reply = stub.Login(auth_pb2.LoginRequest(email=email, password=password), timeout=TIMEOUT)
    return Caller(reply.user.id, reply.access_token)


def new_agent(name: str, **fields: Any) -> agent_pb2.Agent:
    return agent_pb2.Agent(name=name, model=fields.pop("model", "gpt-4o"), **fields)


def create(
    stub: agent_pb2_grpc.AgentServiceStub,
    caller: Caller,
    name: str,
    *,
    request_id: str = "",
    timeout: float = TIMEOUT,
    **fields: Any,
) -> agent_pb2.Agent:
    reply = stub.CreateAgent(
        agent_pb2.CreateAgentRequest(agent=new_agent(name, **fields), request_id=request_id),
        metadata=caller.metadata,
        timeout=timeout,
    )
    result: agent_pb2.Agent = reply.agent
    return result


def get(
    stub: agent_pb2_grpc.AgentServiceStub,
    caller: Caller,
    agent_id: str,
    *,
    timeout: float = TIMEOUT,
) -> agent_pb2.Agent:
    reply = stub.GetAgent(
        agent_pb2.GetAgentRequest(id=agent_id), metadata=caller.metadata, timeout=timeout
    )
    result: agent_pb2.Agent = reply.agent
    return result


def update(
    stub: agent_pb2_grpc.AgentServiceStub,
    caller: Caller,
    agent: agent_pb2.Agent,
    paths: Sequence[str],
    *,
    timeout: float = TIMEOUT,
) -> agent_pb2.Agent:
    reply = stub.UpdateAgent(
        agent_pb2.UpdateAgentRequest(
            agent=agent, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        ),
        metadata=caller.metadata,
        timeout=timeout,
    )
    result: agent_pb2.Agent = reply.agent
    return result


def delete(
    stub: agent_pb2_grpc.AgentServiceStub,
    caller: Caller,
    agent_id: str,
    etag: str = "",
    *,
    timeout: float = TIMEOUT,
) -> agent_pb2.Agent:
    """Soft-deletes (AIP-164); the agent as deleted."""
    reply = stub.DeleteAgent(
        agent_pb2.DeleteAgentRequest(id=agent_id, etag=etag),
        metadata=caller.metadata,
        timeout=timeout,
    )
    result: agent_pb2.Agent = reply.agent
    return result


def list_page(
    stub: agent_pb2_grpc.AgentServiceStub,
    caller: Caller,
    *,
    timeout: float = TIMEOUT,
    **request: Any,
) -> agent_pb2.ListAgentsResponse:
    reply: agent_pb2.ListAgentsResponse = stub.ListAgents(
        agent_pb2.ListAgentsRequest(**request), metadata=caller.metadata, timeout=timeout
    )
    return reply


def list_all(
    stub: agent_pb2_grpc.AgentServiceStub,
    caller: Caller,
    filter: str = "",  # the request field's name
    order_by: str = "",
) -> list[agent_pb2.Agent]:
    agents: list[agent_pb2.Agent] = []
    token = ""
    while True:
        page = list_page(
            stub, caller, page_size=1000, page_token=token, filter=filter, order_by=order_by
        )
        agents.extend(page.agents)
        token = page.next_page_token
        if not token:
            return agents


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    return excinfo.value


def status_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """OK, or the status code the call failed with."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return OK


def reason_of(error: grpc.RpcError) -> str:
    info = error_detail(rpc_status.from_call(error), error_details_pb2.ErrorInfo)
    return str(info.reason) if info is not None else ""


def violated_fields(error: grpc.RpcError) -> set[str]:
    bad_request = error_detail(rpc_status.from_call(error), error_details_pb2.BadRequest)
    assert bad_request is not None, f"no BadRequest in {error.code()}: {error.details()}"
    return {v.field for v in bad_request.field_violations}


def not_found_shape(error: grpc.RpcError, agent_id: str) -> tuple[Any, str, str]:
    """What a caller can tell from a NOT_FOUND (the id they sent masked out)."""
    return error.code(), reason_of(error), str(error.details()).replace(agent_id, "<id>")


def json_log(process: ServiceProcess) -> list[dict[str, Any]]:
    entries = []
    for line in process.log().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


# -- processes --------------------------------------------------------------------------


def _clean_environment() -> dict[str, str]:
    """The test's own environment without AUTH_*/AGENT_* settings a developer may have set."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "AGENT_"))}


def auth_env(
    port: int, data_dir: Path, database_url: str = "", redis_url: str = ""
) -> dict[str, str]:
    return {
        "AUTH_PORT": str(port),
        "AUTH_METRICS_PORT": "0",
        "AUTH_DATA_DIR": str(data_dir),
        "AUTH_DATABASE_URL": database_url,  # "" = unset: SQLite under the data dir
        "AUTH_REDIS_URL": redis_url,
        "AUTH_LOG_FORMAT": "json",
        "AUTH_GRACE_SECONDS": "2",
        "AUTH_RATE_LIMITS": GENEROUS_RATE_LIMITS,  # every caller here is 127.0.0.1
    }


def agent_env(
    port: int,
    data_dir: Path,
    auth_address: str,
    database_url: str = "",
    redis_url: str = "",
    **extra: str,
) -> dict[str, str]:
    return {
        "AGENT_PORT": str(port),
        "AGENT_METRICS_PORT": "0",
        "AGENT_WATCH_PORT": str(free_ports(1)[0]),  # known: the WatchAgents tests use it
        "AGENT_DATA_DIR": str(data_dir),
        "AGENT_DATABASE_URL": database_url,
        "AGENT_REDIS_URL": redis_url,
        "AGENT_AUTH_TARGET": auth_address,
        "AGENT_LOG_FORMAT": "json",
        "AGENT_GRACE_SECONDS": "2",
        "AGENT_L1_TTL_SECONDS": str(L1_TTL_SECONDS),
        "AGENT_PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,
        **extra,
    }


def start(name: str, env: dict[str, str], port: int, log_dir: Path) -> ServiceProcess:
    """Starts `python -m services.<name>` (no waiting: start several, then wait for each)."""
    clean = {k: "" for k in os.environ if k.startswith(("AUTH_", "AGENT_"))}
    return ServiceProcess(name, {**clean, **env}, port, log_dir / f"{name}-{port}.log")


def wait_agent_ready(process: ServiceProcess, redis_url: str) -> None:
    """SERVING, and with Redis its cache listening for invalidations: until it has
    subscribed, another replica's writes do not reach its L1, and the subscription itself
    clears L1 and refuses the fills in progress."""
    process.wait_serving(AGENT_SERVICE)
    if redis_url:
        process.wait_logged("cache invalidation listener subscribed")


def create_admin(env: dict[str, str]) -> None:
    """The operator's command, run against the auth database (its schema already exists)."""
    done = subprocess.run(
        [sys.executable, "-m", "services.auth_svc.cli", "--email", ADMIN_EMAIL],
        env={**_clean_environment(), **env, "AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=STARTUP_DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ADMIN_PASSWORD not in done.stdout + done.stderr


@dataclass
class Stack:
    """auth_svc + agent_svc on one backend, with an admin account and stubs for both.
    Shared by the tests of a module: each test makes its own users and agents and assumes
    nothing about what the others did."""

    backend: str
    auth: ServiceProcess
    agent: ServiceProcess
    auth_stub: auth_pb2_grpc.AuthServiceStub
    agents: agent_pb2_grpc.AgentServiceStub
    watch_agents: agent_pb2_grpc.AgentServiceStub
    """A stub on the WatchAgents port (AGENT_WATCH_PORT, grpc.aio)."""
    agent_database_url: str = ""
    redis_url: str = ""
    channels: list[grpc.Channel] = field(default_factory=list)

    def new_user(self) -> Caller:
        return register_and_login(self.auth_stub)

    def admin(self) -> Caller:
        """The stack's admin, with a token of its own (fresh however long the module ran)."""
        return login(self.auth_stub, ADMIN_EMAIL, ADMIN_PASSWORD)


def free_ports(count: int) -> list[int]:
    """Distinct free ports (the sockets are held together, so no port comes back twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_stack(
    backend: str,
    log_dir: Path,
    *,
    auth_database_url: str = "",
    agent_database_url: str = "",
    redis_url: str = "",
    agent_settings: dict[str, str] | None = None,
) -> Iterator[Stack]:
    auth_port, agent_port = free_ports(2)
    env = auth_env(auth_port, log_dir / "auth-data", auth_database_url, redis_url)
    auth = start("auth_svc", env, auth_port, log_dir)
    agent = start(
        "agent_svc",
        agent_env(
            agent_port,
            log_dir / "agent-data",
            auth.address,
            agent_database_url,
            redis_url,
            **(agent_settings or {}),
        ),
        agent_port,
        log_dir,
    )
    channels: list[grpc.Channel] = []
    try:
        auth.wait_serving(AUTH_SERVICE)
        wait_agent_ready(agent, redis_url)
        channels += [
            grpc.insecure_channel(auth.address),
            grpc.insecure_channel(agent.address),
            grpc.insecure_channel(agent.watch_address),
        ]
        auth_stub = auth_pb2_grpc.AuthServiceStub(channels[0])
        create_admin(env)
        yield Stack(
            backend=backend,
            auth=auth,
            agent=agent,
            auth_stub=auth_stub,
            agents=agent_pb2_grpc.AgentServiceStub(channels[1]),
            watch_agents=agent_pb2_grpc.AgentServiceStub(channels[2]),
            agent_database_url=agent_database_url,
            redis_url=redis_url,
            channels=channels,
        )
    finally:
        for channel in channels:
            channel.close()
        agent.stop()
        auth.stop()


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from run_stack("embedded", tmp_path_factory.mktemp("agent-e2e-embedded"))


@pytest.fixture(scope="module")
def pg_stack(
    tmp_path_factory: pytest.TempPathFactory,
    new_postgres_database: Callable[[], str],
    redis_server_url: str,
) -> Iterator[Stack]:
    """Redis is the session's own database (TEST_REDIS_URL): a session beside this one
    uses another, so nothing flushes it under these processes; keys are per-agent UUIDs
    with TTLs and need no cleanup (the `redis_url` fixture of a later test empties it)."""
    yield from run_stack(
        "postgres_redis",
        tmp_path_factory.mktemp("agent-e2e-postgres"),
        auth_database_url=new_postgres_database(),
        agent_database_url=new_postgres_database(),  # never the auth database
        redis_url=redis_server_url,
    )


@pytest.fixture(scope="module", params=["embedded", "postgres_redis"])
def stack(request: pytest.FixtureRequest) -> Stack:
    name = "embedded_stack" if request.param == "embedded" else "pg_stack"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


# -- 1. ownership -----------------------------------------------------------------------


def test_another_users_agent_is_not_found_exactly_like_a_missing_one(stack: Stack) -> None:
    stub, a, b = stack.agents, stack.new_user(), stack.new_user()
    mine = create(stub, a, "iso-a-1", description="A's")
    create(stub, a, "iso-a-2")
    theirs = create(stub, b, "iso-b-1")
    missing_id = str(uuid.uuid4())

    def attempts(agent_id: str, etag: str) -> list[Callable[[], Any]]:
        hijack = agent_pb2.Agent(id=agent_id, description="hijacked", etag=etag)
        return [
            lambda: get(stub, b, agent_id),
            lambda: update(stub, b, hijack, ["description"]),
            lambda: update(stub, b, agent_pb2.Agent(id=agent_id, description="hijacked"), []),
            lambda: delete(stub, b, agent_id, etag),
            lambda: delete(stub, b, agent_id),
        ]

    for on_a, on_missing in zip(
        attempts(mine.id, mine.etag), attempts(missing_id, mine.etag), strict=True
    ):
        error, missing = rpc_error(on_a), rpc_error(on_missing)
        assert error.code() == NOT_FOUND
        assert not_found_shape(error, mine.id) == not_found_shape(missing, missing_id)

    assert get(stub, a, mine.id) == mine  # untouched by B's attempts
    assert [x.id for x in list_all(stub, b)] == [theirs.id]
    assert list_all(stub, b, filter='name = "iso-a*"') == []
    assert {x.name for x in list_all(stub, a)} == {"iso-a-1", "iso-a-2"}

    # owner_id is an admin's filter: a user naming any owner (even themselves) is refused.
    for owner in (a.user_id, b.user_id):
        error = rpc_error(lambda: list_page(stub, b, filter=f'owner_id = "{owner}"'))  # noqa: B023
        assert (error.code(), reason_of(error)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "OWNER_FILTER_NOT_ALLOWED",
        )


def test_an_admin_reads_and_lists_every_owners_agents_and_filters_by_owner(stack: Stack) -> None:
    admin = stack.admin()
    stub, a, b = stack.agents, stack.new_user(), stack.new_user()
    a_ids = {create(stub, a, f"adm-a-{i}").id for i in range(3)}
    b_agent = create(stub, b, "adm-b-0", model="o3")

    for agent_id in a_ids:
        assert get(stub, admin, agent_id).owner_id == a.user_id
    assert get(stub, admin, b_agent.id) == b_agent

    owned_by_a = list_all(stub, admin, filter=f'owner_id = "{a.user_id}"')
    assert {x.id for x in owned_by_a} == a_ids
    assert {x.owner_id for x in owned_by_a} == {a.user_id}
    narrowed = list_all(stub, admin, filter=f'owner_id = "{b.user_id}" AND model = "o3"')
    assert [x.id for x in narrowed] == [b_agent.id]
    everyone = {x.id for x in list_all(stub, admin)}
    assert a_ids | {b_agent.id} <= everyone


def test_the_cache_never_hands_one_owners_agent_to_another(stack: Stack) -> None:
    stub, a, b = stack.agents, stack.new_user(), stack.new_user()
    agent = create(stub, a, "cached")
    for _ in range(3):  # the first read fills L1 (and L2), the next ones are hits
        assert get(stub, a, agent.id) == agent
    if stack.redis_url:
        client = redis.Redis.from_url(stack.redis_url)
        try:
            assert client.exists(f"agent:{agent.id}"), "the read did not fill L2"
        finally:
            client.close()
    for _ in range(3):
        error = rpc_error(lambda: get(stub, b, agent.id))
        assert error.code() == NOT_FOUND
    assert get(stub, a, agent.id) == agent
    assert get(stub, stack.admin(), agent.id) == agent


# -- 2. paging --------------------------------------------------------------------------


def _page_through(
    stack: Stack, caller: Caller, order_by: str, insert: Callable[[], None]
) -> tuple[list[agent_pb2.Agent], int]:
    """Every page of the caller's agents (25 a page); `insert()` runs on another thread
    between each page fetch and the next. Returns the agents and the number of pages."""
    fetched, inserted = threading.Event(), threading.Event()
    done = threading.Event()
    failures: list[BaseException] = []

    def inserter() -> None:
        while True:
            fetched.wait()
            fetched.clear()
            if done.is_set():
                return
            try:
                insert()
            except BaseException as exc:  # surfaced by the main thread
                failures.append(exc)
            inserted.set()

    thread = threading.Thread(target=inserter, daemon=True)
    thread.start()
    seen: list[agent_pb2.Agent] = []
    pages, token = 0, ""
    try:
        while True:
            page = list_page(
                stack.agents, caller, page_size=25, page_token=token, order_by=order_by
            )
            pages += 1
            assert len(page.agents) <= 25
            seen.extend(page.agents)
            token = page.next_page_token
            if not token:
                break
            inserted.clear()
            fetched.set()
            assert inserted.wait(TIMEOUT), "the inserter thread is stuck"
            assert not failures, failures
    finally:
        done.set()
        fetched.set()
        thread.join(TIMEOUT)
    return seen, pages


def test_keyset_paging_under_concurrent_inserts_returns_every_existing_agent_once(
    stack: Stack,
) -> None:
    caller = stack.new_user()
    with ThreadPoolExecutor(max_workers=8) as pool:
        seeded = {
            a.id: a
            for a in pool.map(lambda i: create(stack.agents, caller, f"page-{i:03d}"), range(120))
        }
    counter = iter(range(10_000))
    late_names: set[str] = set()

    def insert() -> None:
        n = next(counter)
        # One name sorts among the seeded ones, one before all, one after all of them.
        for name in (f"page-{(n * 37) % 120:03d}-new-{n}", f"aaa-new-{n}", f"zzz-new-{n}"):
            create(stack.agents, caller, name)
        late_names.add(f"zzz-new-{n}")

    for order_by in ("create_time desc", "name asc"):
        seen, pages = _page_through(stack, caller, order_by, insert)
        ids = [a.id for a in seen]
        duplicates = [i for i, n in collections.Counter(ids).items() if n > 1]
        assert duplicates == [], f"{order_by}: duplicated across pages"
        missing = set(seeded) - set(ids)
        assert missing == set(), f"{order_by}: {len(missing)} seeded agents skipped"
        assert pages >= 5
        if order_by == "name asc":
            names = [a.name for a in seen]
            assert names == sorted(names)
            # Inserted after every cursor position, so keyset paging must reach them.
            assert late_names <= set(names)
        else:
            times = [a.create_time.ToDatetime() for a in seen]
            assert times == sorted(times, reverse=True)


def _tampered(token: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[len(raw) // 3] ^= 0x01  # one bit of the payload (the cursor), not of the MAC
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_page_tokens_are_tamper_evident_and_bound_to_query_and_caller(stack: Stack) -> None:
    stub, a, b = stack.agents, stack.new_user(), stack.new_user()
    for name in ("tok-1", "tok-2", "tok-3"):
        create(stub, a, name, metadata={"team": "tokens"})
        create(stub, b, name, metadata={"team": "tokens"})
    query: dict[str, Any] = {
        "page_size": 1,
        "order_by": "name asc",
        "filter": 'metadata.team = "tokens"',
    }
    first = list_page(stub, a, **query)
    assert [x.name for x in first.agents] == ["tok-1"]
    token = first.next_page_token
    assert token

    # The same query may use the token again (the second page, both times).
    for _ in range(2):
        again = list_page(stub, a, page_token=token, **query)
        assert [x.name for x in again.agents] == ["tok-2"]

    refused: list[tuple[str, Caller, dict[str, Any]]] = [
        ("tampered", a, {**query, "page_token": _tampered(token)}),
        ("garbage", a, {**query, "page_token": "not-a-page-token"}),
        ("truncated", a, {**query, "page_token": token[:-4]}),
        ("other filter", a, {**query, "page_token": token, "filter": 'model = "gpt-4o"'}),
        ("no filter", a, {**query, "page_token": token, "filter": ""}),
        ("other order", a, {**query, "page_token": token, "order_by": "name desc"}),
        ("other field", a, {**query, "page_token": token, "order_by": "create_time asc"}),
        ("other caller", b, {**query, "page_token": token}),
        ("an admin", stack.admin(), {**query, "page_token": token}),
    ]
    for case, caller, request in refused:
        error = rpc_error(lambda: list_page(stub, caller, **request))  # noqa: B023
        assert error.code() == INVALID_ARGUMENT, case
        assert violated_fields(error) == {"page_token"}, case

    negative = rpc_error(lambda: list_page(stub, a, page_size=-1))
    assert (negative.code(), violated_fields(negative)) == (INVALID_ARGUMENT, {"page_size"})


# -- 3. etags ---------------------------------------------------------------------------


def test_concurrent_updates_carrying_the_same_etag_exactly_one_succeeds(stack: Stack) -> None:
    stub, caller = stack.agents, stack.new_user()
    agent = create(stub, caller, "race")
    contenders = 8
    barrier = threading.Barrier(contenders)

    def contend(i: int) -> tuple[Any, str]:
        patch = agent_pb2.Agent(id=agent.id, description=f"writer {i}", etag=agent.etag)
        barrier.wait(timeout=TIMEOUT)
        try:
            return OK, update(stub, caller, patch, ["description"]).description
        except grpc.RpcError as error:
            return error.code(), reason_of(error)

    with ThreadPoolExecutor(max_workers=contenders) as pool:
        outcomes = list(pool.map(contend, range(contenders)))
    codes = collections.Counter(code for code, _ in outcomes)
    assert codes == {OK: 1, ABORTED: contenders - 1}, outcomes
    assert {detail for code, detail in outcomes if code == ABORTED} == {"ETAG_MISMATCH"}
    (winner,) = [detail for code, detail in outcomes if code == OK]
    stored = get(stub, caller, agent.id)
    assert stored.description == winner
    assert stored.etag != agent.etag


def test_delete_with_a_stale_etag_is_aborted_and_with_an_empty_etag_succeeds(
    stack: Stack,
) -> None:
    stub, caller = stack.agents, stack.new_user()
    agent = create(stub, caller, "stale")
    fresh = update(stub, caller, agent_pb2.Agent(id=agent.id, description="v2"), ["description"])
    stale = rpc_error(lambda: delete(stub, caller, agent.id, agent.etag))
    assert (stale.code(), reason_of(stale)) == (ABORTED, "ETAG_MISMATCH")
    assert get(stub, caller, agent.id) == fresh  # still there

    stale_update = rpc_error(
        lambda: update(stub, caller, agent_pb2.Agent(id=agent.id, name="x", etag=agent.etag), [])
    )
    assert stale_update.code() == ABORTED

    delete(stub, caller, agent.id, "")
    assert get(stub, caller, agent.id).HasField("delete_time")  # soft (AIP-164)
    assert rpc_error(lambda: delete(stub, caller, agent.id)).code() == NOT_FOUND

    matching = create(stub, caller, "current")
    delete(stub, caller, matching.id, matching.etag)
    assert list_all(stub, caller) == []


# -- 4. idempotent create ---------------------------------------------------------------


def test_a_repeated_request_id_returns_the_first_agent_and_creates_nothing(stack: Stack) -> None:
    stub, a, b = stack.agents, stack.new_user(), stack.new_user()
    request_id = str(uuid.uuid4())
    first = create(stub, a, "idem", request_id=request_id, description="first")
    for _ in range(2):
        assert create(stub, a, "idem", request_id=request_id, description="first") == first
    assert [x.id for x in list_all(stub, a)] == [first.id]

    # Another caller's request ids are theirs: the same one creates B's own agent.
    theirs = create(stub, b, "idem", request_id=request_id, description="first")
    assert theirs.id != first.id
    assert theirs.owner_id == b.user_id
    assert [x.id for x in list_all(stub, b)] == [theirs.id]

    # Concurrent repeats of a new request id: one agent, every caller gets it.
    concurrent_id = str(uuid.uuid4())
    with ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(
            pool.map(
                lambda _: create(stub, a, "idem-concurrent", request_id=concurrent_id), range(6)
            )
        )
    assert len({r.id for r in replies}) == 1
    assert len(list_all(stub, a, filter='name = "idem-concurrent"')) == 1

    malformed = rpc_error(lambda: create(stub, a, "idem-2", request_id="not-a-uuid"))
    assert (malformed.code(), violated_fields(malformed)) == (INVALID_ARGUMENT, {"request_id"})

    for request in ("", str(uuid.uuid4())):  # same name, new (or no) request id
        taken = rpc_error(lambda: create(stub, a, "idem", request_id=request))  # noqa: B023
        assert (taken.code(), reason_of(taken)) == (ALREADY_EXISTS, "AGENT_NAME_TAKEN")
    assert sorted(x.name for x in list_all(stub, a)) == ["idem", "idem-concurrent"]


# -- 5. validation ----------------------------------------------------------------------


def test_an_invalid_agent_names_every_bad_field_and_writes_nothing(stack: Stack) -> None:
    stub, caller = stack.agents, stack.new_user()
    too_many = {f"key{i}": "v" for i in range(17)}
    bad = agent_pb2.Agent(name="", model="gpt-unknown", metadata=too_many, temperature=3.0)
    error = rpc_error(
        lambda: stub.CreateAgent(
            agent_pb2.CreateAgentRequest(agent=bad), metadata=caller.metadata, timeout=TIMEOUT
        )
    )
    assert error.code() == INVALID_ARGUMENT
    assert violated_fields(error) == {
        "agent.name",
        "agent.model",
        "agent.metadata",
        "agent.temperature",
    }
    assert list_all(stub, caller) == []

    # The same rules on update: nothing changes either.
    agent = create(stub, caller, "valid")
    error = rpc_error(
        lambda: update(stub, caller, agent_pb2.Agent(id=agent.id, temperature=3.0, top_p=1.5), [])
    )
    assert violated_fields(error) == {"agent.temperature", "agent.top_p"}
    assert list_all(stub, caller) == [agent]


# -- 6. Redis cut off mid-test ----------------------------------------------------------


@dataclass
class OutageAgent:
    process: ServiceProcess
    stub: agent_pb2_grpc.AgentServiceStub
    proxy: TcpProxy
    redis: redis.Redis


@pytest.fixture
def outage_agent(
    pg_stack: Stack,
    new_postgres_database: Callable[[], str],
    tmp_path: Path,
) -> Iterator[OutageAgent]:
    """An agent process of its own whose Redis is reached through a proxy the test cuts."""
    target = urlsplit(pg_stack.redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    userinfo = target.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + f"127.0.0.1:{proxy.port}"
    (port,) = free_ports(1)
    process = start(
        "agent_svc",
        agent_env(
            port,
            tmp_path / "data",
            pg_stack.auth.address,
            new_postgres_database(),
            urlunsplit(target._replace(netloc=netloc)),
        ),
        port,
        tmp_path,
    )
    channel = grpc.insecure_channel(process.address)
    client = redis.Redis.from_url(pg_stack.redis_url)
    try:
        wait_agent_ready(process, pg_stack.redis_url)
        yield OutageAgent(process, agent_pb2_grpc.AgentServiceStub(channel), proxy, client)
    finally:
        channel.close()
        process.stop()
        proxy.close()
        client.close()


def test_calls_keep_succeeding_while_redis_is_unreachable_and_it_recovers(
    pg_stack: Stack, outage_agent: OutageAgent, record_property: Callable[[str, object], None]
) -> None:
    stub, caller, direct = outage_agent.stub, pg_stack.new_user(), outage_agent.redis

    def l2_etag(agent_id: str) -> str | None:
        """The etag of the copy in the real Redis (not through the proxy), if any."""
        data = direct.get(f"agent:{agent_id}")
        if data is None:
            return None
        assert isinstance(data, bytes)
        return AgentCodec().decode(data).etag

    timeout = TIMEOUT
    before = create(stub, caller, "before-outage", description="v1")
    assert get(stub, caller, before.id) == before
    assert l2_etag(before.id) == before.etag, "the read did not fill L2"

    outage_agent.proxy.cut()
    cut_at = time.monotonic()
    latencies: list[float] = []

    def timed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return call(stub, caller, *args, timeout=timeout, **kwargs)
        finally:
            latencies.append(time.monotonic() - started)

    # Every kind of call, for longer than the cache's one-second breaker: the calls after
    # it closes try Redis again and must succeed too. (Real time: the breaker is inside
    # the process and announces nothing.)
    changed = before
    for cycle in itertools.count():
        during = timed(create, f"during-outage-{cycle}")
        assert timed(get, during.id) == during
        patch = agent_pb2.Agent(id=before.id, description=f"v{cycle + 2}", etag=changed.etag)
        changed = timed(update, patch, ["description"])
        # Read-your-writes holds without Redis: no old version from any cache level.
        assert timed(get, before.id) == changed
        listed = timed(list_page, page_size=1000)
        assert {x.id for x in listed.agents} == {before.id, during.id}
        timed(delete, during.id, during.etag)
        # The deleted version, never the cached live one (soft delete: Get still answers).
        assert get(stub, caller, during.id, timeout=timeout).HasField("delete_time")
        if time.monotonic() - cut_at > 1.5:
            break
    # The stale copy is still in the real Redis: the invalidation waits for the way back.
    assert l2_etag(before.id) == before.etag

    outage_agent.proxy.restore()
    deadline = time.monotonic() + 60  # the listener reconnects with backoff (5 s at most)
    recovered = False
    while time.monotonic() < deadline:
        assert get(stub, caller, before.id, timeout=timeout) == changed
        # The deferred invalidation reached Redis: its copy is gone or the current one.
        recovered = l2_etag(before.id) in (None, changed.etag) and any(
            "reachable again" in e.get("msg", "") for e in json_log(outage_agent.process)
        )
        if recovered:
            break
        time.sleep(0.1)
    assert recovered, "no recovery after Redis came back:\n" + outage_agent.process.log()

    # L2 is used again (the breaker closes a second after the last error): an update drops
    # every cached copy, the next read refills L2 with the current version.
    deadline = time.monotonic() + 30
    for attempt in itertools.count():
        patch = agent_pb2.Agent(id=before.id, description=f"after the outage {attempt}")
        current = update(stub, caller, patch, ["description"], timeout=timeout)
        assert get(stub, caller, before.id, timeout=timeout) == current
        cached = l2_etag(before.id)
        if cached is not None:
            assert cached == current.etag
            break
        assert time.monotonic() < deadline, "L2 is not used again after the outage"
        time.sleep(0.05)
    after = create(stub, caller, "after-outage", timeout=timeout)
    assert get(stub, caller, after.id, timeout=timeout) == after
    delete(stub, caller, after.id, after.etag, timeout=timeout)
    assert [x.id for x in list_all(stub, caller)] == [before.id]

    warnings = [
        e["msg"]
        for e in json_log(outage_agent.process)
        if e.get("level") == "warning" and "Redis" in e.get("msg", "")
    ]
    assert warnings, "no warning about Redis in the agent log"
    # Every call above succeeded within its deadline; how long they took is a figure.
    record_property("outage_call_latencies_ms", [round(x * 1000, 1) for x in latencies])


# -- 7. two replicas --------------------------------------------------------------------


@pytest.fixture
def second_replica(pg_stack: Stack, tmp_path: Path) -> Iterator[agent_pb2_grpc.AgentServiceStub]:
    """R2: another agent process on pg_stack's agent database and Redis (R1 is pg_stack's)."""
    (port,) = free_ports(1)
    process = start(
        "agent_svc",
        agent_env(
            port,
            tmp_path / "data",
            pg_stack.auth.address,
            pg_stack.agent_database_url,
            pg_stack.redis_url,
        ),
        port,
        tmp_path,
    )
    channel = grpc.insecure_channel(process.address)
    try:
        wait_agent_ready(process, pg_stack.redis_url)
        yield agent_pb2_grpc.AgentServiceStub(channel)
    finally:
        channel.close()
        process.stop()


def test_a_write_on_one_replica_reaches_the_other_within_the_invalidation_delay(
    pg_stack: Stack,
    second_replica: agent_pb2_grpc.AgentServiceStub,
    record_property: Callable[[str, object], None],
) -> None:
    r1, r2, caller = pg_stack.agents, second_replica, pg_stack.new_user()
    agent = create(r1, caller, "replicated")
    delays: list[float] = []
    for round_ in range(5):
        for _ in range(2):  # R2's L1 now holds the current version
            assert get(r2, caller, agent.id) == agent
        agent = update(r1, caller, agent_pb2.Agent(id=agent.id, description=f"round {round_}"), [])
        written = time.monotonic()
        # Read-your-writes on the replica that served the write: the very next read.
        assert get(r1, caller, agent.id) == agent
        while True:
            seen = get(r2, caller, agent.id)
            delay = time.monotonic() - written
            if seen.etag == agent.etag or delay > INVALIDATION_DEADLINE:
                break
            time.sleep(0.002)
        assert seen == agent, f"R2 still served the old version after {delay:.3f}s"
        delays.append(delay)
    # The delays are a figure (the README quotes them), not a pass mark.
    record_property("invalidation_delays_ms", [round(x * 1000, 1) for x in delays])

    # Replicas share the page token secret: a token from R1 continues on R2.
    create(r1, caller, "replicated-2")
    first = list_page(r1, caller, page_size=1, order_by="name asc")
    second = list_page(
        r2, caller, page_size=1, order_by="name asc", page_token=first.next_page_token
    )
    assert [x.name for x in second.agents] == ["replicated-2"]


def _eventually(read: Callable[[], Any], done: Callable[[Any], bool]) -> tuple[Any, float]:
    """Reads until `done(value)` or INVALIDATION_DEADLINE passes; the last value and when."""
    started = time.monotonic()
    while True:
        value = read()
        delay = time.monotonic() - started
        if done(value) or delay > INVALIDATION_DEADLINE:
            return value, delay
        time.sleep(0.002)


def _tag(stub: agent_pb2_grpc.AgentServiceStub, caller: Caller, agent_id: str, rev: str) -> None:
    stub.TagAgentRevision(
        agent_pb2.TagAgentRevisionRequest(id=agent_id, revision_id=rev, alias="prod"),
        metadata=caller.metadata,
        timeout=TIMEOUT,
    )


def test_alias_moves_deletes_and_purges_on_one_replica_reach_the_other(
    pg_stack: Stack, second_replica: agent_pb2_grpc.AgentServiceStub
) -> None:
    r1, r2, owner = pg_stack.agents, second_replica, pg_stack.new_user()
    agent = create(r1, owner, "pinned", description="v1")
    agent = update(r1, owner, agent_pb2.Agent(id=agent.id, description="v2"), ["description"])
    pinned = f"{agent.id}@prod"
    _tag(r1, owner, agent.id, "1")
    for _ in range(2):  # R2's caches now hold the agent and its aliases
        assert get(r2, owner, pinned).description == "v1"

    _tag(r1, owner, agent.id, "2")  # promote
    seen, delay = _eventually(lambda: get(r2, owner, pinned), lambda a: a.description == "v2")
    assert seen.revision_id == "2", f"R2 still resolved prod to revision 1 after {delay:.3f}s"

    deleted = delete(r1, owner, agent.id, "")
    seen, delay = _eventually(lambda: get(r2, owner, agent.id), lambda a: a.etag == deleted.etag)
    assert seen.HasField("delete_time"), f"R2 still served the live agent after {delay:.3f}s"

    r1.PurgeAgent(
        agent_pb2.PurgeAgentRequest(id=agent.id),
        metadata=pg_stack.admin().metadata,
        timeout=TIMEOUT,
    )
    for ref in (agent.id, pinned, f"{agent.id}@1"):
        code, delay = _eventually(
            lambda ref=ref: status_of(lambda: get(r2, owner, ref)),  # type: ignore[misc]
            lambda code: code == NOT_FOUND,
        )
        assert code == NOT_FOUND, f"R2 still served {ref} after {delay:.3f}s"


# -- 8. auth_svc down -------------------------------------------------------------------


def _unpublished_token() -> str:
    """A well-formed access token signed by a key no auth service published."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(uuid.uuid4()),
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "roles": ["user"],
    }
    return jwt.encode(
        claims,
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": "not-published", "typ": "at+jwt"},
    )


def test_agent_started_while_auth_is_down_is_unavailable_until_keys_arrive(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    auth_port, agent_port = free_ports(2)  # nothing listens on auth_port yet
    auth_address = f"127.0.0.1:{auth_port}"
    started = time.monotonic()
    agent = start(
        "agent_svc",
        agent_env(
            agent_port, tmp_path / "agent-data", auth_address, AGENT_JWKS_COOLDOWN_SECONDS="1"
        ),
        agent_port,
        tmp_path,
    )
    auth: ServiceProcess | None = None
    channels = [grpc.insecure_channel(agent.address)]
    try:
        # It starts and answers (alive: ""), but is not ready: no keys to verify tokens with.
        health = health_pb2_grpc.HealthStub(channels[0])
        for service, expected in (
            ("", health_pb2.HealthCheckResponse.SERVING),
            (AGENT_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING),
        ):
            request = health_pb2.HealthCheckRequest(service=service)
            # wait_for_ready: until the process listens (it starts in the background).
            reply = health.Check(request, timeout=STARTUP_DEADLINE, wait_for_ready=True)
            assert reply.status == expected, service

        stub = agent_pb2_grpc.AgentServiceStub(channels[0])
        for caller in (Caller("", ""), Caller("", "not-a-jwt")):
            for call in (
                lambda: list_page(stub, caller),  # noqa: B023
                lambda: get(stub, caller, str(uuid.uuid4())),  # noqa: B023
            ):
                assert rpc_error(call).code() == UNAUTHENTICATED
        # A well-formed token whose key cannot be looked up yet: temporary, retry.
        unknown_key = Caller("", _unpublished_token())
        refused = rpc_error(lambda: list_page(stub, unknown_key))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(refused)
        assert error_detail(status, error_details_pb2.ErrorInfo).reason == "KEYS_UNAVAILABLE"
        assert error_detail(status, error_details_pb2.RetryInfo) is not None

        auth = start("auth_svc", auth_env(auth_port, tmp_path / "auth-data"), auth_port, tmp_path)
        auth.wait_serving(AUTH_SERVICE)
        channels.append(grpc.insecure_channel(auth.address))
        caller = register_and_login(auth_pb2_grpc.AuthServiceStub(channels[1]))
        auth_up = time.monotonic()
        codes = []
        # The keys arrive by the background refresh or the refetch for an unknown key id
        # (cool-down 1 s); the channel to auth_svc reconnects with backoff.
        while (code := status_of(lambda: list_page(stub, caller))) != OK:
            codes.append(code)
            assert time.monotonic() - auth_up < 60, f"the fresh token is still refused: {codes}"
            time.sleep(0.1)
        record_property("token_accepted_after_auth_up_s", round(time.monotonic() - auth_up, 2))
        assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}, codes
        assert create(stub, caller, "after-auth").owner_id == caller.user_id
        agent.wait_serving(AGENT_SERVICE)  # ready once the keys are there
        record_property("ready_after_s", round(time.monotonic() - started, 2))
    finally:
        for channel in channels:
            channel.close()
        agent.stop()
        if auth is not None:
            auth.stop()


# -- 9. grpcurl -------------------------------------------------------------------------


def grpcurl(
    binary: Path,
    address: str,
    method: str,
    data: dict[str, Any] | None = None,
    token: str = "",
    *,
    target: str = "",
) -> tuple[int, Any]:
    """Runs grpcurl like the module docstring's commands; parsed JSON on success (the text
    of `list` and `describe`)."""
    args = [str(binary), "-plaintext"]
    if token:
        args += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        args += ["-d", json.dumps(data)]
    args += [address, method, *([target] if target else [])]
    done = subprocess.run(args, capture_output=True, text=True, timeout=2 * TIMEOUT, check=False)
    if done.returncode == 0 and method not in ("list", "describe"):
        return 0, json.loads(done.stdout)
    return done.returncode, done.stdout + done.stderr


def test_an_operator_session_through_grpcurl(embedded_stack: Stack, grpcurl_binary: Path) -> None:
    auth, agents = embedded_stack.auth.address, embedded_stack.agent.address
    auth_method, agent_method = f"{AUTH_SERVICE}/", f"{AGENT_SERVICE}/"
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    credentials = {"email": email, "password": "correct horse battery"}
    code, _ = grpcurl(grpcurl_binary, auth, auth_method + "Register", credentials)
    assert code == 0
    code, login_reply = grpcurl(grpcurl_binary, auth, auth_method + "Login", credentials)
    assert code == 0
    token = login_reply["access_token"]

    code, listing = grpcurl(grpcurl_binary, agents, "list")
    assert code == 0
    assert AGENT_SERVICE in listing.split()
    # describe shows the comments written in the protos (reflection keeps source info).
    code, described = grpcurl(grpcurl_binary, agents, "describe", target=AGENT_SERVICE)
    assert code == 0
    assert "// Creates an agent owned by the caller." in described
    assert "rpc CreateAgent ( .agentplatform.agent.v1.CreateAgentRequest )" in described
    code, described = grpcurl(
        grpcurl_binary, auth, "describe", target="agentplatform.auth.v1.LoginRequest"
    )
    assert code == 0
    assert "message LoginRequest {" in described
    code, described = grpcurl(
        grpcurl_binary, agents, "describe", target="agentplatform.errors.v1.ErrorReason"
    )
    assert code == 0
    assert "MISSING_SCOPE = " in described
    assert "// UNAUTHENTICATED: the access token has expired. Refresh it." in described

    code, created = grpcurl(
        grpcurl_binary,
        agents,
        agent_method + "CreateAgent",
        {
            "agent": {
                "name": "support-bot",
                "model": "gpt-4o",
                "description": "Answers support tickets",
                "metadata": {"team": "search"},
                "temperature": 0.2,
                "tools": [
                    {
                        "name": "search_kb",
                        "description": "Search the knowledge base",
                        "parameters": {
                            "type": "object",
                            "properties": {"query": {"type": "string"}},
                        },
                    }
                ],
            },
            "request_id": str(uuid.uuid4()),
        },
        token,
    )
    assert code == 0, created
    agent = created["agent"]
    assert (agent["name"], agent["owner_id"], agent["temperature"]) == (
        "support-bot",
        login_reply["user"]["id"],
        0.2,
    )
    assert agent["tools"][0]["parameters"]["properties"] == {"query": {"type": "string"}}
    code, other = grpcurl(
        grpcurl_binary,
        agents,
        agent_method + "CreateAgent",
        {"agent": {"name": "sales-bot", "model": "o3"}},
        token,
    )
    assert code == 0, other

    code, fetched = grpcurl(
        grpcurl_binary, agents, agent_method + "GetAgent", {"id": agent["id"]}, token
    )
    assert (code, fetched) == (0, {"agent": agent})

    code, listed = grpcurl(
        grpcurl_binary,
        agents,
        agent_method + "ListAgents",
        {"filter": 'model = "gpt-4o" AND name = "sup*"', "order_by": "name asc", "page_size": 10},
        token,
    )
    assert code == 0, listed
    assert listed == {"agents": [agent]}  # no next_page_token: the last page

    new_description = "Answers tickets in English and French"
    code, updated = grpcurl(
        grpcurl_binary,
        agents,
        agent_method + "UpdateAgent",
        {
            "agent": {"id": agent["id"], "description": new_description, "etag": agent["etag"]},
            "update_mask": {"paths": ["description"]},
        },
        token,
    )
    assert code == 0, updated
    assert updated["agent"]["description"] == new_description
    assert updated["agent"]["name"] == "support-bot"  # not in the mask: kept
    assert updated["agent"]["etag"] != agent["etag"]

    code, output = grpcurl(
        grpcurl_binary,
        agents,
        agent_method + "DeleteAgent",
        {"id": agent["id"], "etag": agent["etag"]},
        token,
    )
    assert code == 64 + ABORTED.value[0], output  # the etag before the update
    code, deleted = grpcurl(
        grpcurl_binary,
        agents,
        agent_method + "DeleteAgent",
        {"id": agent["id"], "etag": updated["agent"]["etag"]},
        token,
    )
    assert code == 0, deleted
    assert "delete_time" in deleted["agent"]
    assert "expire_time" in deleted["agent"]

    code, revisions = grpcurl(
        grpcurl_binary, agents, agent_method + "ListAgentRevisions", {"id": agent["id"]}, token
    )
    assert code == 0, revisions
    assert [r["revision_id"] for r in revisions["agents"]] == ["2", "1"]
    code, first = grpcurl(
        grpcurl_binary, agents, agent_method + "GetAgent", {"id": agent["id"] + "@1"}, token
    )
    assert code == 0, first
    assert first["agent"]["description"] == agent["description"]
    code, restored = grpcurl(
        grpcurl_binary, agents, agent_method + "UndeleteAgent", {"id": agent["id"]}, token
    )
    assert code == 0, restored
    assert "delete_time" not in restored["agent"]
    code, tagged = grpcurl(
        grpcurl_binary,
        agents,
        agent_method + "TagAgentRevision",
        {"id": agent["id"], "revision_id": "1", "alias": "prod"},
        token,
    )
    assert code == 0, tagged
    code, pinned = grpcurl(
        grpcurl_binary, agents, agent_method + "GetAgent", {"id": agent["id"] + "@prod"}, token
    )
    assert (code, pinned["agent"]["revision_id"]) == (0, "1"), pinned

    code, output = grpcurl(
        grpcurl_binary, agents, agent_method + "GetAgent", {"id": "not-a-uuid"}, token
    )
    assert code == 64 + INVALID_ARGUMENT.value[0], output
    assert "InvalidArgument" in output
    code, output = grpcurl(
        grpcurl_binary, agents, agent_method + "GetAgent", {"id": agent["id"] + "@"}, token
    )
    assert code == 64 + INVALID_ARGUMENT.value[0], output
    code, output = grpcurl(
        grpcurl_binary, agents, agent_method + "GetAgent", {"id": str(uuid.uuid4())}, token
    )
    assert code == 64 + NOT_FOUND.value[0], output
    code, output = grpcurl(grpcurl_binary, agents, agent_method + "ListAgents", {})
    assert code == 64 + UNAUTHENTICATED.value[0], output
