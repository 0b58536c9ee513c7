"""The in-process login limiter (the embedded default, and the fallback when Redis is down)."""

from __future__ import annotations

import threading
import tracemalloc

import pytest

from services.auth_svc.infra.limiter import InMemoryLoginLimiter
from services.auth_svc.service.ports import LoginAttempt
from tests.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def limiter(clock: FakeClock, limit: int = 3, lockout: float = 60) -> InMemoryLoginLimiter:
    return InMemoryLoginLimiter(
        max_failures=limit, lockout_seconds=lockout, monotonic=clock.monotonic
    )


def test_attempts_up_to_the_limit_are_allowed_and_the_last_one_is_flagged(
    clock: FakeClock,
) -> None:
    limits = limiter(clock)
    attempts = [limits.acquire("k") for _ in range(4)]
    assert attempts[:3] == [
        LoginAttempt(allowed=True),
        LoginAttempt(allowed=True),
        LoginAttempt(allowed=True, locks_on_failure=True),
    ]
    assert attempts[3] == LoginAttempt(allowed=False, retry_after_seconds=60)


def test_parallel_attempts_never_exceed_the_limit(clock: FakeClock) -> None:
    limits = limiter(clock, limit=10)
    start = threading.Barrier(50)
    allowed: list[bool] = []

    def attempt() -> None:
        start.wait(timeout=10)
        allowed.append(limits.acquire("k").allowed)

    threads = [threading.Thread(target=attempt) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert allowed.count(True) == 10
    assert allowed.count(False) == 40


def test_the_cool_down_counts_down_and_ends(clock: FakeClock) -> None:
    limits = limiter(clock)
    for _ in range(3):
        limits.acquire("k")
    clock.advance(45)
    assert limits.acquire("k").retry_after_seconds == pytest.approx(15)
    clock.advance(15)
    assert limits.acquire("k").allowed


def test_reset_forgets_and_keys_are_independent(clock: FakeClock) -> None:
    limits = limiter(clock, limit=1)
    limits.acquire("a")
    assert not limits.acquire("a").allowed
    assert limits.acquire("b").allowed
    limits.reset("a")
    assert limits.acquire("a").allowed


def test_expired_counts_are_dropped_and_memory_is_bounded(clock: FakeClock) -> None:
    limits = InMemoryLoginLimiter(
        max_failures=2, lockout_seconds=60, monotonic=clock.monotonic, max_entries=100
    )
    for n in range(50):
        limits.acquire(f"old-{n}@example.com")
    clock.advance(61)
    limits.acquire("new@example.com")
    assert len(limits._counts) == 1  # the 50 expired counts are gone

    for n in range(500):  # a flood of distinct emails
        limits.acquire(f"flood-{n}@example.com")
    assert len(limits._counts) == 100
    limits.acquire("victim@example.com")
    limits.acquire("victim@example.com")
    assert not limits.acquire("victim@example.com").allowed  # the newest counts survive


def test_memory_is_bounded_whatever_the_key_length(clock: FakeClock) -> None:
    limits = InMemoryLoginLimiter(
        max_failures=2, lockout_seconds=60, monotonic=clock.monotonic, max_entries=1000
    )
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for n in range(200):  # 200 distinct keys of a megabyte each
            limits.acquire(f"{n}:" + "x" * 1_000_000)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limits._counts) == 200
    assert held - before < 200_000  # a fixed-size digest per key, not 200 MB of keys
    assert {len(key) for key in limits._counts} == {32}


def test_a_huge_key_is_counted_like_any_other(clock: FakeClock) -> None:
    limits = limiter(clock, limit=2)
    huge = "ada@example.com" + "x" * 1_000_000
    assert limits.acquire(huge).allowed
    assert limits.acquire(huge).allowed
    assert not limits.acquire(huge).allowed
    assert limits.acquire(huge[:-1]).allowed  # another key
    limits.reset(huge)
    assert limits.acquire(huge).allowed


def test_release_gives_an_attempt_back(clock: FakeClock) -> None:
    limits = limiter(clock, limit=2)
    limits.acquire("k")
    limits.acquire("k")
    assert not limits.acquire("k").allowed
    limits.release("k")  # the last attempt ended in an infrastructure error
    assert limits.acquire("k") == LoginAttempt(allowed=True, locks_on_failure=True)
    assert not limits.acquire("k").allowed


def test_release_never_goes_below_zero(clock: FakeClock) -> None:
    limits = limiter(clock, limit=2)
    limits.release("never-counted")
    limits.acquire("k")
    for _ in range(5):
        limits.release("k")
    assert [limits.acquire("k").allowed for _ in range(3)] == [True, True, False]


def test_release_keeps_the_cool_down_running(clock: FakeClock) -> None:
    limits = limiter(clock, limit=3, lockout=60)
    for _ in range(3):
        limits.acquire("k")
    limits.release("k")
    clock.advance(30)
    assert limits.acquire("k").locks_on_failure  # the third again, counted anew
    assert limits.acquire("k").retry_after_seconds == pytest.approx(60)
