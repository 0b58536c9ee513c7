"""The `worker` command of a service: its background jobs (shared.data.jobs) in the
foreground, with /metrics and /healthz on the service's HTTP port.

    python -m services.auth_svc worker          # a pass every *_WORKER_INTERVAL_SECONDS
    python -m services.auth_svc worker --once   # one pass; exit 1 if a job failed

SIGTERM or SIGINT ends the loop after the pass under way (the jobs are batched: a pass
ends within a batch's time). /healthz answers 200 while passes keep ending (503 when the
last one ended longer than two intervals and a minute ago: a stuck loop), for a liveness
probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus

from sqlalchemy import Engine

from shared.config.settings import CommonSettings
from shared.data.db import make_engine
from shared.data.jobs import Job, Worker, job_locks_for
from shared.rpc.http import Document, Route
from shared.rpc.lifecycle import ShutdownSignals
from shared.rpc.observability import Observability
from shared.rpc.server import RunningServer

__all__ = [
    "HEALTHZ_PATH",
    "attach_in_process",
    "healthz_route",
    "make_worker",
    "run_worker",
    "worker_process",
]

_log = logging.getLogger(__name__)
HEALTHZ_PATH = "/healthz"


def make_worker(
    jobs: list[Job],
    *,
    engine: object,
    settings: CommonSettings,
    observability: Observability,
    on_close: Sequence[Callable[[], None]] = (),
) -> Worker:
    """A worker for the jobs, locked per job (advisory locks on PostgreSQL), counted in the
    service's metrics; `on_close`: what its jobs hold open."""
    observability.metrics.declare_jobs(job.name for job in jobs)
    return Worker(
        jobs,
        locks=job_locks_for(engine),  # type: ignore[arg-type]
        interval_seconds=settings.worker_interval_seconds,
        on_result=observability.metrics.job_result,
        on_close=on_close,
    )


def worker_process(
    settings: CommonSettings, make: Callable[[Engine, Observability], Worker]
) -> tuple[Worker, Observability]:
    """The `worker` command's parts: a small engine of its own, its metrics, its jobs."""
    observability = Observability.from_settings(settings)
    engine = make_engine(
        settings.database_url,
        pool_size=2,
        statement_timeout=settings.db_statement_timeout_seconds,
        transaction_pooler=settings.db_transaction_pooler,
    )
    observability.watch_pool(engine)
    return make(engine, observability), observability


def attach_in_process(running: RunningServer, worker: Worker) -> None:
    """The jobs on a thread of the serving process (`*_WORKER_IN_PROCESS`): they start with
    the server and stop before it releases the database."""
    running.on_start.append(worker.start)
    running.on_stop.insert(0, worker.close)
    _log.info("background jobs in process: %s", ", ".join(job.name for job in worker.jobs))


def healthz_route(worker: Worker) -> Route:
    def render(_headers: Mapping[str, str]) -> Document:
        if worker.healthy(time.time()):
            return Document(b"ok\n", "text/plain; charset=utf-8")
        return Document(
            b"no pass ended lately\n",
            "text/plain; charset=utf-8",
            status=HTTPStatus.SERVICE_UNAVAILABLE,
        )

    return render


def run_worker(worker: Worker, observability: Observability, *, once: bool) -> int:
    """Runs passes until a stop signal (or one pass with `once`); the exit code. One pass
    (a CronJob, or by hand beside a running service) serves no HTTP: nothing would scrape
    it, and the service's metrics port may be taken."""
    if not once:
        observability.route(HEALTHZ_PATH, healthz_route(worker))
        observability.start_metrics()
    try:
        with ShutdownSignals() as signals:
            _log.info(
                "worker: %s, every %.0fs",
                ", ".join(job.name for job in worker.jobs),
                worker.interval_seconds,
            )
            while True:
                results = worker.run_once()
                if once:
                    return 0 if all(r != "failure" for r in results.values()) else 1
                if signals.received(worker.interval_seconds):
                    _log.info("worker stopping")
                    return 0
    finally:
        worker.close()
        observability.close()
