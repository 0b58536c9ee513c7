"""Metrics, traces and access logs of both services, proven with real calls over real
channels to servers built by the composition roots (in process, on free ports)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shared.rpc.logs import JsonFormatter
from shared.rpc.tracing import Tracing, configure_tracing
from tests.helpers import free_port
from tests.integration.inprocess import (
    PASSWORD,
    Served,
    agent_service,
    auth_service,
    eventually,
    register_and_login,
    sample,
    samples,
)

AUTH = "agentplatform.auth.v1.AuthService"
AGENT = "agentplatform.agent.v1.AgentService"
HEALTH = "grpc.health.v1.Health"
UNARY = {"grpc_type": "unary"}


def auth_labels(method: str) -> dict[str, str]:
    return {**UNARY, "grpc_service": AUTH, "grpc_method": method}


def agent_labels(method: str) -> dict[str, str]:
    return {**UNARY, "grpc_service": AGENT, "grpc_method": method}


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


CACHE_EVENTS = [
    ("l1", "hit"),
    ("l1", "miss"),
    ("l2", "hit"),
    ("l2", "miss"),
    ("l2", "fill"),
    ("load", "db"),
]
FROM_DATABASE = Counter(
    {("l1", "miss"): 1, ("l2", "miss"): 1, ("load", "db"): 1, ("l2", "fill"): 1}
)
FROM_L2 = Counter({("l1", "miss"): 1, ("l2", "hit"): 1})
FROM_L1 = Counter({("l1", "hit"): 1})


def cache_events(agent: Served) -> Counter[tuple[str, str]]:
    """The agent cache's event counters, as its metrics export them."""
    text = agent.scrape()
    return Counter(
        {
            (level, outcome): int(
                sample(text, "agentplatform_cache_events_total", level=level, outcome=outcome) or 0
            )
            for level, outcome in CACHE_EVENTS
        }
    )


def wait_for_the_cache_listener(agent: Served) -> None:
    """Until the agent cache's invalidation listener has subscribed (subscribing clears L1
    and refuses fills in progress, so a test counting cache events waits for it)."""

    def subscribed() -> None:
        events = agent.metric(
            "agentplatform_cache_events_total", level="pubsub", outcome="subscribed"
        )
        assert (events or 0) >= 1

    eventually(subscribed)


def wait_for_keys(agent: Served) -> None:
    """Until the agent service's background JWKS fetch has succeeded."""

    def fetched() -> None:
        assert (agent.metric("agentplatform_jwks_fetches_total", result="ok") or 0) >= 1

    eventually(fetched)


class InMemoryTracing:
    """A Tracing over an in-memory exporter, as a test injects it into build_app."""

    def __init__(self, service: str) -> None:
        self.exporter = InMemorySpanExporter()
        tracing = configure_tracing(
            service,
            otlp_endpoint=None,
            processor_factory=lambda: SimpleSpanProcessor(self.exporter),
        )
        assert tracing is not None
        self.tracing: Tracing = tracing

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def close(self) -> None:
        self.tracing.shutdown()


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[Served]:
    with auth_service(tmp_path, {"AUTH_LOGIN_MAX_FAILURES": "2"}) as served:
        yield served


# -- metrics ------------------------------------------------------------------------------


