"""auth_svc settings: AUTH_* environment variables."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.auth_svc import PUBLIC_METHOD_NAMES
from services.auth_svc.infra.keys import key_material_problems
from services.auth_svc.infra.keystore import parse_keks
from shared.config.settings import CommonSettings, EnvReader, Role, load_common
from shared.rpc.ratelimit import Limit, parse_limits

__all__ = [
    "AuthSettings",
    "load_auth_settings",
    "load_or_create_dev_kek",
    "load_or_create_dev_secret",
]


@dataclass(frozen=True, slots=True)
class AuthSettings:
    common: CommonSettings
    issuer: str
    audience: str
    access_token_ttl_seconds: int
    refresh_token_ttl_seconds: int
    refresh_reuse_grace_seconds: float
    password_min_length: int
    login_max_failures: int
    login_lockout_seconds: int
    hash_concurrency: int
    hash_queue: int
    signing_key_pem: str | None
    verify_keys_pem: str | None
    rate_limits: dict[str, Limit]
    client_secret_key: bytes | None
    client_failure_limit: Limit
    audit_retention_days: int
    key_encryption_keys: dict[str, bytes] | None
    """None only in the dev profile (bootstrap then makes one in the data folder)."""
    key_rotation_days: float
    key_publish_ahead_seconds: float


# Per client address, for the public methods: RATE calls per second sustained, BURST at once.
DEFAULT_RATE_LIMITS = (
    "Register=2/10,Login=10/50,RefreshToken=20/100,Logout=20/100,GetJwks=50/200,IssueToken=50/200"
)
# Failed IssueToken attempts per client id: 5 at once, then one every 5 seconds.
DEFAULT_CLIENT_FAILURE_LIMIT = "0.2/5"
MIN_CLIENT_SECRET_KEY = 32
DEV_CLIENT_SECRET_KEY_FILE = "auth-client-secret-key"
DEV_KEK_FILE = "auth-key-encryption-key"


def _client_secret_key(
    reader: EnvReader, common: CommonSettings, *, required: bool
) -> bytes | None:
    """The HMAC key of stored client secrets; None only in the dev profile (bootstrap then
    creates one in the data folder, see load_or_create_dev_secret)."""
    key = reader.secret("CLIENT_SECRET_KEY")
    if key is not None:
        key = key.strip()
        if len(key) < MIN_CLIENT_SECRET_KEY:
            reader.problems.append(
                f"{reader.name('CLIENT_SECRET_KEY')} must be at least "
                f"{MIN_CLIENT_SECRET_KEY} characters"
            )
        return key.encode()
    if common.profile == "prod" and required:
        reader.require("CLIENT_SECRET_KEY", "in the prod profile (or AUTH_CLIENT_SECRET_KEY_FILE)")
    return None


def _dev_file(path: Path, make: Callable[[], str]) -> str:
    """The dev profile's value kept in `path`: made once (mode 0600), then reused; two dev
    processes starting together agree on it (the file is created exclusively)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process of the dev setup made it first
        else:
            with os.fdopen(fd, "w") as out:
                out.write(make())
    return path.read_text().strip()


def load_or_create_dev_secret(data_dir: Path) -> bytes:
    """The dev profile's client-secret key (client secrets survive a restart)."""
    return _dev_file(
        data_dir / DEV_CLIENT_SECRET_KEY_FILE, lambda: secrets.token_urlsafe(48)
    ).encode()


def _key_encryption_keys(
    reader: EnvReader, common: CommonSettings, *, required: bool
) -> dict[str, bytes] | None:
    """`AUTH_KEY_ENCRYPTION_KEYS`: `id:base64key,…` (32 bytes each; the first encrypts)."""
    text = reader.secret("KEY_ENCRYPTION_KEYS")
    if text is None:
        if common.profile == "prod" and required:
            reader.require(
                "KEY_ENCRYPTION_KEYS", "in the prod profile (or AUTH_KEY_ENCRYPTION_KEYS_FILE)"
            )
        return None
    try:
        return parse_keks(text)
    except ValueError as exc:
        reader.problems.append(f"{reader.name('KEY_ENCRYPTION_KEYS')}: {exc}")
        return None


