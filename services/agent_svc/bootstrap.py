"""The composition root of agent_svc: settings in, a wired server out."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from sqlalchemy import Engine

from services.agent_svc import SERVICE_NAME
from services.agent_svc.api.convert import serialized_size
from services.agent_svc.api.servicer import PUBLIC_METHODS, AgentServicer
from services.agent_svc.domain import Agent
from services.agent_svc.infra.cache import TwoLevelCache
from services.agent_svc.infra.changefeed import RedisChangeSignal
from services.agent_svc.infra.codec import AgentCodec
from services.agent_svc.infra.revisions import AliasesCodec, RevisionMemory
from services.agent_svc.jobs import worker_for
from services.agent_svc.repository.sql import SqlAgentUnitOfWork
from services.agent_svc.service.agent_service import AgentService
from services.agent_svc.service.paging import PageTokens
from services.agent_svc.service.ports import AgentAliases, ChangeSignal
from services.agent_svc.service.replica import ReplicaReads
from services.agent_svc.service.watch import ChangeHub, Watchers
from services.agent_svc.settings import AgentSettings
from shared.config.clock import Clock, SystemClock
from shared.config.settings import CommonSettings
from shared.data.db import (
    CallEnded,
    make_engine,
    ping,
    session_factory,
    single_statement_sessions,
    unavailable_database,
)
from shared.data.redis_client import RedisClient, make_redis
from shared.rpc.aio_server import StreamServer
from shared.rpc.children import Children, stop_with_parent
from shared.rpc.lifecycle import Closers
from shared.rpc.metrics import Metrics
from shared.rpc.observability import Observability
from shared.rpc.request_path import RequestPath
from shared.rpc.server import RunningServer, create_server
from shared.rpc.tracing import Tracing
from shared.rpc.worker import attach_in_process
from shared.security.jwks import JwksKeyProvider, grpc_jwks_fetcher
from shared.security.revocations import RevocationPoller, Revocations, grpc_revocation_fetch
from shared.security.tokens import KeyProvider, Principal, TokenVerifier

__all__ = ["AgentApp", "build_app", "build_server", "build_watch_worker", "request_path_for"]

_log = logging.getLogger(__name__)


@dataclass
class AgentApp:
    """Everything agent_svc is made of, wired; `close()` releases it (last built, first
    closed)."""

    settings: AgentSettings
    engine: Engine
    service: AgentService
    verifier: TokenVerifier
    observability: Observability
    closers: Closers
    keys: KeyProvider
    hub: ChangeHub | None = None
    read_engine: Engine | None = None
    """The read replica's (AGENT_DATABASE_READ_URL), if one is configured."""
    watch_port: int = 0
    """The bound port of the WatchAgents server (build_server), 0 before."""

    def ready(self) -> bool:
        """Whether tokens can be verified: the keys were fetched at least once."""
        return bool(getattr(self.keys, "has_keys", True))

    def close(self) -> None:
        self.closers.close()


# gRPC's default reconnect backoff grows to two minutes: after an auth_svc outage the keys
# would stay out of reach that long. Keep retrying the connection every second or two.
_AUTH_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _auth_channel(settings: AgentSettings) -> grpc.Channel:
    """The channel to auth_svc (for its public keys): TLS when a CA file or a client
    certificate is configured (mTLS with the certificate); plaintext otherwise."""
    if not settings.auth_uses_tls:
        return grpc.insecure_channel(settings.auth_target, _AUTH_CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.auth_tls_ca_file),
        private_key=_read(settings.auth_tls_key_file),
        certificate_chain=_read(settings.auth_tls_cert_file),
    )
    options: list[tuple[str, int | str]] = list(_AUTH_CHANNEL_OPTIONS)
    if settings.auth_tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.auth_tls_server_name))
    return grpc.secure_channel(settings.auth_target, credentials, options)


# Revocations are remembered this long (far longer than any access token lives).
REMEMBER_REVOCATIONS_SECONDS = 24 * 3600


