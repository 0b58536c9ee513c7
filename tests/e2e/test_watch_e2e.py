"""WatchAgents over real channels to real processes (the stacks of test_agent_e2e), on the
WatchAgents port (AGENT_WATCH_PORT, the grpc.aio server) unless a test says otherwise.

- On both backends: a stream gets its caller's changes in commit order; one resumed with
  the last token gets every later change exactly once; tokens past the retention and
  malformed ones are refused with their reasons; a missing, forged or under-scoped token
  is refused on the watch port with the status and details the main port gives; the main
  port serves the same stream; a runtime pinned to `id@prod` hears each move of the alias;
  on the typed client's watch channel, a watcher that stops
  reading gets the changes made meanwhile in a few messages, not one message each.
- On a server of its own (one worker thread, two streams at most, on both ports together):
  one stream over the limit is RESOURCE_EXHAUSTED TOO_MANY_WATCHERS while unary calls are
  still served; SIGTERM ends the streams UNAVAILABLE SHUTTING_DOWN, and the typed client
  (its `watch_channel` on the watch port) resumes on the server that replaces it without
  missing or repeating a change.
- A second replica on PostgreSQL + Redis whose log poll is minutes long: its stream hears
  a change made on the first one at once (the Redis pub/sub wake-up).
- grpcurl on either port: reflection, health, the stream.

The grpcurl form (README):

    grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"filter": "model = \\"gpt-4o\\""}' \\
        127.0.0.1:50053 agentplatform.agent.v1.AgentService/WatchAgents
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from agentplatform.client import errors as client_errors
from agentplatform.client.agents import AgentsClient
from agentplatform.client.channel import connect, intercept
from agentplatform.client.credentials import static_token
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.agent_svc import SERVICE_NAME as AGENT_SERVICE
from services.agent_svc.service.watch import Position, encode_token
from tests.e2e.test_agent_e2e import (
    TIMEOUT,
    Caller,
    Stack,
    agent_env,
    create,
    delete,
    free_ports,
    json_log,
    reason_of,
    run_stack,
    start,
    update,
    violated_fields,
    wait_agent_ready,
)
from tests.e2e.test_service_accounts_e2e import by_secret, create_account


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from run_stack("embedded", tmp_path_factory.mktemp("watch-e2e-embedded"))


@pytest.fixture(scope="module")
def pg_stack(
    tmp_path_factory: pytest.TempPathFactory,
    new_postgres_database: Callable[[], str],
    redis_server_url: str,
) -> Iterator[Stack]:
    yield from run_stack(
        "postgres_redis",
        tmp_path_factory.mktemp("watch-e2e-postgres"),
        auth_database_url=new_postgres_database(),
        agent_database_url=new_postgres_database(),
        redis_url=redis_server_url,
    )


@pytest.fixture(scope="module", params=["embedded", "postgres_redis"])
def stack(request: pytest.FixtureRequest) -> Stack:
    name = "embedded_stack" if request.param == "embedded" else "pg_stack"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


CREATED = agent_pb2.AgentChange.KIND_CREATED
UPDATED = agent_pb2.AgentChange.KIND_UPDATED
DELETED = agent_pb2.AgentChange.KIND_DELETED
KIND = agent_pb2.AgentChange.Kind.Name


class Watch:
    """A WatchAgents call read on a thread of its own: messages arrive on a queue."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceStub, caller: Caller, **request: Any):
        self.call = stub.WatchAgents(
            agent_pb2.WatchAgentsRequest(**request), metadata=caller.metadata
        )
        self.messages: queue.Queue[agent_pb2.WatchAgentsResponse | grpc.RpcError] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError as error:
            self.messages.put(error)

    def next(self) -> agent_pb2.WatchAgentsResponse:
        item = self.messages.get(timeout=TIMEOUT)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def opened(self) -> str:
        """The first message: no change, the start's token."""
        first = self.next()
        assert list(first.changes) == []
        assert first.resume_token
        return first.resume_token

    def changes(self, count: int) -> tuple[list[agent_pb2.AgentChange], str]:
        """The next `count` changes (heartbeats skipped) and the last message's token."""
        got: list[agent_pb2.AgentChange] = []
        token = ""
        while len(got) < count:
            message = self.next()
            got += message.changes
            token = message.resume_token
        assert len(got) == count, [(KIND(c.kind), c.agent.name) for c in got]
        return got, token

    def error(self) -> grpc.RpcError:
        while True:
            item = self.messages.get(timeout=TIMEOUT * 2)
            if isinstance(item, grpc.RpcError):
                return item


