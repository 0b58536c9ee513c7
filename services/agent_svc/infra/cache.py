"""A two-level read-through cache: L1 in process → L2 Redis → `load()` (the database).

Values are immutable objects (frozen dataclasses) keyed by UUID; a `Codec` turns them into
the bytes stored in Redis, so the cache knows nothing of the record type.

Reads (`get`)
    L1 hit: one lock, one dict lookup, a TTL compare, no decoding, no allocation.
    L1 miss: per-key single flight. The first caller ("leader") reads L2 (`MGET` of the value
    and of the key's invalidation stamp, one round trip); an L2 hit fills L1; an L2 miss calls
    `load()`, then fills L2 (compare-and-set against the stamp, see below) and L1. Concurrent
    callers for the same key wait for the leader and share its result or its exception.
    Leaders of different keys that read L2 at the same time share one MGET on a connection
    reserved for reads (`coalesce.CoalescedMget`): under load a round trip serves several.
    `load()` returning None (no such record) is not cached at any level, so a create is
    visible at once everywhere; concurrent misses for one absent id still load once.

Writes (`invalidate`, called after the database commit)
    One Redis transaction: `SET {ns}:{id}:inv <random stamp> PX stamp_ttl`, `DEL {ns}:{id}`,
    `PUBLISH {ns}:invalidate <id>`; then the local L1 entry is dropped and any load in flight
    for the key is marked stale. Every replica's listener drops its L1 entry on the message.

Stale fills are refused
    - L1: a load in flight when the key is invalidated (locally or by a message) is marked
      stale under the L1 lock and its result is not stored; callers arriving after the
      invalidation start a new load instead of joining the stale one.
    - L2: the fill is `SET value PX l2_ttl` only if the stamp is still the one read before
      the load (Lua, atomic). Stamps are random, so a stamp that expired and came back is
      never mistaken for the old one; a load that took longer than `stamp_ttl - 1 s` does
      not fill L2 at all, so the stamp it would have to see cannot have expired yet.

Guarantees (and their limits)
    - On the replica that served a write, once `invalidate` has returned no later read
      returns the old version: L1 is dropped after L2, fills racing with the write are
      refused, and if Redis could not be told, the key is kept as a pending invalidation and
      this replica reads nothing from L2 until every pending one has been written to Redis
      and broadcast (a bounded set; on overflow L2 is bypassed for `l2_ttl`).
    - Other replicas drop their L1 copy within the pub/sub delay (sub-millisecond to a few ms
      on a LAN, see tests/integration/test_cache_redis.py). On every (re)subscription the
      listener clears all of L1, since messages may have been lost while it was
      disconnected; and L1 is served only while the listener has heard from Redis within
      the last `3 x listener_ping_seconds` (it pings every `listener_ping_seconds`), so a
      replica cut off from invalidations stops serving L1 within that bound (a closed
      connection at once) and reads through to L2 or the database instead.
    - Limits: a writer cut off from Redis broadcasts its invalidations only when it reaches
      Redis again (pending ones are flushed on reconnect); if it dies first, other replicas
      may serve the old version from L2 for up to `l2_ttl`.
    - The cache keys by id only: checking the owner of what `get` returns is the caller's
      job, on hits as on misses.

Lagging copies (`get(..., load_lagging=...)`, a read replica of the database)
    A miss reads the lagging copy only when L2 was read and holds neither the value nor an
    invalidation stamp of the key: every write of the key since `stamp_ttl` ago left a
    stamp (set after its commit, so it outlives the commit by `stamp_ttl`), so a copy that
    lags less than `stamp_ttl` has every write the stamps no longer cover. Right after an
    invalidation (on the writer's replica or any other: the stamp is in Redis), with
    Redis unreachable, pending invalidations or no Redis at all, the miss reads `load()`
    (the primary). A lagging copy that finds nothing (it may not have replayed the
    creation yet) or returns a version older than one served here is not used either:
    `load()` answers. So an invalidation is never followed by a fill of the old version
    from a lagging copy. Limit: a copy lagging more than `stamp_ttl` may hand an older
    version of a key written between `stamp_ttl` and its lag ago to a replica that never
    served the newer one (replication lag must stay well below `stamp_ttl`).

No read goes backwards
    - Each replica remembers the newest version it served of each key (`version(value)`,
      a bounded map): an L2 value older than that is treated as a miss and reloaded. So
      after an outage during which this replica read a newer version from the database,
      the older copy a writer could not invalidate in time is never served by it again.
      A load that finds nothing marks the key: L2 copies of it are not trusted until the
      database has a version again.
    - Redis restarted: a Redis that comes back from a snapshot brings back values that
      were invalidated after the snapshot was taken. Every new read connection asks Redis
      who it is (`run_id`, new on every start, and on failover a different server): a
      Redis this namespace has not been cleared on yet has its values deleted (the
      invalidation stamps can stay: a stale stamp only refuses fills) before any read,
      then is marked as cleared. Invalidations and fills that reach it meanwhile are
      harmless; the clear is idempotent when several replicas do it at once.
    - What remains (documented in docs/operations.md): a replica that never served the
      newer version may still read the older L2 copy while the writer that could not
      reach Redis has not yet delivered its invalidation (it does so on reconnect; if it
      dies first, for up to `l2_ttl`).

After a failure ("doubt")
    A failover shows why the per-replica guard is not enough: while a Redis master (or one
    shard of a cluster) is away, a writer's invalidations wait in its pending set, and
    other replicas that reach Redis meanwhile (other shards; the promoted master as soon
    as it is up) read L2 copies those invalidations were meant to delete, or fill L2 with
    a version loaded just before the write. A replica that never served the newer version
    then serves the older one after another replica served the newer: a read goes
    backwards across replicas. So a replica doubts its caches for `doubt_seconds`
    (default `breaker_seconds + 3 x listener_ping_seconds`) from the last time it
    - saw a Redis call fail or deferred an invalidation itself,
    - lost its invalidation listener,
    - found a different Redis behind its read connection (a failover, a restart), or a
      cluster primary new since its first read,
    - heard another replica say it deferred one (cluster mode: the writer publishes the
      key and then `doubt` on the channel's node, which may be up while the key's shard
      is not).
    While in doubt L1 is empty and not refilled, and L2 values are not served: every read
    loads from the database (and may still fill L2, against its stamp), itself: it does not
    take the result of another read's load in progress, which may have read the row before
    a write whose invalidation this replica will not hear in time. The window covers
    the time a writer takes to flush its pending invalidations once Redis answers it again
    (its next call after the breaker, or its listener's next poll); a writer cut off from
    Redis for longer than that while the others reach it is the limit above.

Redis unavailable
    Every Redis call is caught: reads degrade to L1 + `load()`, `invalidate` still drops L1
    and remembers the key; nothing raises to the caller. After an error L2 is skipped for
    `breaker_seconds` (a dead Redis costs one short timeout per second, not one per call).
    Warnings are rate-limited. The listener reconnects by itself with backoff, and pings
    while idle so a silently dead connection is noticed too.

Events (`on_event(level, outcome)`, for metrics)
    ("l1", "hit" | "miss"), ("flight", "joined"), ("l2", "hit" | "miss" | "error" |
    "bypass" | "fill" | "stale_fill" | "older" | "doubted"), ("load", "db" | "lagging" |
    "lagging_refused"), ("invalidate", "sent" | "deferred"), ("pubsub", "message" |
    "subscribed" | "error"), ("doubt", "started").
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from services.agent_svc.infra.coalesce import CoalescedMget, RedisConnection
from shared.data.redis_client import RedisClient
from shared.rpc.logs import ThrottledWarning

__all__ = ["Codec", "TwoLevelCache"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS[1] value, KEYS[2] stamp; ARGV[1] stamp read before the load ("" = none), ARGV[2]
# the encoded value, ARGV[3] its lifetime in ms. Stores only if no invalidation came between.
_FILL_IF_UNCHANGED = """
local stamp = redis.call('GET', KEYS[2])
if stamp == false then stamp = '' end
if stamp ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# Cluster mode's invalidation of one key in L2 (a MULTI cannot span slots): KEYS[1] value,
# KEYS[2] stamp (one slot, by their hash tag); ARGV[1] the new stamp, ARGV[2] its lifetime
# in ms. The message follows, published on the node the listeners subscribe to.
_INVALIDATE = """
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[1])
return 1
"""