def _jwks_keys(
    settings: AgentSettings,
    clock: Clock,
    closers: Closers,
    observability: Observability,
    revocations: Revocations,
) -> KeyProvider:
    """Keys fetched from auth_svc's GetJwks, refreshed in the background; the service
    starts while auth_svc is down, and is ready (and verifies) once keys arrive.
    With tracing on, each GetJwks call is a client span that carries the trace context
    (a fetch for an unknown key id during a call belongs to that call's trace). The token
    revocations come over the same channel (shared.security.revocations)."""
    channel = _auth_channel(settings)
    closers.add(channel.close)
    keys = JwksKeyProvider(
        grpc_jwks_fetcher(observability.instrument_channel(channel)),
        cooldown_seconds=settings.jwks_cooldown_seconds,
        clock=clock,
        on_fetch=observability.metrics.jwks_fetch,
    )
    poller = RevocationPoller(
        grpc_revocation_fetch(observability.instrument_channel(channel)),
        revocations,
        interval_seconds=settings.revocation_poll_seconds,
        token_lifetime_seconds=REMEMBER_REVOCATIONS_SECONDS,
        clock=clock,
        on_poll=observability.metrics.revocation_poll,
        on_revoked_kids=keys.revoke,
    )
    keys.start_background_refresh()
    closers.add(keys.close)
    poller.start()
    closers.add(poller.stop)
    return keys


@dataclass
class _Caches:
    agents: TwoLevelCache[Agent]
    aliases: TwoLevelCache[AgentAliases]


def _caches(settings: AgentSettings, closers: Closers, metrics: Metrics) -> _Caches:
    """L1 in process over L2 Redis (when configured); L1 only on the embedded default.
    Agents and their aliases each have one (namespaces `agent`, `agent-aliases`), both
    invalidated on every replica by their writes."""
    client = make_redis(settings.common.redis) if settings.common.redis else None
    if client is not None:
        closers.add(client.close)
    aliases = TwoLevelCache[AgentAliases](
        redis=client,
        codec=AliasesCodec(),
        l1_max_entries=settings.l1_max_entries,
        l1_ttl_seconds=settings.l1_ttl_seconds,
        l2_ttl_seconds=settings.l2_ttl_seconds,
        namespace="agent-aliases",
    )
    aliases.start()
    closers.add(aliases.close)
    return _Caches(_agent_cache(settings, client, closers, metrics), aliases)


def _agent_cache(
    settings: AgentSettings, client: RedisClient | None, closers: Closers, metrics: Metrics
) -> TwoLevelCache[Agent]:
    cache = TwoLevelCache[Agent](
        redis=client,
        codec=AgentCodec(),
        l1_max_entries=settings.l1_max_entries,
        l1_ttl_seconds=settings.l1_ttl_seconds,
        l2_ttl_seconds=settings.l2_ttl_seconds,
        namespace="agent",
        on_event=metrics.cache_event,
        version=lambda agent: agent.revision,  # no replica serves an older one after a newer
    )
    metrics.declare(metrics.cache_events, ("l1", "hit"), ("l1", "miss"), ("load", "db"))
    if client is not None:
        metrics.declare(metrics.cache_events, ("l2", "hit"), ("l2", "miss"), ("l2", "error"))
        metrics.declare(metrics.redis_errors, ("cache",))
    cache.start()
    closers.add(cache.close)
    return cache


WATCH_METHOD = "/agentplatform.agent.v1.AgentService/WatchAgents"
HUB_READ_SECONDS = 0.01
"""The change hub reads the log at most this often (a wake-up per commit otherwise)."""


def _watch(
    settings: AgentSettings,
    read_uow: Any,
    clock: Clock,
    closers: Closers,
    recheck: Callable[[Principal], None],
) -> tuple[ChangeHub, Watchers, ChangeSignal]:
    """The process's change hub and its streams; the signal that wakes the hubs after a
    commit: through Redis when configured (every replica), else in process."""
    hub = ChangeHub(
        read_uow=read_uow,
        clock=clock,
        poll_seconds=settings.watch_poll_seconds,
        # Read often; each stream paces itself (Watchers.batch_seconds): a change waits
        # for its stream's next turn, not for a read and a round of every stream's sends.
        min_interval=min(settings.watch_batch_seconds, HUB_READ_SECONDS),
        idle_interval=settings.watch_batch_seconds,  # no stream here: as before the pacing
        turns=settings.watch_send_slots,
    )
    hub.start()
    closers.add(hub.close)
    watchers = Watchers(
        hub,
        clock=clock,
        retention_seconds=settings.watch_retention_seconds,
        heartbeat_seconds=settings.watch_heartbeat_seconds,
        max_streams=settings.watch_max_streams,
        # A stream ends Unauthenticated once its token expires or is revoked: checked
        # as often as revocations arrive.
        recheck=recheck,
        recheck_seconds=settings.revocation_poll_seconds,
        batch_seconds=settings.watch_batch_seconds,
    )
    signal: ChangeSignal = hub
    if settings.common.redis:
        client = make_redis(settings.common.redis)
        closers.add(client.close)
        redis_signal = RedisChangeSignal(client, hub.changed)
        redis_signal.start()
        closers.add(redis_signal.close)
        signal = redis_signal
    return hub, watchers, signal