def summary(changes: list[agent_pb2.AgentChange]) -> list[tuple[str, str]]:
    return [(KIND(c.kind), c.agent.name) for c in changes]


def test_a_stream_gets_the_callers_changes_and_a_resumed_one_each_later_change_once(
    stack: Stack,
) -> None:
    stub, me, other = stack.agents, stack.new_user(), stack.new_user()
    watch = Watch(stack.watch_agents, me)
    watch.opened()
    theirs_watch = Watch(stack.watch_agents, other)
    theirs_watch.opened()
    first = create(stub, me, "w-one")
    update(stub, me, agent_pb2.Agent(id=first.id, description="changed"), ["description"])
    second = create(stub, me, "w-two")
    got, token = watch.changes(3)
    assert summary(got) == [
        ("KIND_CREATED", "w-one"),
        ("KIND_UPDATED", "w-one"),
        ("KIND_CREATED", "w-two"),
    ]
    assert got[1].agent.description == "changed"
    assert all(c.matches_filter for c in got)
    watch.call.cancel()
    # While nobody watches: more changes, then a resume from the last token.
    third = create(stub, me, "w-three")
    delete(stub, me, second.id)
    resumed = Watch(stack.watch_agents, me, resume_token=token)
    resumed.opened()
    again, _ = resumed.changes(2)
    assert summary(again) == [("KIND_CREATED", "w-three"), ("KIND_DELETED", "w-two")]
    assert again[1].agent_id == second.id
    assert again[0].agent.id == third.id
    # Another owner's stream saw none of that: its first change is its own.
    create(stub, other, "w-theirs")
    (own,), _ = theirs_watch.changes(1)
    assert own.agent.name == "w-theirs"
    resumed.call.cancel()
    theirs_watch.call.cancel()


SLOW_WATCHER_CHANGES = 24
BIG_INSTRUCTIONS = "x" * 12_000  # a change of ~12 KB: one fits the watch channel's window


def test_a_watcher_that_stops_reading_gets_the_changes_made_meanwhile_in_a_few_messages(
    stack: Stack,
) -> None:
    """The typed client's watch channel (`connect(watch=True)`: a 16 KiB stream window,
    no BDP probing). A watcher that stops reading holds up the server's next send once the
    window is full, and the changes committed meanwhile come together in the message after
    it. With gRPC's default window (grown by BDP probing to megabytes) each change would
    wait in the watcher's own transport as a message of its own, unseen by the server:
    a watcher slower than the changes falls further behind with every one (without
    `watch=True` this test gets all 24 changes in 24 messages)."""
    me = stack.new_user()
    channel = connect(stack.agent.watch_address, static_token(me.token), watch=True)
    prompt = Watch(stack.watch_agents, me)
    # A deadline: a lost change fails the test instead of hanging it.
    call = agent_pb2_grpc.AgentServiceStub(channel).WatchAgents(
        agent_pb2.WatchAgentsRequest(), timeout=TIMEOUT * 4
    )
    try:
        assert list(next(call).changes) == []  # open: from now on
        # A watcher that keeps up paces the changes: each is committed once it has the one
        # before, so nothing but the slow watcher's window would put two in one message.
        prompt.opened()
        made = []
        for n in range(SLOW_WATCHER_CHANGES):
            made.append(create(stack.agents, me, f"w-slow-{n}", instructions=BIG_INSTRUCTIONS).id)
            prompt.changes(1)
        got: list[str] = []
        messages = 0
        while len(got) < len(made):
            message = next(call)
            messages += bool(message.changes)  # heartbeats aside
            got += [change.agent.id for change in message.changes]
        assert got == made  # every change once, in commit order
        # Four messages (as seen every time): the first change, in the window (a change is
        # ~12 KB of 16 KiB); the second, whose send the server's transport accepts though the
        # window holds up its bytes; the third, whose send waits for that one; the other 21
        # together, taken when that send completes (the watcher reading again). None of them
        # splits further: a change reached the prompt watcher, so the server had read it,
        # before the next one was made.
        assert messages <= 4, messages
    finally:
        call.cancel()
        prompt.call.cancel()
        channel.close()


