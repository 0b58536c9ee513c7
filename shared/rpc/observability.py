"""Metrics, traces and access logs of one service, wired the same way in both.

A composition root makes one `Observability` per app (`from_settings`), hands its
`metrics` hooks to the service and infra layers (plain callables: nothing below the
composition root imports prometheus or OpenTelemetry), builds the server with
`server_interceptors(...)` and calls `attach(running)` to serve /metrics while the server
runs.

The interceptor chain, outermost first:

    tracing (only when configured) → metrics → access log → error mapping → token check

so the span and the metrics see every call with its final status (including the
rejections of the token check and the INTERNAL of an unexpected exception), and the
access log line carries the user the token check found.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import grpc
from sqlalchemy import Engine

from shared.config.settings import CommonSettings
from shared.data.db import unavailable_database
from shared.rpc.interceptors import (
    AccessLogInterceptor,
    ErrorMappingInterceptor,
    TokenCheckInterceptor,
)
from shared.rpc.metrics import Metrics, MetricsInterceptor, serve_metrics
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
        self._stop_metrics: Callable[[], None] | None = None
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

    def server_interceptors(
        self,
        *,
        error_domain: str,
        verifier: TokenVerifier,
        public_methods: Iterable[str],
    ) -> list[grpc.ServerInterceptor]:
        """The server's interceptors, outermost first (see the module docstring)."""
        chain: list[grpc.ServerInterceptor] = []
        if self.tracing is not None:
            chain.append(self.tracing.server_interceptor())
        chain += [
            MetricsInterceptor(self.metrics),
            AccessLogInterceptor(),
            ErrorMappingInterceptor(domain=error_domain, translators=[unavailable_database]),
            TokenCheckInterceptor(verifier, public_methods),
        ]
        return chain

    def instrument_channel(self, channel: grpc.Channel) -> grpc.Channel:
        """The channel, carrying the trace context of its calls when tracing is on."""
        return channel if self.tracing is None else self.tracing.instrument_channel(channel)

    def watch_pool(self, engine: Engine) -> None:
        """Export the connections the engine's pool has checked out, read at each scrape."""
        pool = engine.pool
        checked_out: Callable[[], int] | None = getattr(pool, "checkedout", None)
        if checked_out is not None:
            self.metrics.watch_pool(checked_out)

    def attach(self, running: RunningServer) -> None:
        """Serve /metrics while `running` runs: up before it starts, down after it drained."""
        running.on_start.append(self.start_metrics)
        running.on_stop.append(self.close)

    # -- lifecycle -------------------------------------------------------------------------

    def start_metrics(self) -> None:
        """Serve /metrics on `metrics_port` of the service's host (0: not at all)."""
        settings = self._settings
        with self._lock:
            if self._stop_metrics is not None or self._closed:
                return
            self._stop_metrics = serve_metrics(self.metrics, settings.host, settings.metrics_port)
        if self._stop_metrics is not None:
            _log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)

    def close(self) -> None:
        """Stop serving /metrics and flush the spans (tracing this object created). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stop, self._stop_metrics = self._stop_metrics, None
        if stop is not None:
            stop()
        if self.tracing is not None and self._owns_tracing:
            self.tracing.shutdown()
