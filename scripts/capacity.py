"""A load model: pods, PostgreSQL connections and Redis shards for a target load.

    python scripts/capacity.py                       # an example mix of calls
    python scripts/capacity.py --scale 100           # 100x that
    python scripts/capacity.py --get 400000 --create 2000 --update 8000 --watchers 20000
    python scripts/capacity.py --measure-pubsub redis://127.0.0.1:6379/0

CPU per call is the benchmark's measured figures (README "Measured figures",
docs/operations.md "Capacity": one server process on one core): a pod with a 1-CPU limit
serves 1/cost calls a second, run at the HPA's 70 % target. What each call asks of the
shared servers (`PER_CALL`: PostgreSQL transactions and rows, Redis commands) is what
those servers counted for real calls (tests/integration/test_capacity_model.py checks it
against Redis `INFO commandstats` and PostgreSQL `pg_stat_database`). A Redis shard's
capacity and the cost of one pub/sub message heard were measured too (docs/operations.md
"Capacity", with the commands). Prints each resource, what it takes, and which saturates
first.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

# Seconds of one core per call, measured (scripts/bench.py; 1 / single-pod QPS).
COST = {
    "get_l1": 1 / 4_097,
    "get_l2": 1 / 3_041,
    "get_db": 1 / 831,
    "list": 1 / 420,
    "create": 1 / 728,
    "update": 1 / 728,  # not benchmarked apart: a change costs what a create does
    "login": 1 / 41,
    # WatchAgents: one message to one stream on the WatchAgents port (grpc.aio; the
    # fan-out benchmark's whole-process CPU per message, ~55-60 µs on a loaded machine;
    # the main port's sync server: ~1 / 8,000).
    "stream_message": 1 / 17_000,
}
HPA_TARGET = 0.7
WATCH_BATCH_SECONDS = 0.05
HUB_READ_SECONDS = 0.01  # agent_svc bootstrap.HUB_READ_SECONDS
HUB_POLL_SECONDS = 1.0
CONNECTIONS_PER_POD = 15  # *_DB_POOL_SIZE 10 + 5 overflow
REDIS_READS_PER_MGET = 2.3  # coalesced L2 reads per round trip under load (benchmark)
# Measured (2026-11-30, Redis 7.0 on one core, 50 clients, no pipelining): ~150,000
# GET/SET/MGET a second per CPU second of redis-server; a script of a GET and a SET,
# ~112,000 a second (3 commands as Redis counts them). Commands are counted the way
# `INFO commandstats` counts them (a script's own calls, MULTI and EXEC included), which
# prices scripts and transactions on the safe side.
REDIS_COMMANDS_PER_SHARD = 150_000.0
# Measured in an agent process (`--measure-pubsub`, 2026-11-30, 2-core machine shared
# with other test runs): the listener thread's CPU per invalidation message heard,
# 45-90 µs at 1,000-4,000 messages a second (~12 µs when a flood batches them). Every
# agent pod hears every write's messages.
PUBSUB_MESSAGE_COST = 70e-6
# Measured (same conditions): redis-server CPU per pub/sub message delivered to one
# subscriber, ~1 µs (one publish to one subscriber; batched deliveries cost less). All
# listeners subscribe on the node of the channel's slot, so this load stays on one node
# however many shards there are.
REDIS_DELIVERY_COST = 1e-6
# Background Redis commands per agent pod (listener pings of the two caches and of the
# watch signal): counted, not calls.
REDIS_BACKGROUND_PER_POD = 6.0


@dataclass(frozen=True)
class Work:
    """What one call asks of the shared servers. Redis commands as `INFO commandstats`
    counts them; `redis_reads` are the L2 reads among them, which concurrent callers
    share (one `MGET` per `REDIS_READS_PER_MGET` under load, one each when alone)."""

    pg_transactions: float = 0.0
    pg_rows_inserted: float = 0.0
    redis_commands: float = 0.0
    redis_reads: float = 0.0
    pubsub_messages: float = 0.0  # messages every agent pod hears


# Counted by the servers for real calls (tests/integration/test_capacity_model.py).
PER_CALL = {
    "get_l1": Work(),
    "get_l2": Work(redis_reads=1),
    # L2 miss, a PostgreSQL read, the fill: EVALSHA of a GET (the stamp) and a SET.
    "get_db": Work(pg_transactions=1, redis_reads=1, redis_commands=3),
    "list": Work(pg_transactions=1),
    # The agent, its first revision, the change-log row; PUBLISH of the watch wake-up
    # (which makes every pod's watch hub read the change log: `hub_reads`).
    "create": Work(pg_transactions=1, pg_rows_inserted=3, redis_commands=1, pubsub_messages=1),
    # A revision and a change-log row; the invalidation (MULTI, SET stamp, DEL value,
    # PUBLISH, EXEC) and the watch wake-up (PUBLISH).
    "update": Work(pg_transactions=1, pg_rows_inserted=2, redis_commands=6, pubsub_messages=2),
    # Not counted by a test (auth-svc): a stated estimate.
    "login": Work(pg_transactions=3, redis_commands=2),
}


def hub_reads(changes: float, *, streams: bool = False) -> float:
    """Change-log reads a second of one agent pod's watch hub: one per wake-up (a change
    anywhere), at most one per `HUB_READ_SECONDS` while it serves streams and one per
    `WATCH_BATCH_SECONDS` while it serves none, and its poll."""
    interval = HUB_READ_SECONDS if streams else WATCH_BATCH_SECONDS
    return min(changes, 1 / interval) + 1 / HUB_POLL_SECONDS


def redis_commands(work: Work, reads_per_mget: float = REDIS_READS_PER_MGET) -> float:
    """Redis commands one call costs when `reads_per_mget` L2 reads share an MGET."""
    return work.redis_commands + work.redis_reads / reads_per_mget


@dataclass(frozen=True)
class Load:
    get: float = 4_000.0  # GetAgent calls/s
    list: float = 200.0  # ListAgents calls/s
    create: float = 10.0  # CreateAgent calls/s
    update: float = 40.0  # UpdateAgent (and other changes of an agent) calls/s
    login: float = 20.0  # Login calls/s
    l1_hit: float = 0.9  # share of GetAgent answered from the pod's L1
    l2_hit: float = 0.95  # share of L1 misses answered from Redis
    watchers: int = 0  # WatchAgents streams, all watching every change
    redis_ops_per_shard: float = REDIS_COMMANDS_PER_SHARD
    postgres_max_connections: int = 100


@dataclass(frozen=True)
class Plan:
    agent_pods: int
    auth_pods: int
    watch_pods: int
    postgres_connections: int
    postgres_transactions: float
    postgres_rows_inserted: float
    redis_ops: float
    redis_shards: int
    pubsub_per_pod: float
    pubsub_deliveries: float
    pubsub_node_cpu: float
    stream_messages: float


def calls_per_second(load: Load) -> dict[str, float]:
    """The load as calls a second of each kind of `PER_CALL`."""
    misses = load.get * (1 - load.l1_hit)
    from_redis = misses * load.l2_hit
    return {
        "get_l1": load.get * load.l1_hit,
        "get_l2": from_redis,
        "get_db": misses - from_redis,
        "list": load.list,
        "create": load.create,
        "update": load.update,
        "login": load.login,
    }


def plan(load: Load) -> Plan:
    calls = calls_per_second(load)
    agent_calls = {name: rate for name, rate in calls.items() if name != "login"}
    cpu = sum(rate * COST[name] for name, rate in agent_calls.items())
    changes = load.create + load.update
    # A stream gets one message per change, at most one per AGENT_WATCH_BATCH_SECONDS
    # (0.05 s: it rests that long after a message; what came meanwhile goes together).
    stream_messages = load.watchers * min(changes, 1 / WATCH_BATCH_SECONDS)
    watch_cpu = stream_messages * COST["stream_message"]
    agent_pods = max(1, math.ceil(cpu / HPA_TARGET))
    watch_pods = math.ceil(watch_cpu / HPA_TARGET) if load.watchers else 0
    auth_pods = max(1, math.ceil(load.login * COST["login"] / HPA_TARGET))
    pods = agent_pods + watch_pods
    pubsub_per_pod = sum(rate * PER_CALL[name].pubsub_messages for name, rate in calls.items())
    redis_ops = (
        sum(rate * redis_commands(PER_CALL[name]) for name, rate in calls.items())
        + pods * REDIS_BACKGROUND_PER_POD
    )
    return Plan(
        agent_pods=agent_pods,
        auth_pods=auth_pods,
        watch_pods=watch_pods,
        postgres_connections=(pods + auth_pods) * CONNECTIONS_PER_POD,
        postgres_transactions=sum(rate * PER_CALL[n].pg_transactions for n, rate in calls.items())
        + pods * hub_reads(changes, streams=load.watchers > 0),
        postgres_rows_inserted=sum(
            rate * PER_CALL[n].pg_rows_inserted for n, rate in calls.items()
        ),
        redis_ops=redis_ops,
        redis_shards=max(1, math.ceil(redis_ops / (load.redis_ops_per_shard * HPA_TARGET))),
        pubsub_per_pod=pubsub_per_pod,
        pubsub_deliveries=pubsub_per_pod * pods,
        pubsub_node_cpu=pubsub_per_pod * pods * REDIS_DELIVERY_COST,
        stream_messages=stream_messages,
    )


def report(load: Load, result: Plan) -> str:
    lines = [
        f"agent-svc pods (1 CPU, {HPA_TARGET:.0%} target): {result.agent_pods}"
        + (f" + {result.watch_pods} for the watch fan-out" if result.watch_pods else ""),
        f"auth-svc pods: {result.auth_pods}",
        f"PostgreSQL connections (pods x {CONNECTIONS_PER_POD}): {result.postgres_connections}"
        f" of max_connections {load.postgres_max_connections}",
        f"PostgreSQL transactions/s: {result.postgres_transactions:,.0f};"
        f" rows inserted/s: {result.postgres_rows_inserted:,.0f}",
        f"Redis commands/s: {result.redis_ops:,.0f} -> {result.redis_shards} shard(s) at"
        f" {load.redis_ops_per_shard:,.0f} commands/s each ({HPA_TARGET:.0%} used)",
        f"pub/sub messages/s per agent pod: {result.pubsub_per_pod:,.0f};"
        f" Redis deliveries/s: {result.pubsub_deliveries:,.0f}"
        f" (~{result.pubsub_node_cpu:.0%} of the subscribed node's core)",
        f"WatchAgents stream messages/s: {result.stream_messages:,.0f}",
    ]
    first = []
    if result.postgres_connections > load.postgres_max_connections:
        first.append("PostgreSQL connections: put PgBouncer (DB_TRANSACTION_POOLER=true) in front")
    if result.redis_shards > 1:
        first.append("one Redis: run a Redis Cluster (REDIS_MODE=cluster)")
    if result.pubsub_node_cpu > HPA_TARGET:
        first.append(
            "Redis pub/sub deliveries: every write reaches every pod through one node"
            " (more shards do not help): fewer pods per channel (shard agents by owner),"
            " or invalidate by TTL"
        )
    if result.pubsub_per_pod * PUBSUB_MESSAGE_COST > 0.1:
        first.append(
            "pub/sub fan-out: every pod hears every write"
            f" (~{result.pubsub_per_pod * PUBSUB_MESSAGE_COST:.0%} of a core each at a"
            f" measured {PUBSUB_MESSAGE_COST * 1e6:.0f} µs a message): shard agents by owner"
            " across deployments, or invalidate by TTL"
        )
    lines.append("saturates: " + ("; ".join(first) if first else "nothing shared (pods only)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Load()
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every rate")
    for name in ("get", "list", "create", "update", "login"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    parser.add_argument("--watchers", type=int, default=0)
    parser.add_argument(
        "--measure-pubsub",
        metavar="REDIS_URL",
        help="measure instead: the agent cache listener's CPU per invalidation message heard",
    )
    parser.add_argument("--l1-hit", type=float, default=defaults.l1_hit)
    parser.add_argument("--l2-hit", type=float, default=defaults.l2_hit)
    parser.add_argument("--redis-ops-per-shard", type=float, default=defaults.redis_ops_per_shard)
    parser.add_argument(
        "--postgres-max-connections", type=int, default=defaults.postgres_max_connections
    )
    args = parser.parse_args(argv)
    if args.measure_pubsub:
        _print(measure_pubsub(args.measure_pubsub))
        return
    load = Load(
        get=args.get * args.scale,
        list=args.list * args.scale,
        create=args.create * args.scale,
        update=args.update * args.scale,
        login=args.login * args.scale,
        l1_hit=args.l1_hit,
        l2_hit=args.l2_hit,
        watchers=args.watchers,
        redis_ops_per_shard=args.redis_ops_per_shard,
        postgres_max_connections=args.postgres_max_connections,
    )
    _print(report(load, plan(load)))


def measure_pubsub(url: str, messages: int = 5_000, rate: float = 1_000.0) -> str:
    """The agent cache's invalidation listener (the real one, on a namespace of its own)
    hears `messages` invalidations published `rate` a second; its thread's CPU time per
    message is the cost every agent pod pays for every write's message."""
    import threading
    import time
    import uuid

    import redis

    from services.agent_svc.infra.cache import TwoLevelCache

    class NoValues:
        def encode(self, value: object) -> bytes:
            return b""

        def decode(self, data: bytes) -> object:
            return None

    heard = threading.Semaphore(0)

    def count(level: str, outcome: str) -> None:
        if (level, outcome) == ("pubsub", "message"):
            heard.release()

    namespace = f"capacity-probe-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    publisher = redis.Redis.from_url(url)
    cache = TwoLevelCache[object](
        redis=client,
        codec=NoValues(),
        l1_max_entries=10_000,
        l1_ttl_seconds=30,
        l2_ttl_seconds=60,
        namespace=namespace,
        on_event=count,
    )
    try:
        cache.start()
        if not cache.wait_subscribed(10):
            raise SystemExit(f"the listener did not subscribe at {url}")
        listener = next(t for t in threading.enumerate() if namespace in t.name)
        assert listener.ident is not None
        cpu_clock = time.pthread_getcpuclockid(listener.ident)
        keys = [str(uuid.uuid4()) for _ in range(1_000)]
        cpu_before, started = time.clock_gettime(cpu_clock), time.monotonic()
        for i in range(messages):
            publisher.publish(f"{namespace}:invalidate", keys[i % len(keys)])
            time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
        for _ in range(messages):
            if not heard.acquire(timeout=10):
                raise SystemExit("the listener stopped hearing messages")
        cpu = time.clock_gettime(cpu_clock) - cpu_before
        elapsed = time.monotonic() - started
    finally:
        cache.close()
        client.close()
        publisher.close()
    return (
        f"{messages} invalidations heard at {messages / elapsed:,.0f}/s: listener CPU"
        f" {cpu:.3f} s, {cpu / messages * 1e6:.1f} µs a message"
    )


def _print(text: str) -> None:
    """Print, and exit quietly when the reader has gone (`capacity.py | head`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at nothing so that cannot fail.
        devnull = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
        os.dup2(devnull.fileno(), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