def build_app(
    settings: AgentSettings,
    *,
    clock: Clock | None = None,
    keys: KeyProvider | None = None,
    tracing: Tracing | None = None,
) -> AgentApp:
    """Builds the real adapters from settings (tests may swap the clock or the keys, and
    bring their own tracing, e.g. over an in-memory exporter)."""
    clock = clock or SystemClock()
    common = settings.common
    observability = Observability.from_settings(common, tracing=tracing)
    metrics = observability.metrics
    closers = Closers()
    closers.add(observability.close)
    engine = make_engine(
        common.database_url,
        pool_size=common.db_pool_size,
        statement_timeout=common.db_statement_timeout_seconds,
        transaction_pooler=common.db_transaction_pooler,
    )
    closers.add(engine.dispose)
    observability.watch_pool(engine)
    sessions = session_factory(engine)
    single_reads = single_statement_sessions(engine)
    read_engine = _read_engine(settings, closers)
    replica_reads = single_statement_sessions(read_engine) if read_engine is not None else None
    caches = _caches(settings, closers, metrics)
    revocations = Revocations()
    if keys is None:
        keys = _jwks_keys(settings, clock, closers, observability, revocations)
    verifier = TokenVerifier(
        keys,
        issuer=settings.issuer,
        audience=settings.audience,
        clock=clock,
        on_result=metrics.token_verification,
        revocations=revocations,
    )
    hub, watchers, signal = _watch(
        settings, lambda: SqlAgentUnitOfWork(single_reads), clock, closers, verifier.recheck
    )
    service = AgentService(
        uow=lambda: SqlAgentUnitOfWork(sessions),
        read_uow=lambda: SqlAgentUnitOfWork(single_reads),
        replica=(
            ReplicaReads(
                lambda: SqlAgentUnitOfWork(replica_reads),
                failed=_replica_failed,
            )
            if replica_reads is not None
            else None
        ),
        cache=caches.agents,
        alias_cache=caches.aliases,
        revision_cache=RevisionMemory(settings.l1_max_entries),
        revisions_kept=settings.revisions_kept,
        deleted_retention_seconds=settings.deleted_retention_days * 86_400.0,
        clock=clock,
        allowed_models=settings.allowed_models,
        catalogue=settings.catalogue,
        page_tokens=PageTokens(settings.page_token_secret),
        agent_size=serialized_size,
        request_id_ttl_seconds=settings.request_id_ttl_seconds,
        max_agents_per_owner=settings.max_agents_per_owner,
        changes=signal,
        watchers=watchers,
    )
    metrics.declare(
        metrics.token_verifications,
        ("verified",),
        ("cached",),
        ("rejected",),
        ("revoked",),
        ("unavailable",),
    )
    metrics.declare(metrics.revocation_polls, ("ok",), ("error",))
    metrics.declare(metrics.jwks_fetches, ("ok",), ("error",))
    return AgentApp(
        settings, engine, service, verifier, observability, closers, keys, hub, read_engine
    )


def _replica_failed(exc: Exception) -> bool:
    """A replica error the primary may not share (unreachable, shut down, a statement
    cancelled by a recovery conflict); not a call that ended (the primary would refuse
    its statement too)."""
    return unavailable_database(exc) is not None and not isinstance(exc, CallEnded)


def _read_engine(settings: AgentSettings, closers: Closers) -> Engine | None:
    """The read replica's engine (AGENT_DATABASE_READ_URL), sized like the primary's: the
    reads it takes over are most of the database reads."""
    url = settings.database_read_url
    if url is None:
        return None
    common = settings.common
    engine = make_engine(
        url,
        pool_size=common.db_pool_size,
        statement_timeout=common.db_statement_timeout_seconds,
        transaction_pooler=common.db_transaction_pooler,
    )
    closers.add(engine.dispose)
    return engine


