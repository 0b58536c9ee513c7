"""The client's channel policy and typed clients, driven through grpc_testing channels:
refresh on an expired token, retry after RetryInfo's delay within the deadline, a
request_id that stays the same across retries, token exchange requests; and gRPC's own
UNAVAILABLE retry (the service config) against a real in-process server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc_testing
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from agentplatform.client import (
    AgentsClient,
    CachedTokenSource,
    ClientSecret,
    NotFound,
    ResourceExhausted,
    TokenClient,
    Unauthenticated,
    connect,
    delegated,
    intercept,
    static_token,
)
from agentplatform.client.credentials import AccessToken

from shared.rpc import errors as server_errors
from shared.rpc.request_path import status_for

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
TOKEN_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["TokenService"]
GET_AGENT = AGENT_SERVICE.methods_by_name["GetAgent"]
CREATE_AGENT = AGENT_SERVICE.methods_by_name["CreateAgent"]
LIST_AGENTS = AGENT_SERVICE.methods_by_name["ListAgents"]
LIST_MODELS = AGENT_SERVICE.methods_by_name["ListModels"]
ISSUE_TOKEN = TOKEN_SERVICE.methods_by_name["IssueToken"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def testing_channel() -> Any:
    return grpc_testing.channel([AGENT_SERVICE, TOKEN_SERVICE], grpc_testing.strict_real_time())


class Pool:
    """Runs the client side of a call on a daemon thread (a test that fails while a call
    waits for its answer must not hang the run)."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:
                future.set_exception(error)

        threading.Thread(target=run, daemon=True).start()
        return future


@pytest.fixture
def pool() -> Pool:
    return Pool()


def fail(rpc: Any, error: server_errors.DomainError) -> None:
    status = status_for(error, "agent.agentplatform", (("x-request-id", "r"),))
    rpc.terminate(None, status.trailing_metadata, status.code, status.details)


def bearer(metadata: Any) -> str | None:
    return dict(metadata).get("authorization")


def counting_source(tokens: list[str]) -> tuple[CachedTokenSource, list[str]]:
    issued: list[str] = []

    def fetch() -> AccessToken:
        issued.append(tokens[len(issued)])
        return AccessToken(issued[-1], expires_at=float("inf"))

    return CachedTokenSource(fetch), issued


def test_an_expired_token_is_refreshed_and_the_call_sent_once_more(
    testing_channel: Any, pool: Pool
) -> None:
    source, issued = counting_source(["t1", "t2"])
    agents = AgentsClient(intercept(testing_channel, source))
    pending = pool.submit(agents.get, "a1")
    metadata, request, rpc = testing_channel.take_unary_unary(GET_AGENT)
    assert bearer(metadata) == "Bearer t1"
    fail(rpc, server_errors.Unauthenticated("expired", reason="TOKEN_EXPIRED"))
    metadata, request, rpc = testing_channel.take_unary_unary(GET_AGENT)
    assert bearer(metadata) == "Bearer t2"
    assert request.id == "a1"
    rpc.terminate(
        agent_pb2.GetAgentResponse(agent=agent_pb2.Agent(id="a1")), (), grpc.StatusCode.OK, ""
    )
    assert pending.result(timeout=5).id == "a1"
    assert issued == ["t1", "t2"]


def test_a_second_refusal_is_raised_and_other_reasons_are_not_retried(
    testing_channel: Any, pool: Pool
) -> None:
    source, issued = counting_source(["t1", "t2", "t3"])
    agents = AgentsClient(intercept(testing_channel, source))
    pending = pool.submit(agents.get, "a1")
    for _ in range(2):
        _, _, rpc = testing_channel.take_unary_unary(GET_AGENT)
        fail(rpc, server_errors.Unauthenticated("bad", reason="INVALID_TOKEN"))
    with pytest.raises(Unauthenticated) as refused:
        pending.result(timeout=5)
    assert refused.value.reason == "INVALID_TOKEN"
    assert issued == ["t1", "t2"]

    pending = pool.submit(agents.get, "a1")
    _, _, rpc = testing_channel.take_unary_unary(GET_AGENT)
    fail(rpc, server_errors.Unauthenticated("who?", reason="ACCOUNT_INACTIVE"))
    with pytest.raises(Unauthenticated):
        pending.result(timeout=5)
    assert issued == ["t1", "t2"]  # the cached t2 was used, and not dropped