def test_a_runtime_pinned_to_an_alias_hears_each_promotion(stack: Stack) -> None:
    """A runtime pins `id@prod`; the owner edits the agent and moves `prod` to the new
    revision: the stream carries the move (the alias and the revision it names now), and
    reading `id@prod` then gives that revision. Tagging it again is no change."""
    stub, me = stack.agents, stack.new_user()
    watch = Watch(stack.watch_agents, me)
    watch.opened()
    agent = create(stub, me, "w-pinned")

    def tag(revision_id: str) -> None:
        stub.TagAgentRevision(
            agent_pb2.TagAgentRevisionRequest(id=agent.id, revision_id=revision_id, alias="prod"),
            metadata=me.metadata,
            timeout=TIMEOUT,
        )

    tag("1")
    update(stub, me, agent_pb2.Agent(id=agent.id, description="v2"), ["description"])
    tag("2")
    pinned = stub.GetAgent(
        agent_pb2.GetAgentRequest(id=f"{agent.id}@prod"), metadata=me.metadata, timeout=TIMEOUT
    ).agent
    assert (pinned.revision_id, pinned.description) == ("2", "v2")
    tag("2")
    stub.UntagAgentRevision(
        agent_pb2.UntagAgentRevisionRequest(id=agent.id, alias="prod"),
        metadata=me.metadata,
        timeout=TIMEOUT,
    )
    got, _ = watch.changes(5)
    assert [(KIND(c.kind), c.alias, c.alias_revision_id) for c in got] == [
        ("KIND_CREATED", "", ""),
        ("KIND_TAGGED", "prod", "1"),
        ("KIND_UPDATED", "", ""),
        ("KIND_TAGGED", "prod", "2"),
        ("KIND_UNTAGGED", "prod", ""),
    ]
    assert {c.agent_id for c in got} == {agent.id}
    assert got[3].agent.description == "v2"  # the agent as it is
    # Nothing more: tagging the revision an alias names already made no event. A change
    # made now is the next one the stream gets.
    create(stub, me, "w-after-pins")
    (after,), _ = watch.changes(1)
    assert (KIND(after.kind), after.agent.name) == ("KIND_CREATED", "w-after-pins")
    watch.call.cancel()


def test_a_filtered_stream_is_told_when_an_agent_leaves_its_filter(stack: Stack) -> None:
    stub, me = stack.agents, stack.new_user()
    watch = Watch(stack.watch_agents, me, filter='metadata.team = "watchers"')
    watch.opened()
    agent = create(stub, me, "w-team", metadata={"team": "watchers"})
    create(stub, me, "w-elsewhere", metadata={"team": "others"})
    update(stub, me, agent_pb2.Agent(id=agent.id, metadata={"team": "others"}), ["metadata"])
    got, _ = watch.changes(2)
    assert [(KIND(c.kind), c.agent.name, c.matches_filter) for c in got] == [
        ("KIND_CREATED", "w-team", True),
        ("KIND_UPDATED", "w-team", False),
    ]
    watch.call.cancel()


def test_an_expired_token_and_a_malformed_one_are_refused_with_their_reasons(
    stack: Stack,
) -> None:
    stub, me = stack.watch_agents, stack.new_user()
    old = encode_token(Position(1, datetime.now(UTC) - timedelta(hours=2)))
    expired = Watch(stub, me, resume_token=old).error()
    assert expired.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(expired) == "RESUME_TOKEN_EXPIRED"
    malformed = Watch(stub, me, resume_token="not-a-token").error()
    assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(malformed) == {"resume_token"}


def test_the_main_port_serves_the_same_stream(stack: Stack) -> None:
    me = stack.new_user()
    watch = Watch(stack.agents, me)
    watch.opened()
    made = create(stack.agents, me, "w-main-port")
    (change,), _ = watch.changes(1)
    assert (KIND(change.kind), change.agent.id) == ("KIND_CREATED", made.id)
    watch.call.cancel()


