"""Per-address rate limits of public methods: the algorithm in process, parsing, addresses,
and the request path refusing at once."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from shared.rpc.errors import ResourceExhausted
from shared.rpc.metrics import Metrics
from shared.rpc.ratelimit import Limit, RateLimiter, client_address, parse_limits
from shared.rpc.request_path import RequestPath
from shared.security.tokens import StaticKeyProvider, TokenVerifier
from tests.helpers import FakeClock, error_detail, rich_status


def limiter(limits: dict[str, Limit], clock: FakeClock, events: list[Any]) -> RateLimiter:
    return RateLimiter(
        limits, monotonic=clock.monotonic, on_event=lambda *event: events.append(event)
    )


def test_a_burst_is_allowed_then_the_rate_and_the_wait_is_said() -> None:
    clock, events = FakeClock(), list[Any]()
    limits = limiter({"Login": Limit(rate=2, burst=3)}, clock, events)
    limit = Limit(rate=2, burst=3)
    for _ in range(3):
        limits.check("Login", limit, "10.0.0.1")
    with pytest.raises(ResourceExhausted) as refused:
        limits.check("Login", limit, "10.0.0.1")
    assert refused.value.reason == "RATE_LIMITED"
    assert refused.value.retry_after_seconds == pytest.approx(0.5)
    assert events == [("Login", "refused")]
    limits.check("Login", limit, "10.0.0.2")  # another address has its own budget
    clock.advance(0.5)
    limits.check("Login", limit, "10.0.0.1")  # one more after one interval
    with pytest.raises(ResourceExhausted):
        limits.check("Login", limit, "10.0.0.1")


def test_refused_calls_do_not_use_up_the_budget() -> None:
    clock, events = FakeClock(), list[Any]()
    limit = Limit(rate=1, burst=1)
    limits = limiter({"Login": limit}, clock, events)
    limits.check("Login", limit, "a")
    for _ in range(100):
        with pytest.raises(ResourceExhausted):
            limits.check("Login", limit, "a")
    clock.advance(1.0)
    limits.check("Login", limit, "a")


def test_in_process_state_is_bounded() -> None:
    clock = FakeClock()
    limit = Limit(rate=1, burst=1)
    limits = RateLimiter({"Login": limit}, monotonic=clock.monotonic, max_local_keys=100)
    for n in range(10_000):
        limits.check("Login", limit, f"10.0.{n // 256}.{n % 256}")
    assert len(limits._local._tats) == 100


def test_limits_parse_and_refuse_nonsense() -> None:
    assert parse_limits("Login=10/50, GetJwks=0.5/2,") == {
        "Login": Limit(10, 50),
        "GetJwks": Limit(0.5, 2),
    }
    for bad in ("Login", "Login=x/1", "Login=0/1", "Login=1/0", "=1/1", "Login=nan/1"):
        with pytest.raises(ValueError, match="bad rate limit"):
            parse_limits(bad)


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.1.2.3:51234", "10.1.2.3"),
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/tmp/grpc.sock", "unix:/tmp/grpc.sock"),
    ],
)
def test_the_address_is_the_peer_without_its_port(peer: str, address: str) -> None:
    assert client_address(peer) == address


class Context:
    def __init__(self, peer: str) -> None:
        self._peer = peer
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.trailing: Any = ()

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return self._peer

    def code(self) -> None:
        return None

    def time_remaining(self) -> None:
        return None

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def test_the_request_path_refuses_over_the_limit_before_anything_else_runs() -> None:
    clock = FakeClock()
    metrics = Metrics()
    limits = RateLimiter(
        {"Login": Limit(rate=1, burst=2)},
        monotonic=clock.monotonic,
        on_event=metrics.rate_limit_event,
    )
    calls: list[bytes] = []

    def login(request: bytes, context: Any) -> bytes:
        calls.append(request)
        return b""

    path = RequestPath(
        domain="test",
        verifier=TokenVerifier(StaticKeyProvider([]), issuer="i", audience="a", clock=clock),
        public_methods={
            "/agentplatform.auth.v1.AuthService/Login",
            "/agentplatform.auth.v1.AuthService/Logout",
        },
        metrics=metrics.rpc,
        rate_limiter=limits,
    )
    handler = path.wrap(
        "/agentplatform.auth.v1.AuthService/Login",
        grpc.unary_unary_rpc_method_handler(login),
    )
    for _ in range(2):
        handler.unary_unary(b"ok", Context("ipv4:10.0.0.9:1"))
    refused = Context("ipv4:10.0.0.9:2")
    with pytest.raises(RuntimeError):
        handler.unary_unary(b"\xff\xff", refused)  # garbage: never even decoded
    assert refused.aborted is not None
    assert refused.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rich_status(refused.trailing)
    assert error_detail(status, error_details_pb2.ErrorInfo).reason == "RATE_LIMITED"
    assert error_detail(status, error_details_pb2.RetryInfo).retry_delay.seconds == 1
    assert calls == [b"ok", b"ok"]
    assert metrics.rate_limited.value("Login") == 1
    # Methods without a limit are not limited.
    other = path.wrap(
        "/agentplatform.auth.v1.AuthService/Logout",
        grpc.unary_unary_rpc_method_handler(lambda request, context: b""),
    )
    for _ in range(10):
        other.unary_unary(b"", Context("ipv4:10.0.0.9:3"))
