"""The unit-of-work port the service layers depend on (no database imports here)."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

__all__ = ["UnitOfWork"]


class UnitOfWork(Protocol):
    """One transaction: rolls back on exit unless `commit()` was called. Each service's
    unit-of-work Protocol extends this with its repositories."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def commit(self) -> None: ...