def test_auth_metrics_count_calls_codes_and_logins(auth: Served) -> None:
    with grpc.insecure_channel(auth.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        email = "metrics@example.com"
        token = register_and_login(channel, email).access_token  # Login: success
        wrong = auth_pb2.LoginRequest(email=email, password="not the password")
        for _ in range(2):  # failure, failure: the limit (2) is reached
            assert rpc_error(lambda: stub.Login(wrong)).code() == grpc.StatusCode.UNAUTHENTICATED
        right = auth_pb2.LoginRequest(email=email, password=PASSWORD)
        assert rpc_error(lambda: stub.Login(right)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        invalid = auth_pb2.LoginRequest(email="", password="")  # not a login attempt
        assert rpc_error(lambda: stub.Login(invalid)).code() == grpc.StatusCode.INVALID_ARGUMENT

        me = auth_pb2.GetCurrentUserRequest()
        stub.GetCurrentUser(me, metadata=bearer(token))  # verified
        stub.GetCurrentUser(me, metadata=bearer(token))  # cached
        garbage = bearer("not.a.token")
        assert rpc_error(lambda: stub.GetCurrentUser(me, metadata=garbage)).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert rpc_error(lambda: stub.GetCurrentUser(me)).code() == (
            grpc.StatusCode.UNAUTHENTICATED  # no token: nothing to verify
        )
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))

    text = auth.scrape()
    login = auth_labels("Login")
    assert sample(text, "grpc_server_started_total", **login) == 5
    for code, count in [
        ("OK", 1),
        ("Unauthenticated", 2),
        ("ResourceExhausted", 1),
        ("InvalidArgument", 1),
        ("NotFound", 0),  # every code is exported, from the start
    ]:
        assert sample(text, "grpc_server_handled_total", **login, grpc_code=code) == count
    assert sample(text, "grpc_server_msg_received_total", **login) == 5
    assert sample(text, "grpc_server_msg_sent_total", **login) == 1  # errors send no message
    assert sample(text, "grpc_server_handling_seconds_count", **login) == 5
    assert sample(text, "grpc_server_handling_seconds_bucket", **login, le="+Inf") == 5
    assert sample(text, "grpc_server_handling_seconds_bucket", **login, le="10.0") == 5
    me_labels = auth_labels("GetCurrentUser")
    assert sample(text, "grpc_server_handled_total", **me_labels, grpc_code="OK") == 2
    assert sample(text, "grpc_server_handled_total", **me_labels, grpc_code="Unauthenticated") == 2
    health = {**UNARY, "grpc_service": HEALTH, "grpc_method": "Check"}
    assert sample(text, "grpc_server_handled_total", **health, grpc_code="OK") == 1
    for name in (
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total",
        "grpc_server_handling_seconds_bucket",
    ):
        assert samples(text, name), name
        for labels in samples(text, name):
            assert {"grpc_type", "grpc_service", "grpc_method"} <= set(labels), (name, labels)

    logins = {r: sample(text, "agentplatform_logins_total", result=r) for r in ("success",
              "failure", "locked")}  # fmt: skip
    assert logins == {"success": 1, "failure": 2, "locked": 1}
    verifications = {
        r: sample(text, "agentplatform_token_verifications_total", result=r)
        for r in ("verified", "cached", "rejected")
    }
    assert verifications == {"verified": 1, "cached": 1, "rejected": 1}
    assert sample(text, "agentplatform_db_pool_connections_in_use") == 0  # none held at rest


