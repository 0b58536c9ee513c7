"""AGENT_* settings: defaults, lists, and what the prod profile insists on."""

from __future__ import annotations

import pytest

from services.agent_svc.settings import DEFAULT_ALLOWED_MODELS, load_agent_settings
from shared.config.settings import ConfigError

PROD = {
    "AGENT_PROFILE": "prod",
    "AGENT_ALLOW_PLAINTEXT": "true",
    "AGENT_DATABASE_URL": "postgresql://db/agent",
    "AGENT_REDIS_URL": "redis://cache:6379/0",
}


def test_dev_defaults() -> None:
    settings = load_agent_settings({})
    assert settings.common.port == 50052
    assert settings.common.metrics_port == 9102
    assert settings.auth_target == "127.0.0.1:50051"
    assert (settings.issuer, settings.audience) == ("agentplatform-auth", "agentplatform")
    assert settings.allowed_models == DEFAULT_ALLOWED_MODELS
    assert (settings.l1_max_entries, settings.l1_ttl_seconds, settings.l2_ttl_seconds) == (
        10_000,
        30.0,
        300.0,
    )
    assert settings.jwks_cooldown_seconds == 30.0
    assert settings.request_id_ttl_seconds == 86_400.0
    assert settings.max_agents_per_owner == 10_000
    assert settings.auth_tls_ca_file is None
    assert len(settings.page_token_secret) >= 32


def test_watch_defaults_and_overrides() -> None:
    settings = load_agent_settings({})
    assert settings.watch_retention_seconds == 3_600.0
    assert settings.watch_max_streams == 1_000
    assert settings.watch_heartbeat_seconds == 15.0
    assert settings.watch_poll_seconds == 1.0
    assert settings.watch_batch_seconds == 0.05
    assert settings.watch_send_slots == 1
    assert settings.watch_port == 50053
    changed = load_agent_settings(
        {
            "AGENT_WATCH_RETENTION_SECONDS": "7200",
            "AGENT_WATCH_MAX_STREAMS": "50",
            "AGENT_WATCH_HEARTBEAT_SECONDS": "5",
            "AGENT_WATCH_POLL_SECONDS": "0.5",
            "AGENT_WATCH_BATCH_SECONDS": "0",
            "AGENT_WATCH_SEND_SLOTS": "2",
            "AGENT_WATCH_PORT": "0",
        }
    )
    assert (changed.watch_retention_seconds, changed.watch_max_streams) == (7_200.0, 50)
    assert (changed.watch_heartbeat_seconds, changed.watch_poll_seconds) == (5.0, 0.5)
    assert (changed.watch_batch_seconds, changed.watch_send_slots) == (0.0, 2)
    assert changed.watch_port == 0  # a free port
    for name, bad in (
        ("AGENT_WATCH_RETENTION_SECONDS", "10"),  # shorter than a minute
        ("AGENT_WATCH_MAX_STREAMS", "0"),
        ("AGENT_WATCH_SEND_SLOTS", "0"),
        ("AGENT_WATCH_BATCH_SECONDS", "1.5"),  # a rest that long delays a revocation
        ("AGENT_WATCH_PORT", "-1"),
        ("AGENT_WATCH_PORT", "50052"),  # the main port's
    ):
        with pytest.raises(ConfigError, match=name):
            load_agent_settings({name: bad})


def test_the_request_id_ttl_is_set_in_seconds_and_positive() -> None:
    settings = load_agent_settings({"AGENT_REQUEST_ID_TTL_SECONDS": "3600"})
    assert settings.request_id_ttl_seconds == 3_600.0
    with pytest.raises(ConfigError, match="AGENT_REQUEST_ID_TTL_SECONDS"):
        load_agent_settings({"AGENT_REQUEST_ID_TTL_SECONDS": "0"})


def test_the_agent_quota_is_a_count_and_zero_means_none() -> None:
    assert load_agent_settings({"AGENT_MAX_AGENTS_PER_OWNER": "0"}).max_agents_per_owner == 0
    for bad in ("-1", "ten"):
        with pytest.raises(ConfigError, match="AGENT_MAX_AGENTS_PER_OWNER"):
            load_agent_settings({"AGENT_MAX_AGENTS_PER_OWNER": bad})


def test_dev_page_token_secrets_differ_per_start() -> None:
    assert load_agent_settings({}).page_token_secret != load_agent_settings({}).page_token_secret


def test_allowed_models_is_a_comma_list() -> None:
    settings = load_agent_settings({"AGENT_ALLOWED_MODELS": " a-model , b-model ,, "})
    assert settings.allowed_models == ("a-model", "b-model")


