"""Stopping a service process: signals in any number and order, the NOT_SERVING window, a
second Ctrl-C (auth_svc on SQLite: the lifecycle is shared code, the same in both)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth_svc import SERVICE_NAME
from tests.helpers import ServiceProcess, free_port

pytestmark = pytest.mark.e2e

EXIT_FORCED = 130
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start_auth(tmp_path: Path, **settings: str) -> ServiceProcess:
    port = free_port()
    env = {
        "AUTH_PORT": str(port),
        "AUTH_METRICS_PORT": "0",
        "AUTH_DATA_DIR": str(tmp_path / f"data-{port}"),
        "AUTH_GRACE_SECONDS": "5",
        **{f"AUTH_{name.upper()}": value for name, value in settings.items()},
    }
    process = ServiceProcess("auth_svc", env, port, tmp_path / f"auth-{port}.log")
    process.wait_serving(SERVICE_NAME)
    return process


def send(process: ServiceProcess, signals: Sequence[signal.Signals]) -> None:
    for signum in signals:
        os.kill(process.process.pid, signum)


def exit_code(process: ServiceProcess, within: float) -> int:
    try:
        return process.process.wait(within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {within}s after the signals:\n{process.log()}")
    finally:
        process.stop()


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.stop()


CTRL_C_ON_SCRIPTS_RUN = (signal.SIGINT, signal.SIGTERM, signal.SIGTERM)


@pytest.mark.parametrize(
    "signals",
    [
        (signal.SIGTERM,),
        (signal.SIGINT,),
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGTERM),
        CTRL_C_ON_SCRIPTS_RUN,
        (signal.SIGTERM,) * 20,
    ],
    ids=lambda signals: "+".join(s.name for s in signals),
)
def test_stop_signals_back_to_back_stop_the_process_gracefully(
    tmp_path: Path, signals: Sequence[signal.Signals]
) -> None:
    # Several rounds where two kinds of signal meet: the hangs this guards against (a
    # handler re-entered while it held a lock; the main thread asleep in a lock wait no
    # handler could interrupt) came about one round in three.
    for _ in range(3 if len(set(signals)) > 1 else 1):
        process = start_auth(tmp_path)
        send(process, signals)
        # A graceful stop (0), well within the grace period; no hang, no traceback.
        assert exit_code(process, within=20) == 0
        assert "Traceback" not in process.log_path.read_text()


def test_a_second_interrupt_stops_at_once(tmp_path: Path) -> None:
    # A long NOT_SERVING window and grace: only the second Ctrl-C can end it quickly.
    process = start_auth(tmp_path, shutdown_delay_seconds="60", grace_seconds="60")
    send(process, (signal.SIGINT,))
    deadline = time.monotonic() + 10
    while health(process.address, "") != NOT_SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    send(process, (signal.SIGINT,))
    assert exit_code(process, within=15) == EXIT_FORCED
    assert "second interrupt: stopping now" in process.log_path.read_text()


def test_after_sigterm_calls_are_served_while_health_says_not_serving(tmp_path: Path) -> None:
    process = start_auth(tmp_path, shutdown_delay_seconds="3")
    with grpc.insecure_channel(process.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5)  # connected before the signal
        send(process, (signal.SIGTERM,))
        deadline = time.monotonic() + 10
        while health(process.address, SERVICE_NAME) != NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health(process.address, "") == NOT_SERVING
        # Still answering in the window: clients and balancers move away meanwhile.
        assert stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5).keys
    assert exit_code(process, within=20) == 0


@pytest.mark.parametrize("moment", ["at once", "after migrating"])
def test_signals_during_start_up_stop_the_process(tmp_path: Path, moment: str) -> None:
    port = free_port()
    env = {
        "AUTH_PORT": str(port),
        "AUTH_METRICS_PORT": "0",
        "AUTH_DATA_DIR": str(tmp_path / "data"),
    }
    process = ServiceProcess("auth_svc", env, port, tmp_path / "auth.log")
    if moment == "after migrating":
        deadline = time.monotonic() + 30
        while "migrations applied" not in process.log():
            assert time.monotonic() < deadline, process.log()
            time.sleep(0.01)
    send(process, CTRL_C_ON_SCRIPTS_RUN)
    # Whatever it was doing (importing, migrating, binding), it stops: gracefully once
    # serving, or at once before that (default signal actions, or the interrupted start).
    exit_code(process, within=20)
