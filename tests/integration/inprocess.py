"""Both services built by their composition roots and served in this process, on free ports,
for tests of what the wiring adds: metrics, traces, access logs, TLS."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.agent_svc import bootstrap as agent_bootstrap
from services.agent_svc.settings import load_agent_settings
from services.auth_svc import bootstrap as auth_bootstrap
from services.auth_svc.settings import load_auth_settings
from shared.data import migrations
from shared.rpc.server import RunningServer
from shared.rpc.tracing import Tracing
from tests.conftest import GENEROUS_RATE_LIMITS
from tests.helpers import free_port
from tests.unit.auth.fakes import FakeHasher

T = TypeVar("T")

PASSWORD = "correct horse battery staple"


@dataclass
class Served:
    """A service served in process: its app, its running server and where to reach it."""

    app: Any
    running: RunningServer
    metrics_port: int
    env: Mapping[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            return str(reply.read().decode())

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample on a fresh scrape (None if the series is absent)."""
        return sample(self.scrape(), name, **labels)


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return None


def samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample with this name."""
    return [
        dict(found.labels)
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == name
    ]


def _env(service: str, tmp_path: Path, env: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """A service's variables: a free port and metrics port, SQLite in its own folder of
    `tmp_path` (unless `env` names a database), then `env` on top."""
    prefix = service.upper()
    data = tmp_path / f"{service}-{free_port()}"
    data.mkdir(parents=True)
    metrics_port = free_port()
    full = {
        f"{prefix}_PORT": "0",
        f"{prefix}_METRICS_PORT": str(metrics_port),
        **({"AGENT_WATCH_PORT": "0"} if prefix == "AGENT" else {}),
        f"{prefix}_DATA_DIR": str(data),
        f"{prefix}_DATABASE_URL": f"sqlite:///{data}/{service}.db",
        **({"AUTH_RATE_LIMITS": GENEROUS_RATE_LIMITS} if service == "auth" else {}),
        **env,
    }
    return full, metrics_port


@contextmanager
def _served(
    app: Any, running: RunningServer, metrics_port: int, env: dict[str, str]
) -> Iterator[Served]:
    running.start()
    try:
        yield Served(app, running, metrics_port, env)
    finally:
        running.stop(0)


@contextmanager
def auth_service(
    tmp_path: Path, env: Mapping[str, str] | None = None, *, tracing: Tracing | None = None
) -> Iterator[Served]:
    """auth_svc on SQLite in `tmp_path` (cheap fake password hashing), metrics served."""
    full, metrics_port = _env("auth", tmp_path, env or {})
    settings = load_auth_settings(full)
    migrations.upgrade("auth", settings.common.database_url)
    app = auth_bootstrap.build_app(settings, hasher=FakeHasher(), tracing=tracing)
    with _served(app, auth_bootstrap.build_server(app), metrics_port, full) as served:
        yield served


@contextmanager
def agent_service(
    tmp_path: Path, env: Mapping[str, str], *, tracing: Tracing | None = None
) -> Iterator[Served]:
    """agent_svc on SQLite in `tmp_path` (unless `env` names a database), metrics served."""
    full, metrics_port = _env("agent", tmp_path, env)
    settings = load_agent_settings(full)
    migrations.upgrade("agent", settings.common.database_url)
    app = agent_bootstrap.build_app(settings, tracing=tracing)
    with _served(app, agent_bootstrap.build_server(app), metrics_port, full) as served:
        yield served


def register_and_login(
    channel: grpc.Channel, email: str, password: str = PASSWORD
) -> auth_pb2.LoginResponse:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    stub.Register(auth_pb2.RegisterRequest(email=email, password=password), timeout=10)
    reply: auth_pb2.LoginResponse = stub.Login(
        auth_pb2.LoginRequest(email=email, password=password), timeout=10
    )
    return reply


def eventually(call: Callable[[], T], *, within: float = 10.0) -> T:
    """The call's result once it stops raising (AssertionError or grpc.RpcError)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except (AssertionError, grpc.RpcError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)
