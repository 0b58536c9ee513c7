"""The `migrate` and `worker` commands as an operator (or a Kubernetes Job) runs them.

python -m services.auth_svc migrate          # only AUTH_DATABASE_URL is needed
python -m services.auth_svc worker --once    # one pass of the background jobs
python -m services.auth_svc worker           # a pass every AUTH_WORKER_INTERVAL_SECONDS
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from services.auth_svc.domain import USER, RefreshToken, User
from services.auth_svc.repository.models import RefreshTokenRow
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from shared.data.db import make_engine, session_factory
from tests.helpers import ROOT, STARTUP_DEADLINE, ServiceProcess, free_port


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "AGENT_"))}
    return {**env, **settings}


def command(service: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"services.{service}", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=STARTUP_DEADLINE,
        check=False,
    )


def seed_expired_tokens(url: str, count: int) -> None:
    engine = make_engine(url)
    now = datetime.now(UTC)
    user = User(uuid.uuid4(), f"{uuid.uuid4().hex}@example.com", "x", (USER,), False, "h", now, now)
    with SqlAuthUnitOfWork(session_factory(engine)) as uow:
        uow.users.add(user)
        family = uuid.uuid4()
        uow.refresh_tokens.add_family(family, user.id, now)
        for n in range(count):
            uow.refresh_tokens.add(
                RefreshToken(
                    uuid.uuid4(), family, user.id, f"{n:064x}", now, now - timedelta(seconds=1)
                )
            )
        uow.commit()
    engine.dispose()


def tokens_left(url: str) -> int:
    engine = make_engine(url)
    with session_factory(engine)() as session:
        left = int(session.scalar(select(func.count()).select_from(RefreshTokenRow)) or 0)
    engine.dispose()
    return left


@pytest.mark.parametrize("service", ["auth", "agent"])
def test_migrate_in_prod_needs_only_the_database_url(
    service: str, new_postgres_database: Callable[[], str]
) -> None:
    prefix = service.upper()
    url = new_postgres_database()
    done = command(
        f"{service}_svc",
        "migrate",
        env=clean_env(**{f"{prefix}_PROFILE": "prod", f"{prefix}_DATABASE_URL": url}),
    )
    assert done.returncode == 0, done.stderr
    assert f"{service} migrations applied" in done.stderr + done.stdout
    missing = command(f"{service}_svc", "migrate", env=clean_env(**{f"{prefix}_PROFILE": "prod"}))
    assert missing.returncode == 2
    assert f"{prefix}_DATABASE_URL is required" in missing.stderr
    assert "SIGNING_KEY" not in missing.stderr
    assert "REDIS_URL" not in missing.stderr


def test_one_worker_pass_purges_expired_refresh_tokens(tmp_path: Path) -> None:
    """One pass (a CronJob, or by hand beside a running `scripts/run`) serves no HTTP: the
    metrics port being taken by the running service does not stop it."""
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            AUTH_DATABASE_URL=url, AUTH_DATA_DIR=str(tmp_path), AUTH_METRICS_PORT=str(port)
        )
        assert command("auth_svc", "migrate", env=env).returncode == 0
        seed_expired_tokens(url, 3)
        done = command("auth_svc", "worker", "--once", env=env)
    assert done.returncode == 0, done.stderr
    assert "job auth.refresh_tokens.purge: done" in done.stderr
    assert "tokens_deleted=3" in done.stderr
    assert tokens_left(url) == 0


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 (loopback)
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_worker_loop_in_prod_exports_its_passes_and_stops_on_sigterm(
    tmp_path: Path, new_postgres_database: Callable[[], str]
) -> None:
    url = new_postgres_database()
    metrics_port = free_port()
    env = clean_env(
        AUTH_PROFILE="prod",  # no signing key, no client-secret key, no Redis, no TLS
        AUTH_DATABASE_URL=url,
        # The key-encryption key: the worker rotates and re-seals the signing keys.
        AUTH_KEY_ENCRYPTION_KEYS="k1:" + base64.b64encode(os.urandom(32)).decode(),
        AUTH_METRICS_PORT=str(metrics_port),
        AUTH_WORKER_INTERVAL_SECONDS="1",
        AUTH_LOG_FORMAT="text",
    )
    assert command("auth_svc", "migrate", env=env).returncode == 0
    seed_expired_tokens(url, 2)
    worker = ServiceProcess("auth_svc", env, metrics_port, tmp_path / "worker.log", ["worker"])
    try:
        worker.wait_logged("job auth.refresh_tokens.purge: done")
        worker.wait_logged("job auth.login_attempts.purge: done")  # a whole pass ended
        status, body = get(f"http://127.0.0.1:{metrics_port}/healthz")
        assert (status, body) == (200, "ok\n")
        status, text = get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        purged = 'job="auth.refresh_tokens.purge",kind="tokens_deleted"} 2.0'
        assert f"agentplatform_job_items_total{{{purged}" in text
        assert 'agentplatform_job_last_success_timestamp_seconds{job="auth.audit.purge"}' in text
        assert tokens_left(url) == 0
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(STARTUP_DEADLINE) == 0
        assert "worker stopping" in worker.log()
    finally:
        worker.stop()


def test_the_local_run_command_runs_the_jobs_in_process(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = clean_env(
        AUTH_PORT=str(port),
        AUTH_METRICS_PORT=str(metrics_port),
        AUTH_DATA_DIR=str(tmp_path),
        AUTH_WORKER_IN_PROCESS="true",
    )
    server = ServiceProcess("auth_svc", env, port, tmp_path / "auth.log")
    try:
        server.wait_serving("agentplatform.auth.v1.AuthService")
        server.wait_logged("job auth.login_attempts.purge: done")
        status, text = get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        assert 'agentplatform_job_runs_total{job="auth.audit.purge",result="success"} 1.0' in text
    finally:
        assert server.stop() == 0
