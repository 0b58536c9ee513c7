"""Run agent_svc: `python -m services.agent_svc [serve|migrate]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from services.agent_svc.bootstrap import build_app, build_server
from services.agent_svc.settings import load_agent_settings
from shared import migrations
from shared.logs import configure_logging
from shared.server import serve
from shared.settings import ConfigError

_log = logging.getLogger("services.agent_svc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agent_svc", description="The agentplatform agent service"
    )
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    args = parser.parse_args(argv)
    try:
        settings = load_agent_settings(os.environ)
    except ConfigError as exc:
        print(f"agent_svc: {exc}", file=sys.stderr)
        return 2
    common = settings.common
    configure_logging(service="agent", level=common.log_level, fmt=common.log_format)
    if args.command == "migrate" or common.migrate_on_start:
        migrations.upgrade("agent", common.database_url)
        _log.info("migrations applied")
        if args.command == "migrate":
            return 0
    app = build_app(settings)
    serve(build_server(app), common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
