"""gRPC server bootstrap shared by both services.

`create_server()` builds and binds a server (port 0 picks a free port, for tests): the
service's handlers and the library's health and reflection services, each wrapped once by
the request path (shared.rpc.request_path). `serve()` (shared.rpc.lifecycle) runs it until
SIGTERM/SIGINT.

Health (grpc.health.v1):
- "" is SERVING from start until the shutdown begins: the process is alive (liveness).
- Each service name reports **readiness**: what this process itself can do (started, its
  own prerequisites such as verification keys loaded, not draining). A shared dependency
  being down must not take every replica out of its Service at once: a database outage
  leaves cache hits and published keys servable.
- Each dependency has a name of its own ("database"): SERVING while its last check
  passed, for operators and dashboards (also the `agentplatform_dependency_up` metric).
- Health checks run on a small thread pool of their own and, with `HEALTH_PORT`, on a
  plaintext server of their own (own completion queue, threads and concurrency limit),
  so a probe is answered while the worker threads are saturated.

Shutdown (`RunningServer.shutdown`): NOT_SERVING at once while calls are still served for
`shutdown_delay` seconds (load balancers and clients watching health move away), then no
new calls (GOAWAY), in-flight calls get `grace` seconds to finish, the ones that do not
are ended with UNAVAILABLE (their database statements cancelled) so clients retry
elsewhere, and after a last short margin grpcio cancels whatever is left.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from shared.config.settings import CommonSettings
from shared.rpc.reflection import SourceReflectionServicer
from shared.rpc.request_path import InFlight, RequestPath

__all__ = [
    "HandlerRegistrar",
    "RunningServer",
    "create_server",
    "server_credentials",
    "server_options",
    "transport_of",
]

_log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
OVERALL = ""
# What the calls still running at the end of the grace period get to end by themselves
# (with UNAVAILABLE) before grpcio cancels them.
END_MARGIN_SECONDS = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HandlerRegistrar:
    """Stands in for a grpc.Server while generated code (`add_XServicer_to_server`),
    the health service and reflection register their handlers: each handler is wrapped
    by the request path, then registered on the real server."""

    def __init__(self, server: grpc.Server, path: RequestPath) -> None:
        self._server = server
        self._path = path
        self.service_names: list[str] = []

    def add_registered_method_handlers(
        self, service_name: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {
            name: self._path.wrap(f"/{service_name}/{name}", handler)
            for name, handler in handlers.items()
        }
        self._server.add_registered_method_handlers(service_name, wrapped)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, wrapped),)
        )
        self.service_names.append(service_name)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Generated code registers each service twice (generic and registered): the
        registered form above covers it. A handler registered only this way (a method
        table of its own) is wrapped per method on first use."""
        for handler in handlers:
            if getattr(handler, "_name", None) in self.service_names:
                continue
            self._server.add_generic_rpc_handlers((_WrappedGeneric(handler, self._path),))


class _WrappedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, inner: grpc.GenericRpcHandler, path: RequestPath) -> None:
        self._inner = inner
        self._path = path
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}
        self._lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        try:
            return self._wrapped[method]
        except KeyError:
            pass
        handler = self._inner.service(details)
        wrapped = None if handler is None else self._path.wrap(method, handler)
        with self._lock:
            self._wrapped.setdefault(method, wrapped)
        return wrapped


def transport_of(settings: CommonSettings) -> str:
    """plaintext, TLS, or mTLS (TLS that requires client certificates)."""
    if not settings.tls_cert_file:
        return "plaintext"
    return "mTLS" if settings.tls_client_ca_file else "TLS"


