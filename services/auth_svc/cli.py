"""Create an admin account: `python -m services.auth_svc.cli --email X [--display-name Y]`,
or promote an existing user: `… --email X --promote`.

Installed as the console script `agentplatform-create-admin`; made to run as a Kubernetes Job.

- Settings are the server's AUTH_* variables, of which it reads only what it uses: the
  database URL (with the profile, the password policy and logging). No signing key, no
  client-secret key, no Redis, no TLS. `--migrate` applies the auth migrations first;
  without it the schema must already exist (the server or the migration Job made it).
- The password comes from AUTH_ADMIN_PASSWORD, or from the file named by
  AUTH_ADMIN_PASSWORD_FILE (a mounted Secret; one trailing newline is dropped), or else from
  the first line of stdin (a hidden prompt on a terminal). Never from the command line:
  arguments show up in `ps`, shell history and Job specs, so `--password` is refused.
- Idempotent for re-run Jobs: if the account exists and already has the admin role, nothing
  changes (the stored password is left alone) and the exit code is 0. If it exists without
  the admin role the command fails unless `--promote` says to promote it: anyone may
  register an address, and promoting that account by accident would hand the admin role
  to whoever registered it first. `--promote` changes only the roles (no password is read)
  and is audited (`user_updated`, actor `operator:create-admin`).

A usage error names the options it is about but never an argument value: a password typed
on the command line by mistake (`--email x@y secret`) is shown as "<value hidden>".

Exit codes: 0 created, or already an admin; 1 anything else, with a one-line reason on
stderr (never a traceback, never the password).
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.auth_svc.domain import ADMIN, USER, AuditEvent, AuditKind, User
from services.auth_svc.infra.hashing import HashPool
from services.auth_svc.infra.limiter import InMemoryLoginLimiter
from services.auth_svc.infra.passwords import Argon2PasswordHasher
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from services.auth_svc.service.auth_service import AuthPolicy, AuthService
from services.auth_svc.service.ports import PasswordHasher
from services.auth_svc.service.validation import normalize_email
from services.auth_svc.settings import AuthSettings, load_auth_settings
from shared.config.clock import SystemClock
from shared.config.settings import ConfigError
from shared.data import migrations
from shared.data.db import make_engine, session_factory
from shared.rpc.errors import AlreadyExists, DomainError
from shared.rpc.logs import configure_logging

__all__ = ["main"]

PROG = "agentplatform-create-admin"
PASSWORD_ENV = "AUTH_ADMIN_PASSWORD"
PASSWORD_FILE_ENV = "AUTH_ADMIN_PASSWORD_FILE"
EXIT_OK = 0
EXIT_FAILED = 1


class CliError(Exception):
    """A failure the operator can act on; the message is printed as is."""


class _UsageError(Exception):
    """argparse's complaint, before the argument values are taken out of it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


HIDDEN = "<value hidden>"


