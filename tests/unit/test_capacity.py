"""The load model in scripts/capacity.py: its arithmetic against the documented figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "capacity.py"


@pytest.fixture(scope="module")
def capacity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capacity", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_100x_the_single_pod_l1_rate_is_the_documented_143_pods(capacity: ModuleType) -> None:
    load = capacity.Load(get=4_097 * 100, list=0, create=0, login=0, l1_hit=1.0)
    assert capacity.plan(load).agent_pods == 143  # docs/operations.md "Capacity"


def test_connections_and_shards_saturate_where_the_operations_guide_says(
    capacity: ModuleType,
) -> None:
    small = capacity.plan(capacity.Load())
    assert small.postgres_connections <= 100
    large = capacity.Load(get=4_000_000, list=20_000, create=5_000, login=2_000, l1_hit=0.5)
    result = capacity.plan(large)
    assert result.postgres_connections == (result.agent_pods + result.auth_pods) * 15
    assert result.redis_shards > 1
    text = capacity.report(large, result)
    assert "PgBouncer" in text
    assert "REDIS_MODE=cluster" in text


def test_watch_messages_are_capped_by_the_hubs_reads(capacity: ModuleType) -> None:
    load = capacity.Load(create=1_000, watchers=100)
    assert capacity.plan(load).stream_messages == 100 * 50  # one per stream per 20 ms read
