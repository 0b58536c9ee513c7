"""Run auth_svc: `python -m services.auth_svc [serve|migrate|worker [--once]]`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.auth_svc.bootstrap import build_app, build_server
from services.auth_svc.jobs import build_worker
from services.auth_svc.settings import load_auth_settings
from shared.rpc.entrypoint import run_service


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(
        service="auth",
        description="The agentplatform auth service",
        load_settings=load_auth_settings,
        build_server=lambda settings: build_server(build_app(settings)),
        build_worker=build_worker,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
