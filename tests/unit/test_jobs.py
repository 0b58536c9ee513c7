"""The background-job runner: results, locks, isolation of failures, metrics, health."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pytest
from prometheus_client import generate_latest

from shared.data.jobs import Job, LocalJobLocks, Worker, purge_in_batches
from shared.rpc.metrics import Metrics


def test_a_purge_runs_batches_until_one_comes_back_short() -> None:
    remaining = [2500]
    batches: list[int] = []

    def delete(limit: int) -> int:
        done = min(limit, remaining[0])
        remaining[0] -= done
        batches.append(done)
        return done

    assert purge_in_batches(delete, batch=1000) == 2500
    assert batches == [1000, 1000, 500]
    assert purge_in_batches(delete, batch=1000) == 0


def test_a_failing_job_is_counted_and_the_others_still_run() -> None:
    seen: list[tuple[str, str, Mapping[str, int]]] = []

    def broken() -> Mapping[str, int]:
        raise RuntimeError("database gone")

    worker = Worker(
        [Job("a.broken", broken), Job("a.fine", lambda: {"deleted": 3})],
        locks=LocalJobLocks(),
        interval_seconds=60,
        on_result=lambda job, result, counts, _at: seen.append((job, result, counts)),
    )
    assert worker.run_once() == {"a.broken": "failure", "a.fine": "success"}
    assert seen == [("a.broken", "failure", {}), ("a.fine", "success", {"deleted": 3})]


def test_a_job_whose_lock_is_held_elsewhere_is_skipped() -> None:
    locks = LocalJobLocks()
    ran: list[str] = []

    def job() -> Mapping[str, int]:
        ran.append("ran")
        return {}

    worker = Worker([Job("a.job", job)], locks=locks, interval_seconds=60)
    with locks.hold("a.job") as got:
        assert got
        assert worker.run_once() == {"a.job": "skipped"}
    assert ran == []
    assert worker.run_once() == {"a.job": "success"}
    assert ran == ["ran"]


def test_job_names_are_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Worker([Job("x", dict), Job("x", dict)], locks=LocalJobLocks(), interval_seconds=1)


def test_the_metrics_say_what_ran_and_when_it_last_succeeded() -> None:
    metrics = Metrics()
    metrics.declare_jobs(["a.job"])
    worker = Worker(
        [Job("a.job", lambda: {"deleted": 7})],
        locks=LocalJobLocks(),
        interval_seconds=60,
        on_result=metrics.job_result,
        wall_clock=lambda: 1_700_000_000.0,
    )
    text = generate_latest(metrics.registry).decode()
    assert 'agentplatform_job_runs_total{job="a.job",result="failure"} 0.0' in text
    assert "agentplatform_job_last_success_timestamp_seconds{" not in text
    worker.run_once()
    text = generate_latest(metrics.registry).decode()
    assert 'agentplatform_job_runs_total{job="a.job",result="success"} 1.0' in text
    assert 'agentplatform_job_items_total{job="a.job",kind="deleted"} 7.0' in text
    assert 'agentplatform_job_last_success_timestamp_seconds{job="a.job"} 1.7e+09' in text


def test_on_a_thread_it_passes_until_stopped_and_reports_health() -> None:
    now = [1000.0]
    worker = Worker(
        [Job("a.job", lambda: {})],
        locks=LocalJobLocks(),
        interval_seconds=0.01,
        wall_clock=lambda: now[0],
    )
    assert worker.healthy(now[0])  # just made
    worker.start()
    assert worker.wait_for_passes(3, timeout=30)
    worker.stop()
    assert worker.healthy(now[0])
    assert not worker.healthy(now[0] + 2 * 0.01 + 61)  # no pass for too long: stuck


def test_closing_stops_the_loop_then_closes_what_the_jobs_hold_once() -> None:
    """The agent worker's Redis client (it publishes purges) was never closed."""
    events: list[str] = []

    def one_pass() -> dict[str, int]:
        events.append("pass")
        return {}

    def failing() -> None:
        raise RuntimeError("already gone")

    worker = Worker(
        [Job("a.job", one_pass)],
        locks=LocalJobLocks(),
        interval_seconds=0.01,
        on_close=[lambda: events.append("closed"), failing, lambda: events.append("2nd")],
    )
    worker.start()
    assert worker.wait_for_passes(2, timeout=30)
    worker.close()  # a closer that fails does not keep the next one from running
    worker.close()
    assert events[-2:] == ["closed", "2nd"]
    assert events.count("closed") == 1
    assert set(events[:-2]) == {"pass"}  # no pass after the close began


def test_closing_while_a_pass_still_runs_leaves_what_it_uses_open() -> None:
    """A pass that outlives the stop's wait would publish through a closed client
    (outside review): the closers wait for a stop that ends the loop."""
    release = threading.Event()
    started = threading.Event()
    closed: list[str] = []

    def slow() -> dict[str, int]:
        started.set()
        assert release.wait(30)
        return {}

    worker = Worker(
        [Job("a.job", slow)],
        locks=LocalJobLocks(),
        interval_seconds=0.01,
        on_close=[lambda: closed.append("closed")],
    )
    worker.start()
    assert started.wait(30)
    worker.close(timeout=0.05)  # the pass is still running
    assert closed == []
    release.set()
    worker.close()
    assert closed == ["closed"]
