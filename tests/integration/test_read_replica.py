"""agent_svc with a real streaming replica (AGENT_DATABASE_READ_URL): a private primary
and a hot standby made from it with pg_basebackup -R (tests/faults/servers.py), whose
replay the test pauses (pg_wal_replay_pause) to make it lag on purpose.

Measured with the replay paused (the lag as long as the test wants):
- ListAgents reads the replica: an agent created since the pause is not listed until the
  replay resumes, then it is;
- GetAgent of that new agent still finds it (the replica has nothing: the primary answers);
- GetAgent right after UpdateAgent returns the new version, on the replica that wrote and
  on another one, and neither L1 nor L2 is refilled with the old version from the replica
  (the invalidation stamp sends those misses to the primary);
- WatchAgents delivers the update at once: the change log is read on the primary.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import missing
from tests.faults.servers import PostgresCluster, PostgresStandby, find_postgres_bindir
from tests.integration.inprocess import (
    Served,
    agent_service,
    auth_service,
    eventually,
    register_and_login,
)

TIMEOUT = 30.0  # a deadline for events, not a measured duration


@pytest.fixture(scope="module")
def primary() -> Iterator[PostgresCluster]:
    bindir = find_postgres_bindir()
    if bindir is None:
        missing("the PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup)", "none found")
    assert bindir is not None
    cluster = PostgresCluster(bindir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def standby(primary: PostgresCluster) -> Iterator[PostgresStandby]:
    replica = primary.make_standby()
    try:
        yield replica
    finally:
        replica.close()


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with auth_service(tmp_path_factory.mktemp("auth")) as served:
        yield served


@pytest.fixture
def token(auth: Served) -> str:
    with grpc.insecure_channel(auth.address) as channel:
        return register_and_login(channel, f"{uuid.uuid4().hex}@example.com").access_token


@pytest.fixture
def replica_env(
    primary: PostgresCluster, standby: PostgresStandby, auth: Served, redis_url: str
) -> Iterator[dict[str, str]]:
    database = primary.create_database().rsplit("/", 1)[1]
    standby.wait_replayed()
    yield {
        "AGENT_DATABASE_URL": primary.url(database),
        "AGENT_DATABASE_READ_URL": standby.url(database),
        "AGENT_REDIS_URL": redis_url,
        "AGENT_AUTH_TARGET": auth.address,
    }
    standby.resume_replay()  # whatever the test left


class Caller:
    def __init__(self, served: Served, token: str) -> None:
        self.channel = grpc.insecure_channel(served.address)
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def create(self, name: str) -> agent_pb2.Agent:
        request = agent_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=name, model="gpt-4o"))
        reply = self.stub.CreateAgent(request, metadata=self.metadata, timeout=TIMEOUT)
        agent: agent_pb2.Agent = reply.agent
        return agent

    def get(self, agent_id: str) -> agent_pb2.Agent:
        request = agent_pb2.GetAgentRequest(id=agent_id)
        agent: agent_pb2.Agent = self.stub.GetAgent(
            request, metadata=self.metadata, timeout=TIMEOUT
        ).agent
        return agent

    def update(self, agent_id: str, description: str) -> agent_pb2.Agent:
        request = agent_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=agent_id, description=description),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
        agent: agent_pb2.Agent = self.stub.UpdateAgent(
            request, metadata=self.metadata, timeout=TIMEOUT
        ).agent
        return agent

    def names(self) -> set[str]:
        request = agent_pb2.ListAgentsRequest(page_size=100)
        reply = self.stub.ListAgents(request, metadata=self.metadata, timeout=TIMEOUT)
        return {agent.name for agent in reply.agents}

    def close(self) -> None:
        self.channel.close()


class Watch:
    """A WatchAgents stream read on a thread: its changes arrive on a queue."""

    def __init__(self, caller: Caller) -> None:
        self.call = caller.stub.WatchAgents(
            agent_pb2.WatchAgentsRequest(), metadata=caller.metadata
        )
        self.messages: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError as error:
            self.messages.put(error)

    def next_change(self) -> agent_pb2.AgentChange:
        deadline = time.monotonic() + TIMEOUT  # heartbeats (empty messages) do not count
        while True:
            message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            assert not isinstance(message, grpc.RpcError), message
            if message.changes:
                assert len(message.changes) == 1, message
                change: agent_pb2.AgentChange = message.changes[0]
                return change


def test_lagging_replica_serves_lists_but_never_an_old_version_after_a_write(
    tmp_path: Path, standby: PostgresStandby, replica_env: dict[str, str], token: str
) -> None:
    with (
        agent_service(tmp_path, replica_env) as writer_pod,
        agent_service(tmp_path, replica_env) as other_pod,
    ):
        writer, other = Caller(writer_pod, token), Caller(other_pod, token)
        try:
            watch = Watch(writer)
            first = writer.create("first")
            assert watch.next_change().kind == agent_pb2.AgentChange.KIND_CREATED
            standby.wait_replayed()
            # Both pods cache the first version (L1 and L2), read from the replica.
            assert other.get(first.id).etag == first.etag
            assert writer.get(first.id).etag == first.etag

            standby.pause_replay()
            second = writer.create("second")
            assert watch.next_change().agent_id == second.id
            # ListAgents reads the replica, which has not replayed the second create.
            assert writer.names() == {"first"}
            # GetAgent of the new agent: the replica lacks it, the primary answers.
            assert other.get(second.id).name == "second"

            updated = writer.update(first.id, "after the pause")
            # The update's change comes at once: the change log is read on the primary.
            change = watch.next_change()
            assert change.kind == agent_pb2.AgentChange.KIND_UPDATED
            assert change.agent.etag == updated.etag
            # Misses right after the invalidation read the primary, on both pods; the
            # replica still has the old version and would have put it back in the cache.
            for caller in (writer, other):
                for _ in range(3):  # the later reads come from what the first one cached
                    read = caller.get(first.id)
                    assert read.description == "after the pause"
                    assert read.etag == updated.etag
            # Still paused: the replica really lags (the list is still the old one).
            assert other.names() == {"first"}

            standby.resume_replay()
            standby.wait_replayed()
            assert writer.names() == {"first", "second"}
            watch.call.cancel()
        finally:
            writer.close()
            other.close()


def test_the_replica_is_a_named_health_service(tmp_path: Path, replica_env: dict[str, str]) -> None:
    with (
        agent_service(tmp_path, replica_env) as pod,
        grpc.insecure_channel(pod.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        def status(name: str) -> Any:
            request = health_pb2.HealthCheckRequest(service=name)
            return health.Check(request, timeout=TIMEOUT).status

        for name in ("database", "database-replica"):
            # NOT_SERVING until the first check has run (every few seconds), then SERVING.
            assert eventually(partial(_serving, status, name), within=TIMEOUT), name


def _serving(status: Callable[[str], Any], name: str) -> bool:
    assert status(name) == health_pb2.HealthCheckResponse.SERVING
    return True


def test_while_the_replica_is_down_the_primary_answers_its_reads(
    tmp_path: Path, standby: PostgresStandby, replica_env: dict[str, str], token: str
) -> None:
    with (
        agent_service(tmp_path, replica_env) as pod,
        grpc.insecure_channel(pod.address) as channel,
    ):
        caller = Caller(pod, token)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            standby.stop("fast")
            created = caller.create("while the replica is down")
            # A miss with no stamp would read the replica: it fails, the primary answers.
            assert caller.get(created.id).etag == created.etag
            # The replica could not list what it never replayed: the primary did.
            assert caller.names() == {"while the replica is down"}

            def replica_not_serving() -> bool:
                request = health_pb2.HealthCheckRequest(service="database-replica")
                status = health.Check(request, timeout=TIMEOUT).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
                return True

            assert eventually(replica_not_serving, within=TIMEOUT)
        finally:
            caller.close()
            standby.ensure_running()
            standby.wait_accepting()


def test_the_replicas_lag_without_a_pause_is_measured(
    primary: PostgresCluster, standby: PostgresStandby
) -> None:
    """The figure docs/operations.md "Read replica" quotes: how long a committed row takes
    to be visible on the standby (polled from it, so one round trip is included). Every
    row must arrive; the times are printed, not asserted."""
    lags: list[float] = []
    with (
        psycopg.connect(primary.admin_url, autocommit=True) as writer,
        psycopg.connect(standby.admin_url, autocommit=True) as reader,
    ):
        # The cluster is this module's own: a fixed table name.
        writer.execute("CREATE TABLE replica_lag_probe (n integer PRIMARY KEY)")
        standby.wait_replayed()
        for n in range(200):
            writer.execute("INSERT INTO replica_lag_probe VALUES (%s)", (n,))  # committed on return
            committed = time.perf_counter()
            deadline = committed + TIMEOUT
            while (
                reader.execute("SELECT 1 FROM replica_lag_probe WHERE n = %s", (n,)).fetchone()
                is None
            ):
                assert time.perf_counter() < deadline, f"row {n} never reached the standby"
            lags.append(time.perf_counter() - committed)
        writer.execute("DROP TABLE replica_lag_probe")
    lags.sort()
    print(
        f"\nreplica lag over {len(lags)} commits: p50 {lags[len(lags) // 2] * 1000:.2f} ms, "
        f"p95 {lags[int(len(lags) * 0.95)] * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms"
    )
