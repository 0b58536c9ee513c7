"""Server reflection that shows the comments written in the protos.

grpcio-reflection answers from the process's descriptor pool, built from the generated
modules, which keep no source info; and upb's `FileDescriptor.CopyToProto` drops it even
when a pool has it. So `grpcurl describe` would show bare signatures. Code generation
(scripts/gen_protos.py) also writes our files' descriptors with their source info to
`agentplatform/descriptor_set.binpb`; this servicer answers with those for our files and
with the pool's copy for everything else (google/protobuf, health, reflection).

A descriptor-set file that does not describe the same protos as the generated modules
(stale generation) is not used: each of its files must equal the pool's copy once its
source info is removed, else that file is served without comments and a warning is logged.
The fields' `json_name`s, which protoc writes into a descriptor set but not into generated
code, are removed: served, they would change the JSON that grpcurl prints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from agentplatform.errors.v1 import errors_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["AsyncSourceReflectionServicer", "SourceReflectionServicer", "load_source_descriptors"]

_log = logging.getLogger(__name__)
DESCRIPTOR_SET = "descriptor_set.binpb"
# Every reason an ErrorInfo may carry, with its documentation: describable by reflection
# (`grpcurl describe agentplatform.errors.v1.ErrorReason`) though no RPC names the enum.
ERROR_REASONS = errors_pb2.DESCRIPTOR.enum_types_by_name["ErrorReason"].full_name


def load_source_descriptors(data: bytes | None = None, pool: Any = None) -> dict[str, bytes]:
    """File name → serialized FileDescriptorProto with source info, for each file of the
    descriptor set (by default the generated one) that matches the pool's."""
    pool = pool or descriptor_pool.Default()
    if data is None:
        try:
            data = (resources.files("agentplatform") / DESCRIPTOR_SET).read_bytes()
        except (FileNotFoundError, ModuleNotFoundError):
            _log.warning("no %s: reflection serves the protos without comments", DESCRIPTOR_SET)
            return {}
    found: dict[str, bytes] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        try:
            loaded = pool.FindFileByName(file.name)
        except KeyError:
            continue  # not imported by this process: nothing to describe
        _without_json_names(file)
        expected = descriptor_pb2.FileDescriptorProto()
        loaded.CopyToProto(expected)
        bare = descriptor_pb2.FileDescriptorProto()
        bare.CopyFrom(file)
        bare.ClearField("source_code_info")
        if bare != expected:
            _log.warning("%s differs from the generated code: served without comments", file.name)
            continue
        found[file.name] = file.SerializeToString()
    return found


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    """Clears the `json_name` protoc computes for each field of a descriptor set: the
    generated code's descriptors have none, and a client that sees one (grpcurl) prints
    lowerCamelCase names instead of the field names operators already script against."""
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in (*message.field, *message.extension):
            field.ClearField("json_name")
    for extension in file.extension:
        extension.ClearField("json_name")


class _WithSources:
    """Answers file requests with source info where known (over grpcio-reflection's
    servicer, sync or grpc.aio)."""

    _sources: dict[str, bytes]

    def __init__(
        self, service_names: Iterable[str], sources: Mapping[str, bytes] | None = None
    ) -> None:
        super().__init__(service_names)  # type: ignore[call-arg]
        self._sources = load_source_descriptors() if sources is None else dict(sources)

    def _file_by_filename(self, request: Any, filename: str) -> Any:
        return self._with_sources(super()._file_by_filename(request, filename))  # type: ignore[misc]

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        return self._with_sources(
            super()._file_containing_symbol(request, fully_qualified_name)  # type: ignore[misc]
        )

    def _file_containing_extension(
        self, request: Any, containing_type: str, extension_number: int
    ) -> Any:
        return self._with_sources(
            super()._file_containing_extension(  # type: ignore[misc]
                request, containing_type, extension_number
            )
        )

    def _with_sources(
        self, response: reflection_pb2.ServerReflectionResponse
    ) -> reflection_pb2.ServerReflectionResponse:
        if not response.HasField("file_descriptor_response") or not self._sources:
            return response
        files = response.file_descriptor_response.file_descriptor_proto
        for index, serialized in enumerate(files):
            name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
            source = self._sources.get(name)
            if source is not None:
                files[index] = source
        return response


class SourceReflectionServicer(_WithSources, reflection.ReflectionServicer):  # type: ignore[misc]
    """grpcio-reflection's servicer, answering file requests with source info where known."""


class AsyncSourceReflectionServicer(_WithSources, reflection_aio.ReflectionServicer):  # type: ignore[misc]
    """The same for a grpc.aio server."""
