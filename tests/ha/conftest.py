"""Fixtures of the HA tests: private Redis topologies (Sentinel, Cluster, either over TLS
with an ACL user) started from `redis-server` for each test module, always killed.

Without `redis-server`/`redis-cli` the tests are skipped with the reason, and fail with
CI=true (tests/conftest.py `missing()`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import missing
from tests.ha.redis_topologies import ClusterSetup, SentinelSetup, make_tls_files


@pytest.fixture(scope="session")
def redis_binaries() -> None:
    for program in ("redis-server", "redis-cli"):
        if shutil.which(program) is None:
            missing(program, "not on PATH")


TOPOLOGIES = ["sentinel", "cluster", "sentinel-tls", "cluster-tls"]


@pytest.fixture(scope="module", params=TOPOLOGIES)
def topology(
    request: pytest.FixtureRequest,
    redis_binaries: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SentinelSetup | ClusterSetup]:
    """A running Sentinel setup or Redis Cluster (plain, or TLS + ACL) for the module."""
    name: str = request.param
    root = tmp_path_factory.mktemp(name)
    tls = make_tls_files(root / "tls") if name.endswith("-tls") else None
    setup: SentinelSetup | ClusterSetup = (
        SentinelSetup(root, tls=tls) if name.startswith("sentinel") else ClusterSetup(root, tls=tls)
    )
    try:
        setup.start()
        yield setup
    finally:
        setup.close()
