"""Metrics, traces and access logs of one service, wired the same way in both.

A composition root makes one `Observability` per app (`from_settings`), hands its
`metrics` hooks to the service and infra layers (plain callables: nothing below the
composition root imports prometheus or OpenTelemetry), builds the server with
`request_path(...)` and `server_interceptors()`, and calls `attach(running)` to serve
/metrics while the server runs.

Every call passes through, outermost first:

    tracing (OpenTelemetry's interceptor, only when configured) → the request path
    (shared.rpc.request_path: decoding, token check, servicer, error mapping, metrics,
    access log)

so the span sees every call with its final status, and the metrics and the access log
line see the rejections of the token check and the INTERNAL of an unexpected exception.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import grpc
from sqlalchemy import Engine

from shared.config.settings import CommonSettings
from shared.data.db import unavailable_database
from shared.rpc.http import METRICS_PATH, HttpEndpoints, Route, metrics_route
from shared.rpc.metrics import Metrics
from shared.rpc.ratelimit import RateLimiter
from shared.rpc.request_path import RequestPath
from shared.rpc.server import RunningServer
from shared.rpc.tracing import Tracing, configure_tracing
from shared.security.tokens import TokenVerifier

__all__ = ["Observability"]

_log = logging.getLogger(__name__)


class Observability:
    """The app's metrics registry, its tracing (or None) and the /metrics endpoint."""

    def __init__(
        self,
        settings: CommonSettings,
        *,
        metrics: Metrics,
        tracing: Tracing | None,
        owns_tracing: bool,
    ) -> None:
        self._settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self._owns_tracing = owns_tracing
        self._routes: dict[str, Route] = {METRICS_PATH: metrics_route(metrics.registry)}
        self._http: HttpEndpoints | None = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(
        cls, settings: CommonSettings, *, tracing: Tracing | None = None
    ) -> Observability:
        """OTLP tracing when `settings.otlp_endpoint` is set, none otherwise; a test may pass
        its own `tracing` (e.g. over an in-memory exporter), which the test then owns."""
        if tracing is not None:
            return cls(settings, metrics=Metrics(), tracing=tracing, owns_tracing=False)
        configured = configure_tracing(
            settings.trace_service_name, otlp_endpoint=settings.otlp_endpoint
        )
        if configured is not None:
            _log.info("tracing: exporting spans over OTLP to %s", settings.otlp_endpoint)
        return cls(settings, metrics=Metrics(), tracing=configured, owns_tracing=True)

    # -- wiring ----------------------------------------------------------------------------

    def request_path(
        self,
        *,
        error_domain: str,
        verifier: TokenVerifier,
        public_methods: Iterable[str],
        rate_limiter: RateLimiter | None = None,
        quiet_methods: Iterable[str] = (),
    ) -> RequestPath:
        """The request path every handler of the server is wrapped in."""
        return RequestPath(
            domain=error_domain,
            verifier=verifier,
            public_methods=public_methods,
            metrics=self.metrics.rpc,
            translators=[unavailable_database],
            rate_limiter=rate_limiter,
            quiet_methods=quiet_methods,
        )

    def server_interceptors(self) -> list[grpc.ServerInterceptor]:
        """The interceptors outside the request path: tracing, when it is configured."""
        return [] if self.tracing is None else [self.tracing.server_interceptor()]

    def instrument_channel(self, channel: grpc.Channel) -> grpc.Channel:
        """The channel, carrying the trace context of its calls when tracing is on."""
        return channel if self.tracing is None else self.tracing.instrument_channel(channel)

    def watch_pool(self, engine: Engine) -> None:
        """Export the connections the engine's pool has checked out, read at each scrape."""
        pool = engine.pool
        checked_out: Callable[[], int] | None = getattr(pool, "checkedout", None)
        if checked_out is not None:
            self.metrics.watch_pool(checked_out)

    def route(self, path: str, route: Route) -> None:
        """Serve `route` at `path` on the HTTP port too (before the server starts)."""
        with self._lock:
            if self._http is not None:
                raise RuntimeError("the HTTP port is already serving")
            self._routes[path] = route

    def attach(self, running: RunningServer) -> None:
        """Serve /metrics while `running` runs: up before it starts, down after it drained;
        the dependency checks of its health become metrics."""
        running.on_start.append(self.start_metrics)
        running.on_stop.append(self.close)
        running.on_dependency = self.metrics.dependency

    # -- lifecycle -------------------------------------------------------------------------

    def start_metrics(self) -> None:
        """Serve /metrics (and the other routes) on `metrics_port` of the service's host
        (0: not at all)."""
        settings = self._settings
        with self._lock:
            if self._http is not None or self._closed or settings.metrics_port == 0:
                return
            self._http = HttpEndpoints(settings.host, settings.metrics_port, self._routes)
            self._http.start()
        _log.info("HTTP on port %d: %s", settings.metrics_port, ", ".join(sorted(self._routes)))

    def close(self) -> None:
        """Stop serving HTTP and flush the spans (tracing this object created). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            http, self._http = self._http, None
        if http is not None:
            http.stop()
        if self.tracing is not None and self._owns_tracing:
            self.tracing.shutdown()
