"""The cache never serves an older version after a newer one: not after a Redis outage that
kept a writer from invalidating, and not after Redis comes back from a snapshot that holds
values invalidated since (a private redis-server, restarted for real)."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from services.agent_svc.infra.cache import TwoLevelCache
from tests.conftest import missing
from tests.faults.servers import PrivateRedis
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis


@dataclass(frozen=True)
class Item:
    version: int


class ItemCodec:
    def encode(self, value: Item) -> bytes:
        return str(value.version).encode()

    def decode(self, data: bytes) -> Item:
        return Item(int(data))


class Database:
    """The source of truth: one versioned row per key."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, Item] = {}

    def loader(self, key: uuid.UUID) -> Callable[[], Item | None]:
        return lambda: self.rows.get(key)


def a_cache(
    client: redis.Redis, namespace: str, events: list[tuple[str, str]], **options: Any
) -> TwoLevelCache[Item]:
    cache = TwoLevelCache[Item](
        redis=client,
        codec=ItemCodec(),
        l2_ttl_seconds=300,
        namespace=namespace,
        on_event=lambda level, outcome: events.append((level, outcome)),
        version=lambda item: item.version,
        # By default every read reaches Redis (no L1): the case the defect was found in.
        **{"breaker_seconds": 0.05, "l1_max_entries": 0, "l1_ttl_seconds": 0, **options},
    )
    cache.start()
    # Subscribing clears L1 and refuses fills in flight: wait, so reads fill L2.
    assert cache.wait_subscribed(10)
    return cache


