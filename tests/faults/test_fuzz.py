"""Fuzzing every RPC of both services, on SQLite and on PostgreSQL.

What no request may do, whatever its bytes: end in INTERNAL or UNKNOWN, or fail without a
google.rpc.ErrorInfo (the caller's only stable handle on an error); and after each batch
both services are SERVING, answer a normal call, and their memory grew by less than
`RSS_GROWTH_LIMIT_MB`.

- `test_mutated_bodies…`: Hypothesis draws a method (every unary method the servers list
  through reflection, health included) and a valid request for it, then sends random
  bytes, a truncation or bit flips of that request, with or without an access token.
- `test_hostile_strings…`: every string field of every request (nested fields, map keys
  and values, Struct keys and values) gets each of `HOSTILE` (NUL, other control
  characters, megabyte strings, bidi overrides, SQL and format metacharacters…) and, in a
  hand-built body, invalid UTF-8; afterwards a metadata-filtered listing still works (a NUL
  stored in metadata once broke every such listing on PostgreSQL).
- `test_deep_and_huge…`: Structs and lists nested 10,000 levels (raw bytes), maps of
  100,000 entries, 10,000 tools, 10,000 mask paths, filters of 20,000 terms.
- `test_property_based…`: Hypothesis strategies for each request message (tests/faults/
  strategies.py), steered towards real ids, models and filters so requests reach the
  database.

The CI run is modest; `scripts/fuzz --examples 100000` runs the same tests with more
examples (`FAULTS_FUZZ_EXAMPLES`).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from google.protobuf import field_mask_pb2, struct_pb2
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from tests.faults.bodies import (
    Method,
    bit_flipped,
    deep_list,
    deep_struct,
    describe_slot,
    length_delimited,
    methods_of,
    string_slots,
    truncated,
    with_invalid_utf8,
    with_value,
)
from tests.faults.load import outcome
from tests.faults.servers import PostgresCluster
from tests.faults.services import (
    AGENT_SERVICE,
    AUTH_SERVICE,
    SERVING,
    Caller,
    Fleet,
    agent_env,
    auth_env,
    create_agent,
    health_status,
    register_and_login,
    rss_mb,
)
from tests.faults.strategies import Hints, fuzz_settings, requests
from tests.helpers import ServiceProcess, free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

CALL_TIMEOUT = 30.0  # a megabyte body on a busy machine; a deadline is not what is tested
RSS_GROWTH_LIMIT_MB = 150.0
MEGABYTE = 1 << 20
HOSTILE: dict[str, str] = {
    "nul": "\x00",
    "nul inside": "agent\x00name",
    "control characters": "".join(chr(c) for c in range(1, 32)) + "\x7f",
    "C1 and separators": "\x85\u2028\u2029",
    "bidi override": "\u202egpt-4o",
    "zero width": "\u200b\ufeff",
    "empty-looking": " \t ",
    "sql": "' OR 1=1; DROP TABLE agents; --",
    "like metacharacters": "%_\\*",
    "format": "%s%n{0}${x}",
    "quotes": "\"'`",
    "path": "../../etc/passwd",
    "255 chars": "a" * 255,
    "megabyte ascii": "x" * MEGABYTE,
    "megabyte 2-byte": "é" * (MEGABYTE // 2),
    "megabyte 4-byte": "\U0001f600" * (MEGABYTE // 4),
}
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@dataclass
class Server:
    process: ServiceProcess
    channel: grpc.Channel
    methods: list[Method]
    service: str
    rss_at_start: float


@dataclass
class FuzzStack:
    auth: Server
    agent: Server
    caller: Caller
    hints: Hints
    seeded: list[str] = field(default_factory=list)

    @property
    def servers(self) -> tuple[Server, Server]:
        return self.auth, self.agent

    def unary_methods(self) -> list[tuple[Server, Method]]:
        return [(s, m) for s in self.servers for m in s.methods if not m.streaming]


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def fuzz_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    auth_db = agent_db = ""
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        cluster.ensure_running()
        auth_db, agent_db = cluster.create_database(), cluster.create_database()
    fleet = Fleet(root / "logs")
    channels: list[grpc.Channel] = []
    try:
        auth = fleet.start("auth_svc", auth_env(free_port(), root / "auth", auth_db))
        auth.wait_serving(AUTH_SERVICE, timeout=60)
        agent = fleet.start(
            "agent_svc", agent_env(free_port(), root / "agent", auth.address, agent_db)
        )
        agent.wait_serving(AGENT_SERVICE, timeout=60)
        servers = []
        for process, service in ((auth, AUTH_SERVICE), (agent, AGENT_SERVICE)):
            channel = grpc.insecure_channel(
                process.address,
                options=[("grpc.max_send_message_length", 64 * MEGABYTE)],
            )
            channels.append(channel)
            servers.append(
                Server(process, channel, methods_of(channel), service, rss_mb(process.process.pid))
            )
        yield servers[0], servers[1]
    finally:
        for channel in channels:
            channel.close()
        fleet.close()


@pytest.fixture
def fuzz_stack(fuzz_servers: tuple[Server, Server]) -> FuzzStack:
    """The module's servers with a user of this test's own, owning a few agents: what one
    test stores (megabyte descriptions…) never shows up in another test's listings."""
    auth, agent = fuzz_servers
    caller = register_and_login(auth_pb2_grpc.AuthServiceStub(auth.channel))
    agents = agent_pb2_grpc.AgentServiceStub(agent.channel)
    seeded = [
        create_agent(agents, caller, f"fuzz-{i}", metadata={"team": "x"}).id for i in range(5)
    ]
    hints = Hints(agent_ids=seeded, emails=[caller.email], user_ids=[caller.user_id])
    return FuzzStack(auth, agent, caller, hints, seeded)