def test_agent_metrics_count_cache_levels_tokens_and_jwks(
    tmp_path: Path, auth: Served, redis_url: str
) -> None:
    env = {
        "AGENT_AUTH_TARGET": auth.address,
        "AGENT_REDIS_URL": redis_url,
        "AGENT_L1_MAX_ENTRIES": "1",  # a second agent read evicts the first from L1
    }
    with (
        agent_service(tmp_path, env) as agent,
        grpc.insecure_channel(auth.address) as auth_channel,
        grpc.insecure_channel(agent.address) as channel,
    ):
        token = register_and_login(auth_channel, "agents@example.com").access_token
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        wait_for_keys(agent)
        wait_for_the_cache_listener(agent)  # its (re)subscription clears L1
        created, other = (
            stub.CreateAgent(
                agent_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=name, model="gpt-4o")),
                metadata=bearer(token),
            ).agent
            for name in ("m", "n")
        )
        reads = 0

        def read(agent_id: str) -> Counter[tuple[str, str]]:
            """One GetAgent, and the cache events it added to the metrics."""
            nonlocal reads
            before = cache_events(agent)
            stub.GetAgent(agent_pb2.GetAgentRequest(id=agent_id), metadata=bearer(token))
            reads += 1
            return cache_events(agent) - before

        assert read(created.id) == FROM_DATABASE  # and both levels filled
        # L1 serves only while the cache's listener has lately heard from Redis (its pings):
        # on a loaded machine a read may come in a gap and go to L2. Read until L1 serves.
        deadline = time.monotonic() + 30
        while (served := read(created.id)) != FROM_L1:
            assert served == FROM_L2
            assert time.monotonic() < deadline, "L1 never served"
        assert read(other.id) == FROM_DATABASE  # L1 holds one entry: the first is evicted
        assert read(created.id) == FROM_L2
        bad = agent_pb2.GetAgentRequest(id="not-a-uuid")
        assert rpc_error(lambda: stub.GetAgent(bad, metadata=bearer(token))).code() == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert rpc_error(lambda: stub.ListAgents(agent_pb2.ListAgentsRequest())).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        text = agent.scrape()

    get_labels = agent_labels("GetAgent")
    assert sample(text, "grpc_server_started_total", **get_labels) == reads + 1
    assert sample(text, "grpc_server_handled_total", **get_labels, grpc_code="OK") == reads
    assert sample(text, "grpc_server_handled_total", **get_labels, grpc_code="InvalidArgument") == 1
    assert sample(text, "grpc_server_msg_sent_total", **get_labels) == reads
    list_labels = agent_labels("ListAgents")
    assert (
        sample(text, "grpc_server_handled_total", **list_labels, grpc_code="Unauthenticated") == 1
    )

    assert sample(text, "agentplatform_cache_events_total", level="l2", outcome="error") == 0
    assert sample(text, "agentplatform_redis_errors_total", component="cache") == 0
    verifications = {
        r: sample(text, "agentplatform_token_verifications_total", result=r)
        for r in ("verified", "cached", "rejected")
    }
    # The calls with the token (two creates, the reads, the bad read): the first one's
    # signature checked, every other one's found in the verifier's cache.
    with_token = 2 + reads + 1
    assert verifications == {"verified": 1, "cached": with_token - 1, "rejected": 0}
    assert (sample(text, "agentplatform_jwks_fetches_total", result="ok") or 0) >= 1
    assert sample(text, "agentplatform_db_pool_connections_in_use") == 0


def test_redis_errors_are_counted_where_they_are_caught(tmp_path: Path, auth: Served) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with (
        auth_service(tmp_path, {"AUTH_REDIS_URL": dead_redis}) as limited,
        grpc.insecure_channel(limited.address) as channel,
    ):
        register_and_login(channel, "limits@example.com")  # the limiter falls back
        assert (limited.metric("agentplatform_redis_errors_total", component="login_limiter")
                or 0) >= 1  # fmt: skip
        assert limited.metric("agentplatform_logins_total", result="success") == 1

    env = {"AGENT_AUTH_TARGET": auth.address, "AGENT_REDIS_URL": dead_redis}
    with (
        agent_service(tmp_path, env) as agent,
        grpc.insecure_channel(auth.address) as auth_channel,
        grpc.insecure_channel(agent.address) as channel,
    ):
        token = register_and_login(auth_channel, "cache@example.com").access_token
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        wait_for_keys(agent)
        created = stub.CreateAgent(
            agent_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name="r", model="gpt-4o")),
            metadata=bearer(token),
        ).agent
        # The first read tries Redis (nothing before it did: a create touches no cache).
        stub.GetAgent(agent_pb2.GetAgentRequest(id=created.id), metadata=bearer(token))
        text = agent.scrape()
    assert sample(text, "agentplatform_cache_events_total", level="l2", outcome="error") == 1
    assert (sample(text, "agentplatform_redis_errors_total", component="cache") or 0) >= 1


# -- traces -------------------------------------------------------------------------------


@pytest.fixture
def auth_tracing() -> Iterator[InMemoryTracing]:
    tracing = InMemoryTracing("auth-svc")
    yield tracing
    tracing.close()


@pytest.fixture
def agent_tracing() -> Iterator[InMemoryTracing]:
    tracing = InMemoryTracing("agent-svc")
    yield tracing
    tracing.close()


