"""The Redis client of both services, built from settings for every supported topology.

- `single`: one server (`redis[s]://[user:password@]host:port/db`).
- `sentinel`: the master that Sentinel names (`REDIS_SENTINEL_MASTER`), found through the
  sentinels in `REDIS_URL` (`redis[s]://s1:26379,s2:26379/db`). After a failover every
  new connection goes to the promoted master; connections to the old one fail and are
  replaced (redis-py's SentinelConnectionPool).
- `cluster`: a Redis Cluster found from the seed nodes in `REDIS_URL`
  (`redis[s]://n1:6379,n2:6379`); commands go to the node that owns their key's slot and
  follow MOVED/ASK and failovers (redis-py's RedisCluster). Keys read or written together
  must share a hash slot: the callers give them a hash tag (`{…}`).

In each: `rediss://` is TLS (verified against `REDIS_TLS_CA_FILE` or the system store, a
client certificate from `REDIS_TLS_CERT_FILE`/`REDIS_TLS_KEY_FILE`), and ACL credentials
come from the URL or `REDIS_USERNAME`/`REDIS_PASSWORD`. Timeouts are short everywhere: a
slow Redis must degrade, not hang, a call (every user falls back without it).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, overload

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from shared.config.settings import RedisConfig

__all__ = ["RedisClient", "is_cluster", "make_redis", "parse_redis_url"]

RedisClient = redis.Redis | RedisCluster
"""What the services hold: a plain client (single, sentinel) or a cluster client."""

CONNECT_TIMEOUT_SECONDS = 0.5
SOCKET_TIMEOUT_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class RedisUrl:
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def parse_redis_url(url: str) -> RedisUrl:
    """`redis[s]://[user:password@]host[:port][,host[:port]…][/db]`; ValueError if not."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss"):
        raise ValueError("a Redis URL starts with redis:// or rediss://")
    netloc, _, path = rest.partition("/")
    credentials, _, host_list = netloc.rpartition("@")
    username = password = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if has_password else None
    hosts = []
    for raw in host_list.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("["):  # [IPv6]:port
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.removeprefix(":")
        else:
            host, _, port_text = item.partition(":")
        hosts.append((host, int(port_text) if port_text else 6379))
    if not hosts:
        raise ValueError("a Redis URL names at least one host")
    db_text = path.partition("?")[0].strip("/")
    return RedisUrl(
        tls=scheme == "rediss",
        hosts=tuple(hosts),
        db=int(db_text) if db_text else 0,
        username=username,
        password=password,
    )


def _tls(config: RedisConfig, on: bool) -> dict[str, Any]:
    if not on:
        return {}
    return {
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": config.tls_ca_file,
        "ssl_certfile": config.tls_cert_file,
        "ssl_keyfile": config.tls_key_file,
    }


_TIMEOUTS: dict[str, Any] = {
    "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
    "socket_timeout": SOCKET_TIMEOUT_SECONDS,
}
# No retries inside a command (what `Redis.from_url` gives; the constructor's default
# retries ten times with backoff): every caller has its own fallback, and a call must
# not wait for a Redis that is away. (The cluster client keeps its few retries: they are
# how it follows a failover to the new owner of a slot.)
_NO_RETRY: dict[str, Any] = {"retry": Retry(NoBackoff(), 0)}


@overload
def make_redis(config: str, *, max_connections: int = 64) -> redis.Redis: ...


@overload
def make_redis(config: RedisConfig, *, max_connections: int = 64) -> RedisClient: ...


def make_redis(config: RedisConfig | str, *, max_connections: int = 64) -> RedisClient:
    """The client for `config`'s topology (see the module docstring); a URL alone is a
    single server."""
    if isinstance(config, str):
        config = RedisConfig(mode="single", url=config)
    parsed = parse_redis_url(config.url)
    credentials: dict[str, Any] = {
        "username": parsed.username or config.username,
        "password": parsed.password or config.password,
    }
    tls = _tls(config, parsed.tls)
    if config.mode == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],  # type: ignore[no-untyped-call]
            max_connections=max_connections,
            decode_responses=False,
            health_check_interval=15,
            **_TIMEOUTS,
            **credentials,
            **tls,
        )
    if config.mode == "sentinel":
        assert config.sentinel_master is not None  # settings require it
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(parsed.hosts),
            sentinel_kwargs={
                **_TIMEOUTS,
                **_NO_RETRY,
                "username": config.sentinel_username,
                "password": config.sentinel_password,
                **tls,
            },
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            config.sentinel_master,
            db=parsed.db,
            max_connections=max_connections,
            decode_responses=False,
            health_check_interval=15,
            **_TIMEOUTS,
            **_NO_RETRY,
            **credentials,
            **tls,
        )
        return client
    host, port = parsed.hosts[0]
    return redis.Redis(
        host=host,
        port=port,
        db=parsed.db,
        max_connections=max_connections,
        decode_responses=False,
        health_check_interval=15,
        **_TIMEOUTS,
        **_NO_RETRY,
        **credentials,
        **tls,
    )


def is_cluster(client: RedisClient | None) -> bool:
    return isinstance(client, RedisCluster)
