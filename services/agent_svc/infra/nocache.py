"""A cache that caches nothing: every read goes to the database (tests, diagnostics)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from services.agent_svc.domain import Agent

__all__ = ["NoCache"]


class NoCache:
    """Implements AgentCache by calling `load` every time."""

    def get(
        self,
        agent_id: uuid.UUID,
        load: Callable[[], Agent | None],
        *,
        load_lagging: Callable[[], Agent | None] | None = None,
    ) -> Agent | None:
        """Always the primary: without invalidation stamps nothing says a copy is current."""
        return load()

    def invalidate(self, agent_id: uuid.UUID) -> None:
        """Nothing is kept, so nothing to drop."""

    def close(self) -> None:
        """Nothing to release."""
