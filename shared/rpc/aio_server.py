"""A grpc.aio server for long-lived streams, beside a service's sync server.

The sync `grpc.server` is the cheaper one for unary calls (DESIGN.md "Server model"), but
each message of a stream costs it thread wake-ups (~80 µs of server CPU per message,
`scripts/stream_cost.py`) where grpc.aio costs ~15-26 µs. `StreamServer` serves chosen
server-streaming methods from a grpc.aio server in the same process, on a port of its own:

- its event loop runs on one thread of its own, shared by every such server of the
  process (one loop; grpcio's asyncio support keeps per-process state);
- each method goes through the request path (`RequestPath.wrap_async_stream`: the same
  token check, statuses, request id, metrics and access log as on the main port);
- grpc.health.v1 Check answers from the main server's health servicer (the same
  readiness, NOT_SERVING while draining), and reflection lists the service, so grpcurl
  and probes work on this port as on the main one;
- the same TLS material, options and address as the main server; with `reuse_port`,
  SO_REUSEPORT, so that other processes of the service may serve the same port (the
  kernel spreads new connections over them).

`start()` / `stop(grace)` block the calling thread until the loop has done them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from shared.config.settings import CommonSettings
from shared.rpc.reflection import AsyncSourceReflectionServicer
from shared.rpc.request_path import RequestPath
from shared.rpc.server import HEALTH_SERVICE, server_credentials, server_options

__all__ = ["StreamServer", "event_loop"]

_log = logging.getLogger(__name__)

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def event_loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for grpc.aio servers, running on a daemon thread."""
    global _loop  # noqa: PLW0603 - one loop per process, made on first use
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True).start()
            _loop = loop
        return _loop


class _Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check answers what the main server's health servicer says (one truth per process)."""

    def __init__(self, main: health.HealthServicer) -> None:
        self._main = main

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        return self._main.Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "Health/Watch is served on the main port; use Check"
        )
        yield health_pb2.HealthCheckResponse()  # pragma: no cover - abort raises


class StreamServer:
    """A bound grpc.aio server for `methods` of `service` (see the module docstring)."""

    def __init__(
        self,
        settings: CommonSettings,
        *,
        port: int,
        service: str,
        methods: Mapping[str, grpc.RpcMethodHandler],
        request_path: RequestPath,
        health_servicer: health.HealthServicer,
        service_names: Sequence[str],
        reuse_port: bool = False,
    ) -> None:
        self._loop = event_loop()
        self._reuse_port = reuse_port
        self._methods = ", ".join(methods)
        wrapped = {
            name: request_path.wrap_async_stream(f"/{service}/{name}", handler)
            for name, handler in methods.items()
        }
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.address = f"{host}:{port}"
        self._server, self.port = self._run(
            self._build(settings, service, wrapped, health_servicer, service_names)
        )

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _build(
        self,
        settings: CommonSettings,
        service: str,
        wrapped: Mapping[str, grpc.RpcMethodHandler],
        health_servicer: health.HealthServicer,
        service_names: Sequence[str],
    ) -> tuple[grpc.aio.Server, int]:
        options = [
            (key, 1 if key == "grpc.so_reuseport" and self._reuse_port else value)
            for key, value in server_options(settings)
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        health_pb2_grpc.add_HealthServicer_to_server(_Health(health_servicer), server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            AsyncSourceReflectionServicer(
                (*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME)
            ),
            server,
        )
        credentials = server_credentials(settings)
        if credentials is None:
            port = server.add_insecure_port(self.address)
        else:
            port = server.add_secure_port(self.address, credentials)
        if port == 0:
            raise RuntimeError(f"cannot bind {self.address}")
        return server, port

    def start(self) -> None:
        self._run(self._server.start())
        _log.info("%s served on port %d (grpc.aio)", self._methods, self.port)

    def stop(self, grace: float) -> None:
        """No new calls; the calls still running get `grace` seconds, then are cancelled."""
        self._run(self._server.stop(grace))
