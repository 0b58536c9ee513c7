"""Every metric the monitoring kit's rules and dashboard read is one the services export,
proven against real scrapes: auth_svc and agent_svc serving (after a few calls) and both
workers (after a pass), each `python -m services.<svc> [worker]` as in production.

Names are compared as Prometheus stores them: a counter family `x` is `x_total`, a
histogram's are `x_bucket`, `x_sum`, `x_count`; recording-rule names (`level:metric:ops`)
must be recorded by the rules, and `up` is Prometheus' own. The labels a selector matches
on must be the metric's own (the jobs' `job` arriving as `job_name`, see podmonitors.yaml)
or the target labels the PodMonitors add; no exported label may collide with those.
"""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.agent_svc import SERVICE_NAME as AGENT_SERVICE_NAME
from services.auth_svc import SERVICE_NAME as AUTH_SERVICE_NAME
from tests import monitoring_kit as kit
from tests.e2e.test_agent_e2e import agent_env, auth_env, register_and_login, start
from tests.helpers import ServiceProcess, free_port

TIMEOUT = 30


def scrape(port: int) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return list(text_string_to_metric_families(reply.read().decode()))


def exercise(auth: ServiceProcess, agent: ServiceProcess) -> None:
    """A few calls of each kind: logins that succeed and fail, agent writes and reads."""
    with grpc.insecure_channel(auth.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=TIMEOUT)
        caller = register_and_login(stub)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Login(
                auth_pb2.LoginRequest(email="nobody@example.com", password="wrong password"),
                timeout=TIMEOUT,
            )
        assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(agent.address) as channel:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        created = agents.CreateAgent(
            agent_pb2.CreateAgentRequest(
                agent=agent_pb2.Agent(name=f"bot-{uuid.uuid4().hex[:8]}", model="gpt-4o")
            ),
            metadata=caller.metadata,
            timeout=TIMEOUT,
        ).agent
        for _ in range(3):
            agents.GetAgent(
                agent_pb2.GetAgentRequest(id=created.id), metadata=caller.metadata, timeout=TIMEOUT
            )
        agents.ListAgents(agent_pb2.ListAgentsRequest(), metadata=caller.metadata, timeout=TIMEOUT)


def test_the_kit_reads_only_metrics_the_services_export(tmp_path: Path) -> None:
    kit.promql()  # skip (fail in CI) without the parser, before starting anything
    auth_port, agent_port = free_port(), free_port()
    metrics = {name: free_port() for name in ("auth", "agent", "auth-worker", "agent-worker")}
    auth = start(
        "auth_svc",
        {**auth_env(auth_port, tmp_path / "auth"), "AUTH_METRICS_PORT": str(metrics["auth"])},
        auth_port,
        tmp_path,
    )
    agent = start(
        "agent_svc",
        {
            **agent_env(agent_port, tmp_path / "agent", auth.address),
            "AGENT_METRICS_PORT": str(metrics["agent"]),
        },
        agent_port,
        tmp_path,
    )
    processes = [auth, agent]
    try:
        auth.wait_serving(AUTH_SERVICE_NAME)
        agent.wait_serving(AGENT_SERVICE_NAME)
        exercise(auth, agent)
        # The workers, as their Deployments run them, on the servers' databases.
        for service, prefix, env in (
            ("auth_svc", "AUTH", auth_env(auth_port, tmp_path / "auth")),
            ("agent_svc", "AGENT", agent_env(agent_port, tmp_path / "agent", auth.address)),
        ):
            port = metrics[f"{service.split('_')[0]}-worker"]
            worker_env = {
                **env,
                f"{prefix}_METRICS_PORT": str(port),
                f"{prefix}_WORKER_INTERVAL_SECONDS": "1",
            }
            worker = ServiceProcess(
                service, worker_env, port, tmp_path / f"{service}-worker.log", ["worker"]
            )
            processes.append(worker)
        for worker, last_job in zip(
            processes[2:], ("auth.signing_keys.maintain", "agent.changes.purge"), strict=True
        ):
            worker.wait_logged(f"job {last_job}: done")
        families = {name: scrape(port) for name, port in metrics.items()}
    finally:
        for process in processes:
            process.stop()

    exported: dict[str, set[str]] = {}
    for scraped in families.values():
        for name, labels in kit.exported_names(scraped).items():
            exported.setdefault(name, set()).update(labels)
    recorded = kit.recorded_names()
    unknown, bad_labels = set(), set()
    for expression in kit.expressions():
        for selector in kit.selectors(expression):
            if ":" in selector.metric or selector.metric in kit.PROMETHEUS_SERIES:
                continue  # recorded (checked in tests/deploy) or Prometheus' own
            if selector.metric not in exported:
                unknown.add(f"{selector.metric} ({selector.where})")
                continue
            own = exported[selector.metric]
            allowed = (
                own | kit.TARGET_LABELS | ({"le"} if selector.metric.endswith("_bucket") else set())
            )
            if own and not selector.labels <= allowed:
                bad_labels.add(
                    f"{selector.metric}{{{','.join(sorted(selector.labels - allowed))}}} "
                    f"({selector.where}; it has {sorted(own)})"
                )
    assert not unknown, "not exported by any process: " + "; ".join(sorted(unknown))
    assert not bad_labels, "labels the metric does not have: " + "; ".join(sorted(bad_labels))
    assert recorded  # recorded names are not metrics of ours
    colliding = {
        f"{name}: {label}"
        for name, labels in exported.items()
        for label in labels & kit.TARGET_LABELS
    }
    assert not colliding, f"exported labels that Prometheus would rename: {sorted(colliding)}"

    # The job names the rules list (AgentplatformJobMissing) are the jobs the workers run.
    jobs = {
        sample.labels["job"]
        for scraped in families.values()
        for family in scraped
        if family.name == "agentplatform_job_runs"
        for sample in family.samples
    }
    listed = {
        value
        for rule in kit.rules()
        if rule.get("alert") == "AgentplatformJobMissing"
        for value in kit.label_values(rule["expr"], "job_name")
    }
    assert jobs
    assert listed == jobs