# -- sending and judging ----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    method: str
    case: str
    code: grpc.StatusCode
    reason: str
    has_error_info: bool
    details: str

    @property
    def wrong(self) -> bool:
        """INTERNAL or UNKNOWN anywhere; an error without ErrorInfo from our own services
        (grpc.health.v1 and reflection are the library's, answering plain statuses)."""
        ours = self.method.startswith((f"/{AUTH_SERVICE}/", f"/{AGENT_SERVICE}/"))
        failed = self.code != grpc.StatusCode.OK
        return self.code in BAD_CODES or (ours and failed and not self.has_error_info)

    def __str__(self) -> str:
        outcome = f"{self.code.name}/{self.reason or '-'} {self.details[:100]!r}"
        return f"{self.method} [{self.case}] → {outcome}"


def send(server: Server, method: Method, body: bytes, metadata: Any, case: str) -> Answer:
    """Sends raw bytes (no serializer) and returns what came back."""
    try:
        server.channel.unary_unary(method.path)(body, metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        code, reason, _, details = outcome(error)
        return Answer(method.path, case, code, reason, bool(reason), details)
    return Answer(method.path, case, grpc.StatusCode.OK, "", True, "")


def assert_no_wrong_answer(answers: list[Answer]) -> None:
    # grpcio's own parse failure first in a group: the other kinds are the news.
    wrong = sorted(
        (a for a in answers if a.wrong), key=lambda a: "Exception deserializing" in a.details
    )
    kinds = Counter(f"{a.method.rsplit('/', 1)[1]} {a.code.name}/{a.reason}" for a in wrong)
    assert not wrong, (
        f"{len(wrong)} of {len(answers)} requests were answered INTERNAL/UNKNOWN or without an"
        f" ErrorInfo ({dict(kinds)}); e.g.\n  " + "\n  ".join(str(a) for a in wrong[:12])
    )


def assert_healthy(stack: FuzzStack) -> None:
    """Both SERVING, a normal call works on each, memory bounded."""
    for server in stack.servers:
        assert server.process.process.poll() is None, f"{server.process.name} died"
        for service in ("", server.service):
            status = health_status(server.process.address, service, timeout=10)
            assert status == SERVING, f"{server.process.name} health {service!r}: {status}"
    auth = auth_pb2_grpc.AuthServiceStub(stack.auth.channel)
    assert auth.GetJwks(auth_pb2.GetJwksRequest(), timeout=CALL_TIMEOUT).keys
    agents = agent_pb2_grpc.AgentServiceStub(stack.agent.channel)
    # A user of its own: with the caller's token, a drawn RevokeAllSessions (an empty
    # request is valid) revokes the caller's access tokens, and drawn Logins with its email
    # and wrong passwords lock it out, both as they should.
    caller = register_and_login(auth)
    fresh = create_agent(agents, caller, f"after-fuzz-{uuid.uuid4().hex[:8]}")
    got = agents.GetAgent(
        agent_pb2.GetAgentRequest(id=fresh.id), metadata=caller.metadata, timeout=30
    )
    assert got.agent == fresh
    for server in stack.servers:
        growth = rss_mb(server.process.process.pid) - server.rss_at_start
        assert growth < RSS_GROWTH_LIMIT_MB, (
            f"{server.process.name} RSS grew {growth:.0f} MB during fuzzing"
        )


# -- mutated bodies ----------------------------------------------------------------------------


def test_mutated_bodies_never_fail_internally_and_always_carry_error_info(
    fuzz_stack: FuzzStack,
) -> None:
    methods = fuzz_stack.unary_methods()
    valid = {m.path: requests(m.input, fuzz_stack.hints) for _, m in methods}
    answers: list[Answer] = []

    @fuzz_settings(150)
    @given(data=st.data())
    def examples(data: st.DataObject) -> None:
        server, method = data.draw(st.sampled_from(methods), label="method")
        body = data.draw(valid[method.path], label="request").SerializeToString()
        mutation = data.draw(st.sampled_from(["random", "truncated", "flipped"]), label="how")
        if mutation == "random":
            body = data.draw(st.binary(max_size=256), label="bytes")
        elif mutation == "truncated":
            body = truncated(body, data.draw(st.integers(0, max(0, len(body) - 1))))
        else:
            positions = st.lists(st.integers(0, 8 * max(1, len(body)) - 1), min_size=1, max_size=8)
            body = bit_flipped(body, data.draw(positions, label="bits"))
        token = data.draw(st.booleans(), label="with token")
        metadata = fuzz_stack.caller.metadata if token else ()
        answer = send(server, method, body, metadata, mutation)
        answers.append(answer)
        assert not answer.wrong, str(answer)

    examples()
    assert answers
    assert_healthy(fuzz_stack)


# -- hostile strings in every string field ------------------------------------------------------


def _bases(stack: FuzzStack) -> dict[str, list[Message]]:
    """A valid request per method of the two services, with every string field set."""
    agent = agent_pb2.Agent(
        name="hostile",
        description="a description",
        model="gpt-4o",
        instructions="some instructions",
        metadata={"team": "x"},
        tools=[
            agent_pb2.Tool(
                name="lookup",
                description="looks things up",
                parameters=_struct({"type": "object", "nested": {"key": "value"}}),
            )
        ],
    )
    update = agent_pb2.Agent()
    update.CopyFrom(agent)
    update.id, update.etag = stack.seeded[0], "an-etag"
    auth, agents = AUTH_SERVICE, AGENT_SERVICE
    return {
        f"/{agents}/CreateAgent": [
            agent_pb2.CreateAgentRequest(agent=agent, request_id=str(uuid.uuid4()))
        ],
        f"/{agents}/UpdateAgent": [
            agent_pb2.UpdateAgentRequest(
                agent=update,
                update_mask=field_mask_pb2.FieldMask(
                    paths=["description", "instructions", "metadata", "tools"]
                ),
            )
        ],
        f"/{agents}/GetAgent": [
            agent_pb2.GetAgentRequest(id=stack.seeded[1]),
            agent_pb2.GetAgentRequest(id=f"{stack.seeded[1]}@prod"),
        ],
        f"/{agents}/DeleteAgent": [agent_pb2.DeleteAgentRequest(id=str(uuid.uuid4()), etag="e")],
        f"/{agents}/UndeleteAgent": [agent_pb2.UndeleteAgentRequest(id=stack.seeded[1], etag="e")],
        f"/{agents}/PurgeAgent": [agent_pb2.PurgeAgentRequest(id=str(uuid.uuid4()), etag="e")],
        f"/{agents}/ListAgentRevisions": [
            agent_pb2.ListAgentRevisionsRequest(id=stack.seeded[1], page_token="a-page-token")
        ],
        f"/{agents}/RollbackAgent": [
            agent_pb2.RollbackAgentRequest(id=stack.seeded[0], revision_id="1", etag="e")
        ],
        f"/{agents}/TagAgentRevision": [
            agent_pb2.TagAgentRevisionRequest(id=stack.seeded[0], revision_id="1", alias="prod")
        ],
        f"/{agents}/UntagAgentRevision": [
            agent_pb2.UntagAgentRevisionRequest(id=stack.seeded[0], alias="staging")
        ],
        f"/{agents}/ListAgents": [
            agent_pb2.ListAgentsRequest(filter='metadata.team = "x"', order_by="name asc"),
            agent_pb2.ListAgentsRequest(page_token="a-page-token"),
        ],
        f"/{auth}/Register": [
            auth_pb2.RegisterRequest(
                email="hostile@example.com", password="a good password", display_name="Ada"
            )
        ],
        f"/{auth}/Login": [
            auth_pb2.LoginRequest(email="nobody@example.com", password="a wrong password")
        ],
        f"/{auth}/RefreshToken": [auth_pb2.RefreshTokenRequest(refresh_token="not-a-token")],
        f"/{auth}/Logout": [auth_pb2.LogoutRequest(refresh_token="not-a-token")],
        f"/{auth}/ChangePassword": [
            auth_pb2.ChangePasswordRequest(
                current_password="not the password", new_password="another good password"
            )
        ],
    }


def _unique(message: Message, slot_name: str) -> Message:
    """Names and request ids made unique, unless they are the field under test: each
    hostile value then gets as far as it can (a taken name would stop it early)."""
    suffix = uuid.uuid4().hex[:8]
    if isinstance(message, agent_pb2.CreateAgentRequest):
        if slot_name != "agent.name":
            message.agent.name = f"hostile-{suffix}"
        if slot_name != "request_id":
            message.request_id = str(uuid.uuid4())
    if isinstance(message, auth_pb2.RegisterRequest) and slot_name != "email":
        message.email = f"hostile-{suffix}@example.com"
    return message


def test_hostile_strings_in_every_string_field_never_fail_internally(
    fuzz_stack: FuzzStack, record_property: Callable[[str, object], None]
) -> None:
    methods = {m.path: (s, m) for s, m in fuzz_stack.unary_methods()}
    metadata = fuzz_stack.caller.metadata
    answers: list[Answer] = []
    for path, bases in _bases(fuzz_stack).items():
        server, method = methods[path]
        for base in bases:
            for slot in string_slots(base):
                name = describe_slot(slot)
                for label, value in HOSTILE.items():
                    body = _unique(with_value(base, slot, value), name).SerializeToString()
                    answers.append(send(server, method, body, metadata, f"{name}={label}"))
                body = with_invalid_utf8(_unique(with_value(base, slot, "QZXJ"), name), slot)
                answers.append(send(server, method, body, metadata, f"{name}=invalid UTF-8"))
    record_property(
        "answers", dict(Counter(f"{a.method.rsplit('/', 1)[1]} {a.code.name}" for a in answers))
    )

    # Whatever was stored, listings that read metadata still work.
    listing = agent_pb2.ListAgentsRequest(filter='metadata.team = "x"', page_size=1000)
    agents = agent_pb2_grpc.AgentServiceStub(fuzz_stack.agent.channel)
    try:
        agents.ListAgents(listing, metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        code, reason, _, details = outcome(error)
        answers.append(
            Answer(
                f"/{AGENT_SERVICE}/ListAgents",
                "afterwards: metadata filter",
                code,
                reason,
                bool(reason),
                details,
            )
        )
    assert_no_wrong_answer(answers)
    assert_healthy(fuzz_stack)


# -- deep and huge ------------------------------------------------------------------------------


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _with_parameters(parameters: bytes, agent_id: str = "") -> bytes:
    """An Agent (raw bytes) with one tool whose `parameters` are the given Struct bytes."""
    tool = agent_pb2.Tool(name="deep").SerializeToString() + length_delimited(3, parameters)
    name = "" if agent_id else f"deep-{uuid.uuid4().hex[:8]}"
    agent = agent_pb2.Agent(id=agent_id, name=name, model="gpt-4o").SerializeToString()
    return agent + length_delimited(7, tool)


def _create(parameters: bytes) -> bytes:
    return length_delimited(1, _with_parameters(parameters))  # CreateAgentRequest.agent


def _list(filter: str = "", order_by: str = "") -> bytes:
    return agent_pb2.ListAgentsRequest(filter=filter, order_by=order_by).SerializeToString()


def _huge_cases(stack: FuzzStack) -> list[tuple[str, str, bytes]]:
    create, update, list_ = (
        f"/{AGENT_SERVICE}/{name}" for name in ("CreateAgent", "UpdateAgent", "ListAgents")
    )
    seeded = stack.seeded[2]
    wide = _struct({f"f{i}": i for i in range(100_000)}).SerializeToString()
    tools_mask = field_mask_pb2.FieldMask(paths=["tools"]).SerializeToString()
    deep_update = length_delimited(1, _with_parameters(deep_struct(10_000), seeded))
    many_tools = [agent_pb2.Tool(name=f"t{i}") for i in range(10_000)]
    return [
        ("struct nested 10,000", create, _create(deep_struct(10_000))),
        ("lists nested 10,000", create, _create(deep_list(10_000))),
        ("struct nested 30", create, _create(deep_struct(30))),
        ("struct nested 20", create, _create(deep_struct(20))),
        ("struct of 100,000 fields", create, _create(wide)),
        ("update, struct nested 10,000", update, deep_update + length_delimited(2, tools_mask)),
        (
            "metadata of 100,000 entries",
            create,
            agent_pb2.CreateAgentRequest(
                agent=agent_pb2.Agent(
                    name="wide", model="gpt-4o", metadata={f"k{i}": "v" for i in range(100_000)}
                )
            ).SerializeToString(),
        ),
        (
            "10,000 tools",
            create,
            agent_pb2.CreateAgentRequest(
                agent=agent_pb2.Agent(name="tools", model="gpt-4o", tools=many_tools)
            ).SerializeToString(),
        ),
        (
            "10,000 mask paths",
            update,
            agent_pb2.UpdateAgentRequest(
                agent=agent_pb2.Agent(id=seeded, description="d"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"] * 10_000),
            ).SerializeToString(),
        ),
        (
            "filter of 20,000 terms",
            list_,
            agent_pb2.ListAgentsRequest(
                filter=" AND ".join(['name = "x"'] * 20_000)
            ).SerializeToString(),
        ),
        (
            "filter nested 5,000 parentheses",
            list_,
            agent_pb2.ListAgentsRequest(
                filter="(" * 5_000 + 'name = "x"' + ")" * 5_000
            ).SerializeToString(),
        ),
        (
            "order_by of 10,000 fields",
            list_,
            _list(order_by=", ".join(["name"] * 10_000)),
        ),
    ]


def test_deep_and_huge_requests_never_fail_internally(
    fuzz_stack: FuzzStack, record_property: Callable[[str, object], None]
) -> None:
    methods = {m.path: (s, m) for s, m in fuzz_stack.unary_methods()}
    answers = []
    for case, path, body in _huge_cases(fuzz_stack):
        server, method = methods[path]
        answers.append(send(server, method, body, fuzz_stack.caller.metadata, case))
    record_property("answers", [f"{a.case}: {a.code.name}/{a.reason}" for a in answers])
    assert_no_wrong_answer(answers)
    assert_healthy(fuzz_stack)


# -- property-based ---------------------------------------------------------------------------


def test_property_based_requests_never_fail_internally(fuzz_stack: FuzzStack) -> None:
    methods = [
        (s, m) for s, m in fuzz_stack.unary_methods() if m.service in (AUTH_SERVICE, AGENT_SERVICE)
    ]
    strategies = {m.path: requests(m.input, fuzz_stack.hints) for _, m in methods}
    sent = Counter[str]()

    @fuzz_settings(150)
    @given(data=st.data())
    def examples(data: st.DataObject) -> None:
        server, method = data.draw(st.sampled_from(methods), label="method")
        request = data.draw(strategies[method.path], label="request")
        answer = send(
            server, method, request.SerializeToString(), fuzz_stack.caller.metadata, "drawn"
        )
        sent[f"{method.name} {answer.code.name}"] += 1
        assert not answer.wrong, f"{answer}\nrequest: {request}"

    examples()
    assert sent
    assert_healthy(fuzz_stack)
