"""Run agent_svc: `python -m services.agent_svc [serve|migrate|worker [--once]]`.

(`watch-worker` is started by `serve` itself when AGENT_WATCH_WORKERS is set.)"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.agent_svc.bootstrap import (
    WATCH_WORKER_COMMAND,
    build_app,
    build_server,
    build_watch_worker,
)
from services.agent_svc.jobs import build_worker
from services.agent_svc.settings import load_agent_settings
from shared.rpc.entrypoint import run_service


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(
        service="agent",
        description="The agentplatform agent service",
        load_settings=load_agent_settings,
        build_server=lambda settings: build_server(build_app(settings)),
        build_worker=build_worker,
        argv=argv,
        other_servers={WATCH_WORKER_COMMAND: build_watch_worker},
    )


if __name__ == "__main__":
    sys.exit(main())