def test_prod_requires_a_page_token_secret() -> None:
    with pytest.raises(ConfigError, match="AGENT_PAGE_TOKEN_SECRET"):
        load_agent_settings(PROD)
    settings = load_agent_settings({**PROD, "AGENT_PAGE_TOKEN_SECRET": "s" * 32})
    assert settings.page_token_secret == b"s" * 32


def test_prod_takes_the_secret_from_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "secret"
    secret.write_text("f" * 40 + "\n")
    settings = load_agent_settings({**PROD, "AGENT_PAGE_TOKEN_SECRET_FILE": str(secret)})
    assert settings.page_token_secret == b"f" * 40


def test_short_secrets_and_empty_model_lists_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_settings({"AGENT_PAGE_TOKEN_SECRET": "short", "AGENT_ALLOWED_MODELS": ","})
    assert "AGENT_PAGE_TOKEN_SECRET" in str(caught.value)
    assert "AGENT_ALLOWED_MODELS" in str(caught.value)


def test_tls_to_auth_settings() -> None:
    plain = load_agent_settings({})
    assert not plain.auth_uses_tls
    assert (plain.auth_tls_cert_file, plain.auth_tls_key_file) == (None, None)
    assert plain.auth_tls_server_name is None
    assert load_agent_settings({"AGENT_AUTH_TLS_CA_FILE": "/tls/ca.crt"}).auth_uses_tls
    mtls = load_agent_settings(
        {
            "AGENT_AUTH_TLS_CERT_FILE": "/tls/tls.crt",
            "AGENT_AUTH_TLS_KEY_FILE": "/tls/tls.key",
            "AGENT_AUTH_TLS_SERVER_NAME": "auth-svc.agentplatform.svc",
        }
    )
    assert mtls.auth_uses_tls  # a client certificate alone means TLS, with the system CAs
    assert (mtls.auth_tls_cert_file, mtls.auth_tls_key_file) == ("/tls/tls.crt", "/tls/tls.key")
    assert mtls.auth_tls_server_name == "auth-svc.agentplatform.svc"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"AGENT_AUTH_TLS_CERT_FILE": "/tls/tls.crt"}, "set both AGENT_AUTH_TLS_CERT_FILE"),
        ({"AGENT_AUTH_TLS_KEY_FILE": "/tls/tls.key"}, "set both AGENT_AUTH_TLS_CERT_FILE"),
        ({"AGENT_AUTH_TLS_SERVER_NAME": "auth"}, "AGENT_AUTH_TLS_SERVER_NAME needs TLS"),
    ],
)
def test_incomplete_tls_to_auth_settings_are_refused(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_agent_settings(env)


def test_a_read_replica_is_optional_and_must_be_postgresql_beside_postgresql() -> None:
    assert load_agent_settings({}).database_read_url is None
    replica = "postgresql://replica/agent"
    prod = {**PROD, "AGENT_PAGE_TOKEN_SECRET": "s" * 32}
    settings = load_agent_settings({**prod, "AGENT_DATABASE_READ_URL": replica})
    assert settings.database_read_url == replica
    worker = load_agent_settings({**prod, "AGENT_DATABASE_READ_URL": replica}, "worker")
    assert worker.database_read_url is None  # the worker's jobs read and write the primary
    with pytest.raises(ConfigError) as caught:
        load_agent_settings({**prod, "AGENT_DATABASE_READ_URL": "sqlite:///replica.db"})
    assert "AGENT_DATABASE_READ_URL must be a PostgreSQL URL" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_agent_settings({"AGENT_DATABASE_READ_URL": replica})  # beside dev's SQLite
    assert "AGENT_DATABASE_READ_URL must be a PostgreSQL URL" in str(caught.value)


def test_watch_workers_are_off_by_default_and_need_redis_to_hear_commits() -> None:
    assert load_agent_settings({}).watch_workers == 0
    redis = {"AGENT_REDIS_URL": "redis://cache:6379/0"}
    assert load_agent_settings({**redis, "AGENT_WATCH_WORKERS": "3"}).watch_workers == 3
    with pytest.raises(ConfigError, match="AGENT_WATCH_WORKERS needs AGENT_REDIS_URL"):
        load_agent_settings({"AGENT_WATCH_WORKERS": "1"})
    for bad in ("-1", "65", "two"):
        with pytest.raises(ConfigError, match="AGENT_WATCH_WORKERS"):
            load_agent_settings({**redis, "AGENT_WATCH_WORKERS": bad})
