"""The model catalogue: which models an agent may name, and in which state.

- active: usable;
- deprecated: usable until its sunset date (from that date on it is refused like a retired
  one, and listed as retired), and the create/update reply carries a `model_notice` (the
  model, its sunset date, its replacement);
- retired: refused (INVALID_ARGUMENT on `agent.model`, naming the replacement); agents
  that still name it stay readable, and an update must move them to another model.

Configured by AGENT_ALLOWED_MODELS (active), AGENT_DEPRECATED_MODELS
(`model@YYYY-MM-DD>replacement`, both parts optional) and AGENT_RETIRED_MODELS
(`model>replacement`), comma-separated; a model named deprecated or retired leaves the
active list (a default model is deprecated without restating the list). A replacement must
be a usable model of the catalogue when it is configured; one that reaches its own sunset
later is passed over for its replacement (`replacement_on`).
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
        for entry in self._entries.values():
            if entry.replacement is not None and entry.replacement not in self.usable:
                raise ValueError(
                    f"the replacement of {entry.name!r}, {entry.replacement!r}, is not a "
                    "usable model (active or deprecated)"
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

    def retired(self, name: str, today: date | None = None) -> ModelEntry | None:
        """The entry of a model that is refused: retired, or (given `today`) deprecated
        and at or past its sunset date."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry.state == RETIRED or (today is not None and _past_sunset(entry, today)):
            return entry
        return None

    def usable_on(self, today: date) -> tuple[str, ...]:
        """The models an agent may name on `today`: active ones, and deprecated ones before
        their sunset date (what an unknown model's refusal lists)."""
        return tuple(
            e.name
            for e in self._entries.values()
            if e.state == ACTIVE or (e.state == DEPRECATED and not _past_sunset(e, today))
        )

    def replacement_on(self, entry: ModelEntry, today: date) -> str | None:
        """The model to name instead of `entry`'s on `today`: its replacement, or, when that
        one has reached its own sunset since the catalogue was written, the replacement's
        replacement, and so on (None when the chain ends in nothing usable)."""
        usable = set(self.usable_on(today))
        seen = {entry.name}
        name = entry.replacement
        while name is not None and name not in usable and name not in seen:
            seen.add(name)
            following = self._entries.get(name)
            name = following.replacement if following is not None else None
        return name if name in usable else None

    def entries_on(self, today: date) -> tuple[ModelEntry, ...]:
        """The entries as they stand on `today`: a deprecated model past its sunset shows
        as retired; each replacement is the one to use on that day (`replacement_on`)."""
        return tuple(
            ModelEntry(
                e.name,
                RETIRED if _past_sunset(e, today) else e.state,
                e.sunset,
                self.replacement_on(e, today),
            )
            for e in self._entries.values()
        )


def _past_sunset(entry: ModelEntry, today: date) -> bool:
    return entry.state == DEPRECATED and entry.sunset is not None and today >= entry.sunset
