"""What a client with gRPC's default limits sees, through a real channel to agent_svc as the
composition root builds it (SQLite and PostgreSQL): every ListAgents page of big agents
fits its 4 MiB receive limit, and the error for a thoroughly invalid agent fits its 8 KiB
trailer limit, so it arrives as the INVALID_ARGUMENT it is."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2

from tests.helpers import error_detail, free_port, rich_status
from tests.integration.agent.test_bootstrap import StandInAuth, sign, start_agent_service

MiB = 1024 * 1024
TIMEOUT = 30


@dataclass
class Caller:
    """A user of agent_svc over a channel with gRPC's default limits."""

    stub: agent_pb2_grpc.AgentServiceStub
    metadata: tuple[tuple[str, str], ...]

    def create(self, agent: agent_pb2.Agent) -> agent_pb2.Agent:
        request = agent_pb2.CreateAgentRequest(agent=agent)
        reply = self.stub.CreateAgent(request, metadata=self.metadata, timeout=TIMEOUT)
        created: agent_pb2.Agent = reply.agent
        return created

    def list(self, request: agent_pb2.ListAgentsRequest) -> agent_pb2.ListAgentsResponse:
        reply: agent_pb2.ListAgentsResponse = self.stub.ListAgents(
            request, metadata=self.metadata, timeout=TIMEOUT
        )
        return reply


def violations(error: grpc.RpcError) -> list[str]:
    status = rich_status(error.trailing_metadata())
    bad_request = error_detail(status, error_details_pb2.BadRequest)
    return [v.field for v in bad_request.field_violations]


@pytest.fixture
def caller(database_url: str) -> Iterator[Caller]:
    key = ed25519.Ed25519PrivateKey.generate()
    auth_port = free_port()
    auth = StandInAuth(key).serve(auth_port)
    running = start_agent_service(
        {
            "AGENT_DATABASE_URL": database_url,
            "AGENT_DB_POOL_SIZE": "3",
            "AGENT_AUTH_TARGET": f"127.0.0.1:{auth_port}",
        }
    )
    metadata = (("authorization", f"Bearer {sign(key, str(uuid.uuid4()))}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield Caller(agent_pb2_grpc.AgentServiceStub(channel), metadata)
    finally:
        running.stop(0)
        auth.stop(0).wait()


def test_every_page_of_big_agents_reaches_a_default_client(caller: Caller) -> None:
    names = [f"big-{index:02d}" for index in range(20)]
    for name in names:  # ~600 KB each: one page of 20 would be 12 MB
        caller.create(agent_pb2.Agent(name=name, model="gpt-4o", instructions="€" * 200_000))
    request = agent_pb2.ListAgentsRequest(page_size=20, order_by="name")
    seen: list[str] = []
    while True:
        reply = caller.list(request)
        assert 0 < reply.ByteSize() < 4 * MiB
        seen += [agent.name for agent in reply.agents]
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert seen == names


def test_an_agent_over_1_mib_is_refused_on_agent(caller: Caller) -> None:
    heavy = agent_pb2.Agent(
        name="heavy",
        model="gpt-4o",
        instructions="😀" * 256_000,  # within 256,000 characters, 1,024,000 bytes
        metadata={f"k{index}": "😀" * 512 for index in range(16)},
    )
    with pytest.raises(grpc.RpcError) as caught:
        caller.create(heavy)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == ["agent"]


def test_the_error_for_a_thoroughly_invalid_agent_arrives_as_invalid_argument(
    caller: Caller,
) -> None:
    noise = "\u202e" * 2_000
    parameters = struct_pb2.Struct()
    parameters.update({noise: "\x00"})
    bad = agent_pb2.Agent(
        name=noise,
        model=noise,
        tools=[
            agent_pb2.Tool(name=f"{noise}{i}", description=noise, parameters=parameters)
            for i in range(128)
        ],
        metadata={f"{noise}{i}": f"\x00{noise}" for i in range(16)},
    )
    with pytest.raises(grpc.RpcError) as caught:
        caller.create(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(violations(caught.value)) == 11


def test_tool_parameters_33_levels_deep_are_refused_on_their_field(caller: Caller) -> None:
    """33 levels is also about the deepest Struct protobuf's parser takes in an Agent
    (its default limit is 100 messages deep, three per level): 32 is the documented rule."""
    data: dict[str, Any] = {}
    for _ in range(32):
        data = {"a": data}
    parameters = struct_pb2.Struct()
    parameters.update(data)
    deep = agent_pb2.Tool(name="deep", parameters=parameters)
    with pytest.raises(grpc.RpcError) as caught:
        caller.create(agent_pb2.Agent(name="deep", model="gpt-4o", tools=[deep]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == ["agent.tools[0].parameters"]
