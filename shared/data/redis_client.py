"""A Redis client with short timeouts: a slow Redis must degrade, not hang, a call."""

from __future__ import annotations

import redis

__all__ = ["make_redis"]


def make_redis(url: str, *, max_connections: int = 64) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        health_check_interval=15,
        max_connections=max_connections,
        decode_responses=False,
    )
