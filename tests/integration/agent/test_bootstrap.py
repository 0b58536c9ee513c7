"""The composition root wired for real, in process: settings → server on a free port, a real
channel, keys fetched from a stand-in auth service's GetJwks (or missing), and the cache
over Redis when configured."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import jwt
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.agent_svc import SERVICE_NAME
from services.agent_svc.bootstrap import build_app, build_server
from services.agent_svc.settings import load_agent_settings
from shared.data import migrations
from shared.rpc.server import RunningServer
from shared.security.jwk import to_jwk
from tests.helpers import error_detail, free_port

KID = "bootstrap-test-key"
ISSUER, AUDIENCE = "agentplatform-auth", "agentplatform"
AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class StandInAuth:
    """Publishes one Ed25519 public key, like auth_svc's GetJwks."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self.jwk = {**to_jwk(key.public_key()), "kid": KID, "alg": "EdDSA", "use": "sig"}
        self.calls = 0

    def GetJwks(self, request: Any, context: Any) -> auth_pb2.GetJwksResponse:
        self.calls += 1
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.Jwk(**self.jwk)])

    def serve(self, port: int) -> grpc.Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(
            self.GetJwks,
            request_deserializer=auth_pb2.GetJwksRequest.FromString,
            response_serializer=auth_pb2.GetJwksResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(AUTH_SERVICE, {"GetJwks": handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        return server


def sign(key: ed25519.Ed25519PrivateKey, user_id: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": user_id,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "roles": ["user"],
    }
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": KID, "typ": "at+jwt"})


def start_agent_service(env: dict[str, str]) -> RunningServer:
    settings = load_agent_settings(
        {
            "AGENT_PORT": "0",
            "AGENT_METRICS_PORT": "0",
            "AGENT_WATCH_PORT": "0",
            "AGENT_LOG_LEVEL": "WARNING",
            **env,
        }
    )
    migrations.upgrade("agent", settings.common.database_url)
    running = build_server(build_app(settings))
    running.start()
    return running


@pytest.fixture
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def auth_port() -> int:
    return free_port()


@pytest.fixture
def stand_in_auth(key: ed25519.Ed25519PrivateKey, auth_port: int) -> Iterator[StandInAuth]:
    auth = StandInAuth(key)
    server = auth.serve(auth_port)
    yield auth
    server.stop(0).wait()


def health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:
        status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
        if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            return int(status)
        time.sleep(0.05)


def eventually_ok(call: Callable[[], Any], within: float = 30.0) -> Any:
    """The call's reply once it succeeds (the channel to auth reconnects in ≤ 2 s)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def health_now(channel: grpc.Channel, service: str = SERVICE_NAME) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)


def test_started_without_auth_it_is_unavailable_and_not_ready_until_keys_arrive(
    sqlite_url: str, key: ed25519.Ed25519PrivateKey, auth_port: int
) -> None:
    running = start_agent_service(
        {
            "AGENT_DATABASE_URL": sqlite_url,
            "AGENT_AUTH_TARGET": f"127.0.0.1:{auth_port}",  # nothing listens yet
            "AGENT_JWKS_COOLDOWN_SECONDS": "0",
        }
    )
    token = sign(key, str(uuid.uuid4()))
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            # Not ready (no keys to verify with), and the refusal is temporary: UNAVAILABLE
            # with RetryInfo, never UNAUTHENTICATED for a token that may well be valid.
            assert health_now(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health_now(channel, "") == health_pb2.HealthCheckResponse.SERVING  # alive
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListAgents(agent_pb2.ListAgentsRequest(), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(caught.value)
            assert error_detail(status, error_details_pb2.ErrorInfo).reason == "KEYS_UNAVAILABLE"
            assert error_detail(status, error_details_pb2.RetryInfo) is not None

            auth = StandInAuth(key)
            server = auth.serve(auth_port)
            try:
                reply = eventually_ok(
                    lambda: stub.ListAgents(
                        agent_pb2.ListAgentsRequest(), metadata=metadata, timeout=10
                    )
                )
                assert list(reply.agents) == []
                assert auth.calls >= 1
                assert health(channel) == health_pb2.HealthCheckResponse.SERVING
            finally:
                server.stop(0).wait()
    finally:
        running.stop(0)


def test_crud_through_a_real_channel_with_redis(
    postgres_url: str,
    redis_url: str,
    key: ed25519.Ed25519PrivateKey,
    auth_port: int,
    stand_in_auth: StandInAuth,
) -> None:
    running = start_agent_service(
        {
            "AGENT_DATABASE_URL": postgres_url,
            "AGENT_REDIS_URL": redis_url,
            "AGENT_AUTH_TARGET": f"127.0.0.1:{auth_port}",
        }
    )
    metadata = (("authorization", f"Bearer {sign(key, str(uuid.uuid4()))}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            created = stub.CreateAgent(
                agent_pb2.CreateAgentRequest(
                    agent=agent_pb2.Agent(name="wired", model="gpt-4o", temperature=0.3)
                ),
                metadata=metadata,
                timeout=10,
            ).agent
            get = agent_pb2.GetAgentRequest(id=created.id)
            assert stub.GetAgent(get, metadata=metadata, timeout=10).agent == created
            assert stub.GetAgent(get, metadata=metadata, timeout=10).agent == created  # cached
            updated = stub.UpdateAgent(
                agent_pb2.UpdateAgentRequest(
                    agent=agent_pb2.Agent(id=created.id, etag=created.etag, description="new"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                ),
                metadata=metadata,
                timeout=10,
            ).agent
            assert stub.GetAgent(get, metadata=metadata, timeout=10).agent == updated
            deleted = stub.DeleteAgent(
                agent_pb2.DeleteAgentRequest(id=created.id), metadata=metadata, timeout=10
            ).agent
            assert deleted.HasField("delete_time")
            assert stub.GetAgent(get, metadata=metadata, timeout=10).agent == deleted
            at_one = agent_pb2.GetAgentRequest(id=f"{created.id}@1")
            assert stub.GetAgent(at_one, metadata=metadata, timeout=10).agent.description == ""
            with pytest.raises(grpc.RpcError) as caught:
                stub.UpdateAgent(
                    agent_pb2.UpdateAgentRequest(
                        agent=agent_pb2.Agent(id=created.id, description="late"),
                        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                    ),
                    metadata=metadata,
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        running.stop(0)