def request_path_for(app: AgentApp) -> RequestPath:
    """The request path around every handler of the app's server."""
    return app.observability.request_path(
        error_domain="agent.agentplatform", verifier=app.verifier, public_methods=PUBLIC_METHODS
    )


def _dependencies(app: AgentApp) -> dict[str, Callable[[], bool]]:
    """The named health services: "database", and "database-replica" with a replica."""
    checks: dict[str, Callable[[], bool]] = {"database": lambda: ping(app.engine)}
    read_engine = app.read_engine
    if read_engine is not None:
        checks["database-replica"] = lambda: ping(read_engine)
    return checks


def _serve_watch_port(
    app: AgentApp,
    running: RunningServer,
    servicer: AgentServicer,
    path: RequestPath,
    *,
    shared_port: bool,
) -> None:
    """WatchAgents on a grpc.aio server of its own port (AGENT_WATCH_PORT), beside the
    sync server: a stream message costs it a fraction of the sync server's (no thread
    wake-ups; docs/watch.md "Server model"). Started with the main server; stopped once
    the hub has ended its streams. `shared_port`: watch workers serve the port too."""
    if shared_port:
        _refuse_if_taken(app.settings.common.host, app.settings.watch_port)
    watch = _watch_server(app, running, servicer, path, shared_port=shared_port)
    running.on_start.append(watch.start)
    running.on_drain.append(lambda: watch.stop(app.settings.common.grace_seconds))


def _refuse_if_taken(host: str, port: int) -> None:
    """With SO_REUSEPORT (watch workers) a bind succeeds beside any other socket of this
    user that set it too (another deployment's watch port on the same host): the two
    would share the connections. The port is first bound without it, as a server without
    workers binds it: taken, the start fails as theirs does."""
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            # As grpc binds: connections of an earlier server in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise RuntimeError(f"cannot bind {host}:{port}: {exc.strerror}") from None


def _watch_server(
    app: AgentApp,
    running: RunningServer,
    servicer: AgentServicer,
    path: RequestPath,
    *,
    shared_port: bool,
) -> StreamServer:
    watch = StreamServer(
        app.settings.common,
        port=app.settings.watch_port,
        service=SERVICE_NAME,
        methods={
            "WatchAgents": grpc.unary_stream_rpc_method_handler(
                servicer.watch_agents_async,
                request_deserializer=agent_pb2.WatchAgentsRequest.FromString,
                response_serializer=agent_pb2.WatchAgentsResponse.SerializeToString,
            )
        },
        request_path=path,
        health_servicer=running.health,
        service_names=[SERVICE_NAME],
        reuse_port=shared_port,
    )
    app.watch_port = watch.port
    return watch


def build_server(app: AgentApp) -> RunningServer:
    """A bound server for the app (port 0 in settings picks a free one). Ready means this
    process can verify tokens (it has fetched the keys once): a replica started while
    auth_svc is down stays out of its Service until the keys arrive, and one that has them
    keeps serving while auth_svc or the database is down (cache hits need neither). The
    database's state is the named health service "database"."""
    path = request_path_for(app)
    # WatchAgents on the main port: each stream holds a thread for its whole life, on a
    # pool of their own (their count is limited by AGENT_WATCH_MAX_STREAMS; a few more
    # threads answer the ones over the limit), so unary calls keep the worker threads.
    streams = app.settings.watch_max_streams
    pool = futures.ThreadPoolExecutor(max_workers=streams + 8, thread_name_prefix="watch")
    path.run_on(WATCH_METHOD, pool)
    servicer = AgentServicer(app.service)
    running = create_server(
        app.settings.common,
        register=lambda registrar: agent_pb2_grpc.add_AgentServiceServicer_to_server(
            servicer, registrar
        ),
        service_names=[SERVICE_NAME],
        request_path=path,
        interceptors=app.observability.server_interceptors(),
        is_ready=app.ready,
        dependencies=_dependencies(app),
        extra_concurrent_rpcs=streams + 8,
    )
    if app.hub is not None:
        # Streams end (UNAVAILABLE, SHUTTING_DOWN) as soon as the server takes no new
        # calls: their clients resume on another replica at once.
        running.on_drain.append(app.hub.close)
        workers = app.settings.watch_workers
        _serve_watch_port(app, running, servicer, path, shared_port=workers > 0)
        if workers:
            _start_watch_workers(app, running, workers)
    running.on_stop.append(lambda: pool.shutdown(wait=False))
    app.observability.attach(running)
    running.on_stop.append(app.close)
    if app.settings.common.worker_in_process:
        attach_in_process(
            running, worker_for(app.settings, app.engine, app.observability, SystemClock())
        )
    return running


