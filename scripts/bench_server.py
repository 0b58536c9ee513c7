"""Benchmark server: the real agent_svc (or auth_svc) server, plus an empty handler.

`python scripts/bench_server.py agent|auth [--cpu N]` builds the service exactly as its
composition root does and adds `/agentplatform.bench.v1.Bench/Empty`, a raw-bytes method
that passes through the same interceptors (token check, errors, logging, metrics) and
does nothing: the floor the benchmark compares real handlers with.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc

EMPTY_METHOD = "/agentplatform.bench.v1.Bench/Empty"


def _empty(request: bytes, context: Any) -> bytes:
    return b""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("service", choices=["agent", "auth"])
    parser.add_argument("--cpu", type=int, default=None, help="pin the server to this core")
    args = parser.parse_args()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})

    from shared.data import migrations
    from shared.rpc.logs import configure_logging
    from shared.rpc.server import serve

    if args.service == "agent":
        from services.agent_svc.bootstrap import build_app, build_server
        from services.agent_svc.settings import load_agent_settings as load
    else:
        from services.auth_svc.bootstrap import build_app, build_server  # type: ignore[assignment]
        from services.auth_svc.settings import load_auth_settings as load  # type: ignore[assignment]

    settings = load(os.environ)
    common = settings.common
    configure_logging(service=args.service, level=common.log_level, fmt=common.log_format)
    migrations.upgrade(args.service, common.database_url)
    running = build_server(build_app(settings))
    running.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "agentplatform.bench.v1.Bench",
                {"Empty": grpc.unary_unary_rpc_method_handler(_empty)},
            ),
        )
    )
    serve(running, common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
