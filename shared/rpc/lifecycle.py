"""What a composition root builds and must release when the service stops."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Closers"]

_log = logging.getLogger(__name__)


class Closers:
    """Release functions in the order their resources were built; `close()` runs them last
    first (a cache before the Redis client it uses), logs a failure and goes on with the
    rest. Closing twice closes once."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def add(self, close: Callable[[], None]) -> None:
        with self._lock:
            self._closers.append(close)

    def close(self) -> None:
        with self._lock:
            closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                close()
            except Exception:
                _log.exception("error while releasing %r", close)
