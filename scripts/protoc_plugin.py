"""A protoc plugin (stdin: CodeGeneratorRequest, stdout: CodeGeneratorResponse) that runs one
of grpcio-tools' built-in generators, for `buf generate` (buf.gen.yaml):

    python scripts/protoc_plugin.py grpc_python     # *_pb2_grpc.py
    python scripts/protoc_plugin.py python          # *_pb2.py
    python scripts/protoc_plugin.py pyi             # *_pb2.pyi (protoc's own stubs)

grpcio-tools has no protoc-gen-grpc_python executable: its generators live inside its
protoc. So this hands the request's descriptors to that protoc (--descriptor_set_in) and
returns what it writes. The version is grpcio-tools' (pinned in pyproject.toml), as for
scripts/gen_protos.py.

One difference between the two compilers is undone here: buf fills in every field's
`json_name`, protoc only an explicit one, and the `_pb2.py` modules embed the descriptors.
A json_name equal to the default (protoc's lowerCamelCase of the field name) is dropped, so
the output is byte for byte what scripts/gen_protos.py writes (an explicit json_name equal
to the default would be dropped too: the same descriptor in meaning).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any


def default_json_name(name: str) -> str:
    """protoc's ToJsonName: underscores dropped, the letter after one upper-cased."""
    out, upper = [], False
    for char in name:
        if char == "_":
            upper = True
        else:
            out.append(char.upper() if upper else char)
            upper = False
    return "".join(out)


def drop_default_json_names(messages: Any) -> None:
    for message in messages:
        for field in [*message.field, *message.extension]:
            if field.json_name == default_json_name(field.name):
                field.ClearField("json_name")
        drop_default_json_names(message.nested_type)


def main() -> int:
    from google.protobuf import descriptor_pb2
    from google.protobuf.compiler import plugin_pb2
    from grpc_tools import protoc

    generator = sys.argv[1] if len(sys.argv) > 1 else "grpc_python"
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    for file in request.proto_file:
        drop_default_json_names(file.message_type)
        for extension in file.extension:
            if extension.json_name == default_json_name(extension.name):
                extension.ClearField("json_name")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        descriptors = root / "in.binpb"
        descriptors.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
        )
        out = root / "out"
        out.mkdir()
        option = f"--{generator}_out={request.parameter + ':' if request.parameter else ''}{out}"
        args = ["protoc", f"--descriptor_set_in={descriptors}", option, *request.file_to_generate]
        if protoc.main(args) != 0:
            response.error = f"grpc_tools.protoc --{generator}_out failed"
        else:
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
