"""Fixtures of the fault suite: a private PostgreSQL cluster (one per session), the check
that `redis-server` exists (each Redis test starts its own, tests/faults/servers.py), an
auth_svc per module, and `Fleet`s of service processes that are always ended.

Without `redis-server` or the PostgreSQL server binaries the tests that need them are
skipped with the reason, and fail with CI=true (tests/conftest.py `missing()`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentplatform.auth.v1 import auth_pb2_grpc

from tests.conftest import missing
from tests.faults.servers import PostgresCluster, find_postgres_bindir
from tests.faults.services import AUTH_SERVICE, AuthService, Fleet, auth_env
from tests.helpers import free_port


@pytest.fixture(scope="session")
def postgres_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """The suite's own PostgreSQL, initialised once; stopped and removed at the end."""
    bindir = find_postgres_bindir()
    if bindir is None:
        missing("the PostgreSQL server binaries (initdb, pg_ctl)", "none found")
    assert bindir is not None
    cluster = PostgresCluster(bindir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg(postgres_cluster: PostgresCluster) -> PostgresCluster:
    """The private cluster, running and thawed whatever the previous test did to it."""
    postgres_cluster.ensure_running()
    return postgres_cluster


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        missing("redis-server", "not on PATH")
    assert path is not None
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Service processes of this test; every one still running is ended at the end."""
    processes = Fleet(tmp_path / "logs")
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture(scope="module")
def module_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthService]:
    root = tmp_path_factory.mktemp("auth")
    processes = Fleet(root / "logs")
    try:
        process = processes.start("auth_svc", auth_env(free_port(), root / "data"))
        process.wait_serving(AUTH_SERVICE, timeout=60)
        with grpc.insecure_channel(process.address) as channel:
            yield AuthService(process, auth_pb2_grpc.AuthServiceStub(channel))
    finally:
        processes.close()
