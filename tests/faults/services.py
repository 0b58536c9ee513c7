"""auth_svc and agent_svc as real processes for the fault suite, and the calls the tests make.

Processes are `python -m services.<name>` (tests/helpers.py `ServiceProcess`) with an
environment built here: the developer's own AUTH_*/AGENT_* variables are blanked, pools
are small (`DB_POOL_SIZE=4`, the machine's PostgreSQL connections are shared) and shutdown
is fast (grace 1 s, no NOT_SERVING delay) unless a test is about shutdown and says
otherwise. `Fleet` starts processes and guarantees they are gone when the test ends; a
process that does not exit in time has its threads dumped (`thread_dump`) before it is
killed, so a hang leaves evidence.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.agent_svc import SERVICE_NAME as AGENT_SERVICE
from services.auth_svc import SERVICE_NAME as AUTH_SERVICE
from tests.helpers import ServiceProcess, free_port

__all__ = [
    "AGENT_SERVICE",
    "AUTH_SERVICE",
    "CALL_TIMEOUT",
    "NOT_SERVING",
    "PAGE_TOKEN_SECRET",
    "PASSWORD",
    "SERVING",
    "AuthService",
    "Caller",
    "Fleet",
    "agent_env",
    "auth_env",
    "create_agent",
    "describe",
    "health_status",
    "login",
    "register_and_login",
    "rss_mb",
    "thread_dump",
    "wait_exit",
    "wait_health",
]

CALL_TIMEOUT = 5.0  # the per-call deadline of the load (the brief's "5 s deadline")
PASSWORD = "a fault-suite password"
PAGE_TOKEN_SECRET = "faults-page-token-secret-0123456789abcdef"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _common(
    prefix: str, port: int, data_dir: Path, database_url: str, redis_url: str
) -> dict[str, str]:
    return {
        f"{prefix}_PORT": str(port),
        f"{prefix}_METRICS_PORT": "0",
        **({"AGENT_WATCH_PORT": "0"} if prefix == "AGENT" else {}),
        f"{prefix}_DATA_DIR": str(data_dir),
        f"{prefix}_DATABASE_URL": database_url,  # "" = unset: SQLite under the data dir
        f"{prefix}_REDIS_URL": redis_url,  # "" = unset: in-process only
        f"{prefix}_LOG_FORMAT": "json",
        f"{prefix}_DB_POOL_SIZE": "4",
        f"{prefix}_GRACE_SECONDS": "1",
        f"{prefix}_SHUTDOWN_DELAY_SECONDS": "0",
    }


def auth_env(
    port: int, data_dir: Path, database_url: str = "", redis_url: str = "", **extra: str
) -> dict[str, str]:
    """auth_svc's environment; `extra` are AUTH_* names without the prefix. The per-address
    limits of public methods are the test suite's generous ones (tests/conftest.py): every
    client here is 127.0.0.1."""
    env = _common("AUTH", port, data_dir, database_url, redis_url)
    env["AUTH_RATE_LIMITS"] = os.environ.get("AUTH_RATE_LIMITS", "")
    return {**env, **{f"AUTH_{key}": value for key, value in extra.items()}}


def agent_env(
    port: int,
    data_dir: Path,
    auth_address: str,
    database_url: str = "",
    redis_url: str = "",
    **extra: str,
) -> dict[str, str]:
    """agent_svc's environment; `extra` are AGENT_* names without the prefix."""
    env = _common("AGENT", port, data_dir, database_url, redis_url)
    env |= {
        "AGENT_AUTH_TARGET": auth_address,
        "AGENT_PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,  # replicas accept each other's tokens
        "AGENT_JWKS_COOLDOWN_SECONDS": "1",
    }
    return {**env, **{f"AGENT_{key}": value for key, value in extra.items()}}


