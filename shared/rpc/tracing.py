"""OpenTelemetry tracing for servers and clients, exported over OTLP when configured.

Health checks are not traced. With no endpoint configured, tracing is off and costs
nothing (no interceptor is installed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import client_interceptor, filters, server_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

__all__ = ["Tracing", "configure_tracing"]

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


class Tracing:
    """A tracer provider and the interceptors that use it."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    def server_interceptor(self) -> grpc.ServerInterceptor:
        not_traced = filters.any_of(
            filters.service_name(HEALTH_SERVICE),
            *(filters.service_name(name) for name in REFLECTION_SERVICES),
        )
        return server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=filters.negate(not_traced)
        )

    def instrument_channel(self, channel: grpc.Channel) -> grpc.Channel:
        """A channel whose calls carry the current trace context."""
        interceptor = client_interceptor(tracer_provider=self.provider)  # type: ignore[no-untyped-call]
        # The instrumentation's own interceptor protocol (grpcext), not grpc's.
        intercepted: grpc.Channel = intercept_channel(channel, interceptor)  # type: ignore[no-untyped-call]
        return intercepted

    def shutdown(self, timeout_seconds: float = 5.0) -> None:
        """Export what is queued and stop, waiting at most `timeout_seconds` (a collector
        that is down must not hold up a pod's exit: the SDK alone waits up to 30 s)."""
        done = threading.Thread(target=self.provider.shutdown, name="tracing-shutdown", daemon=True)
        done.start()
        done.join(timeout_seconds)


def configure_tracing(
    service: str,
    *,
    otlp_endpoint: str | None,
    processor_factory: Callable[[], SpanProcessor] | None = None,
    insecure: bool | None = None,
) -> Tracing | None:
    """Tracing exported to `otlp_endpoint`, or to `processor_factory()` (tests); else None.

    `service` becomes the resource's `service.name`. The OTLP/gRPC exporter speaks TLS to
    an `https://` endpoint and plaintext to `http://` or a bare `host:port` (unless
    `insecure` says otherwise); spans leave in batches, off the request path."""
    if processor_factory is None and not otlp_endpoint:
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        shutdown_on_exit=False,  # Tracing.shutdown() does it, with a bound on the wait
    )
    if processor_factory is not None:
        provider.add_span_processor(processor_factory())
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        assert otlp_endpoint is not None
        if insecure is None:
            insecure = not otlp_endpoint.lower().startswith("https://")
        exporter: Any = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)
