"""Reads sent to a read replica, and the primary standing in while the replica fails.

A read that fails on the replica for a reason the replica may not share with the primary
(unreachable, shut down, a statement cancelled by a recovery conflict: `failed(exc)`) is
read again on the primary, and for `pause_seconds` after that every such read goes to the
primary at once, so a replica outage costs a slower read per pause, not a failed one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from services.agent_svc.service.ports import AgentUnitOfWork

__all__ = ["ReplicaReads"]

_log = logging.getLogger(__name__)

T = TypeVar("T")


class ReplicaReads:
    """The replica's units of work, and when to read the primary's instead."""

    def __init__(
        self,
        uow: Callable[[], AgentUnitOfWork],
        *,
        failed: Callable[[Exception], bool],
        pause_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._uow = uow
        self._failed = failed
        self._pause = pause_seconds
        self._clock = clock
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def read(
        self, work: Callable[[AgentUnitOfWork], T], primary: Callable[[], AgentUnitOfWork]
    ) -> T:
        """`work` on the replica, or on `primary` while the replica fails."""
        if self._clock() < self._paused_until:
            with primary() as uow:
                return work(uow)
        try:
            with self._uow() as uow:
                return work(uow)
        except Exception as exc:
            if not self._failed(exc):
                raise
            with self._lock:
                self._paused_until = self._clock() + self._pause
            _log.warning(
                "the read replica failed (%s); reading the primary for %.0fs",
                type(exc).__name__,
                self._pause,
            )
        with primary() as uow:
            return work(uow)
