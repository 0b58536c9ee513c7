"""A cache miss may read a copy that lags (a read replica) only when no write of the key
can be missing from it: never right after an invalidation, on the writer's replica or any
other, so a lagging copy never puts an older version back into L1 or L2.

The rule (services/agent_svc/infra/cache.py, "Lagging copies"): the lagging load is used
only when L2 was read and holds no invalidation stamp for the key; a stamp lives
`stamp_ttl_seconds` (30 s in the service) after the write's commit, so a copy that lags
less than that has every write the stamp does not cover. Without that read (no Redis,
Redis down, invalidations pending) the miss reads the primary.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis

from services.agent_svc.infra.cache import TwoLevelCache

STAMP_TTL = 2.0  # the smallest the cache allows: the test waits for one to expire


@dataclass(frozen=True)
class Item:
    version: int


class ItemCodec:
    def encode(self, value: Item) -> bytes:
        return str(value.version).encode()

    def decode(self, data: bytes) -> Item:
        return Item(int(data))


class Database:
    """A primary and a replica whose replay is paused: the replica has what it had."""

    def __init__(self) -> None:
        self.primary: dict[uuid.UUID, Item] = {}
        self.replica: dict[uuid.UUID, Item] = {}
        self.reads: list[str] = []

    def write(self, key: uuid.UUID, item: Item) -> None:
        self.primary[key] = item

    def replay(self) -> None:
        self.replica = dict(self.primary)

    def load(self, key: uuid.UUID) -> Callable[[], Item | None]:
        def read() -> Item | None:
            self.reads.append("primary")
            return self.primary.get(key)

        return read

    def load_lagging(self, key: uuid.UUID) -> Callable[[], Item | None]:
        def read() -> Item | None:
            self.reads.append("replica")
            return self.replica.get(key)

        return read


@pytest.fixture
def make_cache(redis_url: str, unique: str) -> Iterator[Callable[..., TwoLevelCache[Item]]]:
    made: list[TwoLevelCache[Item]] = []
    clients: list[redis.Redis] = []

    def make(*, with_redis: bool = True) -> TwoLevelCache[Item]:
        client = redis.Redis.from_url(redis_url) if with_redis else None
        if client is not None:
            clients.append(client)
        cache = TwoLevelCache[Item](
            redis=client,
            codec=ItemCodec(),
            l1_max_entries=100,
            l1_ttl_seconds=300,
            l2_ttl_seconds=300,
            namespace=unique,
            stamp_ttl_seconds=STAMP_TTL,
            version=lambda item: item.version,
        )
        cache.start()
        assert client is None or cache.wait_subscribed(10)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()
    for client in clients:
        client.close()


def get(cache: TwoLevelCache[Item], database: Database, key: uuid.UUID) -> Item | None:
    return cache.get(key, database.load(key), load_lagging=database.load_lagging(key))


def test_a_key_with_no_recent_write_is_read_from_the_lagging_copy(
    make_cache: Callable[..., TwoLevelCache[Item]],
) -> None:
    database, key = Database(), uuid.uuid4()
    database.write(key, Item(1))
    database.replay()
    cache = make_cache()
    assert get(cache, database, key) == Item(1)
    assert database.reads == ["replica"]
    assert get(cache, database, key) == Item(1)  # then served from L1
    assert database.reads == ["replica"]


def test_a_miss_after_an_update_reads_the_primary_and_caches_the_new_version(
    make_cache: Callable[..., TwoLevelCache[Item]],
) -> None:
    database, key = Database(), uuid.uuid4()
    database.write(key, Item(1))
    database.replay()
    writer, other = make_cache(), make_cache()
    assert get(writer, database, key) == Item(1)
    assert get(other, database, key) == Item(1)
    # The update commits on the primary; the replica has not replayed it (paused).
    database.write(key, Item(2))
    writer.invalidate(key)
    assert get(writer, database, key) == Item(2)
    assert database.reads[-1] == "primary"
    # The other replica of the service heard the invalidation (pub/sub) and reads the
    # primary too: what it puts in L2 and L1 is the new version.
    for _ in range(200):
        if not other.in_l1(key):
            break
        threading.Event().wait(0.01)
    assert get(other, database, key) == Item(2)
    # Neither level holds the old version: a third cache (L1 empty) reads L2's value.
    assert get(make_cache(), database, key) == Item(2)
    assert "replica" not in database.reads[2:]


def test_the_lagging_copy_is_used_again_once_the_stamp_has_expired(
    make_cache: Callable[..., TwoLevelCache[Item]], redis_url: str, unique: str
) -> None:
    database, key = Database(), uuid.uuid4()
    database.write(key, Item(1))
    writer = make_cache()
    writer.invalidate(key)  # the create's invalidation
    database.replay()
    client = redis.Redis.from_url(redis_url)
    try:
        stamps = [k for k in client.scan_iter(f"{unique}*{key}*") if k.endswith(b":inv")]
        assert stamps  # the invalidation stamp is there...
        expired = threading.Event()
        for _ in range(int(10 * STAMP_TTL / 0.05)):
            if not any(client.exists(k) for k in stamps):
                expired.set()
                break
            threading.Event().wait(0.05)
        assert expired.is_set()  # ...and gone after its lifetime
    finally:
        client.close()
    assert get(make_cache(), database, key) == Item(1)
    assert database.reads == ["replica"]


def test_without_redis_every_miss_reads_the_primary(
    make_cache: Callable[..., TwoLevelCache[Item]],
) -> None:
    database, key = Database(), uuid.uuid4()
    database.write(key, Item(1))
    database.replay()
    cache = make_cache(with_redis=False)
    assert get(cache, database, key) == Item(1)
    assert database.reads == ["primary"]


def test_a_lagging_copy_older_than_a_version_served_here_is_not_used(
    make_cache: Callable[..., TwoLevelCache[Item]], redis_url: str, unique: str
) -> None:
    # A replica lagging longer than the stamp's life: its copy is older than what this
    # cache served before, and the primary answers instead.
    database, key = Database(), uuid.uuid4()
    database.write(key, Item(1))
    database.replay()
    cache = make_cache()
    database.write(key, Item(2))
    cache.invalidate(key)
    assert get(cache, database, key) == Item(2)  # from the primary: the stamp is there
    cache.invalidate(key)  # L1 dropped (a write that changed nothing, say)
    client = redis.Redis.from_url(redis_url)
    try:
        # The stamps' lifetimes over, and L2's copy gone: nothing says the key was written.
        for found in client.scan_iter(f"{unique}*{key}*"):
            client.delete(found)
    finally:
        client.close()
    database.reads.clear()
    assert get(cache, database, key) == Item(2)
    assert database.reads == ["replica", "primary"]


def test_a_cache_in_doubt_after_a_redis_failure_reads_the_primary(
    make_cache: Callable[..., TwoLevelCache[Item]], redis_url: str, unique: str
) -> None:
    """After a Redis failover the promoted server may lack the latest stamps (or values):
    "no stamp" then proves nothing, so while the cache doubts (cache.py, "After a
    failure") a miss reads the primary, never the lagging copy."""
    database, key = Database(), uuid.uuid4()
    database.write(key, Item(1))
    database.replay()
    cache = make_cache()
    database.write(key, Item(2))  # committed; the replica has not replayed it
    cache.invalidate(key)
    # The failover: the new Redis master never had the stamp (nor a value).
    with redis.Redis.from_url(redis_url) as client:
        client.delete(*client.keys(f"{unique}:*"))
    cache._doubt()  # what a failed call, a lost listener or a new master starts
    assert get(cache, database, key) == Item(2)
    assert database.reads == ["primary"]
