"""The composition root of auth_svc: settings in, a wired server out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agentplatform.auth.v1 import auth_pb2_grpc
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.auth_svc import PUBLIC_METHODS, SERVICE_NAMES
from services.auth_svc.api.admin import (
    AuditServicer,
    SessionServicer,
    SigningKeyServicer,
    UserServicer,
)
from services.auth_svc.api.service_accounts import ServiceAccountServicer, TokenServicer
from services.auth_svc.api.servicer import AuthServicer
from services.auth_svc.api.well_known import JWKS_PATH, jwks_route
from services.auth_svc.infra.hashing import HashPool
from services.auth_svc.infra.keys import PEM_BLOCK
from services.auth_svc.infra.keystore import DatabaseKeyRing, KeyEncryption, KeyFactory
from services.auth_svc.infra.limiter import (
    InMemoryLoginLimiter,
    RedisLoginLimiter,
    SqlLoginLimiter,
)
from services.auth_svc.infra.passwords import Argon2PasswordHasher
from services.auth_svc.infra.throttle import FailureThrottle
from services.auth_svc.jobs import worker_for
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from services.auth_svc.service.admin import AuditReader, RevocationFeed, Sessions, UserAdmin
from services.auth_svc.service.auth_service import AuthPolicy, AuthService
from services.auth_svc.service.ports import LoginLimiter, PasswordHasher
from services.auth_svc.service.service_accounts import (
    SecretHasher,
    ServiceAccountAdmin,
    TokenEndpoint,
)
from services.auth_svc.service.signing_keys import SigningKeyAdmin
from services.auth_svc.settings import (
    AuthSettings,
    load_or_create_dev_kek,
    load_or_create_dev_secret,
)
from shared.config.clock import Clock, SystemClock
from shared.data.db import make_engine, ping, session_factory, single_statement_sessions
from shared.data.redis_client import RedisClient, make_redis
from shared.rpc.lifecycle import Closers
from shared.rpc.metrics import Metrics
from shared.rpc.observability import Observability
from shared.rpc.ratelimit import RateLimiter
from shared.rpc.request_path import RequestPath
from shared.rpc.server import RunningServer, create_server
from shared.rpc.tracing import Tracing
from shared.rpc.worker import attach_in_process
from shared.security.revocations import RevocationPoller, RevocationReply, Revocations
from shared.security.tokens import TokenVerifier

__all__ = ["AuthApp", "build_app", "build_server", "request_path_for"]

_log = logging.getLogger(__name__)
REVOCATION_POLL_SECONDS = 1.0  # its own database: cheap, and its own RPCs see them soon


@dataclass
class AuthApp:
    """Everything auth_svc is made of, wired; `close()` releases it."""

    settings: AuthSettings
    engine: Engine
    service: AuthService
    verifier: TokenVerifier
    keys: DatabaseKeyRing
    signing_keys: SigningKeyAdmin
    clock: Clock
    tokens: TokenEndpoint
    service_accounts: ServiceAccountAdmin
    users: UserAdmin
    sessions: Sessions
    audit: AuditReader
    revocations: RevocationFeed
    observability: Observability
    closers: Closers
    rate_limiter: RateLimiter

    def close(self) -> None:
        self.closers.close()


def _limiter(
    settings: AuthSettings,
    clock: Clock,
    client: RedisClient | None,
    metrics: Metrics,
    engine: Engine,
) -> LoginLimiter:
    """Redis, then the database, then in-process (see infra/limiter.py)."""
    in_process = InMemoryLoginLimiter(
        max_failures=settings.login_max_failures,
        lockout_seconds=settings.login_lockout_seconds,
        monotonic=clock.monotonic,
    )
    if client is None:
        return in_process
    database = SqlLoginLimiter(
        engine,
        max_failures=settings.login_max_failures,
        lockout_seconds=settings.login_lockout_seconds,
        clock=clock,
        fallback=in_process,
    )
    return RedisLoginLimiter(
        client,
        max_failures=settings.login_max_failures,
        lockout_seconds=settings.login_lockout_seconds,
        fallback=database,
        on_redis_error=lambda: metrics.redis_error("login_limiter"),
    )


def _signing_keys(
    settings: AuthSettings, sessions: Any, clock: Clock, closers: Closers
) -> tuple[DatabaseKeyRing, SigningKeyAdmin]:
    """The signing keys from the database (made or imported on the first start), reloaded
    every few seconds. If the database does not answer at start, the service starts
    without keys (not ready; tokens cannot be issued or checked) and keeps trying."""
    keks = settings.key_encryption_keys or load_or_create_dev_kek(settings.common.data_dir)
    encryption = KeyEncryption(keks)

    def load() -> list[Any]:
        with SqlAuthUnitOfWork(sessions) as uow:
            return uow.signing_keys.all()

    admin: SigningKeyAdmin | None = None

    def prepare() -> None:
        assert admin is not None
        outcome = admin.ensure(
            signing_pem=settings.signing_key_pem,
            verify_pems=PEM_BLOCK.findall(settings.verify_keys_pem or ""),
        )
        _log.info("signing keys: %s", outcome)

    ring = DatabaseKeyRing(
        load,
        encryption,
        prepare=prepare,
        issuer=settings.issuer,
        audience=settings.audience,
        access_token_ttl_seconds=settings.access_token_ttl_seconds,
        clock=clock,
    )
    admin = SigningKeyAdmin(
        uow=lambda: SqlAuthUnitOfWork(sessions),
        keys=KeyFactory(encryption),
        reload=ring.reload,
        clock=clock,
        publish_ahead_seconds=settings.key_publish_ahead_seconds,
        token_lifetime_seconds=settings.access_token_ttl_seconds,
        rotation_days=settings.key_rotation_days,
    )
    try:
        prepare()
        ring.reload()
    except SQLAlchemyError as exc:
        _log.warning("signing keys: the database did not answer (%s); retrying", exc)
    ring.start()
    closers.add(ring.stop)
    return ring, admin


def build_app(
    settings: AuthSettings,
    *,
    clock: Clock | None = None,
    hasher: PasswordHasher | None = None,
    tracing: Tracing | None = None,
) -> AuthApp:
    """Builds the real adapters from settings (tests may swap the clock or the hasher, and
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
    keys, key_admin = _signing_keys(settings, sessions, clock, closers)
    metrics.signing_key_ready.set_function(lambda: 1.0 if keys.can_sign() else 0.0)
    client = make_redis(common.redis) if common.redis else None
    if client is not None:
        closers.add(client.close)
    if hasher is None:
        pool = HashPool(concurrency=settings.hash_concurrency, queue=settings.hash_queue)
        closers.add(pool.close)
        hasher = Argon2PasswordHasher(pool)
    limiter = _limiter(settings, clock, client, metrics, engine)
    service = AuthService(
        uow=lambda: SqlAuthUnitOfWork(sessions),
        hasher=hasher,
        limiter=limiter,
        tokens=keys,
        clock=clock,
        policy=AuthPolicy(
            password_min_length=settings.password_min_length,
            refresh_token_ttl_seconds=settings.refresh_token_ttl_seconds,
            refresh_reuse_grace_seconds=settings.refresh_reuse_grace_seconds,
        ),
        on_login=metrics.login_result,
    )
    # This service checks the revocations it records too (its own RPCs, and the user
    # tokens the token exchange takes), polling its own database.
    revocations = Revocations()
    verifier = TokenVerifier(
        keys,
        issuer=settings.issuer,
        audience=settings.audience,
        clock=clock,
        on_result=metrics.token_verification,
        revocations=revocations,
    )
    metrics.declare(metrics.logins, ("success",), ("failure",), ("locked",))
    metrics.declare(metrics.token_verifications, ("verified",), ("cached",), ("rejected",))
    if common.redis_url:
        metrics.declare(metrics.redis_errors, ("login_limiter",), ("rate_limiter",))
    rate_limiter = RateLimiter(
        settings.rate_limits,
        redis_client=client,
        prefix="auth:ratelimit:",
        monotonic=clock.monotonic,
        on_event=metrics.rate_limit_event,
    )
    for method in settings.rate_limits:
        metrics.declare(metrics.rate_limited, (method,))
    observability.route(JWKS_PATH, jwks_route(service.jwks))
    secret_key = settings.client_secret_key or load_or_create_dev_secret(common.data_dir)
    client_secrets = SecretHasher(secret_key)
    uow = lambda: SqlAuthUnitOfWork(sessions)  # noqa: E731
    throttle_limiter = RateLimiter(
        {},
        redis_client=client,
        prefix="auth:client:",
        monotonic=clock.monotonic,
        on_event=metrics.rate_limit_event,
    )
    single_reads = single_statement_sessions(engine)
    tokens = TokenEndpoint(
        uow=uow,
        reads=lambda: SqlAuthUnitOfWork(single_reads),
        secrets=client_secrets,
        tokens=keys,
        throttle=FailureThrottle(throttle_limiter, settings.client_failure_limit),
        verify_subject=verifier.verify,
        clock=clock,
        lifetime_seconds=settings.access_token_ttl_seconds,
        on_result=metrics.token_issued,
    )
    for grant in ("client_credentials", "token_exchange"):
        metrics.declare(metrics.tokens_issued, (grant, "issued"), (grant, "refused"))
    lifetime = settings.access_token_ttl_seconds
    feed = RevocationFeed(
        uow=lambda: SqlAuthUnitOfWork(single_reads),
        clock=clock,
        revoked_kids=key_admin.revoked_kids,
        # A key revoked through another replica leaves this one's JWKS before it tells a
        # verifier about the revocation (not only at its next 5 s reload).
        on_revoked_kids=lambda kids: keys.reload() if keys.publishes(kids) else None,
    )

    def local_fetch(since: datetime | None) -> RevocationReply:
        found, now, truncated = feed.since(since)
        # Revoked signing keys: this service's ring drops them by itself.
        resume = found[-1].create_time if truncated else None
        return RevocationReply([(r.subject, r.not_before) for r in found], now, [], resume)

    poller = RevocationPoller(
        local_fetch,
        revocations,
        interval_seconds=REVOCATION_POLL_SECONDS,
        token_lifetime_seconds=lifetime,
        clock=clock,
        on_poll=metrics.revocation_poll,
    )
    poller.start()
    closers.add(poller.stop)
    admin = ServiceAccountAdmin(
        uow=uow, secrets=client_secrets, clock=clock, token_lifetime_seconds=lifetime
    )
    return AuthApp(
        settings=settings,
        engine=engine,
        service=service,
        verifier=verifier,
        keys=keys,
        signing_keys=key_admin,
        clock=clock,
        tokens=tokens,
        service_accounts=admin,
        users=UserAdmin(uow=uow, limiter=limiter, clock=clock, token_lifetime_seconds=lifetime),
        sessions=Sessions(uow=uow, clock=clock, token_lifetime_seconds=lifetime),
        audit=AuditReader(uow=uow, clock=clock),
        revocations=feed,
        observability=observability,
        closers=closers,
        rate_limiter=rate_limiter,
    )


def request_path_for(app: AuthApp) -> RequestPath:
    """The request path around every handler of the app's server."""
    return app.observability.request_path(
        error_domain="auth.agentplatform",
        verifier=app.verifier,
        public_methods=PUBLIC_METHODS,
        rate_limiter=app.rate_limiter,
        # Polled by every agent pod every 2 s: its successes at DEBUG (GetJwks, fetched
        # on a new key id and every few minutes, stays at INFO).
        quiet_methods=(f"/{SERVICE_NAMES[0]}/GetRevocations",),
    )


def _register(app: AuthApp, registrar: Any) -> None:
    auth_pb2_grpc.add_AuthServiceServicer_to_server(
        AuthServicer(app.service, app.revocations), registrar
    )
    auth_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(app.users), registrar)
    auth_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(app.sessions), registrar)
    auth_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(app.audit), registrar)
    auth_pb2_grpc.add_SigningKeyServiceServicer_to_server(
        SigningKeyServicer(app.signing_keys, app.clock), registrar
    )
    auth_pb2_grpc.add_TokenServiceServicer_to_server(TokenServicer(app.tokens), registrar)
    auth_pb2_grpc.add_ServiceAccountServiceServicer_to_server(
        ServiceAccountServicer(app.service_accounts), registrar
    )


def build_server(app: AuthApp) -> RunningServer:
    """A bound server for the app (port 0 in settings picks a free one). Ready while it has
    a signing key that signs (loaded from the database at start, and decryptable with its
    KEKs): after that a database outage does not take it out of its Service (GetJwks and
    token checks need no database). The database's state is the named health service
    "database"."""
    running = create_server(
        app.settings.common,
        register=lambda registrar: _register(app, registrar),
        service_names=list(SERVICE_NAMES),
        request_path=request_path_for(app),
        interceptors=app.observability.server_interceptors(),
        is_ready=app.keys.can_sign,
        dependencies={"database": lambda: ping(app.engine)},
    )
    app.observability.attach(running)
    running.on_stop.append(app.close)
    if app.settings.common.worker_in_process:
        attach_in_process(
            running, worker_for(app.settings, app.engine, app.observability, SystemClock())
        )
    return running
