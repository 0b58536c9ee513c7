"""The hashing pool's queue, refusals and thread priority, with blocking fake hash work.

Nothing here measures time: work blocks on events the test opens, and every wait has a
generous deadline. The one short duration (`max_wait_seconds` in the abandonment test)
expires while the only hashing thread is provably busy, so its outcome is certain.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from services.auth_svc.infra.hashing import HashPool, Reservation, lower_thread_priority
from shared.config import deadlines
from shared.rpc.errors import ResourceExhausted, Unavailable
from tests.helpers import FakeClock, unavailable

DEADLINE = 30.0


class Blocker:
    """Fake hash work that blocks until `open()`: counts who runs and how many at once."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.calls = 0
        self.started = threading.Semaphore(0)

    def __call__(self) -> str:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.started.release()
        try:
            assert self.gate.wait(DEADLINE)
            return "hashed"
        finally:
            with self.lock:
                self.running -= 1

    def wait_started(self, count: int) -> None:
        for _ in range(count):
            assert self.started.acquire(timeout=DEADLINE)

    def open(self) -> None:
        self.gate.set()


@contextmanager
def a_pool(**options: object) -> Iterator[HashPool]:
    pool = HashPool(**{"concurrency": 2, "queue": 2, **options})  # type: ignore[arg-type]
    try:
        yield pool
    finally:
        pool.close()


def in_threads(
    count: int, call: Callable[[], object]
) -> tuple[list[threading.Thread], list[object]]:
    results: list[object] = []

    def target() -> None:
        try:
            results.append(call())
        except BaseException as error:  # collected for the assertions
            results.append(error)

    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def joined(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(DEADLINE)
        assert not thread.is_alive()


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.001)


def reserve_and_run(pool: HashPool, work: Callable[[], str]) -> Callable[[], str]:
    def call() -> str:
        with pool.reserve() as reservation:
            return reservation.run(work)

    return call


