"""`scripts/run` (scripts/run_local.py) as a newcomer runs it: both services on the
embedded default, agent_svc started once auth_svc serves, so that its first fetches of
auth_svc's keys and revocations succeed (started together, it logged failed fetches at
every start), and Ctrl-C (SIGINT to the launcher) stops both cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import ROOT, STARTUP_DEADLINE, free_port


def test_the_run_command_starts_agent_svc_once_auth_svc_serves(tmp_path: Path) -> None:
    auth_port, agent_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "AGENT_"))}
    env |= {
        "AUTH_PORT": str(auth_port),
        "AUTH_METRICS_PORT": str(free_port()),
        "AGENT_PORT": str(agent_port),
        "AGENT_METRICS_PORT": str(free_port()),
        "AGENT_WATCH_PORT": str(free_port()),
        "AUTH_DATA_DIR": str(tmp_path),
        "AGENT_DATA_DIR": str(tmp_path),
    }
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "scripts/run_local.py"], env=env, cwd=ROOT, stdout=out, stderr=out
        )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{agent_port}") as channel:
            statuses = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=STARTUP_DEADLINE, wait_for_ready=True
            )
            for reply in statuses:  # NOT_SERVING until it has auth_svc's keys
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    statuses.cancel()
                    break
        started = log.read_text()
    finally:
        launcher.send_signal(signal.SIGINT)
        code = launcher.wait(timeout=STARTUP_DEADLINE)
    lines = started.splitlines()
    listening = [n for n, line in enumerate(lines) if " listening on " in line]
    assert [lines[n].split()[3] for n in listening] == ["auth", "agent"], lines
    assert f"agent_svc on 127.0.0.1:{agent_port}" in started
    assert "fetching the JWKS failed" not in started, started
    assert "revocations: poll failed" not in started, started
    assert code == 0, log.read_text()[-3000:]