def test_resource_exhausted_is_retried_after_the_retry_info_delay_with_the_same_request_id(
    testing_channel: Any, pool: Pool
) -> None:
    clock = Clock()
    channel = intercept(testing_channel, static_token("t"), sleep=clock.sleep, clock=clock)
    agents = AgentsClient(channel)
    pending = pool.submit(agents.create, agent_pb2.Agent(name="bot", model="gpt-4o"))
    _, first, rpc = testing_channel.take_unary_unary(CREATE_AGENT)
    assert first.request_id
    fail(
        rpc,
        server_errors.ResourceExhausted("busy", retry_after_seconds=0.75, reason="RATE_LIMITED"),
    )
    _, second, rpc = testing_channel.take_unary_unary(CREATE_AGENT)
    rpc.terminate(
        agent_pb2.CreateAgentResponse(agent=agent_pb2.Agent(id="a1", name="bot")),
        (),
        grpc.StatusCode.OK,
        "",
    )
    assert pending.result(timeout=5).id == "a1"
    assert clock.slept == [0.75]
    assert second.request_id == first.request_id
    assert second == first


def test_a_delay_past_the_deadline_or_a_quota_is_raised_without_waiting(
    testing_channel: Any, pool: Pool
) -> None:
    clock = Clock()
    agents = AgentsClient(intercept(testing_channel, None, sleep=clock.sleep, clock=clock))
    pending = pool.submit(agents.get, "a1", timeout=2.0)
    _, _, rpc = testing_channel.take_unary_unary(GET_AGENT)
    fail(rpc, server_errors.ResourceExhausted("locked", retry_after_seconds=900))
    with pytest.raises(ResourceExhausted) as refused:
        pending.result(timeout=5)
    assert refused.value.retry_delay == 900

    pending = pool.submit(agents.create, agent_pb2.Agent(name="bot"))
    _, _, rpc = testing_channel.take_unary_unary(CREATE_AGENT)
    fail(
        rpc,
        server_errors.ResourceExhausted(
            "quota",
            reason="AGENT_QUOTA_EXCEEDED",
            quota_violations=(server_errors.QuotaViolation("owners/u", "at most 1"),),
        ),
    )
    with pytest.raises(ResourceExhausted) as quota:
        pending.result(timeout=5)
    assert not quota.value.retryable
    assert clock.slept == []


def test_retries_stop_after_the_attempts_and_keep_within_the_deadline(
    testing_channel: Any, pool: Pool
) -> None:
    clock = Clock()
    agents = AgentsClient(intercept(testing_channel, None, sleep=clock.sleep, clock=clock))
    pending = pool.submit(agents.get, "a1", timeout=10.0)
    for _ in range(3):
        _, _, rpc = testing_channel.take_unary_unary(GET_AGENT)
        fail(rpc, server_errors.ResourceExhausted("busy", retry_after_seconds=1.0))
    with pytest.raises(ResourceExhausted):
        pending.result(timeout=5)
    assert clock.slept == [1.0, 1.0]

    # 1.5 s of a 2.5 s deadline are gone after one wait: a second one does not fit.
    clock.slept.clear()
    pending = pool.submit(agents.get, "a1", timeout=2.5)
    for _ in range(2):
        _, _, rpc = testing_channel.take_unary_unary(GET_AGENT)
        fail(rpc, server_errors.ResourceExhausted("busy", retry_after_seconds=1.5))
    with pytest.raises(ResourceExhausted):
        pending.result(timeout=5)
    assert clock.slept == [1.5]


def test_errors_of_the_typed_client_are_decoded(testing_channel: Any, pool: Pool) -> None:
    agents = AgentsClient(intercept(testing_channel))
    pending = pool.submit(agents.get, "nope")
    _, _, rpc = testing_channel.take_unary_unary(GET_AGENT)
    fail(rpc, server_errors.NotFound("no agent", reason="AGENT_NOT_FOUND"))
    with pytest.raises(NotFound) as missing:
        pending.result(timeout=5)
    assert missing.value.reason == "AGENT_NOT_FOUND"
    assert isinstance(missing.value.__cause__, grpc.RpcError)


def test_list_walks_every_page(testing_channel: Any, pool: Pool) -> None:
    agents = AgentsClient(intercept(testing_channel))
    pending = pool.submit(lambda: [a.id for a in agents.list(filter='model = "x"', page_size=2)])
    tokens = []
    for page, next_token in ((["a", "b"], "p2"), (["c"], "")):
        _, request, rpc = testing_channel.take_unary_unary(LIST_AGENTS)
        tokens.append(request.page_token)
        assert request.filter == 'model = "x"'
        response = agent_pb2.ListAgentsResponse(
            agents=[agent_pb2.Agent(id=i) for i in page], next_page_token=next_token
        )
        rpc.terminate(response, (), grpc.StatusCode.OK, "")
    assert pending.result(timeout=5) == ["a", "b", "c"]
    assert tokens == ["", "p2"]


