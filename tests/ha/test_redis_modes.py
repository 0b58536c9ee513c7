"""Every use of Redis, on a Sentinel-watched master and on a Redis Cluster, plain and over
TLS with an ACL user: the client is built from settings alone (shared.data.redis_client),
then the two-level cache (reads, fills, invalidation broadcast between two replicas), the
login limiter's script and the rate limiter run on it as they do on one server."""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import MovedError

from services.agent_svc.infra.cache import TwoLevelCache
from services.agent_svc.infra.changefeed import RedisChangeSignal
from services.auth_svc.infra.limiter import InMemoryLoginLimiter, RedisLoginLimiter
from shared.config.settings import EnvReader, load_redis
from shared.data.redis_client import RedisClient, make_redis
from shared.rpc.errors import ResourceExhausted
from shared.rpc.ratelimit import Limit, RateLimiter
from tests.ha.redis_topologies import (
    ClusterSetup,
    SentinelSetup,
    make_tls_files,
    redis_node,
    take_port,
)

pytestmark = [pytest.mark.faults]

WAIT = 30.0


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    version: int


class ItemCodec:
    def encode(self, value: Item) -> bytes:
        return json.dumps(asdict(value)).encode()

    def decode(self, data: bytes) -> Item:
        return Item(**json.loads(data))


def recorder(into: list[tuple[str, str]]) -> Callable[[str, str], None]:
    return lambda level, outcome: into.append((level, outcome))


def version_of(item: Item) -> int:
    return item.version


@pytest.fixture
def clients(topology: SentinelSetup | ClusterSetup) -> Iterator[list[RedisClient]]:
    """Two clients (two replicas of a service), built from the service's variables."""
    env = topology.config_env("AGENT")
    reader = EnvReader(env, "AGENT")
    config = load_redis(reader, env["AGENT_REDIS_URL"])
    reader.check()
    assert config == topology.config()
    made = [make_redis(config), make_redis(config)]
    yield made
    for client in made:
        client.close()


def test_the_client_matches_the_topology(
    topology: SentinelSetup | ClusterSetup, clients: list[RedisClient]
) -> None:
    client = clients[0]
    assert isinstance(client, RedisCluster) == isinstance(topology, ClusterSetup)
    client.set("ha:probe", b"1")
    assert client.get("ha:probe") == b"1"


def test_the_cache_reads_fills_and_broadcasts_invalidations(clients: list[RedisClient]) -> None:
    events: list[list[tuple[str, str]]] = [[], []]
    namespace = f"ha{uuid.uuid4().hex[:6]}"  # both replicas share it
    caches = [
        TwoLevelCache[Item](
            redis=client,
            codec=ItemCodec(),
            l1_max_entries=100,
            l1_ttl_seconds=60,
            l2_ttl_seconds=60,
            namespace=namespace,
            on_event=recorder(events[i]),
            version=version_of,
        )
        for i, client in enumerate(clients)
    ]
    a, b = caches
    try:
        for cache in caches:
            cache.start()
            assert cache.wait_subscribed(WAIT)
        keys = [uuid.uuid4() for _ in range(20)]  # spread over every shard of a cluster
        for key in keys:
            assert a.get(key, functools.partial(Item, str(key), 1)) == Item(str(key), 1)
        assert events[0].count(("l2", "fill")) == len(keys)

        def unexpected() -> Item:
            raise AssertionError(f"B loaded what A had put in L2: {events[1]}")

        for key in keys:  # B finds each value in L2 (one MGET of the value and its stamp)
            assert b.get(key, unexpected) == Item(str(key), 1)
        assert events[1].count(("l2", "hit")) == len(keys)

        for key in keys:  # A's invalidation reaches B's listener, whatever the key's shard
            messages = events[1].count(("pubsub", "message"))
            a.invalidate(key)
            deadline = time.monotonic() + WAIT
            while b.in_l1(key) or events[1].count(("pubsub", "message")) == messages:
                assert time.monotonic() < deadline, "B did not hear of the invalidation"
                time.sleep(0.005)
            assert b.get(key, functools.partial(Item, str(key), 2)) == Item(str(key), 2)
        assert ("l2", "error") not in events[0] + events[1]
    finally:
        for cache in caches:
            cache.close()


def test_the_login_limiter_counts_across_replicas(clients: list[RedisClient]) -> None:
    prefix = f"ha:login:{uuid.uuid4().hex[:6]}:"
    limiters = [
        RedisLoginLimiter(
            client,
            max_failures=3,
            lockout_seconds=60,
            fallback=InMemoryLoginLimiter(
                max_failures=1, lockout_seconds=60, monotonic=time.monotonic
            ),
            prefix=prefix,
            on_redis_error=lambda: pytest.fail("the limiter fell back"),
        )
        for client in clients
    ]
    email = f"{uuid.uuid4().hex}@example.com"
    allowed = [limiters[i % 2].acquire(email).allowed for i in range(4)]
    assert allowed == [True, True, True, False]
    limiters[0].release(email)
    assert limiters[1].acquire(email).allowed