def test_streams_their_callers_leave_are_logged_cancelled_and_the_server_serves_on(
    stack: Stack,
) -> None:
    """Every stream on the watch port ends with one access line, CANCELLED when its client
    left. (Reading the call's peer once it was cancelled crashed the process: the line
    is made from what the call said when it began.)"""
    me = stack.new_user()
    ids: set[str] = set()
    for round_ in range(12):  # streams cancelled right after a change reached them
        watches = [Watch(stack.watch_agents, me) for _ in range(20)]
        for watch in watches:
            watch.opened()
        ids |= {dict(w.call.initial_metadata())["x-request-id"] for w in watches}
        create(stack.agents, me, f"w-cancel-{round_}")
        for watch in watches:
            watch.changes(1)
            watch.call.cancel()
    made = create(stack.agents, me, "w-after-cancels")  # the process still serves
    deadline = time.monotonic() + TIMEOUT
    while True:  # the lines are written as the server learns of each cancellation
        ended = {
            e.get("request_id"): e.get("code")
            for e in json_log(stack.agent)
            if e.get("logger") == "agentplatform.access" and e.get("request_id") in ids
        }
        if len(ended) == len(ids) or time.monotonic() > deadline:
            break
        assert stack.agent.process.poll() is None, stack.agent.log()[-3000:]
        time.sleep(0.05)
    assert len(ended) == len(ids)
    assert set(ended.values()) == {"CANCELLED"}
    assert made.name == "w-after-cancels"


def _refusal(stub: agent_pb2_grpc.AgentServiceStub, metadata: Any) -> tuple[Any, ...]:
    """What a refused stream tells its caller: status, message, every detail."""
    call = stub.WatchAgents(agent_pb2.WatchAgentsRequest(), metadata=metadata, timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(call))
    error: Any = caught.value
    status = rpc_status.from_call(error)
    assert status is not None, (error.code(), error.details())
    return error.code(), error.details(), [d.SerializeToString() for d in status.details]


def test_the_watch_port_refuses_tokens_exactly_as_the_main_port(stack: Stack) -> None:
    writer_only = by_secret(stack, create_account(stack, "agents.write"))
    forged = stack.new_user().token[:-4] + "AAAA"
    cases = {
        "MISSING_TOKEN": (),
        "INVALID_TOKEN": (("authorization", f"Bearer {forged}"),),
        "MISSING_SCOPE": writer_only.metadata,
    }
    for reason, metadata in cases.items():
        on_watch_port = _refusal(stack.watch_agents, metadata)
        assert on_watch_port == _refusal(stack.agents, metadata), reason
        code, message, _ = on_watch_port
        assert code != grpc.StatusCode.OK
        assert reason_of_details(on_watch_port[2]) == reason, message


def reason_of_details(details: list[bytes]) -> str:
    for packed in details:
        any_message = any_pb2.Any.FromString(packed)
        info = error_details_pb2.ErrorInfo()
        if any_message.Unpack(info):
            return str(info.reason)
    return ""


# -- a server of its own: the limit, unary calls beside it, SIGTERM, the client resuming ----


def _own_agent(stack: Stack, tmp: Path, port: int, watch_port: int) -> Any:
    env = agent_env(
        port,
        tmp / "agent-data",
        stack.auth.address,
        AGENT_WATCH_PORT=str(watch_port),
        AGENT_WATCH_MAX_STREAMS="2",  # on both ports together
        AGENT_MAX_WORKERS="1",  # streams on the main pool would leave unary calls none
        AGENT_GRACE_SECONDS="60",  # streams must end long before it
        AGENT_SHUTDOWN_DELAY_SECONDS="0",
        AGENT_WATCH_HEARTBEAT_SECONDS="1",
    )
    process = start("agent_svc", env, port, tmp)
    wait_agent_ready(process, "")
    return process


