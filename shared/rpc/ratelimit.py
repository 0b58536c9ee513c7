"""Rate limits per client address for public methods (the ones that need no token).

The algorithm is GCRA (the generic cell rate algorithm, a leaky bucket kept as one
timestamp per key): `rate` calls per second sustained, `burst` at once. Refused calls
are answered RESOURCE_EXHAUSTED (reason RATE_LIMITED) at once, with RetryInfo saying
when the next call would be allowed; nothing else runs for them.

Where the state lives: in Redis when the service has one, so the limit holds across
every replica (one Lua script per call: read, decide and write atomically, on Redis's
clock). While Redis fails (and for a second after each failure) each replica limits on
its own, in process: N replicas then allow N times the rate; a rate limit that degrades
to per-replica is better than one that fails closed, or calls that wait for a dead
Redis. In-process state is bounded (the oldest keys go first).

The address is the peer of the call (the client's IP, without its port). Behind a proxy
that is the proxy: configure such a deployment's limits for what the proxy aggregates.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis

from shared.data.redis_client import RedisClient
from shared.rpc.errors import ResourceExhausted

__all__ = ["Limit", "RateLimiter", "client_address", "parse_limits"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` calls per second sustained, up to `burst` at once."""

    rate: float
    burst: int

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.rate


def parse_limits(text: str) -> dict[str, Limit]:
    """`Method=RATE/BURST,…` (e.g. `Login=10/50,GetJwks=50/200`); ValueError if malformed."""
    limits: dict[str, Limit] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, spec = item.partition("=")
        rate_text, _, burst_text = spec.partition("/")
        try:
            rate, burst = float(rate_text), int(burst_text or "1")
        except ValueError:
            rate, burst = math.nan, 0
        if not name.strip() or not math.isfinite(rate) or rate <= 0 or burst < 1:
            raise ValueError(f"bad rate limit {item!r}: expected Method=RATE/BURST")
        limits[name.strip()] = Limit(rate, burst)
    return limits


def client_address(peer: str) -> str:
    """The client's address from grpcio's peer string (`ipv4:1.2.3.4:5678`,
    `ipv6:[::1]:5678`, `unix:/path`): the IP without the port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


# KEYS[1]: the key's theoretical arrival time (ms); ARGV[1]: emission interval (ms);
# ARGV[2]: burst. Returns {1, 0} (allowed) or {0, ms until the next call is allowed}.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + interval
local allow_at = next_tat - tolerance
if allow_at > now then
  return {0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil(next_tat - now) + 1)
return {1, 0}
"""

# The same decision without counting: ms until a call would be allowed (0: now).
_GCRA_PEEK = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + interval - tolerance
if allow_at > now then
  return math.ceil(allow_at - now)
end
return 0
"""


class _LocalGcra:
    """The same algorithm in process: key → theoretical arrival time (monotonic ms)."""

    def __init__(self, max_keys: int, now: Callable[[], float]) -> None:
        self._tats: dict[str, float] = {}
        self._max_keys = max_keys
        self._now = now
        self._lock = threading.Lock()

    def check(self, key: str, limit: Limit, *, count: bool = True) -> float:
        """0 if allowed (and counted, unless `count` is False), else the milliseconds until
        the next one is."""
        now = self._now() * 1000
        interval = limit.interval_ms
        with self._lock:
            tat = max(self._tats.pop(key, now), now)
            allow_at = tat + interval - interval * limit.burst
            if allow_at > now or not count:
                if tat > now:
                    self._tats[key] = tat
                return max(allow_at - now, 0.0)
            self._tats[key] = tat + interval  # re-inserted last: the dict is ordered by use
            while len(self._tats) > self._max_keys:
                del self._tats[next(iter(self._tats))]
            return 0.0


class RateLimiter:
    """Limits per (method, client address), in Redis or (failing that) in process."""

    def __init__(
        self,
        limits: Mapping[str, Limit],
        *,
        redis_client: RedisClient | None = None,
        prefix: str = "ratelimit:",
        breaker_seconds: float = 1.0,
        max_local_keys: int = 100_000,
        monotonic: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self._limits = dict(limits)
        self._redis = redis_client
        self._script = redis_client.register_script(_GCRA) if redis_client is not None else None
        self._peek = redis_client.register_script(_GCRA_PEEK) if redis_client is not None else None
        self._prefix = prefix
        self._breaker = breaker_seconds
        self._down_until = 0.0
        self._monotonic = monotonic
        self._local = _LocalGcra(max_local_keys, monotonic)
        self._on_event = on_event or (lambda _method, _outcome: None)

    def limit_for(self, method_name: str) -> Limit | None:
        """The limit of a method, by its short name (`Login`), or None."""
        return self._limits.get(method_name)

    def check(self, method_name: str, limit: Limit, address: str) -> None:
        """Counts a call; ResourceExhausted (RATE_LIMITED, RetryInfo) if over the limit."""
        key = f"{self._prefix}{method_name}:{address}"
        wait_ms = self._shared(key, limit)
        if wait_ms is None:
            wait_ms = self._local.check(key, limit)
        if wait_ms > 0:
            self._on_event(method_name, "refused")
            raise ResourceExhausted(
                "too many requests from this address; slow down",
                retry_after_seconds=max(wait_ms / 1000, 0.001),
                reason="RATE_LIMITED",
            )

    def wait(self, name: str, limit: Limit, key: str) -> float:
        """Seconds until `check` would allow a call for (name, key), without counting one
        (0: now). For limits on outcomes: peek before the work, `count` after a failure."""
        full_key = f"{self._prefix}{name}:{key}"
        wait_ms = self._shared(full_key, limit, count=False)
        if wait_ms is None:
            wait_ms = self._local.check(full_key, limit, count=False)
        return wait_ms / 1000

    def count(self, name: str, limit: Limit, key: str) -> float:
        """Counts one event for (name, key) if the limit allows it (see `wait`); else the
        seconds until it would."""
        full_key = f"{self._prefix}{name}:{key}"
        wait_ms = self._shared(full_key, limit)
        if wait_ms is None:
            wait_ms = self._local.check(full_key, limit)
        return wait_ms / 1000

    def _shared(self, key: str, limit: Limit, *, count: bool = True) -> float | None:
        """Checked in Redis: the wait in ms (0: allowed), or None if Redis cannot say."""
        if self._script is None or self._monotonic() < self._down_until:
            return None
        try:
            if not count:
                assert self._peek is not None
                return float(self._peek(keys=[key], args=[limit.interval_ms, limit.burst]))
            allowed, wait_ms = self._script(keys=[key], args=[limit.interval_ms, limit.burst])
        except redis.RedisError as exc:
            self._down_until = self._monotonic() + self._breaker
            self._on_event("redis", "error")
            _log.warning("redis unavailable for rate limits, limiting per replica: %s", exc)
            return None
        return 0.0 if allowed else float(wait_ms)
