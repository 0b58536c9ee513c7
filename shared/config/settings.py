"""Typed settings from environment variables with a per-service prefix.

Each service builds its own settings object from `os.environ` in its composition root
(`load_*_settings(env)`); nothing reads the environment at import time. The `dev` profile
has working defaults (SQLite under a local data folder, in-process cache, a generated
signing key, plaintext on localhost); the `prod` profile refuses to start without real
database, Redis and key material.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "CommonSettings",
    "ConfigError",
    "EnvReader",
    "Profile",
    "RedisConfig",
    "RedisMode",
    "Role",
    "load_common",
    "load_migration_settings",
]

Profile = Literal["dev", "prod"]
Role = Literal["serve", "worker", "migrate", "cli"]
"""What the process is for: serving gRPC, running the background jobs (`worker`), applying
migrations, or an operator's command (`cli`: create-admin). A role checks only what it
uses: a migration Job needs the database URL and nothing else; a worker or a command
serves no gRPC and needs no TLS, Redis or keys."""


RedisMode = Literal["single", "sentinel", "cluster"]


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """How to reach Redis: one server, a Sentinel-watched master, or a Redis Cluster; each
    with TLS and ACL credentials if the deployment uses them (shared.data.redis_client
    builds the client from this)."""

    mode: RedisMode
    url: str
    """single: the server (`redis[s]://[user:password@]host:port/db`); sentinel: the
    sentinels (`redis[s]://host:port,host:port/db`); cluster: seed nodes
    (`redis[s]://host:port,host:port`). `rediss://` turns TLS on."""
    sentinel_master: str | None = None
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


class ConfigError(ValueError):
    """The environment does not describe a runnable service; the message says what to set."""


class EnvReader:
    """Reads `PREFIX_NAME` variables with types, collecting every problem at once."""

    def __init__(self, env: Mapping[str, str], prefix: str) -> None:
        self._env = env
        self.prefix = prefix
        self.problems: list[str] = []

    def name(self, key: str) -> str:
        return f"{self.prefix}_{key}"

    def unprefixed(self, name: str) -> str | None:
        """A standard variable shared by every service (e.g. OTEL_EXPORTER_OTLP_ENDPOINT)."""
        value = self._env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def raw(self, key: str) -> str | None:
        value = self._env.get(self.name(key))
        return value.strip() if value is not None and value.strip() else None

    def text(self, key: str, default: str) -> str:
        return self.raw(key) or default

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{self.name(key)} must be an integer, got {raw!r}")
            return default
        if value < minimum:
            self.problems.append(f"{self.name(key)} must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{self.name(key)} must be a number, got {raw!r}")
            return default
        if value < minimum:
            self.problems.append(f"{self.name(key)} must be at least {minimum}, got {value}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        raw = self.raw(key)
        if raw is None:
            return default
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        self.problems.append(f"{self.name(key)} must be true or false, got {raw!r}")
        return default

    def items(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self.raw(key)
        if raw is None:
            return default
        return tuple(item.strip() for item in raw.split(",") if item.strip())

    def require(self, key: str, why: str) -> None:
        if self.raw(key) is None:
            self.problems.append(f"{self.name(key)} is required {why}")

    def secret(self, key: str, *, optional_file: bool = False) -> str | None:
        """A secret given inline (`KEY`) or as a mounted file (`KEY_FILE`). With
        `optional_file`, a file that is not there (an optional Secret volume) or holds
        nothing counts as not given."""
        inline = self.raw(key)
        path = self.raw(f"{key}_FILE")
        if inline and path:
            self.problems.append(f"set {self.name(key)} or {self.name(key)}_FILE, not both")
        if path:
            if optional_file and not Path(path).is_file():
                return None
            try:
                # Secret files usually end in a newline (echo, kubectl --from-file).
                return Path(path).read_text().strip()
            except OSError as exc:
                self.problems.append(f"{self.name(key)}_FILE: cannot read {path}: {exc.strerror}")
                return None
        return inline

    def check(self) -> None:
        if self.problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True, slots=True)
class CommonSettings:
    """What every service needs to serve gRPC, reach its database and report on itself."""

    service: str
    profile: Profile
    host: str
    port: int
    metrics_port: int
    data_dir: Path
    database_url: str
    redis_url: str | None
    max_workers: int
    max_concurrent_rpcs: int
    db_pool_size: int
    db_statement_timeout_seconds: float
    db_transaction_pooler: bool
    grace_seconds: float
    shutdown_delay_seconds: float
    allow_plaintext: bool
    migrate_on_start: bool
    log_level: str
    log_format: Literal["text", "json"]
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_client_ca_file: str | None
    health_port: int
    max_connection_age_seconds: float
    max_connection_age_grace_seconds: float
    otlp_endpoint: str | None
    trace_service_name: str
    worker_in_process: bool
    worker_interval_seconds: float
    role: Role = "serve"
    redis: RedisConfig | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def load_common(
    reader: EnvReader,
    *,
    service: str,
    default_port: int,
    default_metrics_port: int,
    role: Role = "serve",
) -> CommonSettings:
    """The common part of a service's settings; `reader.check()` is left to the caller."""
    serving = role == "serve"
    profile_raw = reader.text("PROFILE", "dev").lower()
    if profile_raw not in ("dev", "prod"):
        reader.problems.append(f"{reader.name('PROFILE')} must be dev or prod, got {profile_raw!r}")
        profile_raw = "prod"
    profile: Profile = "dev" if profile_raw == "dev" else "prod"
    dev = profile == "dev"
    data_dir = Path(reader.text("DATA_DIR", ".data")).absolute()
    database_url = reader.secret("DATABASE_URL")
    if database_url is None:
        if dev:
            database_url = f"sqlite:///{data_dir / (service + '.db')}"
        else:
            reader.require("DATABASE_URL", "in the prod profile (a PostgreSQL URL)")
            database_url = ""
    elif not dev and database_url.startswith("sqlite"):
        reader.problems.append(f"{reader.name('DATABASE_URL')} must be PostgreSQL in prod")
    redis_url = reader.secret("REDIS_URL")
    if redis_url is None and not dev and serving:
        reader.require("REDIS_URL", "in the prod profile")
    redis = load_redis(reader, redis_url)
    log_format = reader.text("LOG_FORMAT", "text" if dev else "json").lower()
    if log_format not in ("text", "json"):
        reader.problems.append(f"{reader.name('LOG_FORMAT')} must be text or json")
    cert, key = reader.raw("TLS_CERT_FILE"), reader.raw("TLS_KEY_FILE")
    client_ca = reader.raw("TLS_CLIENT_CA_FILE")
    if bool(cert) != bool(key):
        reader.problems.append(
            f"set both {reader.name('TLS_CERT_FILE')} and {reader.name('TLS_KEY_FILE')}, or neither"
        )
    if client_ca and not cert:
        # Client certificates (mTLS) need TLS: without a server certificate the server
        # would listen in plaintext and silently ignore the CA.
        reader.problems.append(
            f"{reader.name('TLS_CLIENT_CA_FILE')} (mTLS) needs a server certificate: set "
            f"{reader.name('TLS_CERT_FILE')} and {reader.name('TLS_KEY_FILE')}"
        )
    allow_plaintext = reader.flag("ALLOW_PLAINTEXT", dev)
    if not cert and not allow_plaintext and serving:
        reader.problems.append(
            f"the prod profile serves TLS: set {reader.name('TLS_CERT_FILE')} and "
            f"{reader.name('TLS_KEY_FILE')}, or {reader.name('ALLOW_PLAINTEXT')}=true where "
            "something else encrypts the traffic (a service mesh)"
        )
    common = CommonSettings(
        service=service,
        profile=profile,
        host=reader.text("HOST", "127.0.0.1" if dev else "0.0.0.0"),  # noqa: S104
        port=reader.integer("PORT", default_port),
        metrics_port=reader.integer("METRICS_PORT", default_metrics_port),
        data_dir=data_dir,
        database_url=database_url,
        redis_url=redis_url,
        # Worker threads: 16 served cache hits ~10 % faster than 32 on one core (less GIL
        # hand-off between threads) with the same database-bound throughput, and about
        # matches the 15 PostgreSQL connections a pod may hold (README, "Measured figures").
        max_workers=reader.integer("MAX_WORKERS", 16, minimum=1),
        max_concurrent_rpcs=reader.integer("MAX_CONCURRENT_RPCS", 512, minimum=1),
        # PostgreSQL connections per pod: this many, plus half as many again under bursts.
        db_pool_size=reader.integer("DB_POOL_SIZE", 10, minimum=1),
        # PostgreSQL cancels a statement (or a lock wait) that takes longer; 0: no limit.
        db_statement_timeout_seconds=reader.number("DB_STATEMENT_TIMEOUT_SECONDS", 10.0),
        # PgBouncer in transaction mode between the service and PostgreSQL: no prepared
        # statements, no startup options (docs/operations.md, "High availability").
        db_transaction_pooler=reader.flag("DB_TRANSACTION_POOLER", False),
        grace_seconds=reader.number("GRACE_SECONDS", 10.0),
        # After SIGTERM: NOT_SERVING while still serving, so that whatever watches health
        # (load balancers, clients) moves away before the server stops taking calls.
        shutdown_delay_seconds=reader.number("SHUTDOWN_DELAY_SECONDS", 0.0 if dev else 2.0),
        allow_plaintext=allow_plaintext,
        migrate_on_start=reader.flag("MIGRATE_ON_START", dev),
        log_level=reader.text("LOG_LEVEL", "INFO").upper(),
        log_format="json" if log_format == "json" else "text",
        tls_cert_file=cert,
        tls_key_file=key,
        tls_client_ca_file=client_ca,
        # A plaintext health-only port, for kubelet gRPC probes when the main port is TLS.
        health_port=reader.integer("HEALTH_PORT", 0),
        # Connections are closed after this age so clients re-resolve and spread over pods.
        max_connection_age_seconds=reader.number("MAX_CONNECTION_AGE_SECONDS", 300.0),
        max_connection_age_grace_seconds=reader.number("MAX_CONNECTION_AGE_GRACE_SECONDS", 30.0),
        otlp_endpoint=reader.raw("OTLP_ENDPOINT")
        or reader.unprefixed("OTEL_EXPORTER_OTLP_ENDPOINT"),
        # The traces' service.name, as the OpenTelemetry SDK's standard variable names it.
        trace_service_name=reader.unprefixed("OTEL_SERVICE_NAME") or f"{service}-svc",
        # The background jobs (shared.data.jobs) on a thread of the serving process: the
        # local run command turns it on (one command runs everything); in Kubernetes a
        # worker Deployment runs them.
        worker_in_process=reader.flag("WORKER_IN_PROCESS", False),
        worker_interval_seconds=reader.number("WORKER_INTERVAL_SECONDS", 300.0, minimum=1.0),
        role=role,
        redis=redis,
    )
    if common.db_transaction_pooler and not common.database_url.startswith(
        ("postgres", "postgresql")
    ):
        reader.problems.append(
            f"{reader.name('DB_TRANSACTION_POOLER')} applies to PostgreSQL behind PgBouncer "
            f"(transaction mode); {reader.name('DATABASE_URL')} is not PostgreSQL"
        )
    return common


