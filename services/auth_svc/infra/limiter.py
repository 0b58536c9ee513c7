"""Per-account failed-login limits: in Redis shared by every replica, with two fallbacks.

    RedisLoginLimiter   the normal case: a Lua script per attempt, shared by every replica
    └── SqlLoginLimiter while Redis fails: auth_svc's own table, still shared by every
        │               replica (so N replicas do not allow N times the limit)
        └── InMemoryLoginLimiter  while the database fails too (then a login cannot read
                                  the user anyway); also the embedded default without Redis

Each tier falls back per call, and only for the call that failed. The bound this leaves:
counts do not move between tiers, so an outage of Redis that starts in the middle of an
account's count starts a fresh count in the table, and that account can get at most twice
the limit, once (Redis's count, then the table's) before the cool-down.

Semantics (every implementation): an attempt is counted *before* the password is
checked, atomically, and only while fewer than `max_failures` are counted, so parallel
wrong attempts can never get more tries than the limit. A success resets the count; an
attempt that ends in an infrastructure error is given back (`release`, never below zero).
The count expires `lockout_seconds` after the last counted attempt: reaching the limit
locks the account for that cool-down, during which even the right password is refused.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta

import redis
from sqlalchemy import Connection, Engine, case, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from services.auth_svc.repository.models import LoginAttemptRow
from services.auth_svc.service.ports import LoginAttempt, LoginLimiter
from shared.config.clock import Clock, utc
from shared.data.redis_client import RedisClient
from shared.rpc.logs import ThrottledWarning

__all__ = ["InMemoryLoginLimiter", "RedisLoginLimiter", "SqlLoginLimiter", "key_digest"]

_log = logging.getLogger(__name__)
# A dependency down fails every login's check: one warning per interval, not per login.
_warn_redis = ThrottledWarning(_log)
_warn_database = ThrottledWarning(_log)


def key_digest(key: str) -> bytes:
    """The fixed-size form every limiter stores a key (an email) in: memory and keyspace are
    bounded whatever the key's length, and no store ever holds an email address."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class InMemoryLoginLimiter:
    """Counts live in an insertion-ordered dict, moved to the end on every update: since every
    update sets the expiry to now + cool-down, the dict is ordered by expiry, and expired
    counts are dropped from its front in amortized O(1). `max_entries` bounds memory under
    a flood of distinct emails (dropping the oldest counts first); keys are kept as
    digests, so each entry has the same small size whatever the key."""

    def __init__(
        self,
        *,
        max_failures: int,
        lockout_seconds: float,
        monotonic: Callable[[], float],
        max_entries: int = 1_000_000,
    ) -> None:
        self._max = max_failures
        self._lockout = lockout_seconds
        self._now = monotonic
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._counts: OrderedDict[bytes, tuple[int, float]] = OrderedDict()  # → (count, expiry)

    def acquire(self, key: str) -> LoginAttempt:
        now = self._now()
        digest = key_digest(key)
        with self._lock:
            count, expires = self._counts.get(digest, (0, 0.0))
            if expires <= now:
                count = 0
            if count >= self._max:
                return LoginAttempt(allowed=False, retry_after_seconds=expires - now)
            self._counts[digest] = (count + 1, now + self._lockout)
            self._counts.move_to_end(digest)
            self._evict(now)
            return LoginAttempt(allowed=True, locks_on_failure=count + 1 >= self._max)

    def release(self, key: str) -> None:
        digest = key_digest(key)
        now = self._now()
        with self._lock:
            count, expires = self._counts.get(digest, (0, 0.0))
            if count <= 1 or expires <= now:
                self._counts.pop(digest, None)
            else:  # the expiry stays: the dict stays ordered by it
                self._counts[digest] = (count - 1, expires)

    def reset(self, key: str) -> None:
        digest = key_digest(key)
        with self._lock:
            self._counts.pop(digest, None)

    def _evict(self, now: float) -> None:
        while self._counts:
            oldest = next(iter(self._counts))
            expired = self._counts[oldest][1] <= now
            if not expired and len(self._counts) <= self._max_entries:
                return
            del self._counts[oldest]


# KEYS[1]: the counter; ARGV[1]: limit; ARGV[2]: cool-down in ms.
# Returns {1, count} when counted, {0, ms left} when locked.
_ACQUIRE = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count >= tonumber(ARGV[1]) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then ttl = tonumber(ARGV[2]) end
  return {0, ttl}
end
count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, count}
"""

# KEYS[1]: the counter. One attempt back, never below zero; the cool-down (TTL) stays.
_RELEASE = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count > 1 then
  return redis.call('DECR', KEYS[1])
end
redis.call('DEL', KEYS[1])
return 0
"""


