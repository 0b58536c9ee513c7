"""The Redis master killed under load, on Sentinel and on a Redis Cluster: a real failover.

Two agent_svc replicas reach Redis through the variables alone (`AGENT_REDIS_MODE`,
`AGENT_REDIS_URL`, `AGENT_REDIS_SENTINEL_MASTER`: tests/ha/redis_topologies.py), with the
read and write load of test_redis_faults.py (readers on both replicas, one writer). Beside
it, a probe writes to Redis directly, through a client built the way the services build
theirs, to a key the killed master serves, and reads it back: that measures the outage
(no master for the key) and the recovery after the promotion.

Expected, and asserted: no agent_svc call fails (reads fall back to the database while
Redis has no master, writes still commit and their invalidations wait); no read that
starts after the promotion returns an older version than a read on either replica
already returned (before the cache's "doubt", ~1 cluster run in 4 to 8 saw one, up to
0.9 s after the promotion); the direct writes fail only between the kill and the
promotion and succeed again within seconds; a value read back after the failover is
never older than one read before. The figures are printed
and recorded (`record_property`) for docs/operations.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from agentplatform.agent.v1 import agent_pb2_grpc
from redis.cluster import RedisCluster

from shared.data.redis_client import make_redis
from tests.faults.load import Call, backwards_reads, summarize
from tests.faults.servers import PostgresCluster, RedisServer
from tests.faults.services import AGENT_SERVICE, AuthService, Fleet, agent_env, create_agent
from tests.faults.test_redis_faults import AGENTS, start_load
from tests.ha.redis_topologies import ClusterSetup, SentinelSetup
from tests.helpers import free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.postgres]

PROBE_KEY = "ha:probe:{failover}"
RECOVERY_BOUND_SECONDS = 15.0  # from the promotion to the first direct write that succeeds


@dataclass
class FailoverStack:
    topology: SentinelSetup | ClusterSetup
    replicas: list[tuple[str, agent_pb2_grpc.AgentServiceStub]]
    caller: object
    agent_ids: list[str] = field(default_factory=list)
    versions: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**9)))


@pytest.fixture(params=["sentinel", "cluster"])
def stack(
    request: pytest.FixtureRequest,
    pg: PostgresCluster,
    redis_server_binary: str,
    module_auth: AuthService,
    tmp_path: Path,
) -> Iterator[FailoverStack]:
    topology: SentinelSetup | ClusterSetup = (
        SentinelSetup(tmp_path / "redis")
        if request.param == "sentinel"
        else ClusterSetup(tmp_path / "redis")
    )
    fleet = Fleet(tmp_path / "logs")
    channels: list[grpc.Channel] = []
    try:
        topology.start()
        database = pg.create_database()
        redis_env = {
            key.removeprefix("AGENT_"): value
            for key, value in topology.config_env("AGENT").items()
            if key != "AGENT_REDIS_URL"
        }
        processes = []
        for i in (1, 2):
            env = agent_env(
                free_port(),
                tmp_path / f"r{i}",
                module_auth.address,
                database,
                topology.config().url,
                **redis_env,
            )
            processes.append(fleet.start("agent_svc", env))
            processes[-1].wait_serving(AGENT_SERVICE, timeout=60)
        channels = [grpc.insecure_channel(p.address) for p in processes]
        stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in channels]
        caller = module_auth.new_caller()
        stack = FailoverStack(topology, [("r1", stubs[0]), ("r2", stubs[1])], caller)
        stack.agent_ids = [
            create_agent(stubs[0], caller, f"failover-{i}", description="v0").id
            for i in range(AGENTS)
        ]
        yield stack
    finally:
        for channel in channels:
            channel.close()
        fleet.close()
        topology.close()


@dataclass
class Probe:
    """Direct writes (SET of an increasing number) and reads of one key, each recorded."""

    client: redis.Redis | RedisCluster
    writes: list[tuple[float, bool]] = field(default_factory=list)
    reads: list[tuple[float, int | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    acknowledged: int = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                self.client.set(PROBE_KEY, n)
                self.acknowledged = n
                self.writes.append((started, True))
            except redis.RedisError:
                self.writes.append((started, False))
            try:
                value = self.client.get(PROBE_KEY)
                self.reads.append((started, int(value) if value is not None else None))
            except redis.RedisError:
                self.reads.append((started, None))
            self.stop.wait(0.01)


def _master_of_probe(topology: SentinelSetup | ClusterSetup) -> RedisServer:
    if isinstance(topology, SentinelSetup):
        return topology.node(topology.master_port())
    client = make_redis(topology.config())
    try:
        assert isinstance(client, RedisCluster)
        port = client.get_node_from_key(PROBE_KEY).port  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return next(p for p in topology.processes if p.port == port)


def _promoted(topology: SentinelSetup | ClusterSetup, killed: RedisServer) -> bool:
    if isinstance(topology, SentinelSetup):
        return topology.master_port() != killed.port
    try:
        return len(topology.masters()) == 3  # the killed master's replica took its slots
    except redis.RedisError:
        return False


def test_the_redis_master_killed_under_load(
    stack: FailoverStack, record_property: Callable[[str, object], None]
) -> None:
    topology = stack.topology
    probe = Probe(make_redis(topology.config()))
    thread = threading.Thread(target=probe.run, name="redis-probe", daemon=True)
    thread.start()
    try:
        with start_load(stack) as load:  # type: ignore[arg-type]
            load.wait_for(
                lambda calls: sum(c.ok and c.method == "UpdateAgent" for c in calls) >= 10,
                timeout=60,
                what="the load to warm up",
            )
            master = _master_of_probe(topology)
            before_kill = probe.acknowledged
            down = time.monotonic()
            master.kill()
            deadline = down + 60
            while not _promoted(topology, master):
                assert time.monotonic() < deadline, "no replica was promoted"
                time.sleep(0.05)
            promoted = time.monotonic()
            load.wait_for(
                lambda calls: (
                    sum(c.ok and c.started > promoted + 2 for c in calls) >= 100
                    and any(ok and t > promoted for t, ok in probe.writes)
                    and sum(t > promoted for t, _ in probe.reads) >= 20
                ),
                timeout=60,
                what="calls and direct writes after the promotion",
            )
            load.stop()
    finally:
        probe.stop.set()
        thread.join(10)
        probe.client.close()

    calls: list[Call] = load.calls
    failed = [c for c in calls if not c.ok]
    assert not failed, f"{len(failed)} calls failed ({summarize(failed)}): {failed[:3]}"
    # From the promotion on no read may return an older version than one already returned
    # (cache.py, "After a failure"). Before it, the bound of docs/operations.md
    # ("Staleness") applies; those are counted, not asserted.
    found = backwards_reads((c for c in calls if c.method == "GetAgent"), key=lambda c: c.payload)
    backwards = [pair for pair in found if pair[1].started >= promoted]
    assert not backwards, (
        f"{len(backwards)} reads went backwards after the promotion (kill at {down:.3f},"
        f" promotion at {promoted:.3f}): "
        + "; ".join(
            f"{a.target} saw v{a.payload[1]} (ended {a.ended - promoted:+.3f} s) then"
            f" {b.target} v{b.payload[1]} (started {b.started - promoted:+.3f} s)"
            for a, b in backwards[:8]
        )
    )

    failed_writes = [t for t, ok in probe.writes if not ok]
    first_success = min(t for t, ok in probe.writes if ok and t > down)
    assert all(down - 1.0 <= t <= first_success for t in failed_writes), (
        "a direct write failed outside the failover"
    )
    assert first_success - promoted < RECOVERY_BOUND_SECONDS
    assert first_success > down, "the master was not killed"
    # Reads after the promotion never see a value older than the last write acknowledged
    # before the kill by more than what asynchronous replication may lose; and never go
    # backwards among themselves.
    after = [value for t, value in probe.reads if t > first_success and value is not None]
    assert after, "no direct read after the failover"
    assert after == sorted(after), "a direct read went backwards after the failover"
    lost = max(0, before_kill - after[0])
    figures = {
        "mode": "sentinel" if isinstance(topology, SentinelSetup) else "cluster",
        "promotion_s": round(promoted - down, 2),
        "write_outage_s": round(first_success - down, 2),
        "recovery_after_promotion_s": round(max(0.0, first_success - promoted), 2),
        "failed_direct_writes": len(failed_writes),
        "acknowledged_writes_lost": lost,
        "backwards_reads_before_the_promotion": len(found),
        "agent_calls": summarize(calls),
    }
    print("redis failover:", figures)
    for name, value in figures.items():
        record_property(name, value)
