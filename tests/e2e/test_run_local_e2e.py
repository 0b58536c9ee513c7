"""`scripts/run` (scripts/run_local.py) as a newcomer runs it: both services on the
embedded default, agent_svc started once auth_svc listens, so that its first fetches of
auth_svc's keys and revocations succeed (started together, it logged failed fetches at
every start), and Ctrl-C (SIGINT to the launcher) stops both cleanly. A port already in
use starts nothing (another deployment's auth_svc there would have been taken for its
own); a service that dies is named and the command fails; a killed command takes its
services with it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import ROOT, STARTUP_DEADLINE, free_port


def run_env(tmp_path: Path, auth_port: int, agent_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "AGENT_"))}
    return env | {
        "AUTH_PORT": str(auth_port),
        "AUTH_METRICS_PORT": str(free_port()),
        "AGENT_PORT": str(agent_port),
        "AGENT_METRICS_PORT": str(free_port()),
        "AGENT_WATCH_PORT": str(free_port()),
        "AUTH_DATA_DIR": str(tmp_path),
        "AGENT_DATA_DIR": str(tmp_path),
    }


def launch(env: dict[str, str], log: Path, *, own_group: bool = False) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "scripts/run_local.py"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=out,
            start_new_session=own_group,  # a terminal's process group, to hang up
        )


def wait_serving(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        statuses = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=STARTUP_DEADLINE, wait_for_ready=True
        )
        for reply in statuses:  # NOT_SERVING until it has auth_svc's keys
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                statuses.cancel()
                return


def test_the_run_command_starts_agent_svc_once_auth_svc_serves(tmp_path: Path) -> None:
    auth_port, agent_port = free_port(), free_port()
    log = tmp_path / "run.log"
    launcher = launch(run_env(tmp_path, auth_port, agent_port), log)
    try:
        wait_serving(agent_port)
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


@pytest.mark.parametrize(
    ("variable", "what"),
    [("AUTH_PORT", "auth_svc"), ("AGENT_METRICS_PORT", "agent_svc metrics")],
)
def test_a_port_in_use_starts_nothing_and_says_which(
    tmp_path: Path, variable: str, what: str
) -> None:
    """Another server on the auth port (a second scripts/run): it would answer for auth_svc
    and agent_svc would fetch that deployment's keys. On a metrics port: agent_svc died
    with a traceback after the started line. Nothing starts; the port is named."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        log = tmp_path / "run.log"
        env = run_env(tmp_path, free_port(), free_port()) | {variable: str(taken)}
        launcher = launch(env, log)
        code = launcher.wait(timeout=STARTUP_DEADLINE)
    assert code == 1, log.read_text()
    assert f"already in use: {what} port {taken} ({variable})" in log.read_text()
    assert " listening on " not in log.read_text()  # neither service was started


def _child(parent: int, module: str) -> int:
    """The pid of `parent`'s child running `python -m <module>` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and module.encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no {module} child of {parent}")


def test_a_service_that_dies_is_named_and_the_command_fails(tmp_path: Path) -> None:
    auth_port, agent_port = free_port(), free_port()
    log = tmp_path / "run.log"
    launcher = launch(run_env(tmp_path, auth_port, agent_port), log)
    try:
        wait_serving(agent_port)
        os.kill(_child(launcher.pid, "services.agent_svc"), signal.SIGKILL)
        code = launcher.wait(timeout=STARTUP_DEADLINE)
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=STARTUP_DEADLINE)
    assert code == 128 + signal.SIGKILL, log.read_text()[-3000:]
    assert "agent_svc was killed by signal 9; stopped the rest" in log.read_text()
    assert "auth stopped" in log.read_text()  # the other one stopped cleanly


def _gone(pid: int) -> bool:
    """Whether the process has exited (a zombie counts: it was not reaped, not running)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_command_stops_its_services(tmp_path: Path) -> None:
    """`kill -9` of the command (or its terminal closing): the services ran on as orphans,
    holding the ports, so the next `scripts/run` found them taken."""
    auth_port, agent_port = free_port(), free_port()
    log = tmp_path / "run.log"
    launcher = launch(run_env(tmp_path, auth_port, agent_port), log)
    services: list[int] = []
    try:
        wait_serving(agent_port)
        services += [_child(launcher.pid, f"services.{n}") for n in ("auth_svc", "agent_svc")]
        launcher.kill()
        launcher.wait(timeout=STARTUP_DEADLINE)
        deadline = time.monotonic() + STARTUP_DEADLINE
        while not all(_gone(pid) for pid in services):
            assert time.monotonic() < deadline, f"still running: {services}\n{log.read_text()}"
            time.sleep(0.1)
    finally:
        for pid in services:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "auth stopped" in text, text[-3000:]  # SIGTERM: each drained and stopped


def test_a_hang_up_stops_both_services_cleanly(tmp_path: Path) -> None:
    """A closed terminal sends SIGHUP to its whole process group: the services died at
    once, no drain (found by an outside review). They stop as on Ctrl-C."""
    auth_port, agent_port = free_port(), free_port()
    log = tmp_path / "run.log"
    launcher = launch(run_env(tmp_path, auth_port, agent_port), log, own_group=True)
    try:
        wait_serving(agent_port)
        os.killpg(launcher.pid, signal.SIGHUP)
        code = launcher.wait(timeout=STARTUP_DEADLINE)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=STARTUP_DEADLINE)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "auth stopped" in text, text[-3000:]
    assert "agent stopped" in text, text[-3000:]