def test_the_rate_limiter_shares_its_budget(clients: list[RedisClient]) -> None:
    events: list[tuple[str, str]] = []
    prefix = f"ha:rate:{uuid.uuid4().hex[:6]}:"
    limiters = [
        RateLimiter(
            {},
            redis_client=client,
            prefix=prefix,
            on_event=lambda method, outcome: events.append((method, outcome)),
        )
        for client in clients
    ]
    limit = Limit(rate=0.01, burst=3)
    for i in range(3):
        limiters[i % 2].check("Login", limit, "192.0.2.1")
    with pytest.raises(ResourceExhausted):
        limiters[1].check("Login", limit, "192.0.2.1")
    assert ("redis", "error") not in events


def test_cluster_pubsub_reaches_subscribers_on_every_node_and_sharded_does_not(
    topology: SentinelSetup | ClusterSetup, clients: list[RedisClient]
) -> None:
    """The cache's invalidations use classic PUBLISH, which a cluster forwards to every
    node: a subscriber hears it whichever node it is connected to. Sharded pub/sub
    (SPUBLISH) stays on the shard of the channel's slot: it would not do."""
    if not isinstance(topology, ClusterSetup):
        pytest.skip("a cluster property")
    client = clients[0]
    assert isinstance(client, RedisCluster)
    channel = f"ha:broadcast:{uuid.uuid4().hex[:6]}"
    listeners = []
    for process in topology.processes:  # masters and replicas
        node_client = process.client()
        pubsub = node_client.pubsub()  # type: ignore[no-untyped-call]
        pubsub.subscribe(channel)
        assert pubsub.get_message(timeout=WAIT)["type"] == "subscribe"
        listeners.append((process.port, node_client, pubsub))
    try:
        client.publish(channel, b"hello")
        for port, _, pubsub in listeners:
            message = pubsub.get_message(timeout=WAIT)
            assert message is not None, f"the subscriber on {port} heard nothing"
            assert message["data"] == b"hello"
        owner = client.get_node_from_key(channel)  # type: ignore[no-untyped-call]
        other = next(p for p in topology.masters() if p.port != owner.port)
        node_client = other.client()
        try:
            with pytest.raises(MovedError):  # SSUBSCRIBE only on the slot's shard
                node_client.execute_command("SSUBSCRIBE", channel)  # type: ignore[no-untyped-call]
        finally:
            node_client.close()
    finally:
        for _, node_client, pubsub in listeners:
            pubsub.close()
            node_client.close()


def test_a_single_server_over_tls_with_an_acl_user(redis_binaries: None, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    server = redis_node(tmp_path / "single", take_port(), [], tls=tls)
    try:
        server.start()
        env = {
            "AUTH_REDIS_URL": f"rediss://127.0.0.1:{server.port}/0",
            "AUTH_REDIS_USERNAME": "agentplatform",
            "AUTH_REDIS_PASSWORD": "ha-test-password",
            "AUTH_REDIS_TLS_CA_FILE": str(tls.ca),
            "AUTH_REDIS_TLS_CERT_FILE": str(tls.client_cert),
            "AUTH_REDIS_TLS_KEY_FILE": str(tls.client_key),
        }
        reader = EnvReader(env, "AUTH")
        config = load_redis(reader, env["AUTH_REDIS_URL"])
        reader.check()
        assert config is not None
        client = make_redis(config)
        try:
            assert client.acl_whoami() == "agentplatform"
        finally:
            client.close()
        plain = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
        with pytest.raises(redis.ConnectionError):
            plain.ping()
        plain.close()
    finally:
        server.kill()


def test_the_watch_wake_up_reaches_the_other_replica(clients: list[RedisClient]) -> None:
    """WatchAgents' cross-replica wake-up (a commit on one replica makes the other's hub
    read the change log) is plain PUBLISH/SUBSCRIBE on `agent:changes`: it works on
    Sentinel and on a cluster, whichever node each replica's listener is on."""
    woken = [threading.Event(), threading.Event()]
    signals = [
        RedisChangeSignal(client, event.set, poll=0.1)
        for client, event in zip(clients, woken, strict=True)
    ]
    for signal in signals:
        signal.start()
    try:
        for signal, event in zip(signals, woken, strict=True):
            assert signal.subscribed.wait(WAIT)
            # The listener wakes its hub on any message, its subscription's too: wait for
            # that one, so what follows can only be the other replica's publish.
            assert event.wait(WAIT)
            event.clear()
        signals[0].changed()
        assert woken[0].is_set()  # its own hub, at once
        assert woken[1].wait(WAIT), "the other replica's hub was not woken"
    finally:
        for signal in signals:
            signal.close()
