"""ListAgents' `filter` (a documented subset of AIP-160) and `order_by` (AIP-132).

Filter grammar (whitespace between tokens is free; `AND` is case-sensitive)::

    filter     := term ( "AND" term )*
    term       := field "=" string
    field      := "model" | "name" | "owner_id" | "metadata." key
    key        := [A-Za-z0-9_.-]+ | string (a metadata key; dots belong to the key; quoted,
                                            any key an agent may have: `metadata."kéy"`)
    string     := '"' ( any character but '"' and '\\' | '\\"' | '\\\\' )* '"'

- `name = "sup*"`: a trailing `*` makes a prefix match (names starting with "sup");
  a `*` anywhere else is literal.
- A value takes what its field takes (services/agent_svc/service/validation.py): no
  control characters in model, name and owner_id values; none but tab and line breaks in
  metadata values. NUL is never accepted.
- `owner_id = "<uuid>"`: admins only; anyone else gets PERMISSION_DENIED
  (`OWNER_FILTER_NOT_ALLOWED`): the filter is well formed, the caller may not use it.
- Every other form (OR, NOT, `!=`, `:`, parentheses, unquoted values, other fields) is
  INVALID_ARGUMENT with a violation on `filter`.

order_by: `create_time`, `update_time` or `name`, optionally followed by `asc` or `desc`;
empty means `create_time desc`. Ties are broken by id, in the same direction.

The parsed result is a small typed structure; the repository turns it into SQL with
bound parameters only.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from enum import StrEnum

from services.agent_svc.service.validation import MAX_METADATA_KEY, shown
from shared.config.text import line_problem, text_problem
from shared.rpc.errors import InvalidArgument, PermissionDenied

__all__ = [
    "MAX_FILTER_LENGTH",
    "AgentFilter",
    "Condition",
    "MetadataEquals",
    "ModelEquals",
    "NameEquals",
    "NamePrefix",
    "Ordering",
    "OwnerEquals",
    "SortField",
    "parse_filter",
    "parse_order_by",
]

MAX_FILTER_LENGTH = 4_096
_METADATA_PREFIX = "metadata."
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_.-]+)?")
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class ModelEquals:
    model: str

    def canonical(self) -> str:
        return f"model = {_quote(self.model)}"


@dataclass(frozen=True, slots=True)
class NameEquals:
    name: str

    def canonical(self) -> str:
        return f"name = {_quote(self.name)}"


@dataclass(frozen=True, slots=True)
class NamePrefix:
    prefix: str

    def canonical(self) -> str:
        return f"name = {_quote(self.prefix + '*')}"


@dataclass(frozen=True, slots=True)
class MetadataEquals:
    key: str
    value: str

    def canonical(self) -> str:
        key = self.key if _METADATA_KEY.fullmatch(self.key) else _quote(self.key)
        return f"metadata.{key} = {_quote(self.value)}"


@dataclass(frozen=True, slots=True)
class OwnerEquals:
    owner_id: uuid.UUID

    def canonical(self) -> str:
        return f'owner_id = "{self.owner_id}"'


Condition = ModelEquals | NameEquals | NamePrefix | MetadataEquals | OwnerEquals


@dataclass(frozen=True, slots=True)
class AgentFilter:
    """Conditions that all hold (AND)."""

    conditions: tuple[Condition, ...] = ()

    def canonical(self) -> str:
        """One spelling per meaning (order of terms and spacing do not matter)."""
        return " AND ".join(sorted({c.canonical() for c in self.conditions}))


class SortField(StrEnum):
    CREATE_TIME = "create_time"
    UPDATE_TIME = "update_time"
    NAME = "name"


@dataclass(frozen=True, slots=True)
class Ordering:
    field: SortField = SortField.CREATE_TIME
    descending: bool = True

    def canonical(self) -> str:
        return f"{self.field.value} {'desc' if self.descending else 'asc'}"


def _bad_filter(description: str) -> InvalidArgument:
    return InvalidArgument.field("filter", description)


class _Scanner:
    """A cursor over the filter text that reads one token at a time."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def field(self) -> tuple[str, str | None]:
        """A field's name, and for `metadata."…"` the quoted key (AIP-160 lets a field be a
        string: a key with characters a bare one cannot hold)."""
        self.skip_space()
        if self.text.startswith(_METADATA_PREFIX + '"', self.pos):
            self.pos += len(_METADATA_PREFIX)
            key = self.string("a metadata key")
            return _METADATA_PREFIX + key, key
        match = _FIELD.match(self.text, self.pos)
        if match is None:
            raise _bad_filter(f"expected a field name at position {self.pos + 1}")
        self.pos = match.end()
        return match.group(), None

    def equals(self, field: str) -> None:
        self.skip_space()
        if not self.text.startswith("=", self.pos):
            raise _bad_filter(f'expected "=" after {shown(field)} (only equality is supported)')
        self.pos += 1

    def string(self, field: str) -> str:
        self.skip_space()
        if not self.text.startswith('"', self.pos):
            raise _bad_filter(f"the value of {shown(field)} must be a double-quoted string")
        out: list[str] = []
        pos = self.pos + 1
        while pos < len(self.text):
            char = self.text[pos]
            if char == '"':
                self.pos = pos + 1
                return "".join(out)
            if char == "\\":
                escaped = self.text[pos + 1 : pos + 2]
                if escaped not in ('"', "\\"):
                    raise _bad_filter(f'only \\" and \\\\ escapes are allowed (position {pos + 1})')
                out.append(escaped)
                pos += 2
                continue
            out.append(char)
            pos += 1
        raise _bad_filter("unterminated string")

    def conjunction(self) -> None:
        self.skip_space()
        if (
            not self.text.startswith("AND", self.pos)
            or self.text[self.pos + 3 : self.pos + 4].isalnum()
        ):
            raise _bad_filter(f"expected AND at position {self.pos + 1}")
        self.pos += 3


