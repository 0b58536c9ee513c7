"""gRPC server bootstrap shared by both services.

`create_server()` builds and binds a server (port 0 picks a free port, for tests);
`serve()` runs it until SIGTERM/SIGINT: health NOT_SERVING → stop(grace) → return.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.config.settings import CommonSettings

__all__ = ["RunningServer", "create_server", "serve"]

_log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
OVERALL = ""


@dataclass
class RunningServer:
    """A bound (not yet started) server with its health servicer and bound port."""

    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: Sequence[str]
    is_ready: Callable[[], bool]
    health_server: grpc.Server | None = None
    on_start: list[Callable[[], None]] = field(default_factory=list)
    """Run by `start()` before the server starts (e.g. the metrics endpoint)."""
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    """Run by `stop()` once in-flight calls have drained, in order."""
    _stopping: threading.Event = field(default_factory=threading.Event)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.service_names:
            self.health.set(name, status)

    def start(self) -> None:
        for callback in self.on_start:
            callback()
        _tune_garbage_collector()
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        self.health.set(OVERALL, health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._watch_readiness, name="readiness", daemon=True).start()

    def _watch_readiness(self) -> None:
        """SERVING while the service's dependencies answer; checked every few seconds."""
        last: bool | None = None
        while not self._stopping.is_set():
            ready = self.is_ready()
            if ready != last and not self._stopping.is_set():
                self.set_serving(ready)
                _log.info("health: %s", "SERVING" if ready else "NOT_SERVING")
                last = ready
            self._stopping.wait(1.0 if not ready else 5.0)

    def stop(self, grace: float) -> None:
        """NOT_SERVING, drain in-flight calls for up to `grace` seconds, release resources."""
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        for callback in self.on_stop:
            try:
                callback()
            except Exception:
                _log.exception("error during shutdown")


def _tune_garbage_collector() -> None:
    """Every call allocates thousands of short-lived objects; with the default thresholds the
    cyclic collector runs every 700 allocations and its full passes walk every long-lived
    object (modules, caches), which shows up as tail latency. Objects alive at start are
    frozen out of collection, and collections run less often (young garbage here is
    acyclic and freed by reference counting anyway)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
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


def create_server(
    settings: CommonSettings,
    *,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    interceptors: Sequence[grpc.ServerInterceptor],
    is_ready: Callable[[], bool],
) -> RunningServer:
    """A sync thread-pool server with health, reflection and our interceptors, bound."""
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.max_workers, thread_name_prefix=settings.service
        ),
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                int(settings.max_connection_age_grace_seconds * 1000),
            ),
        ],
    )
    register(server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    credentials = _credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.address)
    else:
        port = server.add_secure_port(settings.address, credentials)
    if port == 0:
        raise RuntimeError(f"cannot bind {settings.address}")
    return RunningServer(
        server=server,
        health=health_servicer,
        port=port,
        service_names=service_names,
        is_ready=is_ready,
        health_server=_health_only_server(settings, health_servicer),
    )


def _health_only_server(
    settings: CommonSettings, health_servicer: health.HealthServicer
) -> grpc.Server | None:
    """A plaintext server with only grpc.health.v1 (kubelet's gRPC probes cannot do TLS)."""
    if not settings.health_port:
        return None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    if server.add_insecure_port(f"{host}:{settings.health_port}") == 0:
        raise RuntimeError(f"cannot bind the health port {settings.health_port}")
    return server


def serve(running: RunningServer, settings: CommonSettings) -> None:
    """Runs until SIGTERM or SIGINT, then drains and returns."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        _log.info(
            "received %s: draining (grace %.0fs)",
            signal.Signals(signum).name,
            settings.grace_seconds,
        )
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    running.start()
    _log.info("%s listening on %s:%d", settings.service, settings.host, running.port)
    stop.wait()
    running.stop(settings.grace_seconds)
    _log.info("%s stopped", settings.service)
