"""Password hashes on threads of their own, at low priority, behind a bounded waiting room.

Why: an argon2id hash costs tens of milliseconds of a core and 19 MiB. Run on the gRPC
worker threads, a login flood would hold every worker thread (waiting for a hash or
hashing) and starve the cheap calls (RefreshToken, GetJwks) of threads and CPU. So:

- Hashes run on `concurrency` dedicated threads (AUTH_HASH_CONCURRENCY), each of which
  lowers its own scheduling priority when it starts (nice 19: on Linux niceness is per
  thread), so request threads win the CPU over hashing. Where that fails, hashing keeps
  the normal priority and the pool works the same.
- A request first *reserves* a place: one of `concurrency + queue` (AUTH_HASH_QUEUE
  waiting hashes besides the running ones). With none free, `reserve()` raises
  RESOURCE_EXHAUSTED (HASHING_BUSY) at once, with a retry delay of about the time the
  queue needs to drain (at least 1 s). Login reserves before it touches Redis or the
  database, so a rejected flood costs nothing but the rejection.
- A reservation runs its hashes one at a time on the pool, and its request thread waits
  for each. A hash still waiting to start after `max_wait_seconds` (or when the caller's
  deadline passes, if that comes first) is abandoned (it never
  runs) and the request gets UNAVAILABLE (HASHING_TIMEOUT): the pool is behind, retry.
  A hash that has started is waited for: it ends within a hash's time.

    HashPool.reserve() → Reservation (a context manager; leaving it frees the place)
    Reservation.run(work) → work() computed on a hashing thread
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from shared.config import deadlines
from shared.rpc.errors import ResourceExhausted, Unavailable

__all__ = ["HashPool", "Reservation", "lower_thread_priority"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

HASHING_NICENESS = 19
# A first guess of one hash's duration (argon2id, OWASP parameters, one core), refined
# by what the pool measures.
_FIRST_ESTIMATE_SECONDS = 0.05
_SMOOTHING = 0.2


def lower_thread_priority(niceness: int = HASHING_NICENESS) -> None:
    """Lowers the calling thread's scheduling priority to `niceness` (Linux applies nice
    per thread); never raises it back, and ignores platforms that cannot do either."""
    try:
        thread = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, thread) < niceness:
            os.setpriority(os.PRIO_PROCESS, thread, niceness)
    except (AttributeError, OSError) as exc:
        _log.info("password hashing keeps the normal thread priority: %s", exc)


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    ABANDONED = "abandoned"


@dataclass(eq=False)
class _Job(Generic[T]):
    work: Callable[[], T]
    state: _State = _State.QUEUED
    value: T | None = None
    error: BaseException | None = None
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            self.value = self.work()
        except BaseException as error:  # handed to the waiting request thread
            self.error = error
        finally:
            self.done.set()


class HashPool:
    """`concurrency` low-priority hashing threads and `concurrency + queue` places."""

    def __init__(
        self,
        *,
        concurrency: int,
        queue: int,
        max_wait_seconds: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        on_thread_start: Callable[[], None] = lower_thread_priority,
        name: str = "password-hash",
    ) -> None:
        if concurrency < 1 or queue < 0:
            raise ValueError("a hash pool needs at least one thread and a queue of 0 or more")
        self.concurrency = concurrency
        self.capacity = concurrency + queue
        self._max_wait = max_wait_seconds
        self._now = monotonic
        self._on_thread_start = on_thread_start
        self._lock = threading.Condition()
        self._jobs: deque[_Job[Any]] = deque()
        self._reserved = 0
        self._closed = False
        self._estimate = _FIRST_ESTIMATE_SECONDS
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{n}", daemon=True)
            for n in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    # -- for request threads ----------------------------------------------------------

    def reserve(self) -> Reservation:
        """A place for one request's hashes; RESOURCE_EXHAUSTED at once if none is free."""
        with self._lock:
            if self._closed or self._reserved >= self.capacity:
                raise ResourceExhausted(
                    "too many password checks in progress; retry later",
                    retry_after_seconds=self._drain_seconds(),
                    reason="HASHING_BUSY",
                )
            self._reserved += 1
        return Reservation(self)

    @property
    def reserved(self) -> int:
        """Places taken now (hashing, waiting, or held by a request between its hashes)."""
        with self._lock:
            return self._reserved

    @property
    def waiting(self) -> int:
        """Hashes queued, not yet started."""
        with self._lock:
            return len(self._jobs)

    def _release(self) -> None:
        with self._lock:
            self._reserved -= 1

    def _run(self, work: Callable[[], T]) -> T:
        job: _Job[T] = _Job(work)
        with self._lock:
            self._jobs.append(job)
            self._lock.notify()
        remaining = deadlines.remaining()  # the caller's deadline, inside a call
        wait = self._max_wait if remaining is None else min(self._max_wait, remaining)
        if not job.started.wait(wait):
            with self._lock:
                if job.state is _State.QUEUED:
                    job.state = _State.ABANDONED
                    self._jobs.remove(job)
                    raise Unavailable(
                        "password checks are running late; retry",
                        retry_after_seconds=self._drain_seconds(),
                        reason="HASHING_TIMEOUT",
                    )
        job.done.wait()  # started: it ends within one hash's time
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[return-value]

    def _drain_seconds(self) -> float:
        """Roughly how long until the places taken now are free again (at least 1 s)."""
        return max(1.0, self._reserved / self.concurrency * self._estimate)

    # -- the hashing threads ----------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._on_thread_start()
        except Exception:  # a priority we could not set must not cost a hashing thread
            _log.exception("hashing thread set-up failed; it runs as it is")
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._lock.wait()
                if not self._jobs:
                    return  # closed, and nothing left to hash
                job = self._jobs.popleft()
                job.state = _State.RUNNING
            job.started.set()
            began = self._now()
            job.run()
            elapsed = self._now() - began
            with self._lock:
                self._estimate += _SMOOTHING * (elapsed - self._estimate)

    def close(self, timeout: float = 10.0) -> None:
        """Refuses new reservations, lets the queued hashes finish, stops the threads."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        deadline = self._now() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - self._now()))


class Reservation:
    """One request's place in a HashPool; leaving the `with` block frees it."""

    def __init__(self, pool: HashPool) -> None:
        self._pool = pool
        self._held = True

    def run(self, work: Callable[[], T]) -> T:
        """`work()` computed on a hashing thread (see the module docstring for the waits)."""
        if not self._held:
            raise RuntimeError("this reservation was released")
        return self._pool._run(work)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._pool._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
