"""Run auth_svc: `python -m services.auth_svc [serve|migrate]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from services.auth_svc.bootstrap import build_app, build_server
from services.auth_svc.settings import load_auth_settings
from shared import migrations
from shared.logs import configure_logging
from shared.server import serve
from shared.settings import ConfigError

_log = logging.getLogger("services.auth_svc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="auth_svc", description="The agentplatform auth service")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    args = parser.parse_args(argv)
    try:
        settings = load_auth_settings(os.environ)
    except ConfigError as exc:
        print(f"auth_svc: {exc}", file=sys.stderr)
        return 2
    common = settings.common
    configure_logging(service="auth", level=common.log_level, fmt=common.log_format)
    if args.command == "migrate" or common.migrate_on_start:
        migrations.upgrade("auth", common.database_url)
        _log.info("migrations applied")
        if args.command == "migrate":
            return 0
    app = build_app(settings)
    serve(build_server(app), common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
