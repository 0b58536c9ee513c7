"""Settings: working dev defaults; prod refuses to start without real infrastructure."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.auth_svc.settings import load_auth_settings, load_or_create_dev_secret
from shared.config.settings import ConfigError, EnvReader, RedisConfig, load_migration_settings
from shared.data.db import normalize_url
from shared.data.redis_client import parse_redis_url

PROD = {
    "AUTH_PROFILE": "prod",
    "AUTH_DATABASE_URL": "postgresql://auth@db:5432/auth",
    "AUTH_REDIS_URL": "redis://redis:6379/0",
    "AUTH_ALLOW_PLAINTEXT": "true",
    "AUTH_CLIENT_SECRET_KEY": "a-client-secret-key-of-at-least-32-chars",
    "AUTH_KEY_ENCRYPTION_KEYS": "k1:" + base64.b64encode(bytes(range(32))).decode(),
    "AUTH_SIGNING_KEY": ed25519.Ed25519PrivateKey.generate()
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode(),
}


def test_unusable_key_material_is_a_configuration_problem_not_a_crash() -> None:
    message = problems({**PROD, "AUTH_SIGNING_KEY": "not a key", "AUTH_VERIFY_KEYS": "nope"})
    assert "AUTH_SIGNING_KEY is not a usable PEM private key" in message
    assert "AUTH_VERIFY_KEYS holds no PEM public key" in message
    assert "not a key" not in message


def problems(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as excinfo:
        load_auth_settings(env)
    return str(excinfo.value)


def test_dev_defaults_need_no_environment(tmp_path: Path) -> None:
    settings = load_auth_settings({"AUTH_DATA_DIR": str(tmp_path)})
    common = settings.common
    assert common.profile == "dev"
    assert common.database_url == f"sqlite:///{tmp_path / 'auth.db'}"
    assert common.redis_url is None
    assert common.host == "127.0.0.1"
    assert common.port == 50051
    assert common.migrate_on_start
    assert common.log_format == "text"
    assert common.tls_cert_file is None
    assert settings.signing_key_pem is None  # a dev key is created in the data folder
    assert settings.access_token_ttl_seconds == 900
    assert settings.password_min_length == 8
    assert settings.login_max_failures == 10
    assert settings.login_lockout_seconds == 900
    assert 0 < settings.refresh_reuse_grace_seconds <= 10


def test_dev_data_dir_defaults_to_a_local_folder() -> None:
    settings = load_auth_settings({})
    assert settings.common.data_dir == Path(".data").absolute()


def test_a_complete_prod_environment_loads() -> None:
    settings = load_auth_settings(PROD)
    common = settings.common
    assert common.profile == "prod"
    assert common.database_url == PROD["AUTH_DATABASE_URL"]
    assert common.redis_url == PROD["AUTH_REDIS_URL"]
    assert common.host == "0.0.0.0"  # noqa: S104
    assert not common.migrate_on_start
    assert common.log_format == "json"
    assert settings.signing_key_pem == PROD["AUTH_SIGNING_KEY"].strip()


@pytest.mark.parametrize(
    "missing",
    [
        "AUTH_DATABASE_URL",
        "AUTH_REDIS_URL",
        "AUTH_CLIENT_SECRET_KEY",
        "AUTH_KEY_ENCRYPTION_KEYS",
    ],
)
def test_prod_refuses_to_start_without(missing: str) -> None:
    env = {k: v for k, v in PROD.items() if k != missing}
    assert missing in problems(env)


def test_prod_takes_the_signing_key_from_a_mounted_file(tmp_path: Path) -> None:
    key_file = tmp_path / "signing-key.pem"
    key_file.write_text(PROD["AUTH_SIGNING_KEY"] + "\n")  # as `kubectl create secret` leaves it
    env = {k: v for k, v in PROD.items() if k != "AUTH_SIGNING_KEY"}
    settings = load_auth_settings({**env, "AUTH_SIGNING_KEY_FILE": str(key_file)})
    assert settings.signing_key_pem == PROD["AUTH_SIGNING_KEY"].strip()


def test_a_secret_file_loses_its_trailing_newline(tmp_path: Path) -> None:
    url_file = tmp_path / "database-url"
    url_file.write_text("postgresql://auth@db:5432/auth\n")
    env = {k: v for k, v in PROD.items() if k != "AUTH_DATABASE_URL"}
    settings = load_auth_settings({**env, "AUTH_DATABASE_URL_FILE": str(url_file)})
    assert settings.common.database_url == "postgresql://auth@db:5432/auth"


def test_an_unreadable_secret_file_is_reported(tmp_path: Path) -> None:
    message = problems({**PROD, "AUTH_DATABASE_URL_FILE": str(tmp_path / "absent")})
    assert "AUTH_DATABASE_URL_FILE: cannot read" in message


def test_a_signing_key_given_twice_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "signing-key.pem"
    key_file.write_text("PEM")
    message = problems({**PROD, "AUTH_SIGNING_KEY_FILE": str(key_file)})
    assert "not both" in message


def test_sqlite_is_refused_in_prod() -> None:
    message = problems({**PROD, "AUTH_DATABASE_URL": "sqlite:////var/lib/auth.db"})
    assert "AUTH_DATABASE_URL must be PostgreSQL in prod" in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("AUTH_PORT", "fifty", "AUTH_PORT must be an integer, got 'fifty'"),
        ("AUTH_MAX_WORKERS", "0", "AUTH_MAX_WORKERS must be at least 1, got 0"),
        ("AUTH_ACCESS_TOKEN_TTL_SECONDS", "1.5", "must be an integer"),
        ("AUTH_PASSWORD_MIN_LENGTH", "4", "AUTH_PASSWORD_MIN_LENGTH must be at least 8"),
        ("AUTH_PASSWORD_MIN_LENGTH", "129", "AUTH_PASSWORD_MIN_LENGTH must be at most 128"),
        ("AUTH_REFRESH_REUSE_GRACE_SECONDS", "soon", "must be a number"),
        ("AUTH_MIGRATE_ON_START", "maybe", "must be true or false"),
        ("AUTH_PROFILE", "staging", "AUTH_PROFILE must be dev or prod"),
        ("AUTH_LOG_FORMAT", "xml", "AUTH_LOG_FORMAT must be text or json"),
    ],
)
def test_bad_values_are_reported_by_name(name: str, value: str, expected: str) -> None:
    assert expected in problems({name: value})


def test_a_grace_of_zero_is_allowed() -> None:
    settings = load_auth_settings({"AUTH_REFRESH_REUSE_GRACE_SECONDS": "0"})
    assert settings.refresh_reuse_grace_seconds == 0


def test_tls_needs_both_certificate_and_key() -> None:
    assert "TLS_CERT_FILE and AUTH_TLS_KEY_FILE" in problems({"AUTH_TLS_CERT_FILE": "/tls/tls.crt"})


def test_a_client_ca_without_a_server_certificate_is_refused() -> None:
    # It used to be ignored: the server listened in plaintext, believing itself mTLS.
    message = problems({"AUTH_TLS_CLIENT_CA_FILE": "/tls/ca.crt"})
    assert "AUTH_TLS_CLIENT_CA_FILE (mTLS) needs a server certificate" in message


def test_prod_serves_plaintext_only_when_told_to() -> None:
    plaintext = {k: v for k, v in PROD.items() if k != "AUTH_ALLOW_PLAINTEXT"}
    assert "the prod profile serves TLS" in problems(plaintext)
    assert load_auth_settings(PROD).common.allow_plaintext
    with_tls = {**plaintext, "AUTH_TLS_CERT_FILE": "/tls/tls.crt", "AUTH_TLS_KEY_FILE": "/k"}
    assert load_auth_settings(with_tls).common.tls_cert_file == "/tls/tls.crt"
    assert load_auth_settings({}).common.allow_plaintext  # dev: plaintext on localhost


def test_the_shutdown_delay_is_a_moment_in_prod_and_none_in_dev() -> None:
    assert load_auth_settings(PROD).common.shutdown_delay_seconds == 2.0
    assert load_auth_settings({}).common.shutdown_delay_seconds == 0.0
    custom = load_auth_settings({"AUTH_SHUTDOWN_DELAY_SECONDS": "5"})
    assert custom.common.shutdown_delay_seconds == 5.0


def test_every_problem_is_listed_at_once() -> None:
    message = problems(
        {
            "AUTH_PROFILE": "prod",
            "AUTH_PORT": "x",
            "AUTH_LOGIN_MAX_FAILURES": "0",
            "AUTH_GRACE_SECONDS": "later",
        }
    )
    for expected in (
        "AUTH_DATABASE_URL is required",
        "AUTH_REDIS_URL is required",
        "AUTH_CLIENT_SECRET_KEY is required",
        "AUTH_KEY_ENCRYPTION_KEYS is required",
        "AUTH_PORT must be an integer",
        "AUTH_LOGIN_MAX_FAILURES must be at least 1",
        "AUTH_GRACE_SECONDS must be a number",
        "the prod profile serves TLS",
    ):
        assert expected in message
    assert message.count("\n  ") == 8


def test_blank_values_count_as_unset() -> None:
    settings = load_auth_settings({"AUTH_PORT": "  ", "AUTH_DATABASE_URL": ""})
    assert settings.common.port == 50051
    assert settings.common.database_url.startswith("sqlite:///")


def test_env_reader_items_split_on_commas() -> None:
    reader = EnvReader({"X_HOSTS": " a, b ,,c "}, "X")
    assert reader.items("HOSTS", ()) == ("a", "b", "c")
    assert reader.items("OTHER", ("d",)) == ("d",)


def test_observability_settings() -> None:
    common = load_auth_settings({}).common
    assert (common.metrics_port, common.otlp_endpoint) == (9101, None)
    assert common.trace_service_name == "auth-svc"
    common = load_auth_settings(
        {
            "AUTH_METRICS_PORT": "0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_SERVICE_NAME": "auth-eu",
        }
    ).common
    assert common.metrics_port == 0
    assert common.otlp_endpoint == "http://collector:4317"
    assert common.trace_service_name == "auth-eu"
    # The service's own variable wins over the standard one.
    common = load_auth_settings(
        {"AUTH_OTLP_ENDPOINT": "mine:4317", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4317"}
    ).common
    assert common.otlp_endpoint == "mine:4317"


def test_the_database_statement_timeout_defaults_to_ten_seconds() -> None:
    env = {"AUTH_PROFILE": "dev"}
    assert load_auth_settings(env).common.db_statement_timeout_seconds == 10.0
    env["AUTH_DB_STATEMENT_TIMEOUT_SECONDS"] = "2.5"
    assert load_auth_settings(env).common.db_statement_timeout_seconds == 2.5


def test_the_client_secret_key_is_long_enough_and_made_once_in_dev(tmp_path: Path) -> None:
    short = problems({**PROD, "AUTH_CLIENT_SECRET_KEY": "short"})
    assert "AUTH_CLIENT_SECRET_KEY must be at least 32 characters" in short
    dev = load_auth_settings({"AUTH_DATA_DIR": str(tmp_path)})
    assert dev.client_secret_key is None  # made by bootstrap, in the data folder
    first = load_or_create_dev_secret(tmp_path)
    assert len(first) >= 32
    assert load_or_create_dev_secret(tmp_path) == first
    assert (tmp_path / "auth-client-secret-key").stat().st_mode & 0o077 == 0


def test_the_worker_in_prod_needs_the_database_and_the_key_encryption_keys() -> None:
    env = {
        "AUTH_PROFILE": "prod",
        "AUTH_DATABASE_URL": "postgresql://auth@db:5432/auth",
        "AUTH_KEY_ENCRYPTION_KEYS": PROD["AUTH_KEY_ENCRYPTION_KEYS"],
        # Named in the ConfigMap but not mounted in a worker's pod: never read.
        "AUTH_SIGNING_KEY_FILE": "/nonexistent/signing-key.pem",
    }
    settings = load_auth_settings(env, "worker")
    assert settings.signing_key_pem is None
    assert settings.common.role == "worker"
    assert "AUTH_REDIS_URL is required" in problems(env)  # serving needs more
    without = {k: v for k, v in env.items() if k != "AUTH_KEY_ENCRYPTION_KEYS"}
    with pytest.raises(ConfigError, match="AUTH_KEY_ENCRYPTION_KEYS is required"):
        load_auth_settings(without, "worker")  # it rotates and re-seals the signing keys


def test_key_encryption_keys_are_checked() -> None:
    for bad, why in (
        ("k1", "id:base64key"),
        ("k1:not base64!", "not base64"),
        ("k1:" + base64.b64encode(b"short").decode(), "must be 32 bytes"),
        ("k1:{0},k1:{0}".format(base64.b64encode(bytes(32)).decode()), "appears twice"),
    ):
        assert why in problems({**PROD, "AUTH_KEY_ENCRYPTION_KEYS": bad})
    new, old = (base64.b64encode(key).decode() for key in (bytes(32), bytes(range(32))))
    two = f"new:{new},old:{old}"
    keks = load_auth_settings({**PROD, "AUTH_KEY_ENCRYPTION_KEYS": two}).key_encryption_keys
    assert keks is not None
    assert list(keks) == ["new", "old"]  # the first encrypts


def test_migration_settings_need_only_the_database_url() -> None:
    common = load_migration_settings(
        {"AUTH_PROFILE": "prod", "AUTH_DATABASE_URL": "postgresql://a@db/a"}, service="auth"
    )
    assert common.database_url.startswith("postgresql")
    with pytest.raises(ConfigError) as caught:
        load_migration_settings({"AUTH_PROFILE": "prod"}, service="auth")
    assert str(caught.value).count("\n  ") == 1
    assert "AUTH_DATABASE_URL is required" in str(caught.value)


def test_an_empty_or_absent_key_file_is_no_key(tmp_path: Path) -> None:
    """The Secret with the signing key is optional (imported on the first start only), and
    its verify-keys.pem may be empty: neither stops the service."""
    empty = tmp_path / "verify-keys.pem"
    empty.write_text("\n")
    settings = load_auth_settings(
        {
            **PROD,
            "AUTH_SIGNING_KEY": "",
            "AUTH_SIGNING_KEY_FILE": str(tmp_path / "absent" / "signing-key.pem"),
            "AUTH_VERIFY_KEYS_FILE": str(empty),
        }
    )
    assert settings.signing_key_pem is None
    assert settings.verify_keys_pem is None


def test_redis_topologies_are_configured_by_variables_alone(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("a CA certificate")
    single = load_auth_settings(PROD).common.redis
    assert single == RedisConfig(mode="single", url="redis://redis:6379/0")
    sentinel = load_auth_settings(
        {
            **PROD,
            "AUTH_REDIS_MODE": "sentinel",
            "AUTH_REDIS_URL": "rediss://s1:26379,s2:26379,s3:26379/2",
            "AUTH_REDIS_SENTINEL_MASTER": "mymaster",
            "AUTH_REDIS_USERNAME": "auth",
            "AUTH_REDIS_PASSWORD": "secret",
            "AUTH_REDIS_TLS_CA_FILE": str(ca),
        }
    ).common.redis
    assert sentinel is not None
    assert (sentinel.mode, sentinel.sentinel_master, sentinel.username) == (
        "sentinel",
        "mymaster",
        "auth",
    )
    assert sentinel.password == "secret"
    assert sentinel.tls_ca_file == str(ca)
    cluster = load_auth_settings(
        {**PROD, "AUTH_REDIS_MODE": "cluster", "AUTH_REDIS_URL": "redis://n1:6379,n2:6379"}
    ).common.redis
    assert cluster == RedisConfig(mode="cluster", url="redis://n1:6379,n2:6379")


def test_a_redis_topology_that_cannot_work_is_refused() -> None:
    message = problems({**PROD, "AUTH_REDIS_MODE": "sentinel"})
    assert "AUTH_REDIS_SENTINEL_MASTER is required with REDIS_MODE=sentinel" in message
    assert "AUTH_REDIS_MODE must be single, sentinel or cluster" in problems(
        {**PROD, "AUTH_REDIS_MODE": "replicated"}
    )
    assert "names several hosts" in problems({**PROD, "AUTH_REDIS_URL": "redis://a:1,b:2/0"})
    assert "must start with redis:// or rediss://" in problems(
        {**PROD, "AUTH_REDIS_URL": "http://redis:6379"}
    )
    assert "AUTH_REDIS_TLS_KEY_FILE (a client certificate)" in problems(
        {**PROD, "AUTH_REDIS_TLS_CERT_FILE": "/tls/client.crt"}
    )
    # TLS material that cannot work: a file that cannot be read, or TLS files beside a
    # plaintext URL (they would be ignored: the traffic would not be encrypted).
    missing = problems(
        {
            **PROD,
            "AUTH_REDIS_URL": "rediss://redis:6379/0",
            "AUTH_REDIS_TLS_CA_FILE": "/nonexistent/ca.crt",
        }
    )
    assert "AUTH_REDIS_TLS_CA_FILE: /nonexistent/ca.crt cannot be read" in missing
    plaintext = problems({**PROD, "AUTH_REDIS_TLS_CA_FILE": "/nonexistent/ca.crt"})
    assert "AUTH_REDIS_TLS_CA_FILE is set but AUTH_REDIS_URL is redis://" in plaintext
    # The pooler setting means PgBouncer in front of PostgreSQL.
    assert "AUTH_DB_TRANSACTION_POOLER applies to PostgreSQL" in problems(
        {"AUTH_DB_TRANSACTION_POOLER": "true"}
    )


def test_redis_urls_name_hosts_credentials_and_database() -> None:
    parsed = parse_redis_url("rediss://user:p%40ss@h1:7000,[::1]:7001,h3/4")
    assert parsed.tls
    assert parsed.hosts == (("h1", 7000), ("::1", 7001), ("h3", 6379))
    assert (parsed.db, parsed.username, parsed.password) == (4, "user", "p@ss")
    assert parse_redis_url("redis://:only-password@h").password == "only-password"
    with pytest.raises(ValueError, match="at least one host"):
        parse_redis_url("redis:///0")


def test_a_multi_host_postgresql_url_becomes_repeated_host_parameters() -> None:
    assert normalize_url(
        "postgresql://app:pw@db-a:5432,db-b:5433/agents?target_session_attrs=read-write"
    ) == (
        "postgresql+psycopg://app:pw@/agents?host=db-a:5432&host=db-b:5433"
        "&target_session_attrs=read-write"
    )
    assert normalize_url("postgres://db-a,db-b/agents") == (
        "postgresql+psycopg:///agents?host=db-a&host=db-b"
    )
    assert normalize_url("postgresql://app@db:5432/agents") == (
        "postgresql+psycopg://app@db:5432/agents"
    )
