"""Background work: jobs that keep a service's data in shape (purges, key rotation).

A `Job` is one idempotent pass (delete what has expired, in batches; rotate a key if one
is due). A `Worker` runs its jobs every `interval_seconds`: on a thread of the serving
process (the embedded default and local runs: `*_WORKER_IN_PROCESS`), or as the main loop
of `python -m services.<svc> worker` (a Deployment of its own in Kubernetes).

Several replicas may run the same jobs at once (pods of a worker Deployment, or every
serving process with in-process work on): each pass takes the job's lock first, and a
replica that does not get it skips the pass (`result="skipped"`). On PostgreSQL the lock
is a transaction advisory lock in a transaction of its own, released when the pass ends or
when that connection dies (a killed worker never leaves it held). A job must still be
correct without the lock (the lock only saves duplicated work): its deletes are
conditional and batched, so two passes at once delete each row once.

Each pass is logged (what it did) and counted: `agentplatform_job_runs_total{job,result}`
(success, failure, skipped), `agentplatform_job_items_total{job,kind}` (rows deleted, keys made),
and `agentplatform_job_last_success_timestamp_seconds{job}`, which an alert compares with
the time to find a job that stopped succeeding.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, text

__all__ = [
    "BATCH",
    "Job",
    "JobLocks",
    "JobObserver",
    "LocalJobLocks",
    "PostgresJobLocks",
    "Worker",
    "job_locks_for",
    "purge_in_batches",
]

_log = logging.getLogger(__name__)

BATCH = 1000
"""Rows a purge deletes per transaction: short transactions, short locks."""

JobRun = Callable[[], Mapping[str, int]]
"""One pass of a job; returns what it did as counts (e.g. {"deleted": 12})."""


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    """Stable and unique across services, e.g. `agent.request_ids.purge` (a metric label)."""
    run: JobRun


def purge_in_batches(delete_batch: Callable[[int], int], *, batch: int = BATCH) -> int:
    """Calls `delete_batch(batch)` (one transaction deleting at most `batch` rows) until a
    batch deletes fewer; the rows deleted in all. Two replicas purging at once each delete
    what they find: a row is deleted once."""
    total = 0
    while True:
        deleted = delete_batch(batch)
        total += deleted
        if deleted < batch:
            return total


class JobLocks(Protocol):
    def hold(self, name: str) -> AbstractContextManager[bool]:
        """Tries to take the job's lock for the `with` block; yields whether it did."""
        ...


class LocalJobLocks:
    """Locks within this process: the embedded default has one process per database."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, name: str) -> Iterator[bool]:
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        got = lock.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                lock.release()


class PostgresJobLocks:
    """Transaction advisory locks (`pg_try_advisory_xact_lock`), one key per job name, in a
    transaction held open on a connection of its own for the whole pass: never waits, and
    ends with the transaction (the pass, or the connection's death). Not a session lock:
    behind PgBouncer in transaction mode the server connection goes back to PgBouncer's pool
    at each commit, so a session lock would stay on a server connection the next client
    gets (and takes the lock again), and the unlock would run elsewhere; a held
    transaction keeps its server connection until it ends."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @staticmethod
    def key(name: str) -> int:
        """A stable 63-bit key for the name (advisory lock keys are bigint)."""
        return zlib.crc32(b"agentplatform.job:" + name.encode()) | (1 << 40)

    @contextmanager
    def hold(self, name: str) -> Iterator[bool]:
        key = self.key(name)
        with self._engine.connect() as connection, connection.begin() as transaction:
            got = bool(
                connection.execute(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}
                ).scalar()
            )
            try:
                yield got
            finally:
                transaction.rollback()  # releases the lock


def job_locks_for(engine: Engine) -> JobLocks:
    """Advisory locks on PostgreSQL, in-process locks on SQLite."""
    if engine.dialect.name == "postgresql":
        return PostgresJobLocks(engine)
    return LocalJobLocks()


class JobObserver(Protocol):
    def __call__(
        self, job: str, result: str, counts: Mapping[str, int], finished_at: float
    ) -> None:
        """A pass of `job` ended with `result` (success, failure, skipped), having done `counts`."""
        ...


def _ignore(job: str, result: str, counts: Mapping[str, int], finished_at: float) -> None:
    """The default observer: nothing is counted."""


class Worker:
    """Runs its jobs every `interval_seconds` on a thread (`start`/`stop`), or once (`run_once`)."""

    def __init__(
        self,
        jobs: Sequence[Job],
        *,
        locks: JobLocks,
        interval_seconds: float,
        on_result: JobObserver = _ignore,
        wall_clock: Callable[[], float] = time.time,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        """`on_close`: what the jobs hold open (a Redis client), closed by `close()`."""
        if len({job.name for job in jobs}) != len(jobs):
            raise ValueError("job names must be unique")
        self.jobs = tuple(jobs)
        self._locks = locks
        self.interval_seconds = interval_seconds
        self._on_result = on_result
        self._wall_clock = wall_clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._passes = 0
        self._passed = threading.Condition()
        self._created_at = wall_clock()
        self.last_pass_at: float | None = None
        self._on_close = list(on_close)

    def run_once(self) -> dict[str, str]:
        """One pass of every job, in order; returns each job's result. A job that fails is
        logged and counted; the others still run."""
        results = {job.name: self._run(job) for job in self.jobs}
        with self._passed:
            self._passes += 1
            self.last_pass_at = self._wall_clock()
            self._passed.notify_all()
        return results

    def _run(self, job: Job) -> str:
        counts: Mapping[str, int] = {}
        try:
            with self._locks.hold(job.name) as got:
                if not got:
                    result = "skipped"
                    _log.info("job %s: skipped (another replica holds its lock)", job.name)
                else:
                    started = time.monotonic()
                    counts = job.run()
                    result = "success"
                    _log.info(
                        "job %s: done in %.2fs: %s",
                        job.name,
                        time.monotonic() - started,
                        " ".join(f"{k}={v}" for k, v in counts.items()) or "(nothing to do)",
                    )
        except Exception:
            result = "failure"
            _log.exception("job %s failed; the next pass tries again", job.name)
        self._on_result(job.name, result, counts, self._wall_clock())
        return result

    # -- on a thread ------------------------------------------------------------------------

    def start(self) -> None:
        """Runs a pass now and then every interval until `stop()`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval_seconds)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stops after the pass under way (if any); whether no pass runs any more (False:
        the pass outlived `timeout`). Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._thread = thread  # still running: a later stop or close waits again
                return False
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stops (as `stop`), then closes what the jobs hold, once; not while a pass still
        runs (it would use them closed): then they are left to the process's exit."""
        if not self.stop(timeout):
            _log.warning("worker: a pass still runs after %.0fs; left open what it uses", timeout)
            return
        closers, self._on_close = self._on_close, []
        for close in closers:
            try:
                close()
            except Exception:
                _log.exception("worker: closing %r failed", close)

    def wait_for_passes(self, count: int, timeout: float) -> bool:
        """Waits until `count` passes have ended in all (for tests and the worker command)."""
        with self._passed:
            return self._passed.wait_for(lambda: self._passes >= count, timeout)

    def healthy(self, now: float) -> bool:
        """Whether the loop is alive: a pass ended (or the worker was made) within two
        intervals and a minute (a pass may take long; a stuck one makes it unhealthy)."""
        last = self.last_pass_at if self.last_pass_at is not None else self._created_at
        return now - last <= 2 * self.interval_seconds + 60