@dataclass
class RunningServer:
    """A bound (not yet started) server with its health servicer and bound port."""

    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: Sequence[str]
    is_ready: Callable[[], bool]
    registrar: HandlerRegistrar
    in_flight: InFlight
    transport: str = "plaintext"
    health_server: grpc.Server | None = None
    health_port: int = 0
    dependencies: Mapping[str, Callable[[], bool]] = field(default_factory=dict)
    """Named health services for shared dependencies, checked every few seconds."""
    on_dependency: Callable[[str, bool], None] | None = None
    """Told the outcome of every dependency check (metrics)."""
    on_start: list[Callable[[], None]] = field(default_factory=list)
    """Run by `start()` before the server starts (e.g. the metrics endpoint)."""
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    """Run once in-flight calls have drained, in order."""
    on_drain: list[Callable[[], None]] = field(default_factory=list)
    """Run as soon as the server takes no new calls (after the NOT_SERVING delay): ends
    long-lived streams (UNAVAILABLE) so their clients resume on another replica at once
    instead of at the end of the grace period."""
    on_force: list[Callable[[], None]] = field(default_factory=list)
    """Run by `force()` (a second Ctrl-C): what must end now (child processes)."""
    readiness_interval: float = 0.5
    dependency_interval: float = 5.0
    _stopping: threading.Event = field(default_factory=threading.Event)
    _forced: threading.Event = field(default_factory=threading.Event)
    _stopped: bool = False

    # -- health ----------------------------------------------------------------------------

    def set_serving(self, serving: bool) -> None:
        """The readiness of the service names (and "" NOT_SERVING once stopping)."""
        stopping = self._stopping.is_set()
        status = _SERVING if serving and not stopping else _NOT_SERVING
        for name in self.service_names:
            self.health.set(name, status)
        self.health.set(OVERALL, _NOT_SERVING if stopping else _SERVING)

    def start(self) -> None:
        for callback in self.on_start:
            callback()
        _tune_garbage_collector()
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        self._watch(self._watch_readiness, "readiness")
        if self.dependencies:
            self._watch(self._watch_dependencies, "dependencies")

    def _watch(self, target: Callable[[], None], name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    def _watch_readiness(self) -> None:
        """SERVING while the process can serve (`is_ready`), until it drains."""
        last: bool | None = None
        while not self._stopping.is_set():
            try:
                ready = self.is_ready()
            except Exception:
                _log.exception("readiness check failed")
                ready = False
            if ready != last and not self._stopping.is_set():
                self.set_serving(ready)
                _log.info("health: %s", "SERVING" if ready else "NOT_SERVING")
                last = ready
            self._stopping.wait(self.readiness_interval)

    def _watch_dependencies(self) -> None:
        last: dict[str, bool] = {}
        while not self._stopping.is_set():
            for name, check in self.dependencies.items():
                try:
                    up = bool(check())
                except Exception:
                    up = False
                self.health.set(name, _SERVING if up else _NOT_SERVING)
                if self.on_dependency is not None:
                    self.on_dependency(name, up)
                if last.get(name) != up:
                    _log.log(
                        logging.INFO if up else logging.WARNING,
                        "dependency %s: %s",
                        name,
                        "up" if up else "DOWN",
                    )
                    last[name] = up
            self._stopping.wait(self.dependency_interval)

    # -- stopping --------------------------------------------------------------------------

    def stop(self, grace: float) -> None:
        """Stops at once: no NOT_SERVING window (tests, and errors at start-up)."""
        self.shutdown(delay=0.0, grace=grace)

    def shutdown(self, *, delay: float, grace: float) -> None:
        """NOT_SERVING for `delay` seconds while still serving, then no new calls; in-flight
        calls get `grace` seconds, then the rest are ended with UNAVAILABLE; resources are
        released. `force()` from another thread cuts every wait short."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self.set_serving(False)
        if delay > 0:
            _log.info("NOT_SERVING for %.1fs before stopping", delay)
            self._forced.wait(delay)
        in_flight = len(self.in_flight)
        if in_flight:
            _log.info("stopping: %d calls in flight get up to %.1fs", in_flight, grace)
        stopped = self.server.stop(0 if self._forced.is_set() else grace + END_MARGIN_SECONDS)
        for callback in self.on_drain:
            try:
                callback()
            except Exception:
                _log.exception("error while ending streams")
        drained = self._wait_forced_or(lambda: self.in_flight.wait_idle(0.1), grace)
        if not drained:
            ended = self.in_flight.terminate()
            if ended:
                _log.warning("ended %d calls still running after %.1fs: UNAVAILABLE", ended, grace)
        while not stopped.wait(0.1):
            if self._forced.is_set():
                self.server.stop(0)
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        for callback in self.on_stop:
            try:
                callback()
            except Exception:
                _log.exception("error during shutdown")

    def _wait_forced_or(self, done: Callable[[], bool], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self._forced.is_set():
            if done():
                return True
            if time.monotonic() >= deadline:
                return False
        return False

    def force(self) -> None:
        """Cut the shutdown short: every call still running is cancelled now."""
        self._forced.set()
        self.server.stop(0)
        for callback in self.on_force:
            try:
                callback()
            except Exception:
                _log.exception("error while forcing the stop")

    @property
    def forced(self) -> bool:
        return self._forced.is_set()


def _tune_garbage_collector() -> None:
    """Every call allocates thousands of short-lived objects; with the default thresholds the
    cyclic collector runs every 700 allocations and its full passes walk every long-lived
    object (modules, caches), which shows up as tail latency. Objects alive at start are
    frozen out of collection, and collections run less often (young garbage here is
    acyclic and freed by reference counting anyway)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file or not settings.tls_key_file:
        return None
    chain = Path(settings.tls_cert_file).read_bytes()
    key = Path(settings.tls_key_file).read_bytes()
    client_ca = (
        Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def server_options(settings: CommonSettings) -> list[tuple[str, int]]:
    """The channel options of every server of a service (a port of its own, keepalive
    pings allowed, connections recycled)."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        (
            "grpc.max_connection_age_grace_ms",
            int(settings.max_connection_age_grace_seconds * 1000),
        ),
    ]


def create_server(
    settings: CommonSettings,
    *,
    register: Callable[[Any], None],
    service_names: Sequence[str],
    request_path: RequestPath,
    is_ready: Callable[[], bool],
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    dependencies: Mapping[str, Callable[[], bool]] | None = None,
    extra_concurrent_rpcs: int = 0,
) -> RunningServer:
    """A sync thread-pool server with health, reflection and the request path, bound.
    `register(registrar)` adds the service's handlers (as `add_XServicer_to_server` does);
    `interceptors` are grpc.ServerInterceptors outside the request path (tracing);
    `extra_concurrent_rpcs`: calls allowed beyond `max_concurrent_rpcs` (long-lived streams
    on pools of their own, limited by their own count)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.max_workers, thread_name_prefix=settings.service
        ),
        interceptors=list(interceptors) or None,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs + extra_concurrent_rpcs,
        options=server_options(settings),
    )
    registrar = HandlerRegistrar(server, request_path)
    register(registrar)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="health-watch"
        ),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        SourceReflectionServicer((*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME)),
        registrar,
    )
    for name in (OVERALL, *service_names):
        health_servicer.set(name, _NOT_SERVING)
    for name in dependencies or {}:
        health_servicer.set(name, _NOT_SERVING)
    credentials = server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.address)
    else:
        port = server.add_secure_port(settings.address, credentials)
    if port == 0:
        raise RuntimeError(f"cannot bind {settings.address}")
    health_server, health_port = _health_only_server(settings, health_servicer, request_path)
    return RunningServer(
        server=server,
        health=health_servicer,
        port=port,
        service_names=service_names,
        is_ready=is_ready,
        registrar=registrar,
        in_flight=request_path.in_flight,
        transport=transport_of(settings),
        health_server=health_server,
        health_port=health_port,
        dependencies=dict(dependencies or {}),
    )


def _health_only_server(
    settings: CommonSettings, health_servicer: health.HealthServicer, path: RequestPath
) -> tuple[grpc.Server | None, int]:
    """A plaintext server with only grpc.health.v1: kubelet's gRPC probes cannot do TLS,
    and a server of its own answers while the main one is saturated."""
    if not settings.health_port:
        return None, 0
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
        options=[("grpc.so_reuseport", 0)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, HandlerRegistrar(server, path))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.health_port}")
    if port == 0:
        raise RuntimeError(f"cannot bind the health port {settings.health_port}")
    return server, port
