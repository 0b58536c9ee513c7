"""agent_svc's background jobs (shared.data.jobs).

agent.request_ids.purge    CreateAgent request ids past AGENT_REQUEST_ID_TTL_SECONDS:
                           a replay after it may create anew anyway
agent.changes.purge        change-log rows past AGENT_WATCH_RETENTION_SECONDS (plus a
                           margin, service/watch.py): resume tokens that old are refused
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, delete, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from services.agent_svc.repository.models import CreateRequestRow
from services.agent_svc.repository.sql import SqlChangeLogRepository
from services.agent_svc.service.watch import PURGE_MARGIN
from services.agent_svc.settings import AgentSettings
from shared.config.clock import Clock, SystemClock
from shared.data.db import session_factory
from shared.data.jobs import Job, Worker, purge_in_batches
from shared.rpc.observability import Observability
from shared.rpc.worker import make_worker, worker_process

__all__ = ["agent_jobs", "build_worker"]


def agent_jobs(
    sessions: sessionmaker[Session],
    *,
    clock: Clock,
    request_id_ttl_seconds: float,
    watch_retention_seconds: float = 3600.0,
) -> list[Job]:
    def request_ids() -> dict[str, int]:
        before = clock.now() - timedelta(seconds=request_id_ttl_seconds)

        def one_batch(limit: int) -> int:
            keys = (
                select(CreateRequestRow.owner_id, CreateRequestRow.request_id)
                .where(CreateRequestRow.create_time < before)
                .limit(limit)
            )
            with sessions.begin() as session:
                result = session.execute(
                    delete(CreateRequestRow).where(
                        tuple_(CreateRequestRow.owner_id, CreateRequestRow.request_id).in_(keys)
                    )
                )
                return int(result.rowcount)  # type: ignore[attr-defined]

        return {"deleted": purge_in_batches(one_batch)}

    def changes() -> dict[str, int]:
        before = clock.now() - timedelta(seconds=watch_retention_seconds) - PURGE_MARGIN

        def one_batch(limit: int) -> int:
            with sessions.begin() as session:
                return SqlChangeLogRepository(session).purge(changed_before=before, limit=limit)

        return {"deleted": purge_in_batches(one_batch)}

    return [
        Job("agent.request_ids.purge", request_ids),
        Job("agent.changes.purge", changes),
    ]


def worker_for(
    settings: AgentSettings, engine: Engine, observability: Observability, clock: Clock
) -> Worker:
    jobs = agent_jobs(
        session_factory(engine),
        clock=clock,
        request_id_ttl_seconds=settings.request_id_ttl_seconds,
        watch_retention_seconds=settings.watch_retention_seconds,
    )
    return make_worker(jobs, engine=engine, settings=settings.common, observability=observability)


def build_worker(settings: AgentSettings) -> tuple[Worker, Observability]:
    """`python -m services.agent_svc worker`: the jobs on their own engine and metrics."""
    return worker_process(
        settings.common,
        lambda engine, observability: worker_for(settings, engine, observability, SystemClock()),
    )
