"""agent_svc settings: AGENT_* environment variables.

- `AGENT_AUTH_TARGET` (`127.0.0.1:50051`): auth_svc, for its public keys (`GetJwks`).
- `AGENT_AUTH_TLS_CA_FILE` (unset): a CA bundle; set it to reach auth_svc over TLS.
- `AGENT_AUTH_TLS_CERT_FILE`, `AGENT_AUTH_TLS_KEY_FILE` (unset): a client certificate
  chain and its key, presented to auth_svc (mTLS, when it sets `AUTH_TLS_CLIENT_CA_FILE`).
  Setting them turns TLS on too (with the system's CAs unless the CA file is set).
- `AGENT_AUTH_TLS_SERVER_NAME` (unset): the name to expect in auth_svc's certificate
  when it differs from the host in `AGENT_AUTH_TARGET` (e.g. a target given as an IP).
- `AGENT_ISSUER` (`agentplatform-auth`), `AGENT_AUDIENCE` (`agentplatform`): the `iss`
  and `aud` every access token must carry.
- `AGENT_ALLOWED_MODELS` (`DEFAULT_ALLOWED_MODELS` below): comma-separated active models.
- `AGENT_DEPRECATED_MODELS` (none): `model@YYYY-MM-DD>replacement,…`: usable, with a notice
  in the replies; `AGENT_RETIRED_MODELS` (none): `model>replacement,…`: refused (see
  services/agent_svc/service/models.py).
- `AGENT_JWKS_COOLDOWN_SECONDS` (30): at most one key refetch per cool-down on an unknown
  `kid`.
- `AGENT_L1_MAX_ENTRIES` (10000), `AGENT_L1_TTL_SECONDS` (30): the in-process cache; the
  TTL bounds staleness after a missed invalidation message.
- `AGENT_L2_TTL_SECONDS` (300): the Redis cache.
- `AGENT_MAX_AGENTS_PER_OWNER` (10000): the most agents one owner may have (0: no limit);
  a create past it is RESOURCE_EXHAUSTED with a QuotaFailure.
- `AGENT_REQUEST_ID_TTL_SECONDS` (86400): how long a CreateAgent request_id is honoured:
  a replay within it gets the first response; after it the id may create anew.
- `AGENT_REVISIONS_KEPT` (100, at least 1): how many of an agent's latest revisions are
  kept (AIP-162); older ones are removed by the write that makes a new one, unless an
  alias names them.
- `AGENT_DELETED_RETENTION_DAYS` (30; fractions allowed): how long a soft-deleted agent
  can be undeleted (its `expire_time`); the worker then removes it with its revisions.
- `AGENT_WATCH_RETENTION_SECONDS` (3600): how long the change log keeps a change, so how
  old a WatchAgents resume_token may be (older: RESUME_TOKEN_EXPIRED).
- `AGENT_WATCH_PORT` (50053; 0: a free port, logged): the port of the grpc.aio server
  that serves WatchAgents (plus health Check and reflection) beside the main port; the
  typed client's `watch_target`. Same host and TLS material as the main port.
- `AGENT_WATCH_MAX_STREAMS` (1000): WatchAgents streams one process serves at once, on
  both ports together (one more: RESOURCE_EXHAUSTED TOO_MANY_WATCHERS); a stream on the
  main port holds a thread of a pool of its own. With watch workers, each worker process
  admits as many on the watch port.
- `AGENT_WATCH_WORKERS` (0): worker processes that serve the watch port beside this one
  (SO_REUSEPORT: the kernel spreads new connections over the processes), each with its
  own change hub, token checks and stream limit, restarted if one dies; a fan-out then
  uses more than one core (docs/watch.md "Watch workers"). Needs `AGENT_REDIS_URL`: a
  worker hears commits through Redis.
- `AGENT_WATCH_HEARTBEAT_SECONDS` (15): an idle stream sends an empty message this often.
- `AGENT_WATCH_POLL_SECONDS` (1): the change log is read at least this often (the Redis
  or in-process wake-up makes it at once; this bounds the delay of a lost wake-up).
- `AGENT_WATCH_BATCH_SECONDS` (0.05): a stream sends at most one message of changes this
  often: after one it rests this long, and what came meanwhile goes in its next (fewer
  sends under a stream of changes; a change after a quiet spell goes at once; a backlog,
  or changes too big for one message, go without rests). The hub
  reads the log at most every 10 ms (or this, if shorter), so a change waits for its
  stream's own next turn, not for a read and a round of every stream's messages
  (docs/watch.md "Measured"). A stream that got nothing from a look (others' changes)
  rests too. At most 1 s: a resting stream notices a revoked token after its rest.
- `AGENT_WATCH_SEND_SLOTS` (1): streams on the main port that make their message at the
  same moment (the WatchAgents port's event loop makes one after another anyway); the
  others wait their turn and then send everything that came meanwhile in one message, so
  a fan-out to a thousand streams leaves the unary calls their share of the interpreter
  (measured: with 2 or more, GetAgent waited seconds during a large fan-out; with 1, ms).
- `AGENT_DATABASE_READ_URL` (or `AGENT_DATABASE_READ_URL_FILE`; unset): a PostgreSQL read
  replica (hot standby) for the reads that tolerate its lag: ListAgents pages, and GetAgent
  and BatchGetAgents cache misses of agents not written within the last 30 s (the cache's
  invalidation stamps; with Redis only). Everything else reads and writes the primary.
- `AGENT_PAGE_TOKEN_SECRET` (or `AGENT_PAGE_TOKEN_SECRET_FILE`, at least 32 characters):
  the HMAC key of page tokens, shared by every replica; required in prod, random per
  start in dev.

Plus the common ones (`AGENT_PROFILE`, `AGENT_PORT` 50052, `AGENT_METRICS_PORT` 9102,
`AGENT_DATABASE_URL`, `AGENT_REDIS_URL`, …) from shared.config.settings.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from services.agent_svc.service.models import (
    ACTIVE,
    DEPRECATED,
    RETIRED,
    ModelCatalogue,
    ModelEntry,
    parse_entries,
)
from shared.config.settings import CommonSettings, EnvReader, Role, load_common

__all__ = ["DEFAULT_ALLOWED_MODELS", "AgentSettings", "load_agent_settings"]

DEFAULT_ALLOWED_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3",
    "o4-mini",
    "claude-sonnet-4",
    "claude-opus-4",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
)
MIN_PAGE_TOKEN_SECRET = 32
MAX_MODEL_NAME = 128  # the width of the model column
MAX_RETENTION_DAYS = 3650.0


@dataclass(frozen=True, slots=True)
class AgentSettings:
    common: CommonSettings
    auth_target: str
    auth_tls_ca_file: str | None
    auth_tls_cert_file: str | None
    auth_tls_key_file: str | None
    auth_tls_server_name: str | None
    issuer: str
    audience: str
    allowed_models: tuple[str, ...]
    catalogue: ModelCatalogue
    jwks_cooldown_seconds: float
    revocation_poll_seconds: float
    l1_max_entries: int
    l1_ttl_seconds: float
    l2_ttl_seconds: float
    request_id_ttl_seconds: float
    max_agents_per_owner: int
    page_token_secret: bytes
    revisions_kept: int = 100
    deleted_retention_days: float = 30.0
    watch_retention_seconds: float = 3600.0
    watch_max_streams: int = 1000
    watch_heartbeat_seconds: float = 15.0
    watch_poll_seconds: float = 1.0
    watch_batch_seconds: float = 0.05
    watch_send_slots: int = 1
    database_read_url: str | None = None
    watch_port: int = 50053
    watch_workers: int = 0

    @property
    def auth_uses_tls(self) -> bool:
        """Whether the channel to auth_svc is TLS (a CA file or a client certificate set)."""
        return bool(self.auth_tls_ca_file or self.auth_tls_cert_file)


MAX_WATCH_WORKERS = 64
MAX_WATCH_BATCH_SECONDS = 1.0


def _page_token_secret(reader: EnvReader, common: CommonSettings, *, required: bool) -> bytes:
    secret = reader.secret("PAGE_TOKEN_SECRET")
    if secret is not None:
        secret = secret.strip()
        if len(secret) < MIN_PAGE_TOKEN_SECRET:
            reader.problems.append(
                f"{reader.name('PAGE_TOKEN_SECRET')} must be at least "
                f"{MIN_PAGE_TOKEN_SECRET} characters"
            )
        return secret.encode()
    if common.profile == "prod" and required:
        # Every replica must accept every other replica's page tokens.
        reader.require("PAGE_TOKEN_SECRET", "in the prod profile (or AGENT_PAGE_TOKEN_SECRET_FILE)")
    return secrets.token_bytes(32)


def _read_url(reader: EnvReader, common: CommonSettings) -> str | None:
    """The read replica's URL: PostgreSQL, beside a PostgreSQL primary."""
    url = reader.secret("DATABASE_READ_URL")
    if not url:
        return None
    if not url.startswith(("postgres://", "postgresql://", "postgresql+")) or (
        common.database_url.startswith("sqlite")
    ):
        reader.problems.append(
            f"{reader.name('DATABASE_READ_URL')} must be a PostgreSQL URL (a read replica "
            f"of the PostgreSQL in {reader.name('DATABASE_URL')})"
        )
        return None
    return url