def test_dry_runs_and_the_model_catalogue(testing_channel: Any, pool: Pool) -> None:
    agents = AgentsClient(intercept(testing_channel))
    pending = pool.submit(agents.create, agent_pb2.Agent(name="dry"), validate_only=True)
    _, request, rpc = testing_channel.take_unary_unary(CREATE_AGENT)
    assert request.validate_only
    rpc.terminate(agent_pb2.CreateAgentResponse(agent=request.agent), (), grpc.StatusCode.OK, "")
    assert pending.result(timeout=5).name == "dry"
    catalogue = [agent_pb2.Model(name="gpt-4o", state="deprecated", replacement="gpt-4.1")]
    listing = pool.submit(agents.models)
    _, _, rpc = testing_channel.take_unary_unary(LIST_MODELS)
    rpc.terminate(agent_pb2.ListModelsResponse(models=catalogue), (), grpc.StatusCode.OK, "")
    assert listing.result(timeout=5) == catalogue


def test_delegation_exchanges_the_users_token(testing_channel: Any, pool: Pool) -> None:
    source = delegated(
        TokenClient(testing_channel),
        ClientSecret("sa-1", "s3cret"),
        "user-token",
        scope="agents.read",
    )
    pending = pool.submit(source.token)
    _, request, rpc = testing_channel.take_unary_unary(ISSUE_TOKEN)
    assert request == auth_pb2.IssueTokenRequest(
        grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
        client_id="sa-1",
        client_secret="s3cret",
        scope="agents.read",
        subject_token="user-token",
        subject_token_type="urn:ietf:params:oauth:token-type:access_token",
    )
    rpc.terminate(
        auth_pb2.IssueTokenResponse(access_token="delegated", expires_in=600, scope="agents.read"),
        (),
        grpc.StatusCode.OK,
        "",
    )
    assert pending.result(timeout=5) == "delegated"
    assert source.token() == "delegated"  # cached: no second request


# -- a real channel: the service config ------------------------------------------------------


class Scripted:
    """A generic handler answering AgentService/GetAgent and AuthService/RefreshToken from
    a script of status codes (then OK), counting the attempts."""

    def __init__(self, script: list[grpc.StatusCode]) -> None:
        self.script = script
        self.attempts = 0
        self.lock = threading.Lock()

    def handler(self, response: Any) -> Callable[[Any, Any], Any]:
        def handle(request: Any, context: Any) -> Any:
            with self.lock:
                self.attempts += 1
                code = self.script.pop(0) if self.script else grpc.StatusCode.OK
            if code != grpc.StatusCode.OK:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", "10"),))
                context.abort(code, "scripted")
            return response

        return handle


@pytest.fixture
def scripted_server() -> Iterator[tuple[str, Scripted]]:
    script = Scripted([])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agent_handlers = {
        "GetAgent": grpc.unary_unary_rpc_method_handler(
            script.handler(agent_pb2.GetAgentResponse(agent=agent_pb2.Agent(id="a1"))),
            request_deserializer=agent_pb2.GetAgentRequest.FromString,
            response_serializer=agent_pb2.GetAgentResponse.SerializeToString,
        )
    }
    auth_handlers = {
        "RefreshToken": grpc.unary_unary_rpc_method_handler(
            script.handler(auth_pb2.RefreshTokenResponse(access_token="x")),
            request_deserializer=auth_pb2.RefreshTokenRequest.FromString,
            response_serializer=auth_pb2.RefreshTokenResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "agentplatform.agent.v1.AgentService", agent_handlers
            ),
            grpc.method_handlers_generic_handler(
                "agentplatform.auth.v1.AuthService", auth_handlers
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", script
    finally:
        server.stop(None)


def test_grpc_retries_unavailable_per_the_service_config(
    scripted_server: tuple[str, Scripted],
) -> None:
    target, script = scripted_server
    with connect(target, static_token("t")) as channel:
        script.script[:] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
        assert AgentsClient(channel).get("a1").id == "a1"
        assert script.attempts == 3

        script.attempts = 0
        script.script[:] = [grpc.StatusCode.UNAVAILABLE]
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token="r"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert script.attempts == 1  # RefreshToken is never retried


def test_the_generated_stubs_get_the_token_and_a_deadline(
    scripted_server: tuple[str, Scripted],
) -> None:
    target, _ = scripted_server
    with connect(target, static_token("tok")) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        response, call = stub.GetAgent.with_call(agent_pb2.GetAgentRequest(id="a1"))
        assert response.agent.id == "a1"
        assert call.code() == grpc.StatusCode.OK
