"""Reflection serves our protos with their comments, and never a stale descriptor set."""

from __future__ import annotations

from importlib import resources

import pytest
from agentplatform.agent.v1 import agent_pb2
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from shared.rpc.reflection import DESCRIPTOR_SET, SourceReflectionServicer, load_source_descriptors

AGENT_PROTO = agent_pb2.DESCRIPTOR.name


def generated_set() -> descriptor_pb2.FileDescriptorSet:
    data = (resources.files("agentplatform") / DESCRIPTOR_SET).read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def comments(file: descriptor_pb2.FileDescriptorProto) -> str:
    return "".join(location.leading_comments for location in file.source_code_info.location)


def test_the_generated_set_matches_the_generated_code_and_keeps_comments() -> None:
    sources = load_source_descriptors()
    assert AGENT_PROTO in sources
    file = descriptor_pb2.FileDescriptorProto.FromString(sources[AGENT_PROTO])
    assert "Creates an agent owned by the caller." in comments(file)
    # Served without json_name, like the generated code's own descriptors.
    assert all(not field.HasField("json_name") for m in file.message_type for field in m.field)


def test_a_file_that_differs_from_the_generated_code_is_not_used() -> None:
    stale = generated_set()
    for file in stale.file:
        if file.name == AGENT_PROTO:
            file.message_type[0].field[0].name = "renamed"
    sources = load_source_descriptors(stale.SerializeToString())
    assert AGENT_PROTO not in sources
    assert sources  # the other files still are


def servicer_answer(
    servicer: SourceReflectionServicer, symbol: str
) -> list[descriptor_pb2.FileDescriptorProto]:
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    (response,) = list(servicer.ServerReflectionInfo(iter([request]), None))
    return [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in response.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("with_sources", [True, False])
def test_the_servicer_answers_with_source_info_where_it_has_it(with_sources: bool) -> None:
    servicer = SourceReflectionServicer(
        ["agentplatform.agent.v1.AgentService"], sources=None if with_sources else {}
    )
    files = {f.name: f for f in servicer_answer(servicer, "agentplatform.agent.v1.AgentService")}
    # The file and everything it imports, as grpcio-reflection answers.
    assert {AGENT_PROTO, "google/protobuf/timestamp.proto", "google/protobuf/struct.proto"} <= set(
        files
    )
    assert bool(comments(files[AGENT_PROTO])) is with_sources
    assert not comments(files["google/protobuf/timestamp.proto"])
