"""The Redis login limiter on a real Redis: atomic counting, the cool-down, the fallback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from services.auth_svc.infra.limiter import InMemoryLoginLimiter, RedisLoginLimiter
from services.auth_svc.service.ports import LoginAttempt
from shared.data.redis_client import make_redis
from tests.helpers import FakeClock
from tests.integration.auth.limits import parallel_attempts

UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = make_redis(redis_url)
    yield client
    client.close()


def limiter_on(
    client: redis.Redis, *, limit: int = 10, lockout: float = 900, prefix: str = "test:login:"
) -> RedisLoginLimiter:
    return RedisLoginLimiter(
        client,
        max_failures=limit,
        lockout_seconds=lockout,
        fallback=InMemoryLoginLimiter(
            max_failures=limit, lockout_seconds=lockout, monotonic=FakeClock().monotonic
        ),
        prefix=prefix,
    )


def test_fifty_parallel_attempts_against_a_limit_of_ten_allow_exactly_ten(
    client: redis.Redis, unique: str
) -> None:
    limiter = limiter_on(client, limit=10)
    attempts = parallel_attempts(limiter, f"{unique}@example.com")
    allowed = [a for a in attempts if a.allowed]
    assert len(allowed) == 10
    assert sum(a.locks_on_failure for a in allowed) == 1  # the tenth
    assert all(0 < a.retry_after_seconds <= 900 for a in attempts if not a.allowed)


def test_the_limit_is_per_account(client: redis.Redis) -> None:
    limiter = limiter_on(client, limit=2)
    for _ in range(2):
        assert limiter.acquire("a@example.com").allowed
    assert not limiter.acquire("a@example.com").allowed
    assert limiter.acquire("b@example.com").allowed


def test_the_cool_down_is_the_counters_ttl(client: redis.Redis) -> None:
    limiter = limiter_on(client, limit=3, lockout=900)
    for _ in range(3):
        counted = time.monotonic()
        limiter.acquire("ada@example.com")
    (key,) = client.keys("test:login:*")
    before = client.pttl(key)
    # Set to the lockout by the last counted failure (less the time since, however long).
    elapsed_ms = (time.monotonic() - counted) * 1000
    assert 900_000 - elapsed_ms - 1 <= before <= 900_000
    locked = limiter.acquire("ada@example.com")
    after = client.pttl(key)
    assert not locked.allowed
    # What the caller is told to wait is what Redis has left on the counter.
    assert after / 1000 <= locked.retry_after_seconds <= before / 1000


def test_the_cool_down_ends(client: redis.Redis) -> None:
    limiter = limiter_on(client, limit=1, lockout=900)
    assert limiter.acquire("ada@example.com").allowed
    assert not limiter.acquire("ada@example.com").allowed
    (key,) = client.keys("test:login:*")
    # The cool-down is Redis's own expiry of the counter, which no event announces: bring
    # it near and wait for Redis to expire the key (the one real wait in these tests).
    client.pexpire(key, 50)
    deadline = time.monotonic() + 30
    while client.exists(key):
        assert time.monotonic() < deadline, "Redis never expired the counter"
        time.sleep(0.01)
    assert limiter.acquire("ada@example.com").allowed


def test_reset_forgets_the_failures(client: redis.Redis) -> None:
    limiter = limiter_on(client, limit=2)
    limiter.acquire("ada@example.com")
    limiter.acquire("ada@example.com")
    limiter.reset("ada@example.com")
    assert client.keys("test:login:*") == []
    assert limiter.acquire("ada@example.com") == LoginAttempt(allowed=True)


def test_release_gives_an_attempt_back_and_never_goes_below_zero(client: redis.Redis) -> None:
    limiter = limiter_on(client, limit=2, lockout=900)
    limiter.acquire("ada@example.com")
    limiter.acquire("ada@example.com")
    assert not limiter.acquire("ada@example.com").allowed
    limiter.release("ada@example.com")
    (key,) = client.keys("test:login:*")
    assert client.get(key) == b"1"
    assert 0 < client.pttl(key) <= 900_000  # the cool-down keeps running
    for _ in range(3):
        limiter.release("ada@example.com")
    assert client.keys("test:login:*") == []
    limiter.release("never-counted@example.com")
    assert client.keys("test:login:*") == []
    assert [limiter.acquire("ada@example.com").allowed for _ in range(3)] == [True, True, False]


def test_fifty_parallel_releases_after_fifty_attempts_leave_nothing(
    client: redis.Redis, unique: str
) -> None:
    limiter = limiter_on(client, limit=100)
    for _ in range(50):
        limiter.acquire(f"{unique}@example.com")
    threads = [
        threading.Thread(target=limiter.release, args=(f"{unique}@example.com",)) for _ in range(60)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert client.keys("test:login:*") == []


def test_redis_never_holds_the_email(client: redis.Redis) -> None:
    limiter_on(client).acquire("ada@example.com")
    (key,) = client.keys("test:login:*")
    assert b"ada" not in key
    assert len(key) == len("test:login:") + 64  # the prefix and a SHA-256 in hex


def test_an_unreachable_redis_falls_back_to_the_in_process_limit() -> None:
    client = make_redis(UNREACHABLE)
    try:
        limiter = limiter_on(client, limit=3)
        results = [limiter.acquire("ada@example.com").allowed for _ in range(4)]
        assert results == [True, True, True, False]
        limiter.release("ada@example.com")  # no error either
        assert limiter.acquire("ada@example.com").allowed
        assert not limiter.acquire("ada@example.com").allowed
        limiter.reset("ada@example.com")
        assert limiter.acquire("ada@example.com").allowed
    finally:
        client.close()


def test_an_unreachable_redis_is_one_warning_not_one_per_login(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """During a Redis outage every login's check fails: the log says so once per interval
    (then how many it suppressed), briefly, not a line with the client's repr per login."""
    client = make_redis(UNREACHABLE)
    try:
        limiter = limiter_on(client, limit=1000)
        with caplog.at_level(logging.WARNING, logger="services.auth_svc.infra.limiter"):
            for _ in range(20):
                limiter.acquire("ada@example.com")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) <= 1, warnings
        assert all(len(w) < 400 for w in warnings), warnings
    finally:
        client.close()
