"""ReplicaReads: a read the replica fails is read on the primary, which then takes the
replica's reads for a pause; errors that are not the replica's own go to the caller."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest

from services.agent_svc.service.replica import ReplicaReads


class ReplicaDown(Exception):
    pass


class Units:
    """Unit-of-work factories that record which side was used (the uow is its name)."""

    def __init__(self) -> None:
        self.used: list[str] = []
        self.replica_fails = False

    def replica(self) -> AbstractContextManager[Any]:
        self.used.append("replica")
        if self.replica_fails:
            raise ReplicaDown()
        return nullcontext("replica")

    def primary(self) -> AbstractContextManager[Any]:
        self.used.append("primary")
        return nullcontext("primary")


def test_a_failing_replica_hands_its_reads_to_the_primary_for_the_pause() -> None:
    units, now = Units(), [0.0]
    reads: Any = ReplicaReads(
        units.replica,  # type: ignore[arg-type]
        failed=lambda exc: isinstance(exc, ReplicaDown),
        pause_seconds=5.0,
        clock=lambda: now[0],
    )
    assert reads.read(lambda uow: uow, units.primary) == "replica"
    units.replica_fails = True
    assert reads.read(lambda uow: uow, units.primary) == "primary"
    now[0] = 4.9
    assert reads.read(lambda uow: uow, units.primary) == "primary"
    assert units.used == ["replica", "replica", "primary", "primary"]  # not retried yet
    units.replica_fails = False
    now[0] = 5.1
    assert reads.read(lambda uow: uow, units.primary) == "replica"


def test_an_error_that_is_not_the_replicas_reaches_the_caller() -> None:
    units = Units()
    reads: Any = ReplicaReads(units.replica, failed=lambda exc: False)  # type: ignore[arg-type]

    def broken(_uow: object) -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        reads.read(broken, units.primary)
    assert units.used == ["replica"]
