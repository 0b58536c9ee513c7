"""Per-address rate limits in Redis: one budget across replicas, per replica while Redis
fails, and a real auth server refusing a flood at once."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
import redis
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from shared.rpc.errors import ResourceExhausted
from shared.rpc.ratelimit import Limit, RateLimiter
from tests.helpers import error_detail
from tests.integration.inprocess import auth_service

pytestmark = pytest.mark.redis


def allowed(limiter: RateLimiter, limit: Limit, address: str, attempts: int) -> int:
    count = 0
    for _ in range(attempts):
        try:
            limiter.check("Login", limit, address)
            count += 1
        except ResourceExhausted:
            pass
    return count


def test_replicas_share_one_budget_per_address(redis_url: str, unique: str) -> None:
    limit = Limit(rate=0.01, burst=5)  # no refill during the test
    clients = [redis.Redis.from_url(redis_url) for _ in range(3)]
    replicas = [RateLimiter({"Login": limit}, redis_client=c, prefix=unique) for c in clients]
    try:
        total = sum(allowed(replica, limit, "10.9.9.9", 4) for replica in replicas)
        assert total == 5  # not 3 x 5
        assert allowed(replicas[0], limit, "10.9.9.10", 10) == 5
    finally:
        for client in clients:
            client.close()


def test_while_redis_fails_each_replica_limits_on_its_own() -> None:
    events: list[tuple[str, str]] = []
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    limit = Limit(rate=0.01, burst=3)
    limiter = RateLimiter({"Login": limit}, redis_client=dead, on_event=lambda *e: events.append(e))
    assert allowed(limiter, limit, "10.0.0.1", 10) == 3
    assert ("redis", "error") in events


def test_a_flood_from_one_address_is_refused_at_once(tmp_path: Path, redis_url: str) -> None:
    env = {"AUTH_REDIS_URL": redis_url, "AUTH_RATE_LIMITS": "Register=0.01/3"}
    client = redis.Redis.from_url(redis_url)
    try:
        flood(tmp_path, env)
    finally:
        # This budget lasts minutes: other tests register from this address too.
        for key in client.scan_iter("auth:ratelimit:*"):
            client.delete(key)
        client.close()


def flood(tmp_path: Path, env: dict[str, str]) -> None:
    with auth_service(tmp_path, env) as auth, grpc.insecure_channel(auth.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        codes = []
        for _ in range(6):
            try:
                stub.Register(
                    auth_pb2.RegisterRequest(
                        email=f"{uuid.uuid4().hex}@example.com", password="a long password"
                    ),
                    timeout=10,
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                refused = error
        assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        status = rpc_status.from_call(refused)
        assert error_detail(status, error_details_pb2.ErrorInfo).reason == "RATE_LIMITED"
        assert error_detail(status, error_details_pb2.RetryInfo).retry_delay.seconds > 0
        # Other public methods have budgets of their own.
        assert stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).keys
