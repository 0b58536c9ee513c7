"""What the tests of every login limiter share."""

from __future__ import annotations

import threading

from services.auth_svc.service.ports import LoginAttempt, LoginLimiter


def parallel_attempts(limiter: LoginLimiter, key: str, count: int = 50) -> list[LoginAttempt]:
    """`count` attempts for one key, released together from as many threads."""
    start = threading.Barrier(count)
    attempts: list[LoginAttempt] = []
    lock = threading.Lock()

    def attempt() -> None:
        start.wait(timeout=30)
        result = limiter.acquire(key)
        with lock:
            attempts.append(result)

    threads = [threading.Thread(target=attempt) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(attempts) == count
    return attempts