def _hide_values(message: str, argv: Sequence[str], option_names: Collection[str]) -> str:
    """The message with every argv token that is not an option name replaced by HIDDEN.

    argparse quotes what it did not understand (`unrecognized arguments: secret`,
    `ignored explicit argument 'secret'`), and a mistyped password is exactly such a
    token. Besides each whole token, the value part of `--name=value` and of `-xvalue`
    (what argparse quotes as an explicit argument) and their repr() spellings are hidden,
    wherever they stand apart from letters and digits (as argparse puts them: between
    spaces or quotes), so a one-letter value does not blot out the words of the message.
    One pass, longest first, so option names that contain a hidden fragment stay readable.
    """
    fragments: set[str] = set()
    for token in argv:
        if token in option_names:
            continue
        parts = {token, token.partition("=")[2]}
        if token.startswith("-") and not token.startswith("--"):
            parts.add(token[2:])
        fragments |= {spelling for part in parts for spelling in (part, repr(part)[1:-1])}
    fragments.discard("")
    if not fragments:
        return message
    names = set(option_names)
    alternatives = sorted(fragments | names, key=len, reverse=True)
    either = "|".join(re.escape(text) for text in alternatives)
    pattern = re.compile(f"(?<![0-9A-Za-z])(?:{either})(?![0-9A-Za-z])")
    return pattern.sub(lambda m: m.group() if m.group() in names else HIDDEN, message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Create an admin account in the auth database. The password is read from "
            f"{PASSWORD_ENV} ({PASSWORD_FILE_ENV}) or from the first line of stdin."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("--email", required=True, help="the admin's email address")
    parser.add_argument("--display-name", default="", help="defaults to the email's local part")
    parser.add_argument(
        "--migrate", action="store_true", help="apply the auth migrations before creating"
    )
    parser.add_argument(
        "--promote",
        action="store_true",
        help="give an existing user the admin role (no password is read or changed)",
    )
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser()
    try:
        return parser.parse_args(list(argv))
    except _UsageError as exc:
        names = {name for action in parser._actions for name in action.option_strings}
        raise CliError(f"{_hide_values(str(exc), argv, names)} (see --help)") from None


def _refuse_password_arguments(argv: Sequence[str]) -> None:
    # Checked before argparse, to say why rather than "unrecognized arguments".
    if any(arg.startswith(("--pass", "-p")) for arg in argv):
        raise CliError(
            "passwords are never taken from the command line: "
            f"set {PASSWORD_ENV} (or {PASSWORD_FILE_ENV}) or write it to stdin"
        )


def read_password(env: Mapping[str, str], stdin: TextIO) -> str:
    """The password from the environment, a mounted file, or the first line of stdin."""
    inline, path = env.get(PASSWORD_ENV), env.get(PASSWORD_FILE_ENV)
    if inline and path:
        raise CliError(f"set {PASSWORD_ENV} or {PASSWORD_FILE_ENV}, not both")
    if inline:
        return inline
    if path:
        try:
            return _strip_line_end(Path(path).read_text())
        except OSError as exc:
            raise CliError(f"{PASSWORD_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Repeat password: "):
            raise CliError("the passwords differ")
        return password
    password = _strip_line_end(stdin.readline())
    if not password:
        raise CliError(f"no password: set {PASSWORD_ENV} or write it to stdin")
    return password


def _strip_line_end(text: str) -> str:
    """The first line without its line ending (other whitespace is part of the password)."""
    return text.split("\n", 1)[0].removesuffix("\r")


ACTOR = "operator:create-admin"


def create_admin(
    settings: AuthSettings,
    *,
    email: str,
    display_name: str,
    password: str,
    hasher: PasswordHasher | None = None,
) -> str:
    """Creates the admin (or finds it already there); returns what happened, for the operator."""
    engine = make_engine(settings.common.database_url, pool_size=2)
    pool = None
    if hasher is None:
        pool = HashPool(concurrency=1, queue=1)
        hasher = Argon2PasswordHasher(pool)
    try:
        service = AuthService(
            uow=lambda: SqlAuthUnitOfWork(session_factory(engine)),
            hasher=hasher,
            limiter=InMemoryLoginLimiter(
                max_failures=1, lockout_seconds=1, monotonic=time.monotonic
            ),
            tokens=None,  # registers only: issues no token
            clock=SystemClock(),
            policy=AuthPolicy(password_min_length=settings.password_min_length),
        )
        try:
            user = service.register(
                email=email, password=password, display_name=display_name, admin=True
            )
        except AlreadyExists:
            existing = _user_by_email(engine, email)
            if existing is None or ADMIN not in existing.roles:
                raise CliError(
                    f"{normalize_email(email)} exists without the admin role; not promoting "
                    "an account that anyone could have registered (--promote does, if you "
                    "mean it)"
                ) from None
            return f"{existing.email} is already an admin (id {existing.id}); nothing changed"
        return f"created admin {user.email} (id {user.id})"
    finally:
        if pool is not None:
            pool.close()
        engine.dispose()


def promote(settings: AuthSettings, *, email: str) -> str:
    """Gives an existing user the admin role (their tokens carry the new role once renewed)."""
    engine = make_engine(settings.common.database_url, pool_size=2)
    try:
        with SqlAuthUnitOfWork(session_factory(engine)) as uow:
            found = uow.users.get_by_email(normalize_email(email))
            user = uow.users.lock(found.id) if found is not None else None
            if user is None:
                raise CliError(f"no user {normalize_email(email)} to promote")
            if ADMIN in user.roles:
                return f"{user.email} is already an admin (id {user.id}); nothing changed"
            now = SystemClock().now()
            promoted = User(
                id=user.id,
                email=user.email,
                display_name=user.display_name,
                roles=(USER, ADMIN),
                disabled=user.disabled,
                password_hash=user.password_hash,
                create_time=user.create_time,
                update_time=now,
            )
            uow.users.save(promoted)
            uow.audit.record(
                AuditEvent(
                    kind=AuditKind.USER_UPDATED,
                    time=now,
                    user_id=user.id,
                    email=user.email,
                    detail={"fields": "roles", "roles": "user,admin"},
                    actor=ACTOR,
                )
            )
            uow.commit()
        return f"promoted {user.email} (id {user.id}) to admin"
    finally:
        engine.dispose()


def _user_by_email(engine: Engine, email: str) -> User | None:
    with SqlAuthUnitOfWork(session_factory(engine)) as uow:
        return uow.users.get_by_email(normalize_email(email))


def _database_problem(exc: SQLAlchemyError) -> str:
    # The driver's own first line: never the statement or its parameters (a password hash).
    original = getattr(exc, "orig", None) or exc
    first = (str(original).strip().splitlines() or [type(original).__name__])[0]
    return f"database error: {first}"


def run(argv: Sequence[str], env: Mapping[str, str], stdin: TextIO, stdout: TextIO) -> int:
    """The command, with its inputs explicit; raises CliError for the operator to read."""
    _refuse_password_arguments(argv)
    args = _parse(argv)
    try:
        settings = load_auth_settings(env, role="cli")
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    password = "" if args.promote else read_password(env, stdin)
    common = settings.common
    configure_logging(service="auth-create-admin", level=common.log_level, fmt=common.log_format)
    try:
        if args.migrate:
            migrations.upgrade("auth", common.database_url)
        if args.promote:
            outcome = promote(settings, email=args.email)
        else:
            outcome = create_admin(
                settings, email=args.email, display_name=args.display_name, password=password
            )
    except DomainError as exc:
        raise CliError(exc.message) from None
    except SQLAlchemyError as exc:
        hint = "" if args.migrate else " (is the schema there? --migrate applies it)"
        raise CliError(_database_problem(exc) + hint) from None
    print(outcome, file=stdout)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv, os.environ, sys.stdin, sys.stdout)
    except CliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
    except Exception as exc:  # a clear line, not a trace: this runs in Job logs
        print(f"{PROG}: failed: {type(exc).__name__}", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