WATCH_WORKER_COMMAND = "watch-worker"


def _start_watch_workers(app: AgentApp, running: RunningServer, count: int) -> None:
    """AGENT_WATCH_WORKERS processes serving the watch port beside this one (module
    `build_watch_worker`); started with the server, stopped as it drains (their streams
    end UNAVAILABLE with this process's), killed by a forced stop."""
    children = Children(
        "watch worker",
        [sys.executable, "-m", "services.agent_svc", WATCH_WORKER_COMMAND],
        count,
        # The bound port (AGENT_WATCH_PORT=0 picks one).
        {"AGENT_WATCH_PORT": str(app.watch_port)},
    )
    grace = app.settings.common.grace_seconds
    running.on_start.append(children.start)
    # SIGTERM before this process ends its own streams, so both drain together.
    running.on_drain.insert(0, children.terminate)
    running.on_drain.append(lambda: children.kill() if running.forced else children.stop(grace))
    running.on_force.append(children.kill)


def build_watch_worker(settings: AgentSettings) -> tuple[RunningServer, CommonSettings]:
    """A watch worker (`python -m services.agent_svc watch-worker`, started by the server
    when AGENT_WATCH_WORKERS is set, with its environment): WatchAgents, health Check and
    reflection on the watch port, which the server's process and the other workers serve
    too (SO_REUSEPORT), and nothing else. Its own change hub (woken through Redis), token
    checks (its own key fetch and revocation poll) and stream limit; no main port (a
    loopback port that answers health only), no metrics endpoint, no background jobs, no
    migrations. It listens on the watch port only once it can verify tokens (the other
    processes serve the port meanwhile), drains at once on SIGTERM (the server has had
    its NOT_SERVING delay: the settings returned to serve it with have none), and gets
    SIGTERM if the server's process dies."""
    stop_with_parent()
    common = replace(
        settings.common,
        shutdown_delay_seconds=0.0,
        metrics_port=0,
        health_port=0,
        worker_in_process=False,
    )
    app = build_app(replace(settings, common=common, watch_workers=0))
    if app.hub is None:  # pragma: no cover - build_app always makes one
        raise RuntimeError("a watch worker needs the change hub")
    path = request_path_for(app)
    local = replace(common, host="127.0.0.1", port=0)
    running = create_server(
        local,
        register=lambda registrar: None,
        service_names=[SERVICE_NAME],
        request_path=path,
        interceptors=app.observability.server_interceptors(),
        is_ready=app.ready,
        dependencies=_dependencies(app),
    )
    listener = _ListenWhenReady(app, running, AgentServicer(app.service), path)
    running.on_start.append(listener.start)
    running.on_drain.append(app.hub.close)
    running.on_drain.append(listener.stop)
    running.on_stop.append(app.close)
    return running, local


class _ListenWhenReady:
    """A watch worker's WatchAgents server, bound and started once the worker can verify
    tokens: a connection the kernel gives a worker restarted while auth_svc is down would
    otherwise wait, then be refused, for the whole outage, while the processes that have
    the keys serve (an outside review). A watch server that cannot be made (the port
    refused) ends the worker (`on_failure`: SIGTERM to itself), whom the server then
    starts again with its back-off, instead of a worker that serves nothing."""

    def __init__(
        self,
        app: AgentApp,
        running: RunningServer,
        servicer: AgentServicer,
        path: RequestPath,
        on_failure: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM),
    ) -> None:
        self._app, self._running, self._servicer, self._path = app, running, servicer, path
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: StreamServer | None = None

    def start(self) -> None:
        threading.Thread(target=self._listen, name="watch-listen", daemon=True).start()

    def _listen(self) -> None:
        while not self._app.ready():
            if self._stopping.wait(0.02):
                return
        with self._lock:
            if self._stopping.is_set():
                return
            try:
                server = _watch_server(
                    self._app, self._running, self._servicer, self._path, shared_port=True
                )
                server.start()
            except Exception:
                _log.exception("watch worker: cannot serve the watch port; stopping")
                self._on_failure()
                return
            self._server = server

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            if self._server is not None:
                self._server.stop(self._app.settings.common.grace_seconds)
