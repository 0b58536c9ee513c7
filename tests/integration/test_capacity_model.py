"""scripts/capacity.py's per-call counts (`PER_CALL`) checked against what the servers count.

agent_svc runs in process on a fresh PostgreSQL database and a private Redis (nothing else
is counted there); each kind of call is made N times in a row, and the counters the servers
keep themselves are read before and after: Redis `INFO commandstats`, PostgreSQL
`pg_stat_database` (`xact_commit`, `tup_inserted`). Calls made one at a time share no MGET,
so the model's L2 reads count one command each here; L1 is off, so a read is an L2 hit
or a database read, never something in between.

Tolerance: Redis counts are exact but for the connection and background commands left out
(`BACKGROUND`: listener pings, the checks a new connection makes). PostgreSQL publishes a
backend's counters up to ~10 s late (at most once a second while busy, 10 s after it went
idle): each figure is read until it has reached the model's count (or 15 s passed), and
may differ from the model by `PG_TOLERANCE` a call.
The model's count includes the watch hub's reads of the change log that each change sets
off in every pod (`capacity.hub_reads`), for the rate the calls were made at.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from google.protobuf import field_mask_pb2
from sqlalchemy import Engine, create_engine, make_url, text

from scripts import capacity
from tests.conftest import missing
from tests.faults.servers import PrivateRedis
from tests.integration.inprocess import Served, agent_service, auth_service, register_and_login

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

N = 100
# PostgreSQL transactions a call may differ from the model's by this much: the service's
# background transactions, counters published late, the watch hub's wake-ups coalescing
# differently than the model's arithmetic says. A model off by a whole transaction a call
# still fails.
PG_TOLERANCE = 0.3
STATS_DELAY = 15.0  # PostgreSQL's idle flush of a backend's counters is 10 s
BACKGROUND = {"ping", "info", "hello", "client|setinfo", "scan", "exists", "script|load"}


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[Served]:
    with auth_service(tmp_path) as served:
        yield served


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


def redis_commands(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter(
        {
            name.removeprefix("cmdstat_"): int(values["calls"])
            for name, values in stats.items()
            if name.removeprefix("cmdstat_") not in BACKGROUND
        }
    )


def pg_counts(admin: Engine, database: str) -> tuple[int, int]:
    """(xact_commit, tup_inserted) of `database`, read from another database (so the
    reading itself is not counted)."""
    with admin.connect() as connection:
        row = connection.execute(
            text("SELECT xact_commit, tup_inserted FROM pg_stat_database WHERE datname = :d"),
            {"d": database},
        ).one()
    return int(row[0]), int(row[1])


def test_each_call_costs_the_servers_what_the_model_says(
    tmp_path: Path,
    auth: Served,
    private_redis: PrivateRedis,
    postgres_url: str,
    postgres_admin_url: str,
) -> None:
    database = make_url(postgres_url).database
    assert database is not None
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    client = private_redis.client()
    env = {
        "AGENT_AUTH_TARGET": auth.address,
        "AGENT_REDIS_URL": private_redis.url,
        "AGENT_DATABASE_URL": postgres_url,
        # Off: whether L1 serves depends on the listener's last ping (a loaded machine
        # sends a read to L2 now and then); every read reaches Redis, as counted.
        "AGENT_L1_MAX_ENTRIES": "0",
    }
    measured: dict[str, tuple[float, float, float]] = {}
    expected: dict[str, float] = {}  # PostgreSQL transactions a call, hub reads included
    try:
        with (
            agent_service(tmp_path, env) as agent,
            grpc.insecure_channel(auth.address) as auth_channel,
            grpc.insecure_channel(agent.address) as channel,
        ):
            token = register_and_login(auth_channel, "capacity@example.com").access_token
            metadata = (("authorization", f"Bearer {token}"),)
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            ids: list[str] = []

            def count(kind: str, call: Callable[[int], object]) -> None:
                work = capacity.PER_CALL[kind]
                redis_before, (xacts, rows) = redis_commands(client), pg_counts(admin, database)
                started = time.monotonic()
                for i in range(N):
                    call(i)
                elapsed = time.monotonic() - started
                commands = sum((redis_commands(client) - redis_before).values()) / N
                # This pod's watch hub reads the change log after each change (no stream
                # here: at most one read per 50 ms) and polls it: the model's `hub_reads`.
                changes = N / elapsed if work.pubsub_messages else 0.0
                transactions = work.pg_transactions + capacity.hub_reads(changes) * elapsed / N
                expected[kind] = transactions
                deadline = time.monotonic() + STATS_DELAY
                while True:  # until PostgreSQL has published the counters, or its delay
                    now_xacts, now_rows = pg_counts(admin, database)
                    done = (now_xacts - xacts) / N >= transactions - 0.05 and (
                        now_rows - rows
                    ) / N >= work.pg_rows_inserted
                    if done or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                measured[kind] = (commands, (now_xacts - xacts) / N, (now_rows - rows) / N)

            def create(i: int) -> None:
                request = agent_pb2.CreateAgentRequest(
                    agent=agent_pb2.Agent(name=f"capacity-{i}", model="gpt-4o")
                )
                ids.append(stub.CreateAgent(request, metadata=metadata).agent.id)

            def get(i: int) -> None:
                stub.GetAgent(agent_pb2.GetAgentRequest(id=ids[i]), metadata=metadata)

            def update(i: int) -> None:
                request = agent_pb2.UpdateAgentRequest(
                    agent=agent_pb2.Agent(id=ids[i], description=f"changed {i}"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                )
                stub.UpdateAgent(request, metadata=metadata)

            def list_agents(_: int) -> None:
                stub.ListAgents(agent_pb2.ListAgentsRequest(page_size=50), metadata=metadata)

            count("create", create)
            count("get_db", get)  # the first read of each: both caches miss
            count("get_l2", get)  # read again: L2 serves (L1 is off)
            count("update", update)  # invalidates L1 and L2 everywhere
            count("list", list_agents)
    finally:
        client.close()
        admin.dispose()

    failures = []
    for kind, (commands, transactions, rows) in measured.items():
        work = capacity.PER_CALL[kind]
        model = capacity.redis_commands(work, reads_per_mget=1)
        if abs(commands - model) > 0.05:
            failures.append(f"{kind}: {commands:.2f} Redis commands a call, the model {model}")
        if abs(transactions - expected[kind]) > PG_TOLERANCE:
            failures.append(
                f"{kind}: {transactions:.2f} PostgreSQL transactions a call,"
                f" the model {expected[kind]:.2f}"
            )
        if abs(rows - work.pg_rows_inserted) > 0.05:
            failures.append(
                f"{kind}: {rows:.2f} rows inserted a call, the model {work.pg_rows_inserted}"
            )
    print("measured per call (Redis commands, PostgreSQL transactions, rows):", measured)
    assert not failures, "; ".join(failures)
