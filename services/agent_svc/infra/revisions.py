"""Caches for revisions and aliases (AIP-162).

- `RevisionMemory`: revisions by (agent id, revision id) in process, least recently used
  evicted beyond its size. A revision never changes, so nothing invalidates it: the
  service reaches one only after reading the agent (through the agent cache, which every
  write and purge invalidates) and checking who may see it.
- `AliasesCodec`: an agent's aliases as bytes, for a `TwoLevelCache` of its own namespace
  (`agent-aliases`): a tag or an untag invalidates it on every replica, as a write of the
  agent invalidates the agent.
- `NoAliasCache`, `NoRevisionCache`: read through every time (unit tests, diagnostics).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable

from services.agent_svc.domain import AgentRevision
from services.agent_svc.infra.codec import CodecError
from services.agent_svc.service.ports import AgentAliases

__all__ = ["AliasesCodec", "NoAliasCache", "NoRevisionCache", "RevisionMemory"]


class RevisionMemory:
    """Implements RevisionCache: a bounded LRU; concurrent misses may each load (a
    revision is read rarely enough, and the result is the same)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[uuid.UUID, int], AgentRevision] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, agent_id: uuid.UUID, revision_id: int, load: Callable[[], AgentRevision | None]
    ) -> AgentRevision | None:
        key = (agent_id, revision_id)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        loaded = load()
        if loaded is not None and self._max:
            with self._lock:
                self._entries[key] = loaded
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return loaded

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class AliasesCodec:
    """`encode(aliases) -> bytes`, `decode(bytes) -> AgentAliases` (compact JSON)."""

    @staticmethod
    def encode(value: AgentAliases) -> bytes:
        return json.dumps(
            {"v": 1, "id": value.agent_id.hex, "a": value.aliases}, separators=(",", ":")
        ).encode()

    @staticmethod
    def decode(data: bytes) -> AgentAliases:
        try:
            document = json.loads(data)
            if document.get("v") != 1:
                raise CodecError(f"unknown codec version {document.get('v')!r}")
            aliases = {str(alias): int(revision) for alias, revision in document["a"].items()}
            return AgentAliases(uuid.UUID(hex=document["id"]), aliases)
        except CodecError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CodecError(f"not encoded aliases: {type(exc).__name__}") from exc


class NoAliasCache:
    def get(
        self, agent_id: uuid.UUID, load: Callable[[], AgentAliases | None]
    ) -> AgentAliases | None:
        return load()

    def invalidate(self, agent_id: uuid.UUID) -> None:
        """Nothing is kept."""

    def close(self) -> None:
        """Nothing to release."""


class NoRevisionCache:
    def get(
        self, agent_id: uuid.UUID, revision_id: int, load: Callable[[], AgentRevision | None]
    ) -> AgentRevision | None:
        return load()