class SqlLoginLimiter:
    """Counts in `auth_login_attempts`, one atomic upsert per attempt; falls back to
    `fallback` (the in-process limiter) for any call the database fails."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_failures: int,
        lockout_seconds: float,
        clock: Clock,
        fallback: LoginLimiter,
        purge_every_seconds: float = 60.0,
    ) -> None:
        self._engine = engine
        self._max = max_failures
        self._lockout = timedelta(seconds=lockout_seconds)
        self._clock = clock
        self._fallback = fallback
        self._purge_every = purge_every_seconds
        self._next_purge = clock.monotonic()
        self._upsert = _upsert_for(engine.dialect.name)

    def acquire(self, key: str) -> LoginAttempt:
        try:
            with self._engine.begin() as connection:
                return self._acquire(connection, key_digest(key).hex())
        except SQLAlchemyError as exc:
            self._database_failed(exc)
            return self._fallback.acquire(key)

    def _acquire(self, connection: Connection, digest: str) -> LoginAttempt:
        now = self._clock.now()
        self._purge_expired(connection, now)
        expired = LoginAttemptRow.expire_time <= now
        # Counted only while under the limit (or expired: counted anew from 1), atomically:
        # the row is locked by the upsert on PostgreSQL, SQLite has one writer at a time.
        insert = self._upsert(LoginAttemptRow).values(
            key_digest=digest, attempts=1, expire_time=now + self._lockout
        )
        statement = insert.on_conflict_do_update(
            index_elements=[LoginAttemptRow.key_digest],
            set_={
                "attempts": case((expired, 1), else_=LoginAttemptRow.attempts + 1),
                "expire_time": insert.excluded.expire_time,
            },
            where=or_(LoginAttemptRow.attempts < self._max, expired),
        ).returning(LoginAttemptRow.attempts)
        counted = connection.execute(statement).scalar_one_or_none()
        if counted is not None:
            return LoginAttempt(allowed=True, locks_on_failure=counted >= self._max)
        expires = connection.execute(
            select(LoginAttemptRow.expire_time).where(LoginAttemptRow.key_digest == digest)
        ).scalar_one_or_none()
        if expires is None:  # reset by a successful login in between: refused this once
            return LoginAttempt(allowed=False, retry_after_seconds=1.0)
        return LoginAttempt(allowed=False, retry_after_seconds=(utc(expires) - now).total_seconds())

    def _purge_expired(self, connection: Connection, now: datetime) -> None:
        """Rows outlive their cool-down only until the next purge (one a minute at most)."""
        if self._clock.monotonic() < self._next_purge:
            return
        self._next_purge = self._clock.monotonic() + self._purge_every
        connection.execute(delete(LoginAttemptRow).where(LoginAttemptRow.expire_time <= now))

    def release(self, key: str) -> None:
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    update(LoginAttemptRow)
                    .where(
                        LoginAttemptRow.key_digest == key_digest(key).hex(),
                        LoginAttemptRow.attempts > 0,
                    )
                    .values(attempts=LoginAttemptRow.attempts - 1)
                )
        except SQLAlchemyError as exc:
            self._database_failed(exc)
            self._fallback.release(key)

    def reset(self, key: str) -> None:
        self._fallback.reset(key)
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    delete(LoginAttemptRow).where(
                        LoginAttemptRow.key_digest == key_digest(key).hex()
                    )
                )
        except SQLAlchemyError as exc:
            self._database_failed(exc)

    @staticmethod
    def _database_failed(exc: SQLAlchemyError) -> None:
        _warn_database(
            "database unavailable for login limits, using in-process: %s", type(exc).__name__
        )


def _upsert_for(dialect: str) -> Callable[..., postgresql.Insert | sqlite.Insert]:
    """INSERT … ON CONFLICT DO UPDATE … RETURNING: PostgreSQL, and SQLite ≥ 3.35."""
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise ValueError(f"no upsert for the {dialect} dialect")


class RedisLoginLimiter:
    """Shared by all replicas; falls back to `fallback` for any call Redis fails."""

    def __init__(
        self,
        client: RedisClient,
        *,
        max_failures: int,
        lockout_seconds: float,
        fallback: LoginLimiter,
        prefix: str = "auth:login-attempts:",
        on_redis_error: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._on_redis_error = on_redis_error or (lambda: None)
        self._max = max_failures
        self._lockout_ms = int(lockout_seconds * 1000)
        self._fallback = fallback
        self._prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    def _key(self, key: str) -> str:
        return self._prefix + key_digest(key).hex()

    def acquire(self, key: str) -> LoginAttempt:
        try:
            counted, value = self._acquire(
                keys=[self._key(key)], args=[self._max, self._lockout_ms]
            )
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return self._fallback.acquire(key)
        if not counted:
            return LoginAttempt(allowed=False, retry_after_seconds=int(value) / 1000)
        return LoginAttempt(allowed=True, locks_on_failure=int(value) >= self._max)

    def release(self, key: str) -> None:
        # Where Redis fails now, it most likely failed when the attempt was counted: the
        # fallback counted it then. A release that misses never takes a count below zero.
        try:
            self._release(keys=[self._key(key)])
        except redis.RedisError as exc:
            self._redis_failed(exc)
            self._fallback.release(key)

    def reset(self, key: str) -> None:
        self._fallback.reset(key)
        try:
            self._client.delete(self._key(key))
        except redis.RedisError as exc:
            self._redis_failed(exc)

    def _redis_failed(self, exc: redis.RedisError) -> None:
        self._on_redis_error()
        _warn_redis(
            "redis unavailable for login limits, using the database: %s: %.200s",
            type(exc).__name__,
            exc,
        )
