"""Hypothesis strategies for every request message, built from the message descriptors.

`requests(descriptor, hints)` draws a message of that type: each field present or not,
scalars over their whole range (NaN and infinities for doubles, any code point but a lone
surrogate for strings, NUL and other control characters included), repeated fields and
maps of a few entries, google.protobuf.Struct as arbitrary JSON, FieldMask paths from the
real field names and from anywhere else. `Hints` steer some string fields towards values
that get past the first check (real agent ids, allowed models, well-formed filters,
emails), so the property tests reach the service and the database, not only validation.

`fuzz_settings(default)`: the examples a fuzz test runs, FAULTS_FUZZ_EXAMPLES if set (what
scripts/fuzz sets), else `default`, the modest CI count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import field_mask_pb2, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = ["Hints", "fuzz_settings", "requests"]

_PROFILE = settings(
    deadline=None,  # one example is a network call to a server on a busy 2-core machine
    database=None,  # no example database: every run draws afresh
    print_blob=True,  # a failure prints the line that reproduces it
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz_settings(default: int) -> settings:
    raw = os.environ.get("FAULTS_FUZZ_EXAMPLES", "").strip()
    return settings(_PROFILE, max_examples=int(raw) if raw else default)


MODELS = ("gpt-4o", "gpt-4o-mini", "o3", "claude-sonnet-4", "gemini-2.5-pro")
FILTER_FIELDS = ("name", "model", "description", "owner_id", "create_time", "metadata.team")
FILTER_OPERATORS = ("=", "!=", "<", ">", "<=", ">=", ":", "=~", "")


@dataclass
class Hints:
    """Values from the running system that make a drawn request meaningful."""

    agent_ids: Sequence[str] = ()
    emails: Sequence[str] = ()
    user_ids: Sequence[str] = ()
    extra: dict[str, st.SearchStrategy[str]] = field(default_factory=dict)


def _msg(fd: Any) -> Descriptor:
    """The message type of a message (or map) field."""
    described: Descriptor | None = fd.message_type
    assert described is not None, fd.full_name
    return described


def _text(max_size: int = 64) -> st.SearchStrategy[str]:
    return st.text(st.characters(codec="utf-8"), max_size=max_size)


def _quoted() -> st.SearchStrategy[str]:
    return _text(20).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')


def _filters() -> st.SearchStrategy[str]:
    term = st.builds(
        lambda f, op, v: f"{f} {op} {v}",
        st.sampled_from(FILTER_FIELDS) | _text(12),
        st.sampled_from(FILTER_OPERATORS),
        _quoted() | _text(12) | st.sampled_from(['"x*"', "*", '""', "NULL", "1e999"]),
    )
    joined = st.lists(term, min_size=1, max_size=4).flatmap(
        lambda terms: st.lists(
            st.sampled_from([" AND ", " OR ", " and ", " ", " AND NOT ", ") AND ("]),
            min_size=len(terms) - 1,
            max_size=len(terms) - 1,
        ).map(lambda ops: terms[0] + "".join(o + t for o, t in zip(ops, terms[1:], strict=True)))
    )
    return joined | _text(80)


def _string(name: str, hints: Hints) -> st.SearchStrategy[str]:
    uuids = st.uuids().map(str)
    if name in hints.extra:
        return hints.extra[name] | _text()
    if name in ("id", "agent_id"):
        known = st.sampled_from(list(hints.agent_ids)) if hints.agent_ids else uuids
        return known | uuids | _text(40)
    if name == "owner_id":
        known = st.sampled_from(list(hints.user_ids)) if hints.user_ids else uuids
        return known | _text(40)
    if name == "request_id":
        return uuids | _text(40)
    if name == "model":
        return st.sampled_from(MODELS) | _text(40)
    if name == "email":
        known = st.sampled_from(list(hints.emails)) if hints.emails else st.emails()
        return known | st.emails() | _text(300)
    if name == "filter":
        return _filters()
    if name == "order_by":
        return st.sampled_from(["name", "name asc", "create_time desc", "name desc, id"]) | _text(
            30
        )
    if "password" in name:
        return _text(140)
    return _text()


def _scalar(fd: FieldDescriptor, hints: Hints) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return _string(fd.name, hints)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE,):
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        return st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, -1, 1, 1000, 1001])
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        return st.integers(-(2**63), 2**63 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in fd.enum_type.values] if fd.enum_type else [0]
        return st.sampled_from(numbers) | st.integers(-5, 100)
    raise TypeError(f"no strategy for {fd.full_name}")


def _json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(_text(16), children, max_size=4)


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | _text(30),
    _json_containers,  # a named function: Hypothesis checks a lambda's source for recursion
    max_leaves=20,
)


def _struct() -> st.SearchStrategy[Message]:
    def build(value: dict[str, Any]) -> Message:
        struct = struct_pb2.Struct()
        struct.update(value)
        return struct

    return st.dictionaries(_text(16), _JSON, max_size=6).map(build)


def _field_mask(descriptor: Descriptor | None) -> st.SearchStrategy[Message]:
    names = [f.name for f in descriptor.fields] if descriptor is not None else ["name"]
    path = (
        st.sampled_from(names) | st.sampled_from(["tools.name", "metadata.team", "*"]) | _text(20)
    )
    return st.lists(path, max_size=5).map(lambda paths: field_mask_pb2.FieldMask(paths=paths))


def _timestamp() -> st.SearchStrategy[Message]:
    return st.builds(
        lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n),
        st.integers(-62135596800, 253402300799),
        st.integers(0, 999_999_999),
    )


def _value(fd: FieldDescriptor, hints: Hints, sibling: Descriptor | None) -> st.SearchStrategy[Any]:
    if fd.type != FieldDescriptor.TYPE_MESSAGE:
        return _scalar(fd, hints)
    return requests(_msg(fd), hints, sibling)


def requests(
    descriptor: Descriptor, hints: Hints, sibling: Descriptor | None = None
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type; `sibling` is the resource a FieldMask refers to."""
    name = descriptor.full_name
    if name == "google.protobuf.Struct":
        return _struct()
    if name == "google.protobuf.FieldMask":
        return _field_mask(sibling)
    if name == "google.protobuf.Timestamp":
        return _timestamp()
    cls = message_factory.GetMessageClass(descriptor)
    resource = next(
        (f.message_type for f in descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE),
        None,
    )
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE and _msg(fd).GetOptions().map_entry:
            key = _scalar(_msg(fd).fields_by_name["key"], hints)
            value = _value(_msg(fd).fields_by_name["value"], hints, resource)
            optional[fd.name] = st.dictionaries(key, value, max_size=20)
        elif fd.is_repeated:
            optional[fd.name] = st.lists(_value(fd, hints, resource), max_size=4)
        else:
            optional[fd.name] = _value(fd, hints, resource)
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        fd = cls.DESCRIPTOR.fields_by_name[name]
        target: Any = getattr(message, name)
        if fd.type == FieldDescriptor.TYPE_MESSAGE and _msg(fd).GetOptions().map_entry:
            value_fd = _msg(fd).fields_by_name["value"]
            for key, item in value.items():
                if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif fd.is_repeated:
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                getattr(message, name).extend(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message
