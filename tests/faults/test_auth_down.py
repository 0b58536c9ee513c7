"""auth_svc down: tokens issued before keep working; a replica started meanwhile waits.

An agent_svc replica that fetched the keys keeps verifying tokens when auth_svc stops. A
replica started while auth_svc is down cannot verify anything yet: that is temporary, so
it answers UNAVAILABLE with RetryInfo (reason KEYS_UNAVAILABLE), not UNAUTHENTICATED, and
its readiness (the named health service) is NOT_SERVING. When auth_svc comes back (same
port, same signing key) the new replica becomes SERVING and accepts the same token.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2_grpc

from tests.faults.load import outcome
from tests.faults.servers import PostgresCluster
from tests.faults.services import (
    AGENT_SERVICE,
    AUTH_SERVICE,
    NOT_SERVING,
    SERVING,
    Fleet,
    agent_env,
    auth_env,
    create_agent,
    health_status,
    register_and_login,
    wait_exit,
    wait_health,
)
from tests.helpers import free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.postgres]


def test_with_auth_down_issued_tokens_work_and_a_new_replica_is_unavailable_until_it_returns(
    pg: PostgresCluster,
    fleet: Fleet,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    auth_port, auth_data = free_port(), tmp_path / "auth"
    auth = fleet.start("auth_svc", auth_env(auth_port, auth_data))
    auth.wait_serving(AUTH_SERVICE, timeout=60)
    database = pg.create_database()
    r1 = fleet.start("agent_svc", agent_env(free_port(), tmp_path / "r1", auth.address, database))
    r1.wait_serving(AGENT_SERVICE, timeout=60)
    with grpc.insecure_channel(auth.address) as channel:
        caller = register_and_login(auth_pb2_grpc.AuthServiceStub(channel))
    channels = [grpc.insecure_channel(r1.address)]
    try:
        first = agent_pb2_grpc.AgentServiceStub(channels[0])
        agent = create_agent(first, caller, "auth-down")
        request = agent_pb2.GetAgentRequest(id=agent.id)
        assert first.GetAgent(request, metadata=caller.metadata, timeout=10).agent == agent

        auth.process.send_signal(signal.SIGTERM)
        assert wait_exit(auth, 30) is not None, "auth_svc did not stop"

        # The replica that has the keys: tokens issued before keep working.
        for _ in range(5):
            assert first.GetAgent(request, metadata=caller.metadata, timeout=10).agent == agent
        listed = first.ListAgents(
            agent_pb2.ListAgentsRequest(), metadata=caller.metadata, timeout=10
        )
        assert [a.id for a in listed.agents] == [agent.id]

        # A replica started while auth_svc is down: UNAVAILABLE + RetryInfo, not ready.
        r2 = fleet.start(
            "agent_svc", agent_env(free_port(), tmp_path / "r2", auth.address, database)
        )
        wait_health(r2, "", {SERVING, NOT_SERVING}, timeout=60)  # up and answering
        channels.append(grpc.insecure_channel(r2.address))
        second = agent_pb2_grpc.AgentServiceStub(channels[1])
        answers: list[tuple[grpc.StatusCode, str, float | None]] = []
        for _ in range(3):
            try:
                second.GetAgent(request, metadata=caller.metadata, timeout=10)
                answers.append((grpc.StatusCode.OK, "", None))
            except grpc.RpcError as error:
                code, reason, delay, _details = outcome(error)
                answers.append((code, reason, delay))
        record_property("new_replica_answers", [(c.name, r, d) for c, r, d in answers])
        assert all(
            code == grpc.StatusCode.UNAVAILABLE
            and reason == "KEYS_UNAVAILABLE"
            and delay is not None
            for code, reason, delay in answers
        ), f"want UNAVAILABLE/KEYS_UNAVAILABLE with RetryInfo, got {answers}"
        readiness = health_status(r2.address, AGENT_SERVICE)
        assert readiness == NOT_SERVING, f"readiness of the keyless replica: {readiness}"

        # auth_svc returns (same port, same data folder: the same signing key).
        back = fleet.start("auth_svc", auth_env(auth_port, auth_data))
        back.wait_serving(AUTH_SERVICE, timeout=60)
        wait_health(r2, AGENT_SERVICE, {SERVING}, timeout=60)
        assert second.GetAgent(request, metadata=caller.metadata, timeout=10).agent == agent
    finally:
        for channel in channels:
            channel.close()