def test_the_stream_limit_leaves_unary_calls_served_and_sigterm_ends_streams_to_resume_elsewhere(
    embedded_stack: Stack, tmp_path: Path
) -> None:
    port, watch_port = free_ports(2)
    server = _own_agent(embedded_stack, tmp_path, port, watch_port)
    me = embedded_stack.new_user()
    channel = grpc.insecure_channel(server.address)
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    watch_channel = grpc.insecure_channel(server.watch_address)
    try:
        raw = Watch(agent_pb2_grpc.AgentServiceStub(watch_channel), me)
        raw.opened()
        typed = AgentsClient(
            intercept(grpc.insecure_channel(server.address), static_token(me.token)),
            watch_channel=intercept(
                grpc.insecure_channel(server.watch_address), static_token(me.token)
            ),
        ).watch(max_backoff=0.5)
        received: queue.Queue[agent_pb2.AgentChange | BaseException] = queue.Queue()

        def follow() -> None:
            try:
                for change in typed:
                    received.put(change)
            except BaseException as exc:
                received.put(exc)

        threading.Thread(target=follow, daemon=True).start()
        before = create(stub, me, "w-before")  # unary, with both streams open
        assert received.get(timeout=TIMEOUT).agent.id == before.id  # type: ignore[union-attr]
        # Two streams on the watch port: the limit holds on either port.
        for port_stub in (stub, agent_pb2_grpc.AgentServiceStub(watch_channel)):
            over = Watch(port_stub, me).error()
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason_of(over) == "TOO_MANY_WATCHERS"
        reply = stub.GetAgent(
            agent_pb2.GetAgentRequest(id=before.id), metadata=me.metadata, timeout=TIMEOUT
        )
        assert reply.agent.name == "w-before"

        os.kill(server.process.pid, signal.SIGTERM)
        ended = raw.error()
        assert ended.code() == grpc.StatusCode.UNAVAILABLE
        assert reason_of(ended) == "SHUTTING_DOWN"
        assert server.process.wait(timeout=TIMEOUT) == 0
        # Each stream has its access line, with the code it ended with.
        ends = {
            str(e.get("code"))
            for e in json_log(server)
            if e.get("logger") == "agentplatform.access"
            and str(e.get("method", "")).endswith("/WatchAgents")
        }
        assert {"RESOURCE_EXHAUSTED", "UNAVAILABLE"} <= ends, ends
        # The replacement (same data): the typed client resumes there, from its last token.
        (tmp_path / "again").mkdir()
        replacement = start(
            "agent_svc",
            agent_env(
                port,
                tmp_path / "agent-data",
                embedded_stack.auth.address,
                AGENT_WATCH_PORT=str(watch_port),
            ),
            port,
            tmp_path / "again",
        )
        try:
            wait_agent_ready(replacement, "")
            after = create(stub, me, "w-after")
            change = received.get(timeout=TIMEOUT)
            assert not isinstance(change, BaseException), change
            assert change.agent.id == after.id  # the next one: nothing repeated
            assert change.kind == CREATED
            assert typed.reconnects >= 1
        finally:
            typed.close()
            replacement.stop()
    finally:
        channel.close()
        watch_channel.close()
        server.stop()


def test_an_expired_token_raises_from_the_typed_client(stack: Stack) -> None:
    me = stack.new_user()
    channel = intercept(stack.channels[1], static_token(me.token))
    watch_channel = intercept(stack.channels[2], static_token(me.token))
    old = encode_token(Position(1, datetime.now(UTC) - timedelta(hours=2)))
    with pytest.raises(client_errors.FailedPrecondition) as caught:
        next(iter(AgentsClient(channel, watch_channel=watch_channel).watch(resume_token=old)))
    assert caught.value.reason == "RESUME_TOKEN_EXPIRED"


# -- a second replica hears the first one's changes through Redis --------------------------


