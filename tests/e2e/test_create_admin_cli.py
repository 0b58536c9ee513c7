"""`agentplatform-create-admin`: run as a process, the way a Kubernetes Job runs it, and
through `main()` in-process for the failure cases (each extra process costs a second)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from argon2 import PasswordHasher as Argon2Hasher

from services.auth_svc.bootstrap import build_app
from services.auth_svc.cli import main
from services.auth_svc.domain import ADMIN, USER, User
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from services.auth_svc.settings import load_auth_settings
from shared.data import migrations
from shared.data.db import make_engine, session_factory
from tests.helpers import ROOT
from tests.unit.auth.fakes import FakeHasher

pytestmark = pytest.mark.e2e

PASSWORD = "an admin's long password"
SCRIPT = Path(sys.executable).parent / "agentplatform-create-admin"


def run_cli(
    args: Sequence[str],
    env: dict[str, str],
    stdin: str = "",
    *,
    script: bool = False,
) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "services.auth_svc.cli"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
    return subprocess.run(
        [*command, *args],
        input=stdin,
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stored_user(database_url: str, email: str) -> User | None:
    engine = make_engine(database_url, pool_size=1)
    try:
        with SqlAuthUnitOfWork(session_factory(engine)) as uow:
            return uow.users.get_by_email(email)
    finally:
        engine.dispose()


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return {"AUTH_DATABASE_URL": database_url, "AUTH_DATA_DIR": str(tmp_path / "data")}


def assert_no_password(done: subprocess.CompletedProcess[str], password: str = PASSWORD) -> None:
    assert password not in done.stdout
    assert password not in done.stderr


def test_creates_an_admin_from_the_environment(env: dict[str, str], database_url: str) -> None:
    done = run_cli(
        ["--email", " Root@Example.com ", "--display-name", "Root", "--migrate"],
        {**env, "AUTH_ADMIN_PASSWORD": PASSWORD},
    )
    assert done.returncode == 0, done.stderr
    assert "created admin root@example.com" in done.stdout
    assert_no_password(done)
    user = stored_user(database_url, "root@example.com")
    assert user is not None
    assert set(user.roles) == {USER, ADMIN}
    assert user.display_name == "Root"
    assert Argon2Hasher().verify(user.password_hash, PASSWORD)


def test_reads_the_first_line_of_stdin(sqlite_url: str, tmp_path: Path) -> None:
    env = {"AUTH_DATABASE_URL": sqlite_url, "AUTH_DATA_DIR": str(tmp_path)}
    migrations.upgrade("auth", sqlite_url)
    done = run_cli(["--email", "ops@example.com"], env, stdin=f"{PASSWORD}\nignored\n", script=True)
    assert done.returncode == 0, done.stderr
    assert_no_password(done)
    user = stored_user(sqlite_url, "ops@example.com")
    assert user is not None
    assert set(user.roles) == {USER, ADMIN}
    assert Argon2Hasher().verify(user.password_hash, PASSWORD)


# -- the same command in-process (each extra process costs over a second of imports) ----


@dataclass
class Outcome:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Callable[..., Outcome]]:
    """`main(argv)` with a clean AUTH_* environment on a migrated SQLite database."""
    for name in [k for k in os.environ if k.startswith("AUTH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AUTH_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("AUTH_DATA_DIR", str(tmp_path))
    migrations.upgrade("auth", sqlite_url)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() configures logging

    def invoke(args: Sequence[str], stdin: str = "", **env: str) -> Outcome:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(list(args))
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    yield invoke
    root.handlers[:] = handlers
    root.setLevel(level)


def assert_clean_failure(outcome: Outcome, message: str) -> None:
    assert outcome.code == 1
    assert message in outcome.err
    assert "Traceback" not in outcome.err + outcome.out
    assert PASSWORD not in outcome.err + outcome.out


def test_a_rerun_for_an_existing_admin_succeeds_and_changes_nothing(
    cli: Callable[..., Outcome], sqlite_url: str
) -> None:
    assert cli(["--email", "root@example.com"], AUTH_ADMIN_PASSWORD=PASSWORD).code == 0
    before = stored_user(sqlite_url, "root@example.com")
    again = cli(["--email", "ROOT@example.com"], AUTH_ADMIN_PASSWORD="another password")
    assert again.code == 0
    assert "already an admin" in again.out
    assert stored_user(sqlite_url, "root@example.com") == before  # password left alone


def test_reads_a_mounted_password_file(
    cli: Callable[..., Outcome], sqlite_url: str, tmp_path: Path
) -> None:
    secret = tmp_path / "admin-password"
    secret.write_text(PASSWORD + "\n")  # as `kubectl create secret --from-file` often has it
    assert cli(["--email", "file@example.com"], AUTH_ADMIN_PASSWORD_FILE=str(secret)).code == 0
    user = stored_user(sqlite_url, "file@example.com")
    assert user is not None
    assert Argon2Hasher().verify(user.password_hash, PASSWORD)


@pytest.mark.parametrize(
    "args",
    [
        ["--email", "x@example.com", "--password", PASSWORD],
        ["--email", "x@example.com", f"--password={PASSWORD}"],
        ["--email", "x@example.com", "-p", PASSWORD],
    ],
)
def test_a_password_on_the_command_line_is_refused(
    cli: Callable[..., Outcome], sqlite_url: str, args: list[str]
) -> None:
    outcome = cli(args, stdin=PASSWORD)
    assert_clean_failure(outcome, "never taken from the command line")
    assert stored_user(sqlite_url, "x@example.com") is None


SECRET = "Tr0ub4dor&3 'quoted'"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--email", "x@example.com", SECRET], "unrecognized arguments: <value hidden>"),
        ([SECRET, "--email", "x@example.com"], "unrecognized arguments: <value hidden>"),
        ([f"--pw={SECRET}", "--email", "x@example.com"], "unrecognized arguments"),
        ([f"--e={SECRET}", "--email", "x@example.com"], "unrecognized arguments"),
        ([f"-x{SECRET}", "--email", "x@example.com"], "unrecognized arguments"),
        (["--email", "x@example.com", f"--migrate={SECRET}"], "--migrate: ignored explicit"),
        (["--email", "x@example.com", f"-h{SECRET}"], "-h/--help: ignored explicit"),
        (["--email", "x@example.com", "--migrate", SECRET], "unrecognized arguments"),
        (["--email", "x@example.com", "--display-name"], "--display-name: expected one"),
        (["--email", "x@example.com", "--display-name", "Ada", SECRET, "more"], "<value hidden>"),
        (["--email", "x@example.com", "e"], "unrecognized"),  # a one-letter value
        (["--email", "x@example.com", "secret\nline two"], "unrecognized"),
    ],
)
def test_a_usage_error_never_shows_an_argument_value(
    cli: Callable[..., Outcome], sqlite_url: str, args: list[str], message: str
) -> None:
    outcome = cli(args, AUTH_ADMIN_PASSWORD=PASSWORD)
    assert_clean_failure(outcome, message)
    assert "see --help" in outcome.err
    shown = outcome.out + outcome.err
    for token in args:
        if token not in ("--email", "--display-name", "--migrate", "e"):
            for fragment in (token, token.partition("=")[2], token[2:], repr(token)[1:-1]):
                assert len(fragment) < 3 or fragment not in shown, fragment
    assert SECRET not in shown
    assert "Tr0ub4dor" not in shown
    assert stored_user(sqlite_url, "x@example.com") is None


def test_usage_errors_from_the_process_hide_values_too(env: dict[str, str]) -> None:
    done = run_cli(["--email", "x@example.com", SECRET], {**env, "AUTH_ADMIN_PASSWORD": PASSWORD})
    assert done.returncode == 1
    assert "unrecognized arguments: <value hidden>" in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "Tr0ub4dor" not in done.stdout + done.stderr


def test_refuses_to_promote_an_existing_plain_user(
    cli: Callable[..., Outcome], sqlite_url: str
) -> None:
    app = build_app(load_auth_settings(os.environ), hasher=FakeHasher())
    try:
        app.service.register(email="taken@example.com", password="someone else", display_name="")
    finally:
        app.close()
    outcome = cli(["--email", "taken@example.com"], AUTH_ADMIN_PASSWORD=PASSWORD)
    assert_clean_failure(outcome, "exists without the admin role")
    assert "--promote" in outcome.err
    user = stored_user(sqlite_url, "taken@example.com")
    assert user is not None
    assert user.roles == (USER,)


def test_promote_gives_an_existing_user_the_admin_role_and_audits_it(
    cli: Callable[..., Outcome], sqlite_url: str
) -> None:
    app = build_app(load_auth_settings(os.environ), hasher=FakeHasher())
    try:
        app.service.register(
            email="ops@example.com", password="their own password", display_name=""
        )
    finally:
        app.close()
    before = stored_user(sqlite_url, "ops@example.com")
    outcome = cli(["--email", "OPS@example.com", "--promote"])  # no password asked for
    assert outcome.code == 0, outcome.err
    assert "promoted ops@example.com" in outcome.out
    user = stored_user(sqlite_url, "ops@example.com")
    assert user is not None
    assert before is not None
    assert set(user.roles) == {USER, ADMIN}
    assert user.password_hash == before.password_hash
    again = cli(["--email", "ops@example.com", "--promote"])
    assert again.code == 0
    assert "already an admin" in again.out
    engine = make_engine(sqlite_url, pool_size=1)
    try:
        with SqlAuthUnitOfWork(session_factory(engine)) as uow:
            (event,) = uow.audit.page(user_id=user.id, kind="user_updated", limit=10)
    finally:
        engine.dispose()
    assert event.actor == "operator:create-admin"
    assert event.detail == {"fields": "roles", "roles": "user,admin"}


def test_in_prod_it_needs_only_the_database(cli: Callable[..., Outcome], sqlite_url: str) -> None:
    """No signing key, client-secret key, Redis or TLS: what the serving process needs.
    (SQLite is refused in prod, so the database check itself is what fails here.)"""
    outcome = cli(["--email", "a@example.com"], AUTH_PROFILE="prod", AUTH_ADMIN_PASSWORD=PASSWORD)
    assert_clean_failure(outcome, "AUTH_DATABASE_URL must be PostgreSQL in prod")
    for needless in ("SIGNING_KEY", "CLIENT_SECRET_KEY", "REDIS_URL", "TLS"):
        assert needless not in outcome.err


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--email", "a@example.com"], {}, "no password"),
        (["--email", "a@example.com"], {"AUTH_ADMIN_PASSWORD": "short"}, "at least 8"),
        (["--email", "not-an-email"], {"AUTH_ADMIN_PASSWORD": PASSWORD}, "valid email"),
        ([], {"AUTH_ADMIN_PASSWORD": PASSWORD}, "--email"),
        (
            ["--email", "a@example.com", "--bogus"],
            {"AUTH_ADMIN_PASSWORD": PASSWORD},
            "unrecognized arguments: <value hidden>",
        ),
        (
            ["--email", "a@example.com"],
            {"AUTH_PROFILE": "prod", "AUTH_DATABASE_URL": ""},
            "AUTH_DATABASE_URL is required",
        ),
        (["--email", "nobody@example.com", "--promote"], {}, "no user nobody@example.com"),
        (
            ["--email", "a@example.com"],
            {"AUTH_ADMIN_PASSWORD": PASSWORD, "AUTH_ADMIN_PASSWORD_FILE": "/x"},
            "not both",
        ),
    ],
)
def test_failures_exit_1_with_one_clear_line(
    cli: Callable[..., Outcome], args: list[str], env: dict[str, str], message: str
) -> None:
    assert_clean_failure(cli(args, **env), message)


def test_a_missing_schema_suggests_migrate(tmp_path: Path, cli: Callable[..., Outcome]) -> None:
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    outcome = cli(
        ["--email", "a@example.com"], AUTH_DATABASE_URL=empty, AUTH_ADMIN_PASSWORD=PASSWORD
    )
    assert_clean_failure(outcome, "--migrate")
    assert (
        cli(
            ["--email", "a@example.com", "--migrate"],
            AUTH_DATABASE_URL=empty,
            AUTH_ADMIN_PASSWORD=PASSWORD,
        ).code
        == 0
    )


def test_in_prod_the_database_url_is_enough(postgres_url: str) -> None:
    done = run_cli(
        ["--email", "root@example.com", "--migrate"],
        {
            "AUTH_PROFILE": "prod",
            "AUTH_DATABASE_URL": postgres_url,
            "AUTH_ADMIN_PASSWORD": PASSWORD,
            "AUTH_LOG_FORMAT": "text",
        },
    )
    assert done.returncode == 0, done.stderr
    assert "created admin root@example.com" in done.stdout
    user = stored_user(postgres_url, "root@example.com")
    assert user is not None
    assert ADMIN in user.roles
