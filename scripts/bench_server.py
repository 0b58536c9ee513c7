"""Benchmark servers: the real agent_svc (or auth_svc) server plus an empty handler, and the
bare floor.

`python scripts/bench_server.py agent|auth [--cpu N]` builds the service exactly as its
composition root does and adds `/agentplatform.bench.v1.Bench/Empty`, a raw-bytes method
that passes through the same request path (token check, errors, logging, metrics) and
does nothing: the floor of our own stack.

`python scripts/bench_server.py bare --port P --response HEX [--cpu N]` is the bare floor
(DESIGN.md): a sync `grpc.server` with 32 threads and no interceptors whose GetAgent
returns a prebuilt GetAgentResponse (the serialized bytes given in hex, parsed once at
start), registered through the generated code like the real service. What our GetAgent
costs above it is everything we add per call.
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


def serve_bare(port: int, response: bytes) -> int:
    """The bare floor: no interceptors, 32 threads, a prebuilt response; until SIGTERM."""
    import signal
    import time
    from concurrent import futures

    from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    prebuilt = agent_pb2.GetAgentResponse.FromString(response)

    class Bare(agent_pb2_grpc.AgentServiceServicer):
        def GetAgent(self, request: Any, context: Any) -> Any:
            return prebuilt

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(Bare(), server)  # type: ignore[abstract]
    checker = health.HealthServicer()
    checker.set("agentplatform.agent.v1.AgentService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    received: list[int] = []  # a signal handler only appends: no locks in a handler
    signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    while not received:
        time.sleep(0.2)
    server.stop(0)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("service", choices=["agent", "auth", "bare"])
    parser.add_argument("--cpu", type=int, default=None, help="pin the server to this core")
    parser.add_argument("--port", type=int, default=0, help="bare: the port")
    parser.add_argument("--response", default="", help="bare: GetAgentResponse bytes, hex")
    args = parser.parse_args()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    if args.service == "bare":
        return serve_bare(args.port, bytes.fromhex(args.response))

    from shared.data import migrations
    from shared.rpc.lifecycle import serve
    from shared.rpc.logs import configure_logging

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
    running.registrar.add_registered_method_handlers(
        "agentplatform.bench.v1.Bench", {"Empty": grpc.unary_unary_rpc_method_handler(_empty)}
    )
    return serve(running, common)


if __name__ == "__main__":
    sys.exit(main())
