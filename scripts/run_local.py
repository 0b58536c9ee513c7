"""Start auth_svc and agent_svc as two processes on the dev profile, each running its
background jobs in process; stop both on Ctrl-C.

- The ports must be free (gRPC, WatchAgents, metrics, health): a server already listening
  on one (another `scripts/run`, say) is named with its variable and nothing starts.
  Otherwise agent_svc would take a server on the auth port for its own auth_svc and fetch
  another deployment's keys, or a service would die on a taken metrics port.
- agent_svc starts once auth_svc listens (it fetches auth_svc's keys and revocations as
  it starts: started together, it logged failed fetches at every start); the "started"
  line is printed once agent_svc listens too.
- A service that exits by itself is named with how it ended, the other one is stopped,
  and the command exits non-zero (128 + the signal for a signal). Ctrl-C stops both and
  exits 0 when both stopped cleanly.
- A closed terminal (SIGHUP) stops both as Ctrl-C does. If the command itself is killed
  (`kill -9`), the services get SIGTERM from the kernel (Linux's parent-death signal) and
  stop as on Ctrl-C, instead of running on as orphans holding the ports.

Environment variables already set (AUTH_*, AGENT_*) are passed through, so the same
command runs against PostgreSQL and Redis (or with TLS) when those are given.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 300.0  # a first start on a slow machine: migrations, a new signing key


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _stop_with_parent(parent: int) -> Callable[[], None]:
    """Run in the child before exec: SIGTERM when the launcher dies (Linux; elsewhere
    nothing). A launcher already gone by then is caught by the parent check."""

    def arm() -> None:
        # A hang-up (the terminal closed) reaches the whole group: the launcher stops the
        # services with SIGTERM, so they drain instead of dying at once.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _host(env: dict[str, str], prefix: str) -> str:
    host = env.get(f"{prefix}_HOST", "127.0.0.1")
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104


def _in_use(host: str, port: int) -> bool:
    """Whether something already listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def listening(
    child: subprocess.Popen[bytes], host: str, port: int, stopping: Callable[[], bool]
) -> bool:
    """Whether the process came to accept connections on its port (False if it exited,
    was told to stop, or took longer than STARTUP_SECONDS). The port was free before it
    started, so what answers is this process (a TCP check: plaintext or TLS alike)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while child.poll() is None and not stopping() and time.monotonic() < deadline:
        if _in_use(host, port):
            return True
        time.sleep(0.1)
    return False


def ended(name: str, code: int) -> str:
    return f"{name} was killed by signal {-code}" if code < 0 else f"{name} exited with {code}"


def exit_code(codes: list[int]) -> int:
    """The worst of the children's: 128 + n for a signal, the code otherwise."""
    return max((128 - code if code < 0 else code) for code in codes) if codes else 0


def main() -> int:
    env = {
        "AUTH_DATA_DIR": str(ROOT / ".data"),
        "AGENT_DATA_DIR": str(ROOT / ".data"),
        # The background jobs (purges) on a thread of each server: no worker to run.
        "AUTH_WORKER_IN_PROCESS": "true",
        "AGENT_WORKER_IN_PROCESS": "true",
        **os.environ,
    }
    auth_port = int(env.get("AUTH_PORT", "50051"))
    agent_port = int(env.get("AGENT_PORT", "50052"))
    watch_port = int(env.get("AGENT_WATCH_PORT", "50053"))
    if not auth_port or not agent_port:
        print("AUTH_PORT and AGENT_PORT must be fixed ports here (not 0)", file=sys.stderr)
        return 2
    env.setdefault("AGENT_AUTH_TARGET", f"127.0.0.1:{auth_port}")
    auth_host, agent_host = _host(env, "AUTH"), _host(env, "AGENT")
    ports = [  # (what, variable, host, port): every port the two services open
        ("auth_svc", "AUTH_PORT", auth_host, auth_port),
        ("agent_svc", "AGENT_PORT", agent_host, agent_port),
        ("agent_svc WatchAgents", "AGENT_WATCH_PORT", agent_host, watch_port),
        (
            "auth_svc metrics",
            "AUTH_METRICS_PORT",
            auth_host,
            int(env.get("AUTH_METRICS_PORT", "9101")),
        ),
        (
            "agent_svc metrics",
            "AGENT_METRICS_PORT",
            agent_host,
            int(env.get("AGENT_METRICS_PORT", "9102")),
        ),
        ("auth_svc health", "AUTH_HEALTH_PORT", auth_host, int(env.get("AUTH_HEALTH_PORT", "0"))),
        (
            "agent_svc health",
            "AGENT_HEALTH_PORT",
            agent_host,
            int(env.get("AGENT_HEALTH_PORT", "0")),
        ),
    ]
    taken = [
        (what, variable, port)
        for what, variable, host, port in ports
        if port and _in_use(host, port)
    ]
    if taken:
        print(
            "already in use: "
            + ", ".join(f"{what} port {port} ({variable})" for what, variable, port in taken)
            + " (another scripts/run?); stop it, or set those variables to free ports",
            file=sys.stderr,
        )
        return 1

    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def start(name: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=env,
            cwd=ROOT,
            preexec_fn=_stop_with_parent(os.getpid()),  # noqa: PLW1509 - one thread here
        )
        children[name] = child
        return child

    def stop(_signum: int = 0, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, stop)
    is_stopping = lambda: stopping  # noqa: E731
    waiting_for: str | None = None  # the service that did not come to listen, if one
    dead: str | None = None  # the first service that ended by itself, if one
    try:
        for name, host, port in (
            ("auth_svc", auth_host, auth_port),
            ("agent_svc", agent_host, agent_port),
        ):
            if not listening(start(name), host, port, is_stopping):
                waiting_for = name
                break
        else:
            print(
                f"auth_svc on {auth_host}:{auth_port}, agent_svc on {agent_host}:{agent_port}"
                f" (WatchAgents also on :{watch_port}); Ctrl-C stops both",
                flush=True,
            )
            while not stopping and all(child.poll() is None for child in children.values()):
                time.sleep(0.2)
        dead = next((n for n, c in children.items() if c.poll() is not None), None)
    finally:
        told = stopping
        stop()
        codes = {name: child.wait() for name, child in children.items()}
    if told:  # Ctrl-C or SIGTERM: clean when every service stopped cleanly
        return exit_code(list(codes.values()))
    if dead is not None:
        print(f"{ended(dead, codes[dead])}; stopped the rest", file=sys.stderr)
    else:
        print(f"{waiting_for} did not start listening in time; stopped", file=sys.stderr)
    return max(exit_code(list(codes.values())), 1)


if __name__ == "__main__":
    sys.exit(main())
