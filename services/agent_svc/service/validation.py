"""Input rules for agents. Every rule is checked and the violations reported at once.

Lengths count Unicode code points ("characters"). Field paths follow AIP-193:
`agent.tools[2].name`, `agent.metadata["team"]`.

What text each field accepts (the rules of shared.config.text):

- One-line fields (name, model, tool names, metadata keys): no control, format or
  surrogate characters (`line_problem`): they are compared by eye, shown in lists and
  logs, and a line break or a bidi override in them can only mislead. Tool names are
  further limited to 1-64 letters, digits, "_" and "-".
- Free text (description, instructions, tool descriptions, metadata values): no control
  characters but tab, line feed and carriage return (`text_problem`).
- Tool parameters (a JSON Schema, sent as a google.protobuf.Struct): no NUL in any key or
  string at any depth, finite numbers, and at most `MAX_PARAMETERS_DEPTH` levels (the
  parameters object is level 1; each nested object or list is one level more).

Byte limits (UTF-8 bytes; a limit in characters alone lets 256,000 four-byte characters
of instructions weigh 1 MB):

- Tool parameters: at most `MAX_TOOL_PARAMETERS_BYTES` (16 KiB) each, as compact JSON
  (no spaces, characters unescaped).
- A whole agent: at most `MAX_AGENT_BYTES` (1 MiB) as the Agent message it is sent as
  (services/agent_svc/service/sizing.py), so GetAgent, and a ListAgents page of one,
  always fit a client's default 4 MiB receive limit. Checked once every other rule holds.

NUL is refused everywhere because PostgreSQL refuses it in text columns, and inside JSON
it cannot be read back by the JSON operators a metadata filter uses: one stored NUL would
fail every filtered listing that scans its row.

Errors stay small: the status and its details travel in the response trailers, and a
client's default limit on them is 8 KiB (above it the client sees RESOURCE_EXHAUSTED, not
the INVALID_ARGUMENT sent). So at most `MAX_REPORTED` violations are listed, and text
echoed from the request (a metadata key in a path, an unknown field name) is cut to
`MAX_SHOWN` characters (`shown`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

from services.agent_svc.domain import AgentInput, Tool
from services.agent_svc.service.sizing import SERVER_FIELDS_MAX, settable_size
from shared.config.text import has_control_characters, has_nul, line_problem, text_problem
from shared.rpc.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_AGENT_BYTES",
    "MAX_DESCRIPTION",
    "MAX_INSTRUCTIONS",
    "MAX_METADATA_KEY",
    "MAX_METADATA_PAIRS",
    "MAX_METADATA_VALUE",
    "MAX_NAME",
    "MAX_PARAMETERS_DEPTH",
    "MAX_REPORTED",
    "MAX_SHOWN",
    "MAX_TOOLS",
    "MAX_TOOL_DESCRIPTION",
    "MAX_TOOL_PARAMETERS_BYTES",
    "check_agent",
    "reported",
    "shown",
]

MAX_NAME = 256
MAX_DESCRIPTION = 512
MAX_INSTRUCTIONS = 256_000
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION = 1_024
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_PARAMETERS_DEPTH = 32
MAX_TOOL_PARAMETERS_BYTES = 16 * 1024
MAX_AGENT_BYTES = 1024 * 1024
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: `$` would let a final "\n" in
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
MAX_REPORTED = 10
MAX_SHOWN = 40


def check_agent(agent: AgentInput, allowed_models: Collection[str], prefix: str = "agent") -> None:
    """Raises InvalidArgument listing the rules the agent breaks (up to MAX_REPORTED)."""
    violations = reported(_violations(agent, allowed_models, prefix), prefix)
    if not violations:
        violations = list(_size(agent, prefix))
    if violations:
        raise InvalidArgument(violations)


def reported(violations: Iterable[FieldViolation], field: str) -> list[FieldViolation]:
    """The first MAX_REPORTED violations, and one more on `field` saying there are more."""
    listed = list(itertools.islice(violations, MAX_REPORTED + 1))
    if len(listed) > MAX_REPORTED:
        listed[MAX_REPORTED:] = [FieldViolation(field, "has more problems than listed here")]
    return listed


def shown(text: str) -> str:
    """Request text quoted for an error message, cut to MAX_SHOWN characters."""
    return repr(text[:MAX_SHOWN]) + ("…" if len(text) > MAX_SHOWN else "")


def _violations(
    agent: AgentInput, allowed_models: Collection[str], prefix: str
) -> Iterator[FieldViolation]:
    yield from _name(agent.name, f"{prefix}.name")
    yield from _text(agent.description, MAX_DESCRIPTION, f"{prefix}.description")
    yield from _model(agent.model, allowed_models, f"{prefix}.model")
    yield from _text(agent.instructions, MAX_INSTRUCTIONS, f"{prefix}.instructions")
    yield from _tools(agent.tools, f"{prefix}.tools")
    yield from _metadata(agent.metadata, f"{prefix}.metadata")
    yield from _in_range(agent.temperature, TEMPERATURE_RANGE, f"{prefix}.temperature")
    yield from _in_range(agent.top_p, TOP_P_RANGE, f"{prefix}.top_p")


def _name(name: str, field: str) -> Iterator[FieldViolation]:
    if not name:
        yield FieldViolation(field, "required")
    elif len(name) > MAX_NAME:
        yield FieldViolation(field, f"must be at most {MAX_NAME} characters")
    elif problem := line_problem(name):
        yield FieldViolation(field, problem)
    elif not name.strip():
        yield FieldViolation(field, "must not be blank")


def _text(text: str, limit: int, field: str) -> Iterator[FieldViolation]:
    if len(text) > limit:
        yield FieldViolation(field, f"must be at most {limit} characters")
    elif problem := text_problem(text):
        yield FieldViolation(field, problem)


def _model(model: str, allowed_models: Collection[str], field: str) -> Iterator[FieldViolation]:
    if not model:
        yield FieldViolation(field, "required")
    elif model not in allowed_models:
        yield FieldViolation(
            field,
            _short_line_problem(model)
            or "not an allowed model; allowed: " + ", ".join(allowed_models),
        )


def _short_line_problem(text: str) -> str | None:
    """line_problem for text short enough to be what was meant (the check looks at each
    character in Python: a megabyte would cost a second of CPU); longer text is refused
    for its length or its form anyway."""
    return line_problem(text) if len(text) <= MAX_NAME else None


def _tools(tools: tuple[Tool, ...], field: str) -> Iterator[FieldViolation]:
    if len(tools) > MAX_TOOLS:
        yield FieldViolation(field, f"at most {MAX_TOOLS} tools")
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        at = f"{field}[{index}]"
        if not TOOL_NAME.fullmatch(tool.name):
            yield FieldViolation(
                f"{at}.name",
                _short_line_problem(tool.name)
                or "must be 1 to 64 letters, digits, underscores or hyphens",
            )
        elif tool.name in seen:
            yield FieldViolation(f"{at}.name", f"duplicate tool name {tool.name!r}")
        seen.add(tool.name)
        yield from _text(tool.description, MAX_TOOL_DESCRIPTION, f"{at}.description")
        if problem := _parameters_problem(tool.parameters):
            yield FieldViolation(f"{at}.parameters", problem)


def _parameters_problem(parameters: Mapping[str, Any]) -> str | None:
    """What is wrong with a tool's parameters, or None. The size comes first: measuring it
    runs in C, while the walk over every value runs in Python (400,000 numbers, 4 MB on
    the wire, would take most of a second of CPU)."""
    try:
        compact = json.dumps(parameters, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return _TOO_DEEP
    if len(compact.encode("utf-8", "surrogatepass")) > MAX_TOOL_PARAMETERS_BYTES:
        return f"must be at most {MAX_TOOL_PARAMETERS_BYTES:,} bytes as compact JSON"
    return _walk_problem(parameters)


def _size(agent: AgentInput, field: str) -> Iterator[FieldViolation]:
    """The whole agent within MAX_AGENT_BYTES, with the most its server fields can add."""
    size = settable_size(agent) + SERVER_FIELDS_MAX
    if size > MAX_AGENT_BYTES:
        yield FieldViolation(
            field,
            f"must be at most {MAX_AGENT_BYTES:,} bytes serialized (1 MiB); "
            f"this one would be {size:,}",
        )


_TOO_DEEP = f"must not be nested deeper than {MAX_PARAMETERS_DEPTH} levels"
_NUL = "must not contain NUL characters"


def _walk_problem(parameters: Mapping[str, Any]) -> str | None:
    """NUL, depth and non-finite numbers anywhere in the parameters. Iterative, so no
    depth of nesting can exhaust the stack before the depth rule refuses it."""
    pending: list[tuple[Any, int]] = [(parameters, 1)]
    while pending:
        container, depth = pending.pop()
        if depth > MAX_PARAMETERS_DEPTH:
            return _TOO_DEEP
        if isinstance(container, Mapping):
            if any(has_nul(key) for key in container):
                return _NUL
            items: Iterable[Any] = container.values()
        else:
            items = container
        for item in items:
            kind = type(item)
            if kind is str:
                if has_nul(item):
                    return _NUL
            elif kind is float:
                if not math.isfinite(item):
                    return "numbers must be finite"
            elif kind is dict or kind is list or isinstance(item, Mapping):
                pending.append((item, depth + 1))
    return None


def _metadata(metadata: Mapping[str, str], field: str) -> Iterator[FieldViolation]:
    if len(metadata) > MAX_METADATA_PAIRS:
        yield FieldViolation(field, f"at most {MAX_METADATA_PAIRS} pairs")
    for key, value in metadata.items():
        at = f"{field}[{_quoted(key)}]"
        if not key:
            yield FieldViolation(at, "key must not be empty")
        elif len(key) > MAX_METADATA_KEY:
            yield FieldViolation(at, f"key must be at most {MAX_METADATA_KEY} characters")
        elif problem := line_problem(key):
            yield FieldViolation(at, f"key {problem}")
        if len(value) > MAX_METADATA_VALUE:
            yield FieldViolation(at, f"value must be at most {MAX_METADATA_VALUE} characters")
        elif problem := text_problem(value):
            yield FieldViolation(at, f"value {problem}")


def _quoted(key: str) -> str:
    """The key as a JSON string for a field path, with every character a one-line field
    refuses escaped too (so the path shows what was sent and cannot break a log line), cut
    to about MAX_SHOWN characters."""
    escaped = "".join(
        f"\\u{ord(char):04x}" if has_control_characters(char) else char
        for char in json.dumps(key[: MAX_SHOWN + 1], ensure_ascii=False)[1:-1]
    )
    return '"' + (escaped[:MAX_SHOWN] + "…" if len(escaped) > MAX_SHOWN else escaped) + '"'


def _in_range(
    value: float | None, bounds: tuple[float, float], field: str
) -> Iterator[FieldViolation]:
    low, high = bounds
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        yield FieldViolation(field, f"must be between {low:g} and {high:g}")
