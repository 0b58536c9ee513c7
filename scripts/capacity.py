"""A load model: pods, PostgreSQL connections and Redis shards for a target load.

    python scripts/capacity.py                       # an example mix of calls
    python scripts/capacity.py --scale 100           # 100x that
    python scripts/capacity.py --get 400000 --create 2000 --watchers 20000

Per-call costs are the benchmark's measured figures (README "Measured figures",
docs/operations.md "Capacity": one server process on one core): a pod with a 1-CPU limit
serves 1/cost calls a second, run at the HPA's 70 % target. Redis and PostgreSQL limits
are stated assumptions (flags), not measurements of a production cluster. Prints each
resource, what it takes, and which saturates first.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

# Seconds of one core per call, measured (scripts/bench.py; 1 / single-pod QPS).
COST = {
    "get_l1": 1 / 4_097,
    "get_l2": 1 / 3_041,
    "get_db": 1 / 831,
    "list": 1 / 420,
    "create": 1 / 728,
    "login": 1 / 41,
    # WatchAgents: one message to one stream on the WatchAgents port (grpc.aio; the
    # fan-out benchmark's whole-process CPU per message, ~55-60 µs on a loaded machine;
    # the main port's sync server: ~1 / 8,000).
    "stream_message": 1 / 17_000,
}
HPA_TARGET = 0.7
WATCH_BATCH_SECONDS = 0.02
CONNECTIONS_PER_POD = 15  # *_DB_POOL_SIZE 10 + 5 overflow
REDIS_READS_PER_MGET = 2.3  # coalesced L2 reads per round trip under load (benchmark)
STATEMENTS_PER_WRITE = 5  # a create: quota row, agent, revision, change log, commit
# Assumed, not measured: what one pub/sub message costs the pod that hears it (an L1 drop
# or a hub wake-up in Python); past a tenth of a core, every pod pays for every write.
PUBSUB_MESSAGE_COST = 20e-6


@dataclass(frozen=True)
class Load:
    get: float = 4_000.0  # GetAgent calls/s
    list: float = 200.0  # ListAgents calls/s
    create: float = 50.0  # CreateAgent/UpdateAgent (any change) calls/s
    login: float = 20.0  # Login calls/s
    l1_hit: float = 0.9  # share of GetAgent answered from the pod's L1
    l2_hit: float = 0.95  # share of L1 misses answered from Redis
    watchers: int = 0  # WatchAgents streams, all watching every change
    redis_ops_per_shard: float = 100_000.0
    postgres_max_connections: int = 100


@dataclass(frozen=True)
class Plan:
    agent_pods: int
    auth_pods: int
    watch_pods: int
    postgres_connections: int
    postgres_queries: float
    redis_ops: float
    redis_shards: int
    pubsub_per_pod: float
    pubsub_deliveries: float
    stream_messages: float


def plan(load: Load) -> Plan:
    misses = load.get * (1 - load.l1_hit)
    from_redis = misses * load.l2_hit
    from_db = misses - from_redis
    cpu = (
        load.get * load.l1_hit * COST["get_l1"]
        + from_redis * COST["get_l2"]
        + from_db * COST["get_db"]
        + load.list * COST["list"]
        + load.create * COST["create"]
    )
    # A stream gets one message per change, at most one per hub read (every
    # AGENT_WATCH_BATCH_SECONDS, 0.02 s: changes within one read share a message).
    stream_messages = load.watchers * min(load.create, 1 / WATCH_BATCH_SECONDS)
    watch_cpu = stream_messages * COST["stream_message"]
    agent_pods = max(1, math.ceil(cpu / HPA_TARGET))
    watch_pods = math.ceil(watch_cpu / HPA_TARGET) if load.watchers else 0
    auth_pods = max(1, math.ceil(load.login * COST["login"] / HPA_TARGET))
    pods = agent_pods + watch_pods
    # Redis: coalesced L2 reads, the L2 fill after a database read, per change an
    # invalidation script + publish + the watch wake-up; each publish reaches every pod.
    redis_ops = misses / REDIS_READS_PER_MGET + from_db + load.create * 3 + load.login * 2
    return Plan(
        agent_pods=agent_pods,
        auth_pods=auth_pods,
        watch_pods=watch_pods,
        postgres_connections=(pods + auth_pods) * CONNECTIONS_PER_POD,
        postgres_queries=from_db + load.list + load.create * STATEMENTS_PER_WRITE + load.login * 3,
        redis_ops=redis_ops,
        redis_shards=max(1, math.ceil(redis_ops / (load.redis_ops_per_shard * HPA_TARGET))),
        pubsub_per_pod=load.create * 2,
        pubsub_deliveries=load.create * 2 * pods,
        stream_messages=stream_messages,
    )


def report(load: Load, result: Plan) -> str:
    lines = [
        f"agent-svc pods (1 CPU, {HPA_TARGET:.0%} target): {result.agent_pods}"
        + (f" + {result.watch_pods} for the watch fan-out" if result.watch_pods else ""),
        f"auth-svc pods: {result.auth_pods}",
        f"PostgreSQL connections (pods x {CONNECTIONS_PER_POD}): {result.postgres_connections}"
        f" of max_connections {load.postgres_max_connections}",
        f"PostgreSQL statements/s: {result.postgres_queries:,.0f}",
        f"Redis ops/s: {result.redis_ops:,.0f} -> {result.redis_shards} shard(s) at"
        f" {load.redis_ops_per_shard:,.0f} ops/s each",
        f"pub/sub messages/s per agent pod: {result.pubsub_per_pod:,.0f};"
        f" Redis deliveries/s: {result.pubsub_deliveries:,.0f}",
        f"WatchAgents stream messages/s: {result.stream_messages:,.0f}",
    ]
    first = []
    if result.postgres_connections > load.postgres_max_connections:
        first.append("PostgreSQL connections: put PgBouncer (DB_TRANSACTION_POOLER=true) in front")
    if result.redis_shards > 1:
        first.append("one Redis: run a Redis Cluster (REDIS_MODE=cluster)")
    if result.pubsub_per_pod * PUBSUB_MESSAGE_COST > 0.1:
        first.append(
            "pub/sub fan-out: every pod hears every write"
            f" (~{result.pubsub_per_pod * PUBSUB_MESSAGE_COST:.0%} of a core each at an"
            f" assumed {PUBSUB_MESSAGE_COST * 1e6:.0f} µs a message): shard agents by owner"
            " across deployments, or invalidate by TTL"
        )
    lines.append("saturates: " + ("; ".join(first) if first else "nothing shared (pods only)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Load()
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every rate")
    for name in ("get", "list", "create", "login"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    parser.add_argument("--watchers", type=int, default=0)
    parser.add_argument("--l1-hit", type=float, default=defaults.l1_hit)
    parser.add_argument("--l2-hit", type=float, default=defaults.l2_hit)
    parser.add_argument("--redis-ops-per-shard", type=float, default=defaults.redis_ops_per_shard)
    parser.add_argument(
        "--postgres-max-connections", type=int, default=defaults.postgres_max_connections
    )
    args = parser.parse_args(argv)
    load = Load(
        get=args.get * args.scale,
        list=args.list * args.scale,
        create=args.create * args.scale,
        login=args.login * args.scale,
        l1_hit=args.l1_hit,
        l2_hit=args.l2_hit,
        watchers=args.watchers,
        redis_ops_per_shard=args.redis_ops_per_shard,
        postgres_max_connections=args.postgres_max_connections,
    )
    print(report(load, plan(load)))


if __name__ == "__main__":
    main()