def test_calls_are_traced_and_health_checks_are_not(
    tmp_path: Path, auth_tracing: InMemoryTracing
) -> None:
    with (
        auth_service(tmp_path, tracing=auth_tracing.tracing) as auth,
        grpc.insecure_channel(auth.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(service=""))
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        stub.GetJwks(auth_pb2.GetJwksRequest())
        wrong = auth_pb2.LoginRequest(email="nobody@example.com", password="wrong password")
        rpc_error(lambda: stub.Login(wrong))
        health.Check(health_pb2.HealthCheckRequest(service=""))

    spans = auth_tracing.spans()
    assert [span.name for span in spans] == [f"/{AUTH}/GetJwks", f"/{AUTH}/Login"]
    jwks, login = spans
    for span, method in ((jwks, "GetJwks"), (login, "Login")):
        assert span.kind == SpanKind.SERVER
        assert span.attributes is not None
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == AUTH
        assert span.attributes["rpc.method"] == method
        assert span.resource.attributes["service.name"] == "auth-svc"
    assert login.attributes is not None
    assert login.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    # OpenTelemetry's semantic conventions: a server span is an error only for server-side
    # codes (UNKNOWN, INTERNAL, UNAVAILABLE, ...), not for a caller's bad credentials.
    assert login.status.status_code == StatusCode.UNSET
    assert jwks.status.status_code == StatusCode.UNSET


def test_a_jwks_fetch_during_a_call_is_part_of_its_trace(
    tmp_path: Path, auth_tracing: InMemoryTracing, agent_tracing: InMemoryTracing
) -> None:
    with auth_service(tmp_path, tracing=auth_tracing.tracing) as auth:
        env = {"AGENT_AUTH_TARGET": auth.address, "AGENT_JWKS_COOLDOWN_SECONDS": "0"}
        with (
            agent_service(tmp_path, env, tracing=agent_tracing.tracing) as agent,
            grpc.insecure_channel(agent.address) as channel,
        ):
            # The background fetch at start: a trace of its own, across both services.
            background = eventually(lambda: client_spans(agent_tracing)[0])
            # A token naming a key id nobody published makes the verifier refetch the JWKS
            # while the call runs (cool-down 0).
            stranger = ed25519.Ed25519PrivateKey.generate()
            token = sign(stranger, kid="a-key-nobody-published")
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            error = rpc_error(
                lambda: stub.ListAgents(agent_pb2.ListAgentsRequest(), metadata=bearer(token))
            )
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    agent_spans = agent_tracing.spans()
    auth_spans = auth_tracing.spans()
    server = only(s for s in agent_spans if s.name == f"/{AGENT}/ListAgents")
    assert server.kind == SpanKind.SERVER
    assert server.parent is None
    fetch = only(s for s in client_spans(agent_tracing) if s.parent is not None)
    assert fetch.parent is not None
    assert server.context is not None
    assert fetch.context is not None
    assert fetch.context.trace_id == server.context.trace_id
    assert fetch.parent.span_id == server.context.span_id
    # On the auth side, the GetJwks server span continues the agent's trace.
    remote = only(
        s
        for s in auth_spans
        if s.name == f"/{AUTH}/GetJwks"
        and s.context is not None
        and s.context.trace_id == server.context.trace_id
    )
    assert remote.kind == SpanKind.SERVER
    assert remote.parent is not None
    assert remote.parent.is_remote
    assert remote.parent.span_id == fetch.context.span_id
    # The background fetch: client span → auth server span, in a trace of their own.
    assert background.context is not None
    assert background.context.trace_id != server.context.trace_id
    assert any(
        s.context is not None
        and s.context.trace_id == background.context.trace_id
        and s.parent is not None
        and s.parent.span_id == background.context.span_id
        for s in auth_spans
    )


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A stand-in OpenTelemetry collector: the OTLP/gRPC trace service, remembering spans."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (service.name, span name)

    def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((attributes.get("service.name", ""), span.name))
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_over_otlp_when_an_endpoint_is_configured(tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {"AUTH_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_SERVICE_NAME": "auth-test"}
    try:
        with (
            auth_service(tmp_path, env) as auth,
            grpc.insecure_channel(auth.address) as channel,
        ):
            auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest())
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        # Stopping the server flushed the batch.
        assert collector.spans == [("auth-test", f"/{AUTH}/GetJwks")]
    finally:
        server.stop(0)


def client_spans(tracing: InMemoryTracing) -> list[ReadableSpan]:
    spans = [
        s for s in tracing.spans() if s.kind == SpanKind.CLIENT and s.name.endswith("/GetJwks")
    ]
    assert spans
    return spans


def only(spans: Any) -> ReadableSpan:
    found = list(spans)
    assert len(found) == 1, [s.name for s in found]
    span: ReadableSpan = found[0]
    return span


def sign(key: ed25519.Ed25519PrivateKey, *, kid: str) -> str:
    now = int(time.time())
    claims = {
        "iss": "agentplatform-auth",
        "aud": "agentplatform",
        "sub": str(uuid.uuid4()),
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "roles": ["user"],
    }
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt"})


# -- access logs --------------------------------------------------------------------------


def test_one_json_access_line_per_call_with_the_request_id_echoed(
    auth: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    secrets: list[str] = [PASSWORD]
    with grpc.insecure_channel(auth.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        email = "logs@example.com"
        stub.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD))
        login, call = stub.Login.with_call(
            auth_pb2.LoginRequest(email=email, password=PASSWORD),
            metadata=(("x-request-id", "req-from-the-caller"),),
        )
        secrets += [login.access_token, login.refresh_token]
        assert ("x-request-id", "req-from-the-caller") in call.trailing_metadata()
        _, me_call = stub.GetCurrentUser.with_call(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(login.access_token)
        )
        generated = dict(me_call.trailing_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{13,}", generated)
        # On errors too, and an unusable id is replaced rather than logged.
        wrong = auth_pb2.LoginRequest(email=email, password="wrong-password-123")
        secrets.append(wrong.password)
        error = rpc_error(lambda: stub.Login(wrong, metadata=(("x-request-id", "req-on-error"),)))
        assert ("x-request-id", "req-on-error") in error.trailing_metadata()
        odd = (("x-request-id", 'spaces and "quotes" ' + "x" * 200),)
        error = rpc_error(lambda: stub.Login(wrong, metadata=odd))
        replaced = dict(error.trailing_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{13,}", replaced)
        # A locked account: a warning (go-grpc-middleware's level for ResourceExhausted).
        error = rpc_error(lambda: stub.Login(wrong))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    formatter = JsonFormatter("auth")
    lines = [formatter.format(record) for record in caplog.records]
    for line in lines:
        for secret in secrets:
            assert secret not in line
    access = [json.loads(line) for line in lines]
    access = [entry for entry in access if entry["logger"] == "agentplatform.access"]
    assert [(e["method"], e["code"], e["level"]) for e in access] == [
        (f"/{AUTH}/Register", "OK", "info"),
        (f"/{AUTH}/Login", "OK", "info"),
        (f"/{AUTH}/GetCurrentUser", "OK", "info"),
        (f"/{AUTH}/Login", "UNAUTHENTICATED", "info"),
        (f"/{AUTH}/Login", "UNAUTHENTICATED", "info"),
        (f"/{AUTH}/Login", "RESOURCE_EXHAUSTED", "warning"),
    ]
    for entry in access:
        assert set(entry) >= {
            "time",
            "service",
            "method",
            "code",
            "duration_ms",
            "peer",
            "request_id",
            "user_id",
        }
        assert entry["service"] == "auth"
        assert abs(datetime.fromisoformat(entry["time"]).timestamp() - time.time()) < 60
        assert isinstance(entry["duration_ms"], float)
        assert entry["duration_ms"] >= 0
        assert entry["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:"))
    request_ids = [e["request_id"] for e in access]
    assert request_ids[1] == "req-from-the-caller"
    assert request_ids[2] == generated
    assert request_ids[3] == "req-on-error"
    assert request_ids[4] == replaced
    assert len(set(request_ids)) == len(request_ids)
    assert [e["user_id"] for e in access] == [None, None, login.user.id, None, None, None]
