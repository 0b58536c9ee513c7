"""Prometheus metrics: go-grpc-prometheus names for every call, plus domain metrics.

Each app owns a `Metrics` object with its own registry (no process globals), served on
its own HTTP port at /metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics", "MetricsInterceptor", "serve_metrics"]

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# go-grpc-prometheus' default buckets, with finer ones below 5 ms where our calls live.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every metric a service exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", _LABELS, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=r,
        )
        self.received = Counter(
            "grpc_server_msg_received_total", "Stream messages received.", _LABELS, registry=r
        )
        self.sent = Counter(
            "grpc_server_msg_sent_total", "Stream messages sent.", _LABELS, registry=r
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server.",
            _LABELS,
            buckets=_BUCKETS,
            registry=r,
        )
        self.logins = Counter(
            "agentplatform_logins_total", "Login attempts by result.", ("result",), registry=r
        )
        self.token_verifications = Counter(
            "agentplatform_token_verifications_total",
            "Access-token checks by result (verified, cached, rejected).",
            ("result",),
            registry=r,
        )
        self.cache_events = Counter(
            "agentplatform_cache_events_total",
            "Agent cache events by level and outcome: l1 hit|miss, l2 hit|miss|error|bypass|"
            "fill|stale_fill, load db, flight joined, invalidate sent|deferred, "
            "pubsub message|subscribed|error.",
            ("level", "outcome"),
            registry=r,
        )
        self.redis_errors = Counter(
            "agentplatform_redis_errors_total",
            "Redis errors by component.",
            ("component",),
            registry=r,
        )
        self.jwks_fetches = Counter(
            "agentplatform_jwks_fetches_total", "JWKS fetches by result.", ("result",), registry=r
        )
        self.db_pool_in_use = Gauge(
            "agentplatform_db_pool_connections_in_use",
            "Database connections checked out of the pool.",
            registry=r,
        )
        self._bound: dict[tuple[int, tuple[str, ...]], Any] = {}

    def watch_pool(self, checked_out: Callable[[], int]) -> None:
        """Reports the pool's checked-out connections at every scrape."""
        self.db_pool_in_use.set_function(lambda: float(checked_out()))

    # -- hooks: plain callables the service and infra layers are given (no prometheus there)

    def login_result(self, result: str) -> None:
        """`result`: success, failure or locked (AuthService's login observer)."""
        self._children(self.logins, result).inc()

    def token_verification(self, result: str) -> None:
        """`result`: verified, cached or rejected (TokenVerifier's `on_result`)."""
        self._children(self.token_verifications, result).inc()

    def cache_event(self, level: str, outcome: str) -> None:
        """TwoLevelCache's `on_event`; an L2 or pub/sub error is also a Redis error."""
        self._children(self.cache_events, level, outcome).inc()
        if outcome == "error":
            self.redis_error("cache")

    def redis_error(self, component: str) -> None:
        """A Redis call failed and was caught (the caller degraded instead of failing)."""
        self._children(self.redis_errors, component).inc()

    def jwks_fetch(self, result: str) -> None:
        """`result`: ok or error (JwksKeyProvider's `on_fetch`)."""
        self._children(self.jwks_fetches, result).inc()

    def declare(self, counter: Counter, *label_values: tuple[str, ...]) -> None:
        """Exports these series at 0 before their first event (rate() needs a start)."""
        for values in label_values:
            self._children(counter, *values)

    def _children(self, counter: Counter, *values: str) -> Any:
        """The labelled child, bound once: the hooks run on every call."""
        key = (id(counter), values)
        child = self._bound.get(key)
        if child is None:
            child = self._bound.setdefault(key, counter.labels(*values))
        return child


def _go_code_name(code: grpc.StatusCode) -> str:
    """The status code as Go's codes.Code.String() spells it (go-grpc-prometheus labels)."""
    if code == grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code == grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


class _MethodMetrics:
    """The labelled children of one method, bound once (a scrape-cheap hot path)."""

    __slots__ = ("handled", "handled_by_code", "handling", "received", "sent", "started")

    def __init__(self, metrics: Metrics, service: str, method: str) -> None:
        labels = ("unary", service, method)
        self.started = metrics.started.labels(*labels)
        self.received = metrics.received.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self.handling = metrics.handling.labels(*labels)
        self.handled = metrics.handled
        self.handled_by_code: dict[grpc.StatusCode, Any] = {
            code: metrics.handled.labels(*labels, _go_code_name(code)) for code in grpc.StatusCode
        }


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every unary call (our services, health and reflection alike)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._by_method: dict[str, _MethodMetrics] = {}
        self._lock = threading.Lock()

    def _for(self, full_method: str) -> _MethodMetrics:
        bound = self._by_method.get(full_method)
        if bound is None:
            service, _, method = full_method.lstrip("/").rpartition("/")
            with self._lock:
                bound = self._by_method.setdefault(
                    full_method, _MethodMetrics(self._metrics, service, method)
                )
        return bound

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        bound = self._for(details.method)
        behavior = handler.unary_unary

        def call(request: Any, context: Any) -> Any:
            bound.started.inc()
            bound.received.inc()
            start = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = behavior(request, context)
                code = context.code() or grpc.StatusCode.OK
                if code == grpc.StatusCode.OK:
                    bound.sent.inc()
                return response
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                bound.handling.observe(time.perf_counter() - start)
                bound.handled_by_code[code].inc()

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def serve_metrics(metrics: Metrics, host: str, port: int) -> Callable[[], None] | None:
    """Serves /metrics on its own port (0 disables); returns a function that stops it."""
    if port == 0:
        return None
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
