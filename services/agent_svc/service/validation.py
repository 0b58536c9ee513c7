"""Input rules for agents. Every rule is checked and every violation reported at once.

Lengths count Unicode code points ("characters"). Field paths follow AIP-193:
`agent.tools[2].name`, `agent.metadata["team"]`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from services.agent_svc.domain import AgentInput, Tool
from shared.config.text import has_control_characters
from shared.rpc.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_DESCRIPTION",
    "MAX_INSTRUCTIONS",
    "MAX_METADATA_KEY",
    "MAX_METADATA_PAIRS",
    "MAX_METADATA_VALUE",
    "MAX_NAME",
    "MAX_TOOLS",
    "MAX_TOOL_DESCRIPTION",
    "check_agent",
]

MAX_NAME = 256
MAX_DESCRIPTION = 512
MAX_INSTRUCTIONS = 256_000
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION = 1_024
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)


def check_agent(agent: AgentInput, allowed_models: Collection[str], prefix: str = "agent") -> None:
    """Raises InvalidArgument listing every rule the agent breaks."""
    violations = list(_violations(agent, allowed_models, prefix))
    if violations:
        raise InvalidArgument(violations)


def _violations(
    agent: AgentInput, allowed_models: Collection[str], prefix: str
) -> Iterator[FieldViolation]:
    yield from _name(agent.name, f"{prefix}.name")
    if len(agent.description) > MAX_DESCRIPTION:
        yield FieldViolation(
            f"{prefix}.description", f"must be at most {MAX_DESCRIPTION} characters"
        )
    if not agent.model:
        yield FieldViolation(f"{prefix}.model", "required")
    elif agent.model not in allowed_models:
        yield FieldViolation(
            f"{prefix}.model", "not an allowed model; allowed: " + ", ".join(allowed_models)
        )
    if len(agent.instructions) > MAX_INSTRUCTIONS:
        yield FieldViolation(
            f"{prefix}.instructions", f"must be at most {MAX_INSTRUCTIONS} characters"
        )
    yield from _tools(agent.tools, f"{prefix}.tools")
    yield from _metadata(agent.metadata, f"{prefix}.metadata")
    yield from _in_range(agent.temperature, TEMPERATURE_RANGE, f"{prefix}.temperature")
    yield from _in_range(agent.top_p, TOP_P_RANGE, f"{prefix}.top_p")


def _name(name: str, field: str) -> Iterator[FieldViolation]:
    if not name:
        yield FieldViolation(field, "required")
    elif len(name) > MAX_NAME:
        yield FieldViolation(field, f"must be at most {MAX_NAME} characters")
    elif has_control_characters(name):
        yield FieldViolation(field, "must not contain control characters")
    elif not name.strip():
        yield FieldViolation(field, "must not be blank")


def _tools(tools: tuple[Tool, ...], field: str) -> Iterator[FieldViolation]:
    if len(tools) > MAX_TOOLS:
        yield FieldViolation(field, f"at most {MAX_TOOLS} tools")
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        at = f"{field}[{index}]"
        if not TOOL_NAME.match(tool.name):
            yield FieldViolation(
                f"{at}.name", "must be 1 to 64 letters, digits, underscores or hyphens"
            )
        elif tool.name in seen:
            yield FieldViolation(f"{at}.name", f"duplicate tool name {tool.name!r}")
        seen.add(tool.name)
        if len(tool.description) > MAX_TOOL_DESCRIPTION:
            yield FieldViolation(
                f"{at}.description", f"must be at most {MAX_TOOL_DESCRIPTION} characters"
            )
        if not _is_json(tool.parameters):
            yield FieldViolation(f"{at}.parameters", "numbers must be finite")


def _is_json(value: Any) -> bool:
    """True if the value has a JSON representation (no NaN or infinity anywhere)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_is_json(item) for item in value.values())
    if isinstance(value, list):
        return all(_is_json(item) for item in value)
    return True


def _metadata(metadata: Mapping[str, str], field: str) -> Iterator[FieldViolation]:
    if len(metadata) > MAX_METADATA_PAIRS:
        yield FieldViolation(field, f"at most {MAX_METADATA_PAIRS} pairs")
    for key, value in metadata.items():
        at = f"{field}[{json.dumps(key, ensure_ascii=False)}]"
        if not key:
            yield FieldViolation(at, "key must not be empty")
        elif len(key) > MAX_METADATA_KEY:
            yield FieldViolation(at, f"key must be at most {MAX_METADATA_KEY} characters")
        if len(value) > MAX_METADATA_VALUE:
            yield FieldViolation(at, f"value must be at most {MAX_METADATA_VALUE} characters")


def _in_range(
    value: float | None, bounds: tuple[float, float], field: str
) -> Iterator[FieldViolation]:
    low, high = bounds
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        yield FieldViolation(field, f"must be between {low:g} and {high:g}")