def load_redis(reader: EnvReader, url: str | None) -> RedisConfig | None:
    """`REDIS_MODE` (single, sentinel, cluster) and what it needs besides `REDIS_URL`."""
    mode = reader.text("REDIS_MODE", "single").lower()
    if mode not in ("single", "sentinel", "cluster"):
        reader.problems.append(
            f"{reader.name('REDIS_MODE')} must be single, sentinel or cluster, got {mode!r}"
        )
        return None
    master = reader.raw("REDIS_SENTINEL_MASTER")
    cert, key = reader.raw("REDIS_TLS_CERT_FILE"), reader.raw("REDIS_TLS_KEY_FILE")
    if bool(cert) != bool(key):
        reader.problems.append(
            f"set both {reader.name('REDIS_TLS_CERT_FILE')} and "
            f"{reader.name('REDIS_TLS_KEY_FILE')} (a client certificate), or neither"
        )
    if url is None:
        return None
    if not url.startswith(("redis://", "rediss://")):
        reader.problems.append(f"{reader.name('REDIS_URL')} must start with redis:// or rediss://")
    if mode == "sentinel" and master is None:
        reader.require("REDIS_SENTINEL_MASTER", "with REDIS_MODE=sentinel (the master's name)")
    if mode != "sentinel" and master is not None:
        reader.problems.append(
            f"{reader.name('REDIS_SENTINEL_MASTER')} is only read with REDIS_MODE=sentinel"
        )
    tls_files = {
        "REDIS_TLS_CA_FILE": reader.raw("REDIS_TLS_CA_FILE"),
        "REDIS_TLS_CERT_FILE": cert,
        "REDIS_TLS_KEY_FILE": key,
    }
    for name, path in tls_files.items():
        if path is None:
            continue
        if url.startswith("redis://"):
            reader.problems.append(
                f"{reader.name(name)} is set but {reader.name('REDIS_URL')} is redis:// "
                "(plaintext): use rediss:// for TLS, or unset it"
            )
        elif not os.access(path, os.R_OK):
            reader.problems.append(f"{reader.name(name)}: {path} cannot be read")
    if mode == "single" and "," in url.partition("://")[2].partition("/")[0]:
        reader.problems.append(
            f"{reader.name('REDIS_URL')} names several hosts: set "
            f"{reader.name('REDIS_MODE')}=sentinel or cluster"
        )
    return RedisConfig(
        mode="sentinel" if mode == "sentinel" else "cluster" if mode == "cluster" else "single",
        url=url,
        sentinel_master=master,
        username=reader.raw("REDIS_USERNAME"),
        password=reader.secret("REDIS_PASSWORD"),
        sentinel_username=reader.raw("REDIS_SENTINEL_USERNAME"),
        sentinel_password=reader.secret("REDIS_SENTINEL_PASSWORD"),
        tls_ca_file=reader.raw("REDIS_TLS_CA_FILE"),
        tls_cert_file=cert,
        tls_key_file=key,
    )


def load_migration_settings(env: Mapping[str, str], *, service: str) -> CommonSettings:
    """What `migrate` needs: the database URL (and the profile, data folder and log
    settings it is read with); nothing the serving process needs (no keys, no TLS)."""
    reader = EnvReader(env, service.upper())
    common = load_common(
        reader, service=service, default_port=0, default_metrics_port=0, role="migrate"
    )
    reader.check()
    return common