def _catalogue(reader: EnvReader, active: tuple[str, ...]) -> ModelCatalogue:
    """The active models, then the deprecated and retired ones (which leave the active
    list: a default model is deprecated without restating AGENT_ALLOWED_MODELS)."""
    staged: list[ModelEntry] = []
    for key, state in (("DEPRECATED_MODELS", DEPRECATED), ("RETIRED_MODELS", RETIRED)):
        try:
            staged += parse_entries(reader.text(key, ""), state)
        except ValueError as exc:
            reader.problems.append(f"{reader.name(key)}: {exc}")
    named = {entry.name for entry in staged}
    entries = [ModelEntry(name, ACTIVE) for name in active if name not in named] + staged
    if any(len(entry.name) > MAX_MODEL_NAME for entry in staged):
        reader.problems.append(
            f"the model catalogue: names are at most {MAX_MODEL_NAME} characters"
        )
    try:
        return ModelCatalogue(entries)
    except ValueError as exc:
        reader.problems.append(f"the model catalogue: {exc}")
        return ModelCatalogue.of_active(active)


def load_agent_settings(env: Mapping[str, str], role: Role = "serve") -> AgentSettings:
    """Reads AGENT_* variables for the role (the worker needs neither the page-token secret
    nor the way to auth_svc); raises ConfigError listing every problem."""
    reader = EnvReader(env, "AGENT")
    common = load_common(
        reader, service="agent", default_port=50052, default_metrics_port=9102, role=role
    )
    serving = role == "serve"
    settings = AgentSettings(
        common=common,
        auth_target=reader.text("AUTH_TARGET", "127.0.0.1:50051"),
        auth_tls_ca_file=reader.raw("AUTH_TLS_CA_FILE"),
        auth_tls_cert_file=reader.raw("AUTH_TLS_CERT_FILE"),
        auth_tls_key_file=reader.raw("AUTH_TLS_KEY_FILE"),
        auth_tls_server_name=reader.raw("AUTH_TLS_SERVER_NAME"),
        issuer=reader.text("ISSUER", "agentplatform-auth"),
        audience=reader.text("AUDIENCE", "agentplatform"),
        allowed_models=(allowed := reader.items("ALLOWED_MODELS", DEFAULT_ALLOWED_MODELS)),
        catalogue=_catalogue(reader, allowed),
        jwks_cooldown_seconds=reader.number("JWKS_COOLDOWN_SECONDS", 30.0),
        # How often the revocations are asked for: the bound on how long a revoked token
        # (a disabled user's, say) is still accepted here while auth_svc answers.
        revocation_poll_seconds=reader.number("REVOCATION_POLL_SECONDS", 2.0, minimum=0.1),
        l1_max_entries=reader.integer("L1_MAX_ENTRIES", 10_000, minimum=0),  # 0: no L1
        l1_ttl_seconds=reader.number("L1_TTL_SECONDS", 30.0),
        l2_ttl_seconds=reader.number("L2_TTL_SECONDS", 300.0, minimum=1.0),
        request_id_ttl_seconds=reader.number("REQUEST_ID_TTL_SECONDS", 86_400.0, minimum=1.0),
        max_agents_per_owner=reader.integer("MAX_AGENTS_PER_OWNER", 10_000, minimum=0),
        page_token_secret=_page_token_secret(reader, common, required=serving),
        revisions_kept=reader.integer("REVISIONS_KEPT", 100, minimum=1),
        deleted_retention_days=reader.number("DELETED_RETENTION_DAYS", 30.0, minimum=0.0),
        watch_retention_seconds=reader.number("WATCH_RETENTION_SECONDS", 3600.0, minimum=60.0),
        watch_max_streams=reader.integer("WATCH_MAX_STREAMS", 1000, minimum=1),
        watch_heartbeat_seconds=reader.number("WATCH_HEARTBEAT_SECONDS", 15.0, minimum=0.05),
        watch_poll_seconds=reader.number("WATCH_POLL_SECONDS", 1.0, minimum=0.01),
        watch_batch_seconds=reader.number("WATCH_BATCH_SECONDS", 0.05, minimum=0.0),
        watch_send_slots=reader.integer("WATCH_SEND_SLOTS", 1, minimum=1),
        database_read_url=_read_url(reader, common) if serving else None,
        watch_port=reader.integer("WATCH_PORT", 50053, minimum=0),
        watch_workers=reader.integer("WATCH_WORKERS", 0, minimum=0),
    )
    if bool(settings.auth_tls_cert_file) != bool(settings.auth_tls_key_file):
        reader.problems.append(
            f"set both {reader.name('AUTH_TLS_CERT_FILE')} and "
            f"{reader.name('AUTH_TLS_KEY_FILE')}, or neither"
        )
    if not settings.auth_uses_tls and not common.allow_plaintext and serving:
        reader.problems.append(
            f"the prod profile fetches keys over TLS: set {reader.name('AUTH_TLS_CA_FILE')} "
            f"(and a client certificate for mTLS), or {reader.name('ALLOW_PLAINTEXT')}=true "
            "where something else encrypts the traffic (a service mesh)"
        )
    if settings.auth_tls_server_name and not settings.auth_uses_tls:
        reader.problems.append(
            f"{reader.name('AUTH_TLS_SERVER_NAME')} needs TLS to auth_svc "
            f"({reader.name('AUTH_TLS_CA_FILE')} or a client certificate)"
        )
    if not 0 <= settings.deleted_retention_days <= MAX_RETENTION_DAYS:
        reader.problems.append(
            f"{reader.name('DELETED_RETENTION_DAYS')} must be from 0 to {MAX_RETENTION_DAYS}"
        )
    if settings.watch_port and settings.watch_port in (common.port, common.health_port):
        reader.problems.append(
            f"{reader.name('WATCH_PORT')} must differ from {reader.name('PORT')} and "
            f"{reader.name('HEALTH_PORT')}"
        )
    if settings.watch_batch_seconds > MAX_WATCH_BATCH_SECONDS:
        # A stream resting longer would notice a revoked token that much later.
        reader.problems.append(
            f"{reader.name('WATCH_BATCH_SECONDS')} is at most {MAX_WATCH_BATCH_SECONDS}"
        )
    if settings.watch_workers > MAX_WATCH_WORKERS:
        reader.problems.append(f"{reader.name('WATCH_WORKERS')} is at most {MAX_WATCH_WORKERS}")
    if settings.watch_workers and not common.redis:
        reader.problems.append(
            f"{reader.name('WATCH_WORKERS')} needs {reader.name('REDIS_URL')}: watch workers "
            "hear this process's commits through Redis"
        )
    if not settings.allowed_models:
        reader.problems.append(f"{reader.name('ALLOWED_MODELS')} must name at least one model")
    if any(len(model) > MAX_MODEL_NAME for model in settings.allowed_models):
        reader.problems.append(
            f"{reader.name('ALLOWED_MODELS')}: model names are at most {MAX_MODEL_NAME} characters"
        )
    reader.check()
    return settings