def load_or_create_dev_kek(data_dir: Path) -> dict[str, bytes]:
    """The dev profile's key-encryption key (the signing keys in the dev database)."""
    return parse_keks(
        _dev_file(
            data_dir / DEV_KEK_FILE,
            lambda: "dev:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        )
    )


def _client_failure_limit(reader: EnvReader) -> Limit:
    text = reader.text("CLIENT_FAILURE_LIMIT", DEFAULT_CLIENT_FAILURE_LIMIT)
    try:
        return parse_limits(f"IssueToken={text}")["IssueToken"]
    except ValueError:
        reader.problems.append(
            f"{reader.name('CLIENT_FAILURE_LIMIT')}: expected RATE/BURST, got {text!r}"
        )
        return parse_limits(f"IssueToken={DEFAULT_CLIENT_FAILURE_LIMIT}")["IssueToken"]


def _rate_limits(reader: EnvReader) -> dict[str, Limit]:
    text = reader.text("RATE_LIMITS", DEFAULT_RATE_LIMITS)
    if text.lower() == "none":
        return {}
    try:
        limits = parse_limits(text)
    except ValueError as exc:
        reader.problems.append(f"{reader.name('RATE_LIMITS')}: {exc}")
        return parse_limits(DEFAULT_RATE_LIMITS)
    unknown = set(limits) - PUBLIC_METHOD_NAMES
    if unknown:
        reader.problems.append(
            f"{reader.name('RATE_LIMITS')} names methods that are not public: "
            + ", ".join(sorted(unknown))
        )
    return limits


def load_auth_settings(env: Mapping[str, str], role: Role = "serve") -> AuthSettings:
    """Reads AUTH_* variables for the role (the worker needs no signing key, no client-secret
    key, no Redis and no TLS); raises ConfigError listing every problem."""
    reader = EnvReader(env, "AUTH")
    common = load_common(
        reader, service="auth", default_port=50051, default_metrics_port=9101, role=role
    )
    serving = role == "serve"
    # The keys live in the database (encrypted under the KEKs); an environment key is
    # imported on the first start only. Read only to serve (its files need not be mounted
    # in the worker's pod).
    signing_key = (reader.secret("SIGNING_KEY", optional_file=True) or None) if serving else None
    # Dedicated low-priority hashing threads (argon2id: tens of ms of a core, 19 MiB each).
    hash_concurrency = reader.integer("HASH_CONCURRENCY", 2, minimum=1)
    settings = AuthSettings(
        common=common,
        issuer=reader.text("ISSUER", "agentplatform-auth"),
        audience=reader.text("AUDIENCE", "agentplatform"),
        access_token_ttl_seconds=reader.integer("ACCESS_TOKEN_TTL_SECONDS", 900, minimum=30),
        refresh_token_ttl_seconds=reader.integer(
            "REFRESH_TOKEN_TTL_SECONDS", 30 * 24 * 3600, minimum=60
        ),
        refresh_reuse_grace_seconds=reader.number("REFRESH_REUSE_GRACE_SECONDS", 5.0),
        password_min_length=reader.integer("PASSWORD_MIN_LENGTH", 8, minimum=8),
        login_max_failures=reader.integer("LOGIN_MAX_FAILURES", 10, minimum=1),
        login_lockout_seconds=reader.integer("LOGIN_LOCKOUT_SECONDS", 900, minimum=1),
        hash_concurrency=hash_concurrency,
        # Hashes that may wait for a hashing thread; beyond them, HASHING_BUSY at once.
        # Each waiting hash holds a gRPC worker thread: as many as run, so that a flood
        # holds at most 2 x AUTH_HASH_CONCURRENCY of the worker threads, briefly.
        hash_queue=reader.integer("HASH_QUEUE", hash_concurrency, minimum=0),
        signing_key_pem=signing_key,
        # Empty (a verify-keys.pem with nothing in it yet) is none.
        verify_keys_pem=(reader.secret("VERIFY_KEYS", optional_file=True) or None)
        if serving
        else None,
        rate_limits=_rate_limits(reader),
        client_secret_key=_client_secret_key(reader, common, required=serving),
        client_failure_limit=_client_failure_limit(reader),
        # Audit events older than this are purged by the worker; 0 keeps them forever.
        audit_retention_days=reader.integer("AUDIT_RETENTION_DAYS", 365, minimum=0),
        key_encryption_keys=_key_encryption_keys(reader, common, required=role != "cli"),
        key_rotation_days=reader.number("KEY_ROTATION_DAYS", 30.0, minimum=0.0),
        # Longer than verifiers take to see a new key in the JWKS (agent_svc refetches it
        # every 5 minutes): 10 minutes.
        key_publish_ahead_seconds=reader.number("KEY_PUBLISH_AHEAD_SECONDS", 600.0, minimum=0.0),
    )
    reader.problems += key_material_problems(settings.signing_key_pem, settings.verify_keys_pem)
    if settings.password_min_length > 128:
        reader.problems.append("AUTH_PASSWORD_MIN_LENGTH must be at most 128")
    reader.check()
    return settings
