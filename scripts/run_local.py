"""Start auth_svc and agent_svc as two processes on the dev profile, each running its
background jobs in process; stop both on Ctrl-C. agent_svc starts once auth_svc serves
(it fetches auth_svc's keys and revocations as it starts: started together, it logged
failed fetches at every start).

Environment variables already set (AUTH_*, AGENT_*) are passed through, so the same
command runs against PostgreSQL and Redis when those URLs are given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


STARTUP_SECONDS = 300.0  # a first start on a slow machine: migrations, a new signing key


def serving(child: subprocess.Popen[bytes], address: str, stopping: Callable[[], bool]) -> bool:
    """Whether the process came to answer its health check SERVING (False if it exited,
    was told to stop, or took longer than STARTUP_SECONDS)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while child.poll() is None and not stopping() and time.monotonic() < deadline:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.1)
    if child.poll() is None and not stopping():
        print(f"auth_svc did not serve within {STARTUP_SECONDS:.0f} s", file=sys.stderr)
    return False


def main() -> int:
    env = {
        "AUTH_DATA_DIR": str(ROOT / ".data"),
        "AGENT_DATA_DIR": str(ROOT / ".data"),
        # The background jobs (purges) on a thread of each server: no worker to run.
        "AUTH_WORKER_IN_PROCESS": "true",
        "AGENT_WORKER_IN_PROCESS": "true",
        **os.environ,
    }
    env.setdefault("AGENT_AUTH_TARGET", f"127.0.0.1:{env.get('AUTH_PORT', '50051')}")
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def start(name: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env, cwd=ROOT)
        children.append(child)
        return child

    def stop(_signum: int = 0, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    auth_port = env.get("AUTH_PORT", "50051")
    auth_host = env.get("AUTH_HOST", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")  # noqa: S104
    if not serving(start("auth_svc"), f"{auth_host}:{auth_port}", lambda: stopping):
        told = stopping  # Ctrl-C during the start: the processes' own exit codes
        stop()
        codes = [child.wait() for child in children]
        return max(codes) if told else max([*codes, 1])
    if not stopping:
        start("agent_svc")
        print(
            f"auth_svc on 127.0.0.1:{auth_port}, "
            f"agent_svc on 127.0.0.1:{env.get('AGENT_PORT', '50052')} "
            f"(WatchAgents also on :{env.get('AGENT_WATCH_PORT', '50053')}); Ctrl-C stops both",
            flush=True,
        )
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        stop()
        codes = [child.wait() for child in children]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