def thread_dump(pid: int) -> str:
    """What every thread of a (hung) process is doing: `py-spy dump` when it is installed,
    otherwise each thread's kernel state and wait channel from /proc."""
    py_spy = shutil.which("py-spy")
    if py_spy:
        done = subprocess.run(
            [py_spy, "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.stdout + done.stderr
    lines = [f"(py-spy is not installed: kernel view of pid {pid})"]
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            name = (task / "comm").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip()
            lines.append(f"  tid {task.name:>8} {name:<20} state {state} wchan {wchan}")
    return "\n".join(lines)


class Fleet:
    """Service processes of one test; `close()` ends every one that is still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._processes: list[ServiceProcess] = []
        self._numbers = itertools.count(1)

    def start(self, name: str, env: dict[str, str], port: int | None = None) -> ServiceProcess:
        """Starts `python -m services.<name>` (no waiting); its port is `<PREFIX>_PORT`."""
        prefix = "AUTH" if name == "auth_svc" else "AGENT"
        port = port or int(env.get(f"{prefix}_PORT") or free_port())
        blank = {k: "" for k in os.environ if k.startswith(("AUTH_", "AGENT_"))}
        log = self.log_dir / f"{name}-{port}-{next(self._numbers)}.log"
        process = ServiceProcess(name, {**blank, **env, f"{prefix}_PORT": str(port)}, port, log)
        self._processes.append(process)
        return process

    def close(self) -> None:
        for process in reversed(self._processes):
            if process.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.process.pid, signal.SIGCONT)
            process.stop(timeout=15)


def wait_exit(process: ServiceProcess, timeout: float) -> int | None:
    """The exit code, or None (after a thread dump in the log dir and a kill) on timeout."""
    try:
        return process.process.wait(timeout)
    except subprocess.TimeoutExpired:
        dump = thread_dump(process.process.pid)
        process.log_path.with_suffix(".threads.txt").write_text(dump)
        process.process.kill()
        process.process.wait()
        return None


def rss_mb(pid: int) -> float:
    """The resident set size of a process (VmRSS in /proc/<pid>/status), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def health_status(address: str, service: str, timeout: float = 2.0) -> Any:
    """SERVING / NOT_SERVING / …, or the status code if the check itself failed."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return error.code()
        return reply.status


def wait_health(
    process: ServiceProcess, service: str, wanted: Iterable[Any], timeout: float = 60.0
) -> Any:
    """Polls the health check until it answers one of `wanted`; returns that answer."""
    wanted = set(wanted)
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log()}")
        last = health_status(process.address, service, timeout=1.0)
        if last in wanted:
            return last
        time.sleep(0.05)
    raise TimeoutError(f"{process.name} health {service!r} is {last}, not {wanted}")


# -- callers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    user_id: str
    email: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def login(stub: auth_pb2_grpc.AuthServiceStub, email: str, password: str = PASSWORD) -> Caller:
    reply = stub.Login(auth_pb2.LoginRequest(email=email, password=password), timeout=30)
    return Caller(reply.user.id, email, reply.access_token)


def register_and_login(stub: auth_pb2_grpc.AuthServiceStub, password: str = PASSWORD) -> Caller:
    email = f"faults-{uuid.uuid4().hex[:12]}@example.com"
    stub.Register(auth_pb2.RegisterRequest(email=email, password=password), timeout=30)
    return login(stub, email, password)


def create_agent(
    stub: agent_pb2_grpc.AgentServiceStub, caller: Caller, name: str, **fields: Any
) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(name=name, model=fields.pop("model", "gpt-4o"), **fields)
    reply = stub.CreateAgent(
        agent_pb2.CreateAgentRequest(agent=agent), metadata=caller.metadata, timeout=30
    )
    result: agent_pb2.Agent = reply.agent
    return result


def describe(agent_id: str, description: str) -> agent_pb2.UpdateAgentRequest:
    """An unconditional update of the description only."""
    return agent_pb2.UpdateAgentRequest(
        agent=agent_pb2.Agent(id=agent_id, description=description),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
    )


@dataclass
class AuthService:
    """An auth_svc on SQLite that a module's tests share (it is not the one under fault)."""

    process: ServiceProcess
    stub: auth_pb2_grpc.AuthServiceStub

    @property
    def address(self) -> str:
        return self.process.address

    def new_caller(self) -> Caller:
        return register_and_login(self.stub)