def _condition(
    field: str, value: str, *, allow_owner: bool, quoted_key: str | None = None
) -> Condition:
    if quoted_key is not None:  # what an agent's metadata may hold, nothing more
        if not quoted_key or len(quoted_key) > MAX_METADATA_KEY:
            raise _bad_filter(f"a metadata key must be 1 to {MAX_METADATA_KEY} characters")
        if problem := line_problem(quoted_key):
            raise _bad_filter(f"a metadata key {problem}")
    key = field[len(_METADATA_PREFIX) :] if field.startswith(_METADATA_PREFIX) else None
    if field not in ("model", "name", "owner_id") and not (
        key is not None and (quoted_key is not None or _METADATA_KEY.fullmatch(key))
    ):
        raise _bad_filter(
            f"unknown field {shown(field)}; filterable: model, name, metadata.KEY"
            + (", owner_id" if allow_owner else "")
        )
    if field == "owner_id" and not allow_owner:
        raise PermissionDenied(
            "only admins may filter by owner_id", reason="OWNER_FILTER_NOT_ALLOWED"
        )
    # A value its field refuses matches nothing stored, and NUL would reach the database
    # (PostgreSQL refuses it): the field's own text rule applies to its filter value.
    problem = text_problem(value) if key is not None else line_problem(value)
    if problem:
        raise _bad_filter(f"the value of {shown(field)} {problem}")
    if key is not None:
        return MetadataEquals(key, value)
    if field == "model":
        return ModelEquals(value)
    if field == "name":
        return NamePrefix(value[:-1]) if value.endswith("*") else NameEquals(value)
    try:
        return OwnerEquals(uuid.UUID(value))
    except ValueError:
        raise _bad_filter("owner_id must be a UUID") from None


def parse_filter(text: str, *, allow_owner: bool) -> AgentFilter:
    """The conditions of a filter expression; InvalidArgument on `filter` if malformed."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _bad_filter(f"must be at most {MAX_FILTER_LENGTH} characters")
    scanner = _Scanner(text)
    conditions: list[Condition] = []
    if scanner.at_end():
        return AgentFilter()
    while True:
        field, quoted_key = scanner.field()
        scanner.equals(field)
        value = scanner.string(field)
        conditions.append(_condition(field, value, allow_owner=allow_owner, quoted_key=quoted_key))
        if scanner.at_end():
            return AgentFilter(tuple(conditions))
        scanner.conjunction()


def parse_order_by(text: str) -> Ordering:
    """`field [asc|desc]`; empty → create_time desc; InvalidArgument on `order_by` if not."""
    words = text.split()
    if not words:
        return Ordering()
    fields = [f.value for f in SortField]
    allowed = ", ".join(fields)
    if len(words) > 2 or words[0] not in fields:
        raise InvalidArgument.field(
            "order_by", f"must be one field of {allowed}, optionally followed by asc or desc"
        )
    direction = words[1].lower() if len(words) == 2 else "asc"
    if direction not in ("asc", "desc"):
        raise InvalidArgument.field("order_by", "the direction must be asc or desc")
    return Ordering(SortField(words[0]), descending=direction == "desc")
