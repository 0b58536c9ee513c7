"""The model catalogue: which models an agent may name, and in which state.

- active: usable;
- deprecated: usable until its sunset date, and the create/update reply carries a
  `model_notice` (the model, its sunset date, its replacement);
- retired: refused (INVALID_ARGUMENT on `agent.model`, naming the replacement); agents
  that still name it stay readable, and an update must move them to another model.

Configured by AGENT_ALLOWED_MODELS (active), AGENT_DEPRECATED_MODELS
(`model@YYYY-MM-DD>replacement`, both parts optional) and AGENT_RETIRED_MODELS
(`model>replacement`), comma-separated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

__all__ = ["ACTIVE", "DEPRECATED", "RETIRED", "ModelCatalogue", "ModelEntry", "parse_entries"]

ACTIVE, DEPRECATED, RETIRED = "active", "deprecated", "retired"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    state: str
    sunset: date | None = None
    replacement: str | None = None


def parse_entries(text: str, state: str) -> list[ModelEntry]:
    """`model@2027-03-01>replacement,…` (deprecated) or `model>replacement,…` (retired);
    ValueError naming the bad item."""
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        head, _, replacement = item.partition(">")
        name, _, sunset_text = head.partition("@")
        name, replacement, sunset_text = name.strip(), replacement.strip(), sunset_text.strip()
        if not name:
            raise ValueError(f"{item!r}: no model name")
        sunset = None
        if sunset_text:
            if state != DEPRECATED:
                raise ValueError(f"{item!r}: only a deprecated model has a sunset date")
            try:
                sunset = date.fromisoformat(sunset_text)
            except ValueError:
                raise ValueError(f"{item!r}: the sunset date is YYYY-MM-DD") from None
        entries.append(ModelEntry(name, state, sunset, replacement or None))
    return entries


class ModelCatalogue:
    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._entries: dict[str, ModelEntry] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise ValueError(f"model {entry.name!r} is listed twice")
            self._entries[entry.name] = entry
        self.usable = tuple(
            e.name for e in self._entries.values() if e.state in (ACTIVE, DEPRECATED)
        )

    @classmethod
    def of_active(cls, names: Iterable[str]) -> ModelCatalogue:
        return cls(ModelEntry(name, ACTIVE) for name in names)

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        return tuple(self._entries.values())

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def notice(self, name: str) -> ModelEntry | None:
        """The entry of a deprecated model (what a reply tells the caller), else None."""
        entry = self._entries.get(name)
        return entry if entry is not None and entry.state == DEPRECATED else None

    def retired(self, name: str) -> ModelEntry | None:
        entry = self._entries.get(name)
        return entry if entry is not None and entry.state == RETIRED else None
