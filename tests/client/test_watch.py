"""AgentsClient.watch resumes by itself: after UNAVAILABLE (a server shutting down) or
TOO_MANY_WATCHERS it opens the stream again with the last token it saw, after a growing,
jittered backoff reset by each message; an expired token and other errors are raised."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2
from agentplatform.client import errors
from agentplatform.client.agents import AgentsClient, AgentWatch

from shared.rpc import errors as server_errors
from tests.client.test_errors import FakeRpcError, from_server


def change(name: str, token: str) -> agent_pb2.AgentChange:
    return agent_pb2.AgentChange(
        kind=agent_pb2.AgentChange.KIND_CREATED,
        agent=agent_pb2.Agent(name=name),
        agent_id=name,
        resume_token=token,
    )


class Call:
    """A streaming call: its messages, then an error (or the end)."""

    def __init__(self, messages: list[agent_pb2.WatchAgentsResponse], error: Any = None):
        self._messages, self._error = messages, error
        self.cancelled = False

    def __iter__(self) -> Iterator[agent_pb2.WatchAgentsResponse]:
        yield from self._messages
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self.cancelled = True


class Stub:
    def __init__(self, *calls: Call) -> None:
        self._calls = list(calls)
        self.requests: list[agent_pb2.WatchAgentsRequest] = []

    def WatchAgents(self, request: agent_pb2.WatchAgentsRequest) -> Call:
        self.requests.append(agent_pb2.WatchAgentsRequest.FromString(request.SerializeToString()))
        return self._calls.pop(0)


def shutting_down() -> Any:
    return from_server(
        server_errors.Unavailable("bye", retry_after_seconds=0.1, reason="SHUTTING_DOWN")
    )


def test_it_resumes_with_the_last_token_after_unavailable_and_too_many_watchers() -> None:
    busy = from_server(
        server_errors.ResourceExhausted("full", retry_after_seconds=1.0, reason="TOO_MANY_WATCHERS")
    )
    stub = Stub(
        Call(
            [
                agent_pb2.WatchAgentsResponse(resume_token="t0"),
                agent_pb2.WatchAgentsResponse(changes=[change("a", "t1")], resume_token="t1"),
            ],
            shutting_down(),
        ),
        Call([], busy),
        Call(
            [agent_pb2.WatchAgentsResponse(changes=[change("b", "t2")], resume_token="t3")],
            shutting_down(),
        ),
        Call([agent_pb2.WatchAgentsResponse(changes=[change("c", "t4")], resume_token="t4")]),
    )
    slept: list[float] = []
    watch = AgentWatch(stub, 'model = "x"', "", max_backoff=5.0, sleep=slept.append)
    assert [c.agent.name for c in watch] == ["a", "b", "c"]
    assert [r.resume_token for r in stub.requests] == ["", "t1", "t1", "t3"]
    assert {r.filter for r in stub.requests} == {'model = "x"'}
    assert watch.resume_token == "t4"
    assert watch.reconnects == 3
    # Backoff: at least the server's RetryInfo (1 s for the busy one), jittered to half.
    assert 0.05 <= slept[0] <= 0.1
    assert 0.5 <= slept[1] <= 1.0


def test_an_expired_token_is_raised_as_failed_precondition() -> None:
    expired = from_server(server_errors.FailedPrecondition("old", reason="RESUME_TOKEN_EXPIRED"))
    watch = AgentWatch(Stub(Call([], expired)), "", "w1.old", max_backoff=1.0, sleep=print)
    with pytest.raises(errors.FailedPrecondition) as caught:
        list(watch)
    assert caught.value.reason == "RESUME_TOKEN_EXPIRED"


def test_other_errors_are_raised_at_once() -> None:
    denied = from_server(server_errors.PermissionDenied("no", reason="MISSING_SCOPE"))
    slept: list[float] = []
    watch = AgentWatch(Stub(Call([], denied)), "", "", max_backoff=1.0, sleep=slept.append)
    with pytest.raises(errors.PermissionDenied):
        list(watch)
    assert slept == []


def test_a_message_too_large_for_the_client_is_raised_not_resumed_forever() -> None:
    """RESOURCE_EXHAUSTED is resumed only for TOO_MANY_WATCHERS. gRPC's own refusal of a
    message over the client's receive limit has the same code; resuming from the same
    token would get the same message again, forever."""
    too_large = FakeRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5000000 vs. 4194304)"
    )
    slept: list[float] = []
    watch = AgentWatch(Stub(Call([], too_large)), "", "t0", max_backoff=1.0, sleep=slept.append)
    with pytest.raises(errors.ResourceExhausted, match="larger than max"):
        list(watch)
    assert slept == []


class Channel:
    """A channel that hands out calls recording which channel they were made on."""

    def __init__(self, name: str, made: list[tuple[str, str]]) -> None:
        self._name, self._made = name, made

    def _callable(self, method: str, *args: Any, **kwargs: Any) -> Any:
        def call(request: Any, *more: Any, **options: Any) -> Any:
            name = method.rsplit("/", 1)[-1]
            self._made.append((self._name, name))
            return Call([]) if name == "WatchAgents" else agent_pb2.GetAgentResponse()

        return call

    unary_unary = unary_stream = stream_unary = stream_stream = _callable


def test_watch_goes_to_the_watch_channel_when_there_is_one() -> None:
    made: list[tuple[str, str]] = []
    client = AgentsClient(Channel("main", made), watch_channel=Channel("watch", made))
    list(client.watch())
    client.get("some-id")
    assert made == [("watch", "WatchAgents"), ("main", "GetAgent")]
    made.clear()
    list(AgentsClient(Channel("main", made)).watch())
    assert made == [("main", "WatchAgents")]
