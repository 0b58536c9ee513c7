"""The request path on real servers over real channels: bodies that do not parse, the health
service off the saturated path, the request id, shutdown of calls in flight."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2
from agentplatform.auth.v1 import auth_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from tests.helpers import error_detail
from tests.integration.inprocess import Served, agent_service, auth_service

# Bytes no request message parses: a malformed tag, a truncated field, a dangling tag.
GARBAGE = (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" * 3)
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def _methods(module: object, channel: grpc.Channel) -> list[str]:
    """Every method of the module's services that the server behind `channel` serves (as
    its reflection lists them)."""
    served = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    descriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
    methods = [
        f"/{svc.full_name}/{method.name}"
        for svc in descriptor.services_by_name.values()
        if svc.full_name in served
        for method in svc.methods
    ]
    assert methods, f"the server serves none of {descriptor.name}'s services"
    return methods


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Served]]:
    tmp_path: Path = tmp_path_factory.mktemp("request-path")
    with (
        auth_service(tmp_path) as auth,
        agent_service(tmp_path, {"AGENT_AUTH_TARGET": auth.address}) as agent,
    ):
        yield auth, agent


def _refusal(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    status = rpc_status.from_call(error)
    info = error_detail(status, error_details_pb2.ErrorInfo)
    return error.code(), info.reason if info is not None else ""


@pytest.mark.parametrize("body", GARBAGE)
def test_every_unary_method_answers_a_body_that_does_not_parse_with_invalid_argument(
    servers: tuple[Served, Served], body: bytes
) -> None:
    auth, agent = servers
    for served, module in ((auth, auth_pb2), (agent, agent_pb2)):
        with grpc.insecure_channel(served.address) as channel:
            for method in [*_methods(module, channel), HEALTH]:
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary(method)(body, timeout=10)
                # Before any token check, and never grpcio's INTERNAL "Exception
                # deserializing request!".
                assert _refusal(caught.value) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "MALFORMED_REQUEST",
                ), method
                assert "not a valid message" in (caught.value.details() or ""), method


def test_invalid_utf8_in_a_string_field_is_invalid_argument(
    servers: tuple[Served, Served],
) -> None:
    _, agent = servers
    with grpc.insecure_channel(agent.address) as channel, pytest.raises(grpc.RpcError) as caught:
        # GetAgentRequest.id (field 1, a string) holding the bytes C3 28.
        channel.unary_unary("/agentplatform.agent.v1.AgentService/GetAgent")(
            b"\x0a\x02\xc3\x28", timeout=10
        )
    assert _refusal(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


def test_a_streamed_message_that_does_not_parse_is_invalid_argument(
    servers: tuple[Served, Served],
) -> None:
    _, agent = servers
    with grpc.insecure_channel(agent.address) as channel:
        replies = channel.stream_stream(REFLECTION)(iter([b"\xff\xff"]), timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            list(replies)
    assert _refusal(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


def test_health_is_answered_while_every_worker_thread_is_busy(tmp_path: Path) -> None:
    release = threading.Event()
    with auth_service(tmp_path, {"AUTH_MAX_WORKERS": "2"}) as auth:
        blocked = threading.Semaphore(0)

        def stuck(request: bytes, context: object) -> bytes:
            blocked.release()
            release.wait(30)
            return b""

        # A method registered late, like the benchmark's empty handler: it goes through
        # the same registrar, so through the request path (GetJwks is public: no token).
        auth.running.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "agentplatform.test.v1.Stuck",
                    {"Wait": grpc.unary_unary_rpc_method_handler(stuck)},
                ),
            )
        )
        with grpc.insecure_channel(auth.address) as channel:
            waiting = [
                channel.unary_unary("/agentplatform.test.v1.Stuck/Wait").future(b"", timeout=30)
                for _ in range(4)
            ]
            try:
                for _ in range(2):  # both worker threads are taken
                    assert blocked.acquire(timeout=10)
                check = channel.unary_unary(
                    HEALTH,
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                reply = check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                release.set()
                for future in waiting:
                    future.exception()


# -- gRPC's built-in retry honours the server's delay --------------------------------------

JWKS_METHOD = "/agentplatform.auth.v1.AuthService/GetJwks"


def _retrying(code: str) -> str:
    """A service config retrying `code` quickly: without a pushback, five attempts would
    all land within a few tens of milliseconds."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": "agentplatform.auth.v1.AuthService"}],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.01s",
                        "maxBackoff": "0.01s",
                        "backoffMultiplier": 1,
                        "retryableStatusCodes": [code],
                    },
                }
            ]
        }
    )


def test_a_rate_limited_call_carries_its_retry_delay_as_a_pushback(tmp_path: Path) -> None:
    """Two GetJwks per second, one at once: the second call of a burst is refused with a
    delay of about half a second, in RetryInfo and in grpc-retry-pushback-ms."""
    with (
        auth_service(tmp_path, {"AUTH_RATE_LIMITS": "GetJwks=2/1"}) as auth,
        grpc.insecure_channel(auth.address) as channel,
    ):
        call = channel.unary_unary(JWKS_METHOD)
        call(b"", timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
        assert _refusal(refused.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        status = rpc_status.from_call(refused.value)
        retry = error_detail(status, error_details_pb2.RetryInfo)
        assert retry is not None
        trailers = dict(refused.value.trailing_metadata())
        pushback_ms = int(trailers["grpc-retry-pushback-ms"])
        assert 0 < pushback_ms == math.ceil(retry.retry_delay.ToNanoseconds() / 1e6)


def test_grpc_retries_a_refused_call_after_the_servers_delay(tmp_path: Path) -> None:
    """With a retry policy for RESOURCE_EXHAUSTED, the refused call is retried once, after the
    server's delay, and succeeds; with the policy's 10 ms backoff alone its five attempts
    would all be refused."""
    with auth_service(tmp_path, {"AUTH_RATE_LIMITS": "GetJwks=2/1"}) as auth:
        options = [("grpc.service_config", _retrying("RESOURCE_EXHAUSTED"))]
        with grpc.insecure_channel(auth.address, options=options) as channel:
            call = channel.unary_unary(JWKS_METHOD)
            call(b"", timeout=30)
            call(b"", timeout=30)  # refused once, then retried after the pushback
        assert auth.metric("grpc_server_started_total", grpc_method="GetJwks") == 3