# The version remembered for a key the database does not have: newer than any real one.
_GONE = sys.maxsize
# The message that tells every replica's listener to doubt (see "After a failure").
_DOUBT = "doubt"
_INFO_RUN_ID = re.compile(rb"^run_id:([0-9a-f]+)", re.MULTILINE)

# Extra safety for the L2 fill deadline: covers the fill's own round trip.
_FILL_MARGIN_SECONDS = 1.0
_FLUSH_CHUNK = 500


class Codec(Protocol[T]):
    def encode(self, value: T) -> bytes: ...

    def decode(self, data: bytes) -> T: ...


class _Flight:
    """One load in progress for one key; waiters block on `done`."""

    __slots__ = ("done", "error", "stale", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.stale = False


class TwoLevelCache(Generic[T]):
    """L1 (bounded LRU with TTL) over L2 (Redis, optional) over `load()`."""

    def __init__(
        self,
        *,
        redis: RedisClient | None,
        codec: Codec[T],
        l1_max_entries: int,
        l1_ttl_seconds: float,
        l2_ttl_seconds: float,
        namespace: str = "agent",
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str], None] | None = None,
        stamp_ttl_seconds: float = 30.0,
        breaker_seconds: float = 1.0,
        max_pending_invalidations: int = 10_000,
        warn_interval_seconds: float = 10.0,
        listener_poll_seconds: float = 0.25,
        listener_ping_seconds: float = 0.5,
        listener_max_backoff_seconds: float = 5.0,
        version: Callable[[T], int] | None = None,
        max_versions: int = 100_000,
        doubt_seconds: float | None = None,
    ) -> None:
        if l1_max_entries < 0 or l1_ttl_seconds < 0 or l2_ttl_seconds <= 0:
            raise ValueError("cache sizes and lifetimes must be positive")
        if stamp_ttl_seconds < 2 * _FILL_MARGIN_SECONDS:
            raise ValueError("stamp_ttl_seconds must be at least 2 seconds")
        self._redis = redis
        self._codec = codec
        self._l1_max = l1_max_entries
        self._l1_ttl = l1_ttl_seconds
        self._l2_ttl_ms = max(1, int(l2_ttl_seconds * 1000))
        self._l2_ttl = l2_ttl_seconds
        self._namespace = namespace
        self._channel = f"{namespace}:invalidate"
        self._clock = clock
        self._on_event = on_event
        self._stamp_ttl_ms = int(stamp_ttl_seconds * 1000)
        self._fill_deadline = stamp_ttl_seconds - _FILL_MARGIN_SECONDS
        self._breaker = breaker_seconds
        self._max_pending = max_pending_invalidations
        self._poll = listener_poll_seconds
        self._ping_every = listener_ping_seconds
        self._max_backoff = listener_max_backoff_seconds
        self._warn = ThrottledWarning(_log, warn_interval_seconds)
        self._warn_listener = ThrottledWarning(_log, warn_interval_seconds)

        # L1: key -> (value, expires_at), least recently used first; in-flight loads.
        self._lock = threading.Lock()
        self._l1: OrderedDict[uuid.UUID, tuple[T, float]] = OrderedDict()
        self._flights: dict[uuid.UUID, _Flight] = {}
        # The newest version served per key (under `_lock`), oldest entries dropped first.
        self._version = version
        self._served: dict[uuid.UUID, int] = {}
        self._max_versions = max_versions

        # L1 is served only while the listener has heard from Redis lately: a replica that
        # cannot hear invalidations must not keep serving what they would have dropped.
        self._trust_seconds = 3 * listener_ping_seconds
        self._l1_trusted_until = float("inf") if redis is None else 0.0
        # After Redis failed or changed under this replica (see "After a failure"): until
        # then, reads come from the database.
        self._doubt_seconds = (
            breaker_seconds + 3 * listener_ping_seconds if doubt_seconds is None else doubt_seconds
        )
        self._doubt_until = 0.0
        self._run_id: bytes | None = None

        # L2 health: circuit breaker, distrust after losing track of invalidations.
        self._down_until = 0.0
        self._distrust_until = 0.0
        self._degraded = False
        self._open_l2(redis)
        self._cleared = 0

        # Invalidations Redis has not heard of yet: key -> sequence number of the latest.
        self._pending: dict[uuid.UUID, int] = {}
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._sequence = itertools.count(1)

        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._subscriptions = 0
        self._listener: threading.Thread | None = None

    def _open_l2(self, client: RedisClient | None) -> None:
        self._fill_script = (
            client.register_script(_FILL_IF_UNCHANGED) if client is not None else None
        )
        # L2 reads: concurrent ones share one MGET, on a connection of their own, which
        # checks which Redis it reached every time it connects. A Redis Cluster answers an
        # MGET only for keys of one slot: there each read is its own MGET (of a value and
        # its stamp, which share a slot by their hash tag), and each primary is checked
        # the first time it is seen (see "Redis restarted").
        self._cluster: RedisCluster | None = None
        self._invalidate_script: Any = None
        self._reads: CoalescedMget | None = None
        if isinstance(client, RedisCluster):
            self._cluster = client
            self._invalidate_script = client.register_script(_INVALIDATE)
        elif client is not None:
            self._reads = CoalescedMget(
                client.connection_pool.make_connection(), on_connect=self._check_redis
            )
        self._checked = (frozenset[str](), set[str]())  # cluster primaries, their run_ids
        self._cluster_lock = threading.Lock()

    # -- public API ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the invalidation listener (if there is a Redis); idempotent, non-blocking."""
        if self._redis is None or self._listener is not None:
            return
        self._stop.clear()
        self._listener = threading.Thread(
            target=self._listen, name=f"cache-listener-{self._namespace}", daemon=True
        )
        self._listener.start()

    def close(self) -> None:
        """Stop the listener and close the read connection. The Redis client belongs to
        the caller and stays open."""
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout=self._poll + 2.0)
        if self._reads is not None:
            self._reads.close()

    def get(
        self,
        key: uuid.UUID,
        load: Callable[[], T | None],
        *,
        load_lagging: Callable[[], T | None] | None = None,
    ) -> T | None:
        """The value for `key`, from L1, L2 or `load()` (None if `load()` finds nothing).
        `load_lagging`: the same read from a copy that may lag (a read replica), used
        instead of `load()` only when no write of the key can be missing from it (see
        "Lagging copies" in the module docstring)."""
        now = self._clock()
        hit: tuple[T, float] | None = None
        with self._lock:
            entry = self._l1.get(key)
            if entry is not None and entry[1] > now and now < self._l1_trusted_until:
                self._l1.move_to_end(key)
                hit = entry
            else:
                if entry is not None:
                    del self._l1[key]
                existing = self._flights.get(key)
                # In doubt an invalidation may never reach this replica (a writer cut off
                # from Redis keeps it), so nothing would tell a load in progress that a
                # write it may have missed was served elsewhere: a read loads for itself.
                leader = existing is None or now < self._doubt_until
                flight = existing if existing is not None and not leader else _Flight()
                if existing is None:
                    self._flights[key] = flight
                elif leader:
                    # Not in `_flights`, so no invalidation can mark it stale: it fills
                    # neither level (the doubt may end before its load returns).
                    flight.stale = True
        on_event = self._on_event
        if hit is not None:
            if on_event is not None:
                on_event("l1", "hit")
            return hit[0]
        if on_event is not None:
            on_event("l1", "miss")
        if not leader:
            if on_event is not None:
                on_event("flight", "joined")
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            value: T | None = flight.value
            return value
        try:
            value = self._read_through(key, load, flight, load_lagging)
            flight.value = value
            return value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()

    def invalidate(self, key: uuid.UUID) -> None:
        """Forget `key` everywhere; call after the write is committed. Never raises."""
        if self._redis is not None:
            sent = False
            # Tried even while the breaker skips reads: an invalidation held back is a window
            # in which other replicas serve the old version, and writes are rare enough to
            # afford a try (a dead Redis costs a write one short timeout).
            if not self._pending or self._flush_pending():
                try:
                    self._send_invalidations([key])
                    sent = True
                    self._l2_ok()
                except Exception as exc:
                    self._l2_failed("invalidate", exc)
            if sent:
                self._event("invalidate", "sent")
            else:
                self._defer(key)
                self._event("invalidate", "deferred")
                self._tell_the_others(key)
        # After L2: a read between the two must not refill L1 from the old L2 value.
        self._drop_local(key)

    def _tell_the_others(self, key: uuid.UUID) -> None:
        """Cluster mode, an invalidation deferred: the key's shard may be the only one
        down (a master died, its replica not yet promoted), while the other replicas'
        listeners, on nodes that are up, keep their L1 trusted. They still hear of the
        write and drop their copy; their L2 reads of that shard fail meanwhile, and the
        promoted master's values are cleared before they read it (`_check_cluster`)."""
        if self._cluster is not None:
            with contextlib.suppress(redis.RedisError):
                self._publish(self._cluster, key)
                self._publish(self._cluster, _DOUBT)

    def _publish(self, cluster: RedisCluster, key: uuid.UUID | str) -> None:
        """PUBLISH on the node of the channel's slot, where every replica's listener is
        subscribed (ClusterPubSub's choice): delivered at once, as on one server. (A
        cluster forwards a PUBLISH to every node, but over its bus: a hop later, long
        enough for another replica to serve its old copy after the writer answered.)"""
        node = cluster.get_node_from_key(self._channel)  # type: ignore[no-untyped-call]
        cluster.publish(self._channel, str(key), target_nodes=node)

    def in_l1(self, key: uuid.UUID) -> bool:
        """Whether a live L1 entry exists for `key` (no side effects; for tests and probes)."""
        with self._lock:
            entry = self._l1.get(key)
            return entry is not None and entry[1] > self._clock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._l1)

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until the listener is subscribed (True) or `timeout` passes (False)."""
        return self._subscribed.wait(timeout)

    @property
    def pending_invalidations(self) -> int:
        """How many invalidations are waiting for Redis to come back."""
        return len(self._pending)

    # -- read path -----------------------------------------------------------------------

    def _read_through(
        self,
        key: uuid.UUID,
        load: Callable[[], T | None],
        flight: _Flight,
        load_lagging: Callable[[], T | None] | None = None,
    ) -> T | None:
        started = self._clock()
        l2_read = False
        stamp: bytes = b""
        lagging_ok = False
        if self._l2_readable():
            try:
                reply = self._l2_mget((self._value_key(key), self._stamp_key(key)))
            except Exception as exc:
                self._l2_failed("read", exc)
            else:
                self._l2_ok()
                l2_read = True
                data, stamp = reply[0], reply[1] or b""
                if data is not None:
                    try:
                        cached = self._codec.decode(data)
                    except Exception as exc:
                        self._warn("undecodable L2 entry for %s (%s); reloading", key, exc)
                    else:
                        if self._is_older_than_served(key, cached):
                            self._event("l2", "older")
                        elif self._clock() < self._doubt_until:
                            self._event("l2", "doubted")
                        else:
                            self._event("l2", "hit")
                            self._fill_l1(key, cached, flight)
                            return cached
                else:
                    # No write of the key within the stamp's life — unless Redis failed
                    # over lately: the promoted server may never have had the stamp.
                    lagging_ok = not stamp and self._clock() >= self._doubt_until
                self._event("l2", "miss")
        elif self._redis is not None:
            self._event("l2", "bypass")
        value = self._load(key, load, load_lagging if lagging_ok else None)
        if value is None:
            self._note_gone(key)
            return None
        if l2_read and not flight.stale and self._clock() - started < self._fill_deadline:
            self._fill_l2(key, value, stamp)
        self._fill_l1(key, value, flight)
        return value

    def _load(
        self,
        key: uuid.UUID,
        load: Callable[[], T | None],
        load_lagging: Callable[[], T | None] | None,
    ) -> T | None:
        """The lagging copy's value if it may be used and is not suspect, else `load()`:
        a lagging copy that finds nothing may not have the key's creation yet, and one
        older than a version served here lags more than the stamp's lifetime."""
        if load_lagging is not None:
            value = load_lagging()
            if value is not None and not self._is_older_than_served(key, value):
                self._event("load", "lagging")
                return value
            self._event("load", "lagging_refused")
        value = load()
        self._event("load", "db")
        return value

    def _is_older_than_served(self, key: uuid.UUID, value: T) -> bool:
        if self._version is None:
            return False
        with self._lock:
            served = self._served.get(key)
        return served is not None and self._version(value) < served

    def _note_served(self, key: uuid.UUID, value: T) -> None:
        """Under `_lock`: the newest version served of `key` is at least this one's."""
        if self._version is None:
            return
        version = self._version(value)
        served = self._served.pop(key, None)
        self._served[key] = version if served is None or served == _GONE else max(served, version)
        while len(self._served) > self._max_versions:
            del self._served[next(iter(self._served))]

    def _note_gone(self, key: uuid.UUID) -> None:
        """The database has no such key: no L2 copy of it is to be trusted."""
        if self._version is None:
            return
        with self._lock:
            self._served.pop(key, None)
            self._served[key] = _GONE
            while len(self._served) > self._max_versions:
                del self._served[next(iter(self._served))]

    def _fill_l1(self, key: uuid.UUID, value: T, flight: _Flight) -> None:
        with self._lock:
            self._note_served(key, value)
            now = self._clock()
            if flight.stale or now < self._doubt_until:
                return
            expires = now + self._l1_ttl
            self._l1[key] = (value, expires)
            self._l1.move_to_end(key)
            while len(self._l1) > self._l1_max:
                self._l1.popitem(last=False)

    def _fill_l2(self, key: uuid.UUID, value: T, stamp: bytes) -> None:
        assert self._fill_script is not None
        try:
            data = self._codec.encode(value)
        except Exception:
            _log.exception("cannot encode the value for %s; not stored in Redis", key)
            return
        try:
            stored = self._fill_script(
                keys=[self._value_key(key), self._stamp_key(key)],
                args=[stamp, data, self._l2_ttl_ms],
            )
        except Exception as exc:
            self._l2_failed("fill", exc)
            return
        self._event("l2", "fill" if stored == 1 else "stale_fill")

    def _l2_mget(self, keys: tuple[str, str]) -> list[bytes | None]:
        if self._cluster is None:
            assert self._reads is not None
            return self._reads.mget(keys)
        # A read that a MOVED sent to a newly promoted primary (redis-py follows it inside
        # the MGET) is thrown away: that primary is checked first, then read again.
        for _ in range(3):
            checked = self._check_cluster(self._cluster)
            reply: list[bytes | None] = self._cluster.mget(keys)  # type: ignore[assignment]
            if self._primaries(self._cluster) == checked:
                return reply
        raise redis.ConnectionError("the cluster's primaries kept changing under a read")

    @staticmethod
    def _primaries(cluster: RedisCluster) -> frozenset[str]:
        return frozenset(node.name for node in cluster.get_primaries())  # type: ignore[no-untyped-call]

    # -- Redis restarted ------------------------------------------------------------------

    def _check_cluster(self, cluster: RedisCluster) -> frozenset[str]:
        """Cluster mode, before a read: every primary not seen before (the first read, a
        failover, a node added) is asked who it is, and a Redis new to this namespace has
        its values here cleared, as `_check_redis` does for one server. The primaries are
        redis-py's view of the cluster, refreshed when a node fails or a slot moves. (A
        primary restarted in place within the cluster's node timeout keeps its address
        and is not checked again: its values live at most `l2_ttl`.)"""
        primaries = cluster.get_primaries()  # type: ignore[no-untyped-call]
        names = frozenset(node.name for node in primaries)
        if names == self._checked[0]:
            return names
        with self._cluster_lock:
            first_check = not self._checked[1]
            for node in primaries:
                client = cluster.get_redis_connection(node)
                run_id = str(client.info("server")["run_id"])
                if run_id in self._checked[1]:
                    continue
                if not first_check:
                    self._doubt()  # a primary new since the first read: a failover
                marker = f"{self._namespace}:l2-cleared:{run_id}:{{{_tag_on(cluster, node)}}}"
                if not client.exists(marker):
                    cleared = self._clear_node_values(client)
                    client.set(marker, "1", ex=30 * 24 * 3600)
                    self._cleared += cleared
                    _log.info(
                        "Redis %s (%s) is new to the %s cache: cleared %d values",
                        run_id[:12],
                        node.name,
                        self._namespace,
                        cleared,
                    )
                self._checked[1].add(run_id)
            self._checked = (names, self._checked[1])
        return names

    def _clear_node_values(self, client: redis.Redis) -> int:
        """The values of this namespace on one cluster node (one UNLINK per key: a
        command of several keys must stay in one slot)."""
        value_length = len(self._value_key(uuid.UUID(int=0)))
        cleared = 0
        pipe = client.pipeline(transaction=False)
        for found in client.scan_iter(match=f"{self._namespace}:*", count=1000):
            if len(found) == value_length:
                pipe.unlink(found)
                cleared += 1
            if len(pipe) >= _FLUSH_CHUNK:
                pipe.execute()
        pipe.execute()
        return cleared

    def _check_redis(self, connection: RedisConnection) -> None:
        """On each new read connection, before any read (see "No read goes backwards"):
        clear the values of a Redis this namespace has not been cleared on yet."""
        connection.send_command("INFO", "server")
        found = _INFO_RUN_ID.search(_as_bytes(connection.read_response()))
        if found is None:
            raise redis.ResponseError("INFO server gave no run_id")
        run_id = found.group(1)
        if self._run_id is not None and run_id != self._run_id:
            self._doubt()  # a failover or a restart: see "After a failure"
        self._run_id = run_id
        marker = f"{self._namespace}:l2-cleared:{run_id.decode()}"
        connection.send_command("EXISTS", marker)
        if connection.read_response():
            return
        cleared = self._clear_values(connection)
        connection.send_command("SET", marker, "1", "EX", 30 * 24 * 3600)
        connection.read_response()
        self._cleared += cleared
        _log.info(
            "Redis %s is new to the %s cache: cleared %d values that may predate it",
            found.group(1).decode()[:12],
            self._namespace,
            cleared,
        )

    def _clear_values(self, connection: RedisConnection) -> int:
        prefix = f"{self._namespace}:".encode()
        value_length = len(prefix) + 36  # the namespace, then a UUID
        cursor: bytes | int = 0
        cleared = 0
        while True:
            connection.send_command("SCAN", cursor, "MATCH", prefix + b"*", "COUNT", 1000)
            cursor, keys = connection.read_response()
            values = [k for k in keys if len(k) == value_length]
            if values:
                connection.send_command("UNLINK", *values)
                cleared += int(connection.read_response())
            if int(cursor) == 0:
                return cleared

    # -- local invalidation --------------------------------------------------------------

    def _drop_local(self, key: uuid.UUID) -> None:
        with self._lock:
            self._l1.pop(key, None)
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.stale = True

    def _clear_local(self) -> None:
        with self._lock:
            self._l1.clear()
            for flight in self._flights.values():
                flight.stale = True
            self._flights.clear()

    # -- L2 health -----------------------------------------------------------------------

    def _l2_reachable(self) -> bool:
        """Redis is worth a try: no recent error, and no invalidation left unsent."""
        if self._redis is None or self._clock() < self._down_until:
            return False
        if self._pending:
            return self._flush_pending()
        return True

    def _l2_readable(self) -> bool:
        return self._l2_reachable() and self._clock() >= self._distrust_until

    def _l2_failed(self, operation: str, exc: Exception) -> None:
        self._down_until = self._clock() + self._breaker
        self._degraded = True
        self._doubt()
        self._event("l2", "error")
        self._warn(
            "Redis unavailable (%s: %s: %s); serving from the in-process cache and the "
            "database, retrying in %.1fs",
            operation,
            type(exc).__name__,
            exc,
            self._breaker,
        )

    def _doubt(self) -> None:
        """Redis failed or changed under this replica, or another replica could not reach
        it: for `doubt_seconds`, L1 is emptied and not refilled and L2 values are not
        served (every read loads from the database); see "After a failure"."""
        with self._lock:
            self._doubt_until = self._clock() + self._doubt_seconds
            self._l1.clear()
            for flight in self._flights.values():
                flight.stale = True
            self._flights.clear()
        self._event("doubt", "started")

    def _l2_ok(self) -> None:
        if self._degraded:
            self._degraded = False
            _log.info("Redis is reachable again; the %s cache uses it", self._namespace)

    def _defer(self, key: uuid.UUID) -> None:
        with self._pending_lock:
            if key not in self._pending and len(self._pending) >= self._max_pending:
                # Too many to track: stop trusting L2 for as long as a stale entry may live.
                self._pending.clear()
                self._distrust_until = self._clock() + self._l2_ttl
                _log.error(
                    "more than %d invalidations could not reach Redis; bypassing L2 for %.0fs",
                    self._max_pending,
                    self._l2_ttl,
                )
            self._pending[key] = next(self._sequence)
        self._doubt()

    def _flush_pending(self) -> bool:
        """Send every pending invalidation; True when none is left. Never raises."""
        if not self._flush_lock.acquire(blocking=False):
            return False  # another thread is flushing: don't trust L2 until it is done
        try:
            with self._pending_lock:
                snapshot = dict(self._pending)
            keys = list(snapshot)
            try:
                for start in range(0, len(keys), _FLUSH_CHUNK):
                    self._send_invalidations(keys[start : start + _FLUSH_CHUNK])
            except Exception as exc:
                self._l2_failed("flush invalidations", exc)
                return False
            with self._pending_lock:
                for key, sequence in snapshot.items():
                    if self._pending.get(key) == sequence:
                        del self._pending[key]
                left = bool(self._pending)
            if keys:
                _log.info("sent %d invalidations deferred while Redis was unavailable", len(keys))
            self._l2_ok()
            return not left
        finally:
            self._flush_lock.release()

    def _send_invalidations(self, keys: list[uuid.UUID]) -> None:
        assert self._redis is not None
        if self._cluster is not None:  # one script per key, then the message
            for key in keys:
                self._invalidate_script(
                    keys=[self._value_key(key), self._stamp_key(key)],
                    args=[os.urandom(12).hex(), self._stamp_ttl_ms],
                )
                self._publish(self._cluster, key)
            return
        pipe = self._redis.pipeline(transaction=True)
        for key in keys:
            pipe.set(self._stamp_key(key), os.urandom(12).hex(), px=self._stamp_ttl_ms)
            pipe.delete(self._value_key(key))
            pipe.publish(self._channel, str(key))
        pipe.execute()

    # -- pub/sub listener ----------------------------------------------------------------

    def _listen(self) -> None:
        assert self._redis is not None
        backoff = 0.1
        while not self._stop.is_set():
            pubsub: Any = None
            try:
                pubsub = self._redis.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                last_seen = last_ping = time.monotonic()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=self._poll)
                    now = time.monotonic()
                    if message is not None:
                        last_seen = now
                        if self._handle(message):
                            backoff = 0.1
                        if self._subscribed.is_set():  # Redis answered: L1 can be trusted
                            self._l1_trusted_until = self._clock() + self._trust_seconds
                    if now - last_ping >= self._ping_every:
                        pubsub.ping()
                        last_ping = now
                    if now - last_seen > 3 * self._ping_every:
                        raise redis.ConnectionError("no reply from Redis on the pub/sub link")
                    if self._pending:
                        self._l2_reachable()  # flushes them, unless the breaker is open
            except Exception as exc:
                self._subscribed.clear()
                self._l1_trusted_until = 0.0  # until subscribed again (which clears L1)
                if self._stop.is_set():
                    break
                self._doubt()
                self._event("pubsub", "error")
                self._warn_listener(
                    "cache invalidation listener lost Redis (%s: %s); reconnecting in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
        self._subscribed.clear()

    def _handle(self, message: dict[str, Any]) -> bool:
        """Act on one pub/sub message; True if it was a (re)subscription."""
        kind = message.get("type")
        if isinstance(kind, bytes):
            kind = kind.decode()
        if kind == "message":
            data = message.get("data")
            if data in (_DOUBT, _DOUBT.encode()):
                self._doubt()
                return False
            try:
                text = data.decode() if isinstance(data, bytes) else str(data)
                key = uuid.UUID(text)
            except (ValueError, UnicodeDecodeError):
                _log.debug("ignoring a malformed invalidation message %r", data)
                return False
            self._drop_local(key)
            self._event("pubsub", "message")
            return False
        if kind == "subscribe":
            # Messages sent while disconnected are lost: forget everything held locally.
            self._subscriptions += 1
            self._clear_local()
            self._subscribed.set()
            self._event("pubsub", "subscribed")
            _log.info(
                "cache invalidation listener subscribed to %s%s",
                self._channel,
                "" if self._subscriptions == 1 else " again (L1 cleared)",
            )
            if self._pending:
                self._flush_pending()
            return True
        return False

    # -- helpers -------------------------------------------------------------------------

    def _value_key(self, key: uuid.UUID) -> str:
        # In a cluster the value and its stamp share a hash slot (`{id}`): they are read in
        # one MGET and changed in one script. One server keeps the keys it always had.
        if self._cluster is not None:
            return f"{self._namespace}:{{{key}}}"
        return f"{self._namespace}:{key}"

    def _stamp_key(self, key: uuid.UUID) -> str:
        return f"{self._value_key(key)}:inv"

    def _event(self, level: str, outcome: str) -> None:
        if self._on_event is not None:
            self._on_event(level, outcome)


def _tag_on(cluster: RedisCluster, node: Any) -> str:
    """A hash tag whose slot `node` serves, so a key carrying it is stored on that node."""
    slots = cluster.nodes_manager.slots_cache
    for number in itertools.count():
        tag = str(number)
        owners = slots.get(key_slot(tag.encode()))
        if owners and owners[0].name == node.name:
            return tag
        if number > 1_000_000:
            break
    raise redis.ResponseError(f"no slot of the cluster is served by {node.name}")


def _as_bytes(reply: Any) -> bytes:
    """INFO's reply as bytes (redis-py parses it into a dict unless the raw reply is read)."""
    if isinstance(reply, bytes):
        return reply
    if isinstance(reply, str):
        return reply.encode()
    if isinstance(reply, dict) and "run_id" in reply:
        return f"run_id:{reply['run_id']}".encode()
    raise redis.ResponseError(f"unexpected reply to INFO: {type(reply).__name__}")