def test_after_an_outage_an_older_l2_copy_is_not_served_again(redis_url: str, unique: str) -> None:
    database, events = Database(), list[tuple[str, str]]()
    key = uuid.uuid4()
    database.rows[key] = Item(1)
    host, port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["host"], 6379
    proxy = TcpProxy(host, port)
    client = redis.Redis(host="127.0.0.1", port=proxy.port, db=15, socket_timeout=0.5)
    reader = a_cache(client, unique, events)
    try:
        assert reader.get(key, database.loader(key)) == Item(1)  # L2 now holds version 1
        proxy.cut()
        # A writer commits version 2 but cannot reach Redis: L2 keeps version 1.
        database.rows[key] = Item(2)
        assert reader.get(key, database.loader(key)) == Item(2)  # from the database
        proxy.restore()
        for _ in range(200):  # past the breaker: the next reads reach Redis again
            read = reader.get(key, database.loader(key))
            assert read == Item(2)  # never version 1 again
            if ("l2", "older") in events:
                break
            time.sleep(0.01)
        assert ("l2", "older") in events
    finally:
        reader.close()
        client.close()
        proxy.cut()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class SteppedClock:
    """`time.monotonic` plus the jumps a test makes (a doubt window passes at once)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def test_a_replica_that_lost_redis_doubts_what_a_cut_off_writer_could_not_invalidate(
    redis_url: str, unique: str
) -> None:
    """The failover case (tests/faults/test_redis_failover.py): Redis goes away for both
    replicas, the writer commits version 2 and keeps its invalidation, and Redis comes back
    for the reader first, its L2 still holding version 1. The reader never served version 2
    (so its own guard cannot help), while the writer already did: serving version 1 would
    be a read going backwards. The reader lost its listener, so it doubts: it reads the
    database until `doubt_seconds` after that, then L2 again."""
    database = Database()
    reader_events: list[tuple[str, str]] = []
    key = uuid.uuid4()
    database.rows[key] = Item(1)
    target = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    host, port, db = target["host"], int(target["port"]), int(target.get("db", 0))
    writer_proxy, reader_proxy = TcpProxy(host, port), TcpProxy(host, port)
    writer_client = redis.Redis(port=writer_proxy.port, db=db, socket_timeout=0.5)
    reader_client = redis.Redis(port=reader_proxy.port, db=db, socket_timeout=0.5)
    direct = redis.Redis(host=host, port=port, db=db, socket_timeout=2)
    clock = SteppedClock()
    writer = a_cache(writer_client, unique, [])
    reader = a_cache(reader_client, unique, reader_events, clock=clock, doubt_seconds=30.0)
    try:
        assert reader.get(key, database.loader(key)) == Item(1)  # L2 holds version 1
        writer_proxy.cut()
        reader_proxy.cut()
        wait_until(lambda: ("pubsub", "error") in reader_events)
        database.rows[key] = Item(2)
        writer.invalidate(key)
        assert writer.pending_invalidations == 1
        assert writer.get(key, database.loader(key)) == Item(2)

        reader_proxy.restore()
        wait_until(lambda: reader_events.count(("pubsub", "subscribed")) >= 2)
        assert direct.get(f"{unique}:{key}") == b"1"  # the old copy, still in L2
        assert reader.get(key, database.loader(key)) == Item(2)
        assert ("l2", "doubted") in reader_events

        # The writer comes back and delivers its invalidation; past the doubt, the
        # reader's reads are L2 hits again.
        writer_proxy.restore()
        wait_until(lambda: writer.pending_invalidations == 0)  # its listener is back
        assert direct.get(f"{unique}:{key}") is None
        clock.offset += 30.0
        hits = reader_events.count(("l2", "hit"))
        wait_until(
            lambda: (
                reader.get(key, database.loader(key)) == Item(2)
                and reader_events.count(("l2", "hit")) > hits
            )
        )
    finally:
        reader.close()
        writer.close()
        for client in (reader_client, writer_client, direct):
            client.close()
        writer_proxy.cut()
        reader_proxy.cut()


def proxied(redis_url: str) -> tuple[TcpProxy, redis.Redis]:
    """A client of the test Redis through a proxy the test can cut."""
    target = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    host, port, db = target["host"], int(target["port"]), int(target.get("db", 0))
    proxy = TcpProxy(host, port)
    return proxy, redis.Redis(port=proxy.port, db=db, socket_timeout=0.5)


class SlowLoad:
    """A load that reads the row, says so (`loading`), and returns what it read only once
    released (`release`): a read of the database that began before a write."""

    def __init__(self, database: Database, key: uuid.UUID) -> None:
        self._row = database.loader(key)
        self.loading, self.release = threading.Event(), threading.Event()

    def __call__(self) -> Item | None:
        row = self._row()
        self.loading.set()
        self.release.wait(timeout=30)
        return row


def test_a_read_in_doubt_does_not_take_a_load_that_began_before_it(
    redis_url: str, unique: str
) -> None:
    """In doubt the replica may not hear invalidations (a writer cut off from Redis keeps
    them), so a read must not take the result of another read's load of the same key that
    began before it: that load may have read the row before a write another replica has
    already served. Found by the Redis freeze fault test under load: after the thaw a read
    joined such a load and returned the version before one the writer's replica had
    served (a read going backwards with L1 off)."""
    database = Database()
    events: list[tuple[str, str]] = []
    key = uuid.uuid4()
    database.rows[key] = Item(1)
    proxy, client = proxied(redis_url)
    reader = a_cache(client, unique, events, doubt_seconds=60.0, breaker_seconds=60.0)
    slow = SlowLoad(database, key)

    results: dict[str, Item | None] = {}
    try:
        proxy.cut()
        # A read finds Redis gone: the breaker skips it from now on, and the cache doubts.
        assert reader.get(key, database.loader(key)) == Item(1)
        assert ("l2", "error") in events
        first = threading.Thread(target=lambda: results.update(first=reader.get(key, slow)))
        first.start()
        assert slow.loading.wait(timeout=10)  # its load has read version 1 ...
        database.rows[key] = Item(2)  # ... and a writer commits version 2, unheard here
        second = threading.Thread(
            target=lambda: results.update(second=reader.get(key, database.loader(key)))
        )
        second.start()
        second.join(timeout=10)  # before the first load returns: not waiting for it
        slow.release.set()
        first.join(timeout=10)
        second.join(timeout=10)
        assert results == {"first": Item(1), "second": Item(2)}
    finally:
        slow.release.set()
        reader.close()
        client.close()
        proxy.cut()


def test_a_read_in_doubt_that_loaded_for_itself_fills_no_cache(redis_url: str, unique: str) -> None:
    """Its load is not in the map invalidations look in, so none can mark it stale: were
    it to fill L1 when it returns after the doubt ended, the replica would serve the
    version it loaded after a newer one's invalidation had come (review finding)."""
    database = Database()
    events: list[tuple[str, str]] = []
    key = uuid.uuid4()
    database.rows[key] = Item(1)
    proxy, client = proxied(redis_url)
    clock = SteppedClock()
    reader = a_cache(
        client,
        unique,
        events,
        clock=clock,
        doubt_seconds=60.0,
        breaker_seconds=600.0,
        l1_max_entries=100,
        l1_ttl_seconds=600,
    )
    loads = {name: SlowLoad(database, key) for name in ("first", "second")}

    threads: list[threading.Thread] = []
    try:
        proxy.cut()
        assert reader.get(key, database.loader(key)) == Item(1)  # Redis gone: in doubt
        for name in ("first", "second"):  # the first's load is shared, the second's its own
            threads.append(threading.Thread(target=reader.get, args=(key, loads[name])))
            threads[-1].start()
            assert loads[name].loading.wait(timeout=10)
        database.rows[key] = Item(2)
        reader.invalidate(key)  # a write here: its flight (the first's) is marked stale
        clock.offset += 61.0  # the doubt is over before the second load returns
        for load in loads.values():
            load.release.set()
        for thread in threads:
            thread.join(timeout=10)
        assert key not in reader._l1  # neither load's version 1 was kept
    finally:
        for load in loads.values():
            load.release.set()
        reader.close()
        client.close()
        proxy.cut()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        missing("redis-server", "not on PATH")
    server = PrivateRedis(tmp_path / "redis")
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_values_a_snapshot_brings_back_are_never_served(private_redis: PrivateRedis) -> None:
    database, events = Database(), list[tuple[str, str]]()
    keys = [uuid.uuid4() for _ in range(3)]
    for key in keys:
        database.rows[key] = Item(1)
    client = redis.Redis(port=private_redis.port, socket_timeout=0.5)
    cache = a_cache(client, "agent", events)
    try:
        for key in keys:
            assert cache.get(key, database.loader(key)) == Item(1)
        client.save()  # the snapshot holds version 1 of every key
        for key in keys:  # written and invalidated after the snapshot
            database.rows[key] = Item(2)
            cache.invalidate(key)
            assert cache.get(key, database.loader(key)) == Item(2)
        private_redis.restart(from_dump=True)  # version 1 of every key is back in L2
        assert redis.Redis(port=private_redis.port).exists(f"agent:{keys[0]}")
        fresh = a_cache(redis.Redis(port=private_redis.port, socket_timeout=0.5), "agent", [])
        try:
            # A replica that never saw version 2 (it just started) must not serve 1 either.
            for key in keys:
                assert fresh.get(key, database.loader(key)) == Item(2)
        finally:
            fresh.close()
        for key in keys:
            assert cache.get(key, database.loader(key)) == Item(2)
    finally:
        cache.close()
        client.close()
