"""The client throttle of the token endpoint, on the shared rate limiter (GCRA in Redis
when there is one, so every replica counts the same failures; in process otherwise)."""

from __future__ import annotations

import hashlib

from shared.rpc.ratelimit import Limit, RateLimiter

__all__ = ["FailureThrottle"]

_NAME = "IssueTokenFailures"


class FailureThrottle:
    """Failed attempts per client id: `limit.burst` at once, then `limit.rate` a second.
    Counted after a failure (`failed`), which then says how long the client should wait:
    only failures count and only failures are slowed (seconds, never minutes)."""

    def __init__(self, limiter: RateLimiter, limit: Limit) -> None:
        self._limiter = limiter
        self._limit = limit

    @staticmethod
    def _key(client: str) -> str:
        # Any text a caller sends, bounded: the digest is the key.
        return hashlib.sha256(client.encode()).hexdigest()[:32]

    def wait(self, client: str) -> float:
        return self._limiter.wait(_NAME, self._limit, self._key(client))

    def failed(self, client: str) -> float:
        return self._limiter.count(_NAME, self._limit, self._key(client))
