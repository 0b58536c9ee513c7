"""The shared observability wiring: the request path, tracing on or off, the hooks."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.instrumentation.grpc._server import OpenTelemetryServerInterceptor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.auth_svc.settings import load_auth_settings
from shared.rpc.metrics import Metrics
from shared.rpc.observability import Observability
from shared.rpc.request_path import RequestPath, request_id_for
from shared.rpc.tracing import configure_tracing
from shared.security.tokens import StaticKeyProvider, TokenVerifier
from tests.helpers import FakeClock

VERIFIER = TokenVerifier(StaticKeyProvider([]), issuer="i", audience="a", clock=FakeClock())


def chain(observability: Observability) -> list[type[Any]]:
    path = observability.request_path(error_domain="test", verifier=VERIFIER, public_methods=())
    assert isinstance(path, RequestPath)
    return [type(interceptor) for interceptor in observability.server_interceptors()]


def test_without_an_otlp_endpoint_there_is_no_tracing_at_all() -> None:
    observability = Observability.from_settings(load_auth_settings({}).common)
    assert observability.tracing is None
    assert chain(observability) == []
    channel: Any = object()
    assert observability.instrument_channel(channel) is channel
    observability.close()
    observability.close()  # idempotent


def test_an_otlp_endpoint_puts_the_tracing_interceptor_outside_the_request_path() -> None:
    common = load_auth_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}).common
    observability = Observability.from_settings(common)
    try:
        assert observability.tracing is not None
        resource = observability.tracing.provider.resource
        assert resource.attributes["service.name"] == "auth-svc"
        assert chain(observability) == [OpenTelemetryServerInterceptor]
    finally:
        observability.close()  # shuts the exporter down: nothing was exported


def test_injected_tracing_is_used_and_left_to_its_owner() -> None:
    exporter = InMemorySpanExporter()
    tracing = configure_tracing(
        "test", otlp_endpoint=None, processor_factory=lambda: SimpleSpanProcessor(exporter)
    )
    assert tracing is not None
    observability = Observability.from_settings(load_auth_settings({}).common, tracing=tracing)
    assert observability.tracing is tracing
    observability.close()
    with tracing.provider.get_tracer("test").start_as_current_span("still open"):
        pass
    assert [span.name for span in exporter.get_finished_spans()] == ["still open"]
    tracing.shutdown()


def test_configure_tracing_is_off_without_an_endpoint_or_a_processor() -> None:
    assert configure_tracing("test", otlp_endpoint=None) is None
    assert configure_tracing("test", otlp_endpoint="") is None


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    result: float | None = metrics.registry.get_sample_value(name, labels)
    return result


def test_hooks_count_by_label_and_cache_errors_are_redis_errors() -> None:
    metrics = Metrics()
    metrics.declare(metrics.logins, ("success",), ("failure",), ("locked",))
    assert value(metrics, "agentplatform_logins_total", result="locked") == 0
    metrics.login_result("success")
    metrics.login_result("success")
    metrics.token_verification("cached")
    metrics.jwks_fetch("error")
    metrics.cache_event("l1", "hit")
    metrics.cache_event("l2", "error")
    metrics.cache_event("pubsub", "error")
    metrics.redis_error("login_limiter")
    assert value(metrics, "agentplatform_logins_total", result="success") == 2
    assert value(metrics, "agentplatform_token_verifications_total", result="cached") == 1
    assert value(metrics, "agentplatform_jwks_fetches_total", result="error") == 1
    assert value(metrics, "agentplatform_cache_events_total", level="l1", outcome="hit") == 1
    assert value(metrics, "agentplatform_redis_errors_total", component="cache") == 2
    assert value(metrics, "agentplatform_redis_errors_total", component="login_limiter") == 1


@pytest.mark.parametrize(
    "given", ["abc", "7b0c4c1e-2f7c-4a55-9d55-1f6f1d0f3a10", "trace:1/a+b=c@d_e.f", "x" * 128]
)
def test_a_sane_request_id_is_kept(given: str) -> None:
    assert request_id_for(given) == given


@pytest.mark.parametrize("given", ["", "has space", 'quote"', "x" * 129, "é", "a\tb", "a\nb"])
def test_other_request_ids_are_replaced(given: str) -> None:
    replaced = request_id_for(given)
    assert replaced != given
    assert len(replaced) <= 128
    int(replaced, 16)


def test_a_request_id_is_generated_when_none_is_sent() -> None:
    generated = {request_id_for(None) for _ in range(1000)}
    assert len(generated) == 1000
    assert all(len(request_id) >= 13 for request_id in generated)
