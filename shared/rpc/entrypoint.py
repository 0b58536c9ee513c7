"""The command line of a service: `python -m services.<name>_svc [serve|migrate|worker]`.

- `serve` (the default): the gRPC server (migrating first if `*_MIGRATE_ON_START`);
- `migrate`: applies the service's migrations and exits; reads only what it needs (the
  database URL, profile and logging: `load_migration_settings`), so a migration Job gets
  no keys and no Redis;
- `worker [--once]`: the background jobs (shared.rpc.worker);
- a service's own serving commands (`other_servers`: agent_svc's `watch-worker`), which
  serve like `serve` but are built otherwise, with settings of their own (the builder
  returns the server and the settings it is served with: a worker's shutdown delay, say),
  log as `<service>-<command>`, and never migrate.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, Protocol, TypeVar

from shared.config.settings import CommonSettings, ConfigError, Role, load_migration_settings
from shared.data import migrations
from shared.data.jobs import Worker
from shared.rpc.lifecycle import EXIT_FORCED, serve
from shared.rpc.logs import configure_logging
from shared.rpc.observability import Observability
from shared.rpc.server import RunningServer
from shared.rpc.worker import run_worker

__all__ = ["ServiceSettings", "run_service"]


def _exit(code: int) -> NoReturn:
    """Ends the process once serving is over. Not through the interpreter's shutdown: it
    joins every worker thread of the server's pool, and a thread stuck in a call to a
    frozen database (which a forced stop leaves behind) would hold the exit forever."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_log = logging.getLogger(__name__)


class ServiceSettings(Protocol):
    @property
    def common(self) -> CommonSettings: ...


S = TypeVar("S", bound=ServiceSettings)


def run_service(
    *,
    service: str,
    description: str,
    load_settings: Callable[[Mapping[str, str], Role], S],
    build_server: Callable[[S], RunningServer],
    build_worker: Callable[[S], tuple[Worker, Observability]],
    argv: Sequence[str] | None = None,
    other_servers: Mapping[str, Callable[[S], tuple[RunningServer, CommonSettings]]] | None = None,
) -> int:
    """Reads settings (exit 2 with every problem listed), then migrates, runs the worker, or
    (migrating first if configured) serves until SIGTERM/SIGINT; returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"{service}_svc", description=description)
    others = dict(other_servers or {})
    parser.add_argument(
        "command", nargs="?", default="serve", choices=["serve", "migrate", "worker", *others]
    )
    parser.add_argument("--once", action="store_true", help="worker: one pass, then exit")
    args = parser.parse_args(argv)
    if args.command == "migrate":
        return _migrate(service)
    role: Role = "worker" if args.command == "worker" else "serve"
    try:
        settings = load_settings(os.environ, role)
    except ConfigError as exc:
        print(f"{service}_svc: {exc}", file=sys.stderr)
        return 2
    common = settings.common
    configure_logging(
        service=f"{service}-{args.command}" if args.command in others else service,
        level=common.log_level,
        fmt=common.log_format,
    )
    if args.command == "worker":
        worker, observability = build_worker(settings)
        return run_worker(worker, observability, once=args.once)
    try:
        if args.command in others:
            running, common = others[args.command](settings)
        else:
            if common.migrate_on_start:
                migrations.upgrade(service, common.database_url)
                _log.info("%s migrations applied", service)
            running = build_server(settings)
    except KeyboardInterrupt:  # Ctrl-C while starting: nothing to drain yet
        _log.info("%s interrupted while starting", service)
        return EXIT_FORCED
    _exit(serve(running, common))


def _migrate(service: str) -> int:
    try:
        common = load_migration_settings(os.environ, service=service)
    except ConfigError as exc:
        print(f"{service}_svc: {exc}", file=sys.stderr)
        return 2
    configure_logging(service=service, level=common.log_level, fmt=common.log_format)
    migrations.upgrade(service, common.database_url)
    _log.info("%s migrations applied", service)
    return 0
