"""The real processes (`python -m services.<svc>`) wire what the in-process tests prove:
/metrics on its own port while serving and gone after SIGTERM, JSON access lines on the
process output with the request id echoed to the caller."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.agent_svc import SERVICE_NAME as AGENT_SERVICE_NAME
from services.auth_svc import SERVICE_NAME as AUTH_SERVICE_NAME
from tests.helpers import ServiceProcess, free_port


def scrape(port: int) -> dict[str, float]:
    """Every sample as `name{label="value",...}` → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        f"{s.name}{{{','.join(f'{k}={v!r}' for k, v in sorted(s.labels.items()))}}}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def access_lines(process: ServiceProcess) -> list[dict[str, object]]:
    output = process.log_path.read_text(errors="replace")  # the process has exited
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [e for e in entries if e.get("logger") == "agentplatform.access"]


def test_both_processes_serve_metrics_and_log_json_access_lines(tmp_path: Path) -> None:
    auth_port, auth_metrics, agent_port, agent_metrics = (free_port() for _ in range(4))
    auth = ServiceProcess(
        "auth_svc",
        {
            "AUTH_PORT": str(auth_port),
            "AUTH_METRICS_PORT": str(auth_metrics),
            "AUTH_DATA_DIR": str(tmp_path / "auth"),
            "AUTH_LOG_FORMAT": "json",
        },
        auth_port,
        tmp_path / "auth.log",
    )
    # agent_svc starts without auth_svc (it fetches the keys in the background): both at once.
    agent = ServiceProcess(
        "agent_svc",
        {
            "AGENT_PORT": str(agent_port),
            "AGENT_METRICS_PORT": str(agent_metrics),
            "AGENT_WATCH_PORT": "0",
            "AGENT_DATA_DIR": str(tmp_path / "agent"),
            "AGENT_LOG_FORMAT": "json",
            "AGENT_AUTH_TARGET": auth.address,
        },
        agent_port,
        tmp_path / "agent.log",
    )
    try:
        auth.wait_serving(AUTH_SERVICE_NAME)
        agent.wait_serving(AGENT_SERVICE_NAME)
        with grpc.insecure_channel(auth.address) as channel:
            _, call = auth_pb2_grpc.AuthServiceStub(channel).GetJwks.with_call(
                auth_pb2.GetJwksRequest(), metadata=(("x-request-id", "e2e-request-1"),), timeout=30
            )
            assert ("x-request-id", "e2e-request-1") in call.trailing_metadata()
        with (
            grpc.insecure_channel(agent.address) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            agent_pb2_grpc.AgentServiceStub(channel).ListAgents(
                agent_pb2.ListAgentsRequest(), timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        agent_request_id = dict(caught.value.trailing_metadata())["x-request-id"]

        fetched = "agentplatform_jwks_fetches_total{result='ok'}"
        # The agent's key fetch retries (backoff up to 10 s) until auth is up.
        deadline = time.monotonic() + 60
        while (agent_samples := scrape(agent_metrics))[fetched] < 1:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        assert "agentplatform_db_pool_connections_in_use{}" in agent_samples
        jwks = "grpc_service='agentplatform.auth.v1.AuthService',grpc_type='unary'"
        auth_samples = scrape(auth_metrics)
        handled = f"grpc_server_handled_total{{grpc_code='OK',grpc_method='GetJwks',{jwks}}}"
        assert auth_samples[handled] >= 2  # ours and the agent service's key fetch
        assert "agentplatform_logins_total{result='success'}" in auth_samples
        # The agent service polls GetRevocations every 2 s: wait for one answered poll.
        polled = f"grpc_server_handled_total{{grpc_code='OK',grpc_method='GetRevocations',{jwks}}}"
        while scrape(auth_metrics).get(polled, 0) < 1:
            assert time.monotonic() < deadline, auth.log()
            time.sleep(0.1)
    finally:
        for process in (agent, auth):  # one SIGTERM to each (a second one could land
            if process.process.poll() is None:  # in interpreter shutdown and kill it)
                process.process.terminate()
        for process in (agent, auth):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.process.wait(15)
        assert (agent.stop(), auth.stop()) == (0, 0)

    for port in (auth_metrics, agent_metrics):  # stopped with the server
        with pytest.raises(urllib.error.URLError):
            scrape(port)
    [auth_line] = [e for e in access_lines(auth) if e["request_id"] == "e2e-request-1"]
    assert auth_line["service"] == "auth"
    assert auth_line["method"] == "/agentplatform.auth.v1.AuthService/GetJwks"
    assert auth_line["code"] == "OK"
    # A poll every 2 s per agent pod would drown the log: its successes are DEBUG lines.
    assert not [e for e in access_lines(auth) if str(e["method"]).endswith("/GetRevocations")]
    [agent_line] = access_lines(agent)
    assert agent_line["service"] == "agent"
    assert agent_line["request_id"] == agent_request_id
    assert agent_line["code"] == "UNAUTHENTICATED"
    assert agent_line["user_id"] is None
    for line in (auth_line, agent_line):
        assert {"time", "duration_ms", "peer"} <= set(line)