def test_a_stream_ends_unauthenticated_when_its_callers_token_is_revoked(stack: Stack) -> None:
    """A stream is checked for its whole life, not only when it opens: disabling the user
    revokes their tokens, and their open stream (on either port) ends UNAUTHENTICATED
    TOKEN_REVOKED within the revocation poll, delivering nothing more; another user's
    stream goes on."""
    me, other = stack.new_user(), stack.new_user()
    mine = [Watch(stack.watch_agents, me), Watch(stack.agents, me)]
    theirs = Watch(stack.watch_agents, other)
    for watch in (*mine, theirs):
        watch.opened()
    with grpc.insecure_channel(stack.auth.address) as channel:
        users = auth_pb2_grpc.UserServiceStub(channel)
        users.DisableUser(
            auth_pb2.DisableUserRequest(id=me.user_id),
            metadata=stack.admin().metadata,
            timeout=TIMEOUT,
        )
    for watch in mine:
        error = watch.error()
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        status = rpc_status.from_call(error)
        assert status is not None, error.details()
        details = [d.SerializeToString() for d in status.details]
        assert reason_of_details(details) == "TOKEN_REVOKED", error.details()
    create(stack.agents, other, "still-watched")
    changes, _ = theirs.changes(1)
    assert summary(changes) == [("KIND_CREATED", "still-watched")]
    theirs.call.cancel()


@pytest.fixture
def second_replica(pg_stack: Stack, tmp_path: Path) -> Iterator[Any]:
    port, watch_port = free_ports(2)
    env = agent_env(
        port,
        tmp_path / "agent-data",
        pg_stack.auth.address,
        pg_stack.agent_database_url,
        pg_stack.redis_url,
        AGENT_WATCH_PORT=str(watch_port),
        AGENT_WATCH_POLL_SECONDS="600",  # only the Redis wake-up can deliver within the test
    )
    process = start("agent_svc", env, port, tmp_path)
    try:
        wait_agent_ready(process, pg_stack.redis_url)
        process.wait_logged("watch signal subscribed")
        yield process
    finally:
        process.stop()


def test_a_second_replicas_stream_hears_the_first_ones_changes_through_redis(
    pg_stack: Stack, second_replica: Any
) -> None:
    me = pg_stack.new_user()
    with grpc.insecure_channel(second_replica.watch_address) as channel:
        watch = Watch(agent_pb2_grpc.AgentServiceStub(channel), me)
        watch.opened()
        made = create(pg_stack.agents, me, "w-across")  # on the first replica
        (change,), _ = watch.changes(1)
        assert change.agent.id == made.id
        watch.call.cancel()


@pytest.mark.parametrize("port", ["watch", "main"])
def test_an_operator_watches_through_grpcurl(
    embedded_stack: Stack, grpcurl_binary: Path, port: str
) -> None:
    """The README's command, on either port: grpcurl finds the method by reflection,
    prints the opening message (its resume_token) and each change as it comes;
    `-max-time` ends the session (exit 64 + DEADLINE_EXCEEDED)."""
    me = embedded_stack.new_user()
    agent = embedded_stack.agent
    address = agent.watch_address if port == "watch" else agent.address
    process = subprocess.Popen(
        [
            str(grpcurl_binary),
            "-plaintext",
            "-max-time",
            "20",
            "-H",
            f"authorization: Bearer {me.token}",
            "-d",
            json.dumps({"filter": 'model = "gpt-4o"'}),
            address,
            "agentplatform.agent.v1.AgentService/WatchAgents",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        opening = _json_object(process.stdout)
        assert opening["resume_token"].startswith("w1.")
        made = create(embedded_stack.agents, me, "w-grpcurl")
        change = _json_object(process.stdout)
        assert change["changes"][0]["kind"] == "KIND_CREATED"
        assert change["changes"][0]["agent"]["id"] == made.id
    finally:
        process.kill()
        process.wait()


def test_the_watch_port_answers_health_checks_and_lists_its_services(
    embedded_stack: Stack, grpcurl_binary: Path
) -> None:
    address = embedded_stack.agent.watch_address
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", AGENT_SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = subprocess.run(
        [str(grpcurl_binary), "-plaintext", address, "list"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout.split()
    assert AGENT_SERVICE in listed
    assert "grpc.health.v1.Health" in listed


def _json_object(stream: Any) -> dict[str, Any]:
    """The next JSON object grpcurl prints (one per message, over several lines)."""
    lines: list[str] = []
    while True:
        line = stream.readline()
        assert line, "grpcurl ended: " + "".join(lines)
        lines.append(line)
        if line.rstrip() == "}":
            return dict(json.loads("".join(lines)))
