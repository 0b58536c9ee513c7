"""agent_svc's background jobs (shared.data.jobs).

agent.request_ids.purge    CreateAgent request ids past AGENT_REQUEST_ID_TTL_SECONDS:
                           a replay after it may create anew anyway
agent.deleted.purge        soft-deleted agents past their expire_time (AIP-164), with
                           their revisions and aliases: a batch per transaction, the
                           purged agents returned by the repository (one change-log
                           event each can join that transaction); then their cache
                           entries are invalidated on every replica and their watch
                           hubs woken (when Redis is configured; otherwise the serving
                           replicas' L1 TTL bounds it, and the hubs' poll); each purge is
                           a PURGED event of WatchAgents, in its batch's transaction
agent.changes.purge        change-log rows past AGENT_WATCH_RETENTION_SECONDS (plus a
                           margin, service/watch.py): resume tokens that old are refused
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Engine, delete, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from services.agent_svc.domain import Agent
from services.agent_svc.infra.cache import TwoLevelCache
from services.agent_svc.infra.changefeed import CHANNEL as CHANGES_CHANNEL
from services.agent_svc.infra.codec import AgentCodec
from services.agent_svc.infra.revisions import AliasesCodec
from services.agent_svc.repository.models import CreateRequestRow
from services.agent_svc.repository.sql import SqlAgentUnitOfWork, SqlChangeLogRepository
from services.agent_svc.service.ports import AgentAliases, ChangeKind
from services.agent_svc.service.watch import PURGE_MARGIN
from services.agent_svc.settings import AgentSettings
from shared.config.clock import Clock, SystemClock
from shared.data.db import session_factory
from shared.data.jobs import Job, Worker, purge_in_batches
from shared.data.redis_client import make_redis
from shared.rpc.observability import Observability
from shared.rpc.worker import make_worker, worker_process

__all__ = ["agent_jobs", "build_worker"]


def agent_jobs(
    sessions: sessionmaker[Session],
    *,
    clock: Clock,
    request_id_ttl_seconds: float,
    on_purged: Callable[[list[uuid.UUID]], None] | None = None,
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

    def deleted_agents() -> dict[str, int]:
        now = clock.now()

        def one_batch(limit: int) -> int:
            with SqlAgentUnitOfWork(sessions) as uow:
                purged = uow.agents.purge_expired(now=now, limit=limit)
                for agent in purged:  # each purge is an event of the change feed
                    uow.changes.append(ChangeKind.PURGED, agent)
                uow.commit()
            if purged and on_purged is not None:
                on_purged([agent.id for agent in purged])
            return len(purged)

        return {"purged": purge_in_batches(one_batch)}

    def changes() -> dict[str, int]:
        before = clock.now() - timedelta(seconds=watch_retention_seconds) - PURGE_MARGIN

        def one_batch(limit: int) -> int:
            with sessions.begin() as session:
                return SqlChangeLogRepository(session).purge(changed_before=before, limit=limit)

        return {"deleted": purge_in_batches(one_batch)}

    return [
        Job("agent.request_ids.purge", request_ids),
        Job("agent.deleted.purge", deleted_agents),
        Job("agent.changes.purge", changes),
    ]


def _cache_invalidator(
    settings: AgentSettings,
) -> tuple[Callable[[list[uuid.UUID]], None] | None, list[Callable[[], None]]]:
    """Tells every serving replica to drop purged agents (and their aliases) from its
    caches, through the same Redis channels their writes use; and how to close its client."""
    if not settings.common.redis:
        return None, []
    client = make_redis(settings.common.redis)
    # No L1 and no listener: these caches only send invalidations.
    agents = TwoLevelCache[Agent](
        redis=client,
        codec=AgentCodec(),
        namespace="agent",
        l1_max_entries=0,
        l1_ttl_seconds=0.0,
        l2_ttl_seconds=settings.l2_ttl_seconds,
    )
    aliases = TwoLevelCache[AgentAliases](
        redis=client,
        codec=AliasesCodec(),
        namespace="agent-aliases",
        l1_max_entries=0,
        l1_ttl_seconds=0.0,
        l2_ttl_seconds=settings.l2_ttl_seconds,
    )

    def invalidate(ids: list[uuid.UUID]) -> None:
        for agent_id in ids:
            agents.invalidate(agent_id)
            aliases.invalidate(agent_id)
        # The purges are in the change log: wake the watch hubs (they poll it anyway).
        client.publish(CHANGES_CHANNEL, b"1")

    return invalidate, [client.close]


def worker_for(
    settings: AgentSettings, engine: Engine, observability: Observability, clock: Clock
) -> Worker:
    invalidate, closers = _cache_invalidator(settings)
    jobs = agent_jobs(
        session_factory(engine),
        clock=clock,
        request_id_ttl_seconds=settings.request_id_ttl_seconds,
        on_purged=invalidate,
        watch_retention_seconds=settings.watch_retention_seconds,
    )
    return make_worker(
        jobs,
        engine=engine,
        settings=settings.common,
        observability=observability,
        on_close=closers,
    )


def build_worker(settings: AgentSettings) -> tuple[Worker, Observability]:
    """`python -m services.agent_svc worker`: the jobs on their own engine and metrics."""
    return worker_process(
        settings.common,
        lambda engine, observability: worker_for(settings, engine, observability, SystemClock()),
    )
