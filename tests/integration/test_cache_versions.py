"""The cache never serves an older version after a newer one: not after a Redis outage that
kept a writer from invalidating, and not after Redis comes back from a snapshot that holds
values invalidated since (a private redis-server, restarted for real)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from services.agent_svc.infra.cache import TwoLevelCache
from tests.conftest import missing
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
    client: redis.Redis, namespace: str, events: list[tuple[str, str]]
) -> TwoLevelCache[Item]:
    cache = TwoLevelCache[Item](
        redis=client,
        codec=ItemCodec(),
        l1_max_entries=0,  # every read reaches Redis: the case the defect was found in
        l1_ttl_seconds=0,
        l2_ttl_seconds=300,
        namespace=namespace,
        breaker_seconds=0.05,
        on_event=lambda level, outcome: events.append((level, outcome)),
        version=lambda item: item.version,
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


@dataclass
class PrivateRedis:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--dbfilename",
                "dump.rdb",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(300):
            try:
                client.ping()
                return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        missing("redis-server", "not on PATH")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = PrivateRedis(port, tmp_path)
    server.start()
    yield server
    server.kill()


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
        private_redis.kill()
        private_redis.start()  # back from the snapshot: version 1 of every key is in L2
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
