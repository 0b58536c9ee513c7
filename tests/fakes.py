"""The in-memory unit of work both services' unit tests build their fakes on."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

S = TypeVar("S")


class SnapshotDatabase(Generic[S]):
    """The committed state; each unit of work changes a private deep copy of it."""

    def __init__(self, empty: Callable[[], S]) -> None:
        self.empty = empty
        self.committed = empty()
        self.commits = 0


class SnapshotUnitOfWork(Generic[S]):
    """Rolls back unless committed, like the SQL one: the copy is dropped on exit."""

    def __init__(self, database: SnapshotDatabase[S]) -> None:
        self._database = database
        self._state = database.empty()

    def __enter__(self) -> Self:
        self._state = copy.deepcopy(self._database.committed)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = self._database.empty()  # uncommitted changes are dropped

    def commit(self) -> None:
        self._database.committed = copy.deepcopy(self._state)
        self._database.commits += 1
