"""The command line of a service: `python -m services.<name>_svc [serve|migrate]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, Protocol, TypeVar

from shared.config.settings import CommonSettings, ConfigError
from shared.data import migrations
from shared.rpc.lifecycle import EXIT_FORCED, serve
from shared.rpc.logs import configure_logging
from shared.rpc.server import RunningServer

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
    load_settings: Callable[[Mapping[str, str]], S],
    build_server: Callable[[S], RunningServer],
    argv: Sequence[str] | None = None,
) -> int:
    """Reads settings (exit 2 with every problem listed), migrates if asked or configured,
    then serves until SIGTERM/SIGINT; returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"{service}_svc", description=description)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    args = parser.parse_args(argv)
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        print(f"{service}_svc: {exc}", file=sys.stderr)
        return 2
    common = settings.common
    configure_logging(service=service, level=common.log_level, fmt=common.log_format)
    try:
        if args.command == "migrate" or common.migrate_on_start:
            migrations.upgrade(service, common.database_url)
            _log.info("%s migrations applied", service)
            if args.command == "migrate":
                return 0
        running = build_server(settings)
    except KeyboardInterrupt:  # Ctrl-C while starting: nothing to drain yet
        _log.info("%s interrupted while starting", service)
        return EXIT_FORCED
    _exit(serve(running, common))