def test_work_runs_on_a_hashing_thread_and_hands_back_its_result() -> None:
    with a_pool() as pool, pool.reserve() as reservation:
        name = reservation.run(lambda: threading.current_thread().name)
        assert name.startswith("password-hash-")
        with pytest.raises(ZeroDivisionError):
            reservation.run(lambda: 1 // 0)
        assert reservation.run(lambda: "again") == "again"  # one reservation, many hashes


def test_at_most_concurrency_hashes_run_at_once_and_every_waiting_one_runs() -> None:
    blocker = Blocker()
    with a_pool(concurrency=2, queue=4) as pool:
        threads, results = in_threads(6, reserve_and_run(pool, blocker))
        blocker.wait_started(2)
        wait_until(lambda: pool.waiting == 4)
        assert pool.reserved == 6
        blocker.open()
        joined(threads)
    assert results == ["hashed"] * 6
    assert blocker.most_at_once == 2


def test_a_full_room_is_refused_at_once_with_a_retry_delay() -> None:
    blocker = Blocker()
    with a_pool(concurrency=2, queue=2) as pool:
        threads, results = in_threads(4, reserve_and_run(pool, blocker))  # 2 run, 2 wait
        blocker.wait_started(2)
        wait_until(lambda: pool.reserved == 4)
        with pytest.raises(ResourceExhausted) as excinfo:
            pool.reserve()  # would block the test forever if it waited
        assert excinfo.value.reason == "HASHING_BUSY"
        assert excinfo.value.retry_after_seconds >= 1.0
        blocker.open()
        joined(threads)
        assert results == ["hashed"] * 4
        assert pool.reserved == 0
        with pool.reserve() as reservation:  # room again
            assert reservation.run(lambda: "ok") == "ok"


def test_a_queue_of_zero_admits_only_what_can_run() -> None:
    blocker = Blocker()
    with a_pool(concurrency=1, queue=0) as pool:
        threads, _ = in_threads(1, reserve_and_run(pool, blocker))
        blocker.wait_started(1)
        with pytest.raises(ResourceExhausted):
            pool.reserve()
        blocker.open()
        joined(threads)


def test_a_hash_that_waits_too_long_is_abandoned_and_never_runs() -> None:
    blocker = Blocker()
    ran: list[str] = []

    def late() -> str:
        ran.append("late")
        return "late"

    with a_pool(concurrency=1, queue=1, max_wait_seconds=0.05) as pool:
        threads, _ = in_threads(1, reserve_and_run(pool, blocker))
        blocker.wait_started(1)  # the only hashing thread is busy until the gate opens
        with pool.reserve() as reservation, pytest.raises(Unavailable) as excinfo:
            reservation.run(late)
        assert excinfo.value.reason == "HASHING_TIMEOUT"
        assert excinfo.value.retry_after_seconds >= 1.0
        assert pool.reserved == 1  # the waiter's place is free again
        blocker.open()
        joined(threads)
    assert ran == []  # close() waited for the threads: it never ran


class _Call:
    """The current call as the hashing pool sees it: only its remaining time matters."""

    def __init__(self, remaining: float) -> None:
        self._remaining = remaining

    def remaining(self) -> float:
        return self._remaining

    def on_end(self, hook: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


def test_a_hash_waits_no_longer_than_its_callers_deadline() -> None:
    blocker = Blocker()
    # The configured wait is long: only the caller's deadline can end this one early.
    with a_pool(concurrency=1, queue=1, max_wait_seconds=DEADLINE * 10) as pool:
        threads, _ = in_threads(1, reserve_and_run(pool, blocker))
        blocker.wait_started(1)
        scope = deadlines.current_call.set(_Call(remaining=0.05))
        try:
            with pool.reserve() as reservation, pytest.raises(Unavailable) as excinfo:
                reservation.run(lambda: "late")
        finally:
            deadlines.current_call.reset(scope)
        assert excinfo.value.reason == "HASHING_TIMEOUT"
        blocker.open()
        joined(threads)


def test_the_retry_delay_is_the_time_to_drain_the_places_taken() -> None:
    clock = FakeClock()
    blocker = Blocker()

    def three_seconds() -> str:
        clock.advance(3.0)
        return "hashed"

    with a_pool(concurrency=2, queue=6, monotonic=clock.monotonic) as pool:
        with pool.reserve() as reservation:
            for _ in range(40):  # the pool learns what a hash costs
                reservation.run(three_seconds)
        threads, _ = in_threads(8, reserve_and_run(pool, blocker))
        blocker.wait_started(2)
        wait_until(lambda: pool.reserved == 8)
        with pytest.raises(ResourceExhausted) as excinfo:
            pool.reserve()
        # 8 places taken, 2 threads, 3 s per hash: about 12 s until the room is empty.
        assert excinfo.value.retry_after_seconds == pytest.approx(12.0, rel=0.01)
        blocker.open()
        joined(threads)


def test_hashing_threads_lower_their_own_priority() -> None:
    if not hasattr(os, "getpriority"):
        unavailable("per-thread scheduling priorities (Linux)")
    request_thread = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with a_pool() as pool, pool.reserve() as reservation:
        hashing = reservation.run(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        )
    assert hashing == max(request_thread, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == request_thread


def test_a_priority_that_cannot_be_set_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise PermissionError("not allowed")

    monkeypatch.setattr(os, "setpriority", refuse)
    monkeypatch.setattr(os, "getpriority", lambda *_args: 0)
    lower_thread_priority()  # no error
    with a_pool() as pool, pool.reserve() as reservation:
        assert reservation.run(lambda: "ok") == "ok"


def test_a_failing_thread_start_hook_costs_no_hashing_thread() -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    with a_pool(concurrency=1, queue=0, on_thread_start=broken) as pool, pool.reserve() as slot:
        assert slot.run(lambda: "ok") == "ok"


def test_a_released_reservation_runs_nothing_and_frees_its_place_once() -> None:
    with a_pool(concurrency=1, queue=0) as pool:
        reservation: Reservation = pool.reserve()
        reservation.release()
        reservation.release()
        assert pool.reserved == 0
        with pytest.raises(RuntimeError):
            reservation.run(lambda: "no")


def test_close_finishes_the_queued_hashes_and_refuses_new_ones() -> None:
    blocker = Blocker()
    pool = HashPool(concurrency=1, queue=2)
    threads, results = in_threads(3, reserve_and_run(pool, blocker))
    blocker.wait_started(1)
    wait_until(lambda: pool.waiting == 2)
    closer = threading.Thread(target=pool.close)
    closer.start()
    blocker.open()
    joined([*threads, closer])
    assert results == ["hashed"] * 3
    with pytest.raises(ResourceExhausted):
        pool.reserve()
