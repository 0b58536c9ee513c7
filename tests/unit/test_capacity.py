"""The load model in scripts/capacity.py: its arithmetic against the documented figures."""

from __future__ import annotations

import importlib.util
import subprocess
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
    load = capacity.Load(get=4_097 * 100, list=0, create=0, update=0, login=0, l1_hit=1.0)
    assert capacity.plan(load).agent_pods == 143  # docs/operations.md "Capacity"


def test_connections_and_shards_saturate_where_the_operations_guide_says(
    capacity: ModuleType,
) -> None:
    small = capacity.plan(capacity.Load())
    assert small.postgres_connections <= 100
    large = capacity.Load(
        get=4_000_000, list=20_000, create=1_000, update=4_000, login=2_000, l1_hit=0.5
    )
    result = capacity.plan(large)
    assert result.postgres_connections == (result.agent_pods + result.auth_pods) * 15
    assert result.redis_shards > 1
    text = capacity.report(large, result)
    assert "PgBouncer" in text
    assert "REDIS_MODE=cluster" in text


def test_watch_messages_are_capped_by_the_streams_pacing(capacity: ModuleType) -> None:
    load = capacity.Load(create=1_000, update=0, watchers=100)
    assert capacity.plan(load).stream_messages == 100 * 20  # one per stream per 50 ms


def test_the_plan_adds_up_the_per_call_counts(capacity: ModuleType) -> None:
    load = capacity.Load(get=1_000, list=100, create=10, update=40, login=0, l1_hit=0.5, l2_hit=0.8)
    result = capacity.plan(load)
    # 500 L1 hits, 400 L2 hits, 100 database reads; 100 lists; 10 creates; 40 updates.
    pods = result.agent_pods + result.watch_pods
    hub_reads = pods * (20 + 1)  # each pod's hub, no streams: a read per 50 ms, a poll
    assert result.postgres_transactions == 100 + 100 + 10 + 40 + hub_reads
    assert result.postgres_rows_inserted == 10 * 3 + 40 * 2
    reads = (400 + 100) / capacity.REDIS_READS_PER_MGET
    commands = reads + 100 * 3 + 10 * 1 + 40 * 6
    background = (result.agent_pods + result.watch_pods) * capacity.REDIS_BACKGROUND_PER_POD
    assert result.redis_ops == pytest.approx(commands + background)
    assert result.pubsub_per_pod == 10 * 1 + 40 * 2


def test_piped_into_a_reader_that_has_gone_it_exits_quietly() -> None:
    """`capacity.py | head` once ended in a BrokenPipeError traceback."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # gone before the script prints
    errors = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0
    assert errors == ""


def test_at_100x_the_pubsub_fan_out_saturates_the_subscribed_redis_node(
    capacity: ModuleType,
) -> None:
    load = capacity.Load(get=400_000, list=20_000, create=1_000, update=4_000, login=0)
    result = capacity.plan(load)
    assert result.redis_shards == 1  # commands alone fit one shard...
    assert result.pubsub_node_cpu > 1  # ...but the deliveries to every pod do not
    assert "Redis pub/sub deliveries" in capacity.report(load, result)
