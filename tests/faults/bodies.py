"""Request bodies a well-behaved client never sends, and the methods to send them to.

- `methods_of(channel)`: every method the server offers, found through its own reflection
  service (so a service added later is fuzzed without editing this file).
- `GARBAGE`: bodies no protobuf message can parse (a bad wire type, a truncated varint,
  field number 0, a length past the end).
- `string_slots(message)` / `with_value(message, slot, value)`: every place a string can
  go in a message — scalar and repeated fields, nested messages, map keys and values, the
  keys and string values of a google.protobuf.Struct — and a copy with one of them set.
- `with_invalid_utf8(message, slot)`: the serialized message with that string replaced by
  invalid UTF-8 bytes of the same length (proto3 forbids them, so only a hand-built body
  carries them).
- `deep_struct(depth)`, `deep_list(depth)`: raw google.protobuf.Value bytes nested
  `depth` levels (the parser's recursion limit is far below 10,000).
- `truncated`, `bit_flipped`: mutations of a valid body.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

__all__ = [
    "GARBAGE",
    "Method",
    "Slot",
    "bit_flipped",
    "deep_list",
    "deep_struct",
    "describe_slot",
    "length_delimited",
    "methods_of",
    "string_slots",
    "truncated",
    "with_invalid_utf8",
    "with_value",
]

GARBAGE: tuple[bytes, ...] = (
    b"\x0f",  # field 1, wire type 7: no such wire type
    b"\x08\x80",  # field 1 varint, truncated
    b"\x00",  # field number 0
    b"\x0a\x05ab",  # field 1, 5 bytes announced, 2 sent
    b"\xff" * 16,  # a varint tag longer than ten bytes
)
INVALID_UTF8 = b"\xc3\x28\xff\xfe"  # a broken two-byte sequence, then bytes never valid
_MARKER = "QZXJ"  # as long as INVALID_UTF8; in no base message


@dataclass(frozen=True)
class Method:
    path: str  # "/package.Service/Method"
    service: str
    name: str
    input: Descriptor
    streaming: bool

    @property
    def request_class(self) -> type[Message]:
        cls: type[Message] = message_factory.GetMessageClass(self.input)
        return cls


def _msg(fd: Any) -> Descriptor:
    """The message type of a message (or map) field."""
    described: Descriptor | None = fd.message_type
    assert described is not None, fd.full_name
    return described


def methods_of(channel: grpc.Channel) -> list[Method]:
    """Every method of every service the server lists through reflection."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    found = []
    for service_name in database.get_services():
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            found.append(
                Method(
                    path=f"/{service.full_name}/{method.name}",
                    service=service.full_name,
                    name=method.name,
                    input=_local(method.input_type),
                    streaming=method.client_streaming or method.server_streaming,
                )
            )
    return found


def _local(described: Descriptor) -> Descriptor:
    """The same message from this process's default pool when it has it (its generated
    class then compares equal to the test's own messages), else the reflected one."""
    try:
        local: Descriptor = descriptor_pool.Default().FindMessageTypeByName(described.full_name)
    except KeyError:
        return described
    return local


# -- string slots ---------------------------------------------------------------------------

Slot = tuple[Any, ...]
"""A path of steps: a field name, then ("index", i), ("key", k) or ("value", k)."""


def string_slots(message: Message, prefix: Slot = ()) -> Iterator[Slot]:
    """Every string-valued place in `message` as it is (set fields, present entries)."""
    for field, value in message.ListFields():
        path = (*prefix, field.name)
        if _is_map(field):
            value_field = _msg(field).fields_by_name["value"]
            for key in list(value):
                if _msg(field).fields_by_name["key"].type == FieldDescriptor.TYPE_STRING:
                    yield (*path, ("key", key))
                if value_field.type == FieldDescriptor.TYPE_STRING:
                    yield (*path, ("value", key))
                elif value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    yield from string_slots(value[key], (*path, ("value", key)))
        elif field.is_repeated:
            for i, item in enumerate(value):
                if field.type == FieldDescriptor.TYPE_STRING:
                    yield (*path, ("index", i))
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    yield from string_slots(item, (*path, ("index", i)))
        elif field.type == FieldDescriptor.TYPE_STRING:
            yield path
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            yield from string_slots(value, path)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and _msg(field).GetOptions().map_entry


def with_value(message: Message, slot: Slot, value: str) -> Message:
    """A copy of `message` with the string at `slot` replaced by `value`."""
    copy = type(message)()
    copy.CopyFrom(message)
    _set(copy, slot, value)
    return copy


def _set(message: Message, slot: Slot, value: str) -> None:
    name, rest = slot[0], slot[1:]
    field = message.DESCRIPTOR.fields_by_name[name]
    container = getattr(message, name)
    if not rest:
        setattr(message, name, value)
        return
    if isinstance(rest[0], str):  # a field of the nested message
        _set(container, rest, value)
        return
    step, key = rest[0]
    if step == "index":
        if len(rest) == 1:
            container[key] = value
        else:
            _set(container[key], rest[1:], value)
    elif step == "key":
        old = container[key]
        if _msg(field).fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
            entry = type(old)()
            entry.CopyFrom(old)
            del container[key]
            container[value].CopyFrom(entry)
        else:
            del container[key]
            container[value] = old
    elif len(rest) == 1:  # a map value that is a string
        container[key] = value
    else:
        _set(container[key], rest[1:], value)


def describe_slot(slot: Slot) -> str:
    out = ""
    for step in slot:
        if isinstance(step, str):
            out += ("." if out else "") + step
        else:
            kind, key = step
            out += f"[{key!r}]" if kind != "key" else f"{{key {key!r}}}"
    return out


def with_invalid_utf8(message: Message, slot: Slot) -> bytes:
    """`message` serialized with the string at `slot` made of invalid UTF-8 bytes."""
    body = with_value(message, slot, _MARKER).SerializeToString()
    assert body.count(_MARKER.encode()) == 1, "the marker must be unique in the body"
    return body.replace(_MARKER.encode(), INVALID_UTF8)


# -- raw wire format ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_struct(depth: int) -> bytes:
    """A google.protobuf.Struct nested `depth` levels, {"a": {"a": … {}}}, as raw bytes."""
    struct = b""  # the innermost, empty Struct
    for _ in range(depth):
        value = length_delimited(5, struct)  # Value.struct_value
        entry = length_delimited(1, b"a") + length_delimited(2, value)  # map entry
        struct = length_delimited(1, entry)  # Struct.fields
    return struct


def deep_list(depth: int) -> bytes:
    """A google.protobuf.Struct {"a": [[[…]]]} with lists nested `depth` levels."""
    value = b""
    for _ in range(depth):
        list_value = length_delimited(1, value)  # ListValue.values
        value = length_delimited(6, list_value)  # Value.list_value
    entry = length_delimited(1, b"a") + length_delimited(2, value)
    return length_delimited(1, entry)


def truncated(body: bytes, keep: int) -> bytes:
    return body[: max(0, min(len(body) - 1, keep))]


def bit_flipped(body: bytes, positions: Sequence[int]) -> bytes:
    """`body` with the bits at `positions` (modulo its length in bits) flipped."""
    if not body:
        return body
    flipped = bytearray(body)
    for position in positions:
        bit = position % (len(body) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)
