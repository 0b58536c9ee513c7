"""Revisions, aliases and soft delete end to end (AIP-162, AIP-164): agent_svc and
auth_svc as processes on PostgreSQL + Redis, called over real channels, and the worker
run as an operator runs it (`python -m services.agent_svc worker --once`).

The agent process deletes with AGENT_DELETED_RETENTION_DAYS=0.0001 (a deleted agent can be
undeleted for 8.6 s, then it is gone and due for purging) and runs no worker of its own, so
only the explicit worker pass purges.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2

from tests.e2e.test_agent_e2e import (
    NOT_FOUND,
    TIMEOUT,
    Stack,
    create,
    get,
    list_all,
    reason_of,
    rpc_error,
    run_stack,
    update,
    violated_fields,
)
from tests.e2e.test_worker_e2e import clean_env, command

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
Change = agent_pb2.AgentChange


class Watcher:
    """A WatchAgents stream read on a thread: the changes it got, and the token of the
    last message (where a reconnect resumes)."""

    def __init__(self, stub: Any, metadata: Sequence[tuple[str, str]], token: str = "") -> None:
        self.changes: list[Any] = []
        self.token = token
        self._seen = threading.Condition()
        self._messages = 0
        self.ended: grpc.StatusCode | None = None
        self._call = stub.WatchAgents(
            agent_pb2.WatchAgentsRequest(resume_token=token), metadata=metadata
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.wait(lambda: self._messages > 0)  # the opening message: it is watching now

    def _read(self) -> None:
        try:
            for response in self._call:
                with self._seen:
                    self.changes.extend(response.changes)
                    self.token = response.resume_token
                    self._messages += 1
                    self._seen.notify_all()
        except grpc.RpcError as error:
            self.ended = error.code()

    def wait(self, done: Callable[[], bool]) -> None:
        with self._seen:
            assert self._seen.wait_for(done, timeout=60), [c.kind for c in self.changes]

    def wait_for_kinds(self, count: int) -> None:
        self.wait(lambda: len(self.changes) >= count)

    def disconnect(self) -> str:
        self._call.cancel()
        self._thread.join(timeout=30)
        assert self.ended == grpc.StatusCode.CANCELLED  # ended by us, not by the server
        return self.token


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    new_postgres_database: Callable[[], str],
    redis_server_url: str,
) -> Iterator[Stack]:
    yield from run_stack(
        "postgres_redis",
        tmp_path_factory.mktemp("revisions-e2e"),
        auth_database_url=new_postgres_database(),
        agent_database_url=new_postgres_database(),
        redis_url=redis_server_url,
        agent_settings={"AGENT_DELETED_RETENTION_DAYS": "0.0001", "AGENT_REVISIONS_KEPT": "10"},
    )


def test_edit_list_tag_pin_roll_back_delete_undelete_and_purge(
    stack: Stack, tmp_path: Path
) -> None:
    stub, owner, reader = stack.agents, stack.new_user(), stack.new_user()
    # A watcher of the owner's agents, started before all of this.
    watcher = Watcher(stub, owner.metadata)
    agent = create(stub, owner, "support-bot", description="v1")
    for number in (2, 3, 4):  # edit three times
        agent = update(
            stub, owner, agent_pb2.Agent(id=agent.id, description=f"v{number}"), ["description"]
        )
    assert agent.revision_id == "4"

    listed = stub.ListAgentRevisions(
        agent_pb2.ListAgentRevisionsRequest(id=agent.id, page_size=3),
        metadata=owner.metadata,
        timeout=TIMEOUT,
    )
    assert [a.description for a in listed.agents] == ["v4", "v3", "v2"]
    assert listed.next_page_token
    assert listed.agents[1].etag == ""
    assert listed.agents[1].updated_by == f"users/{owner.user_id}"

    stub.TagAgentRevision(
        agent_pb2.TagAgentRevisionRequest(id=agent.id, revision_id="3", alias="prod"),
        metadata=owner.metadata,
        timeout=TIMEOUT,
    )
    pinned = get(stub, owner, f"{agent.id}@prod")
    assert (pinned.revision_id, pinned.description) == ("3", "v3")
    assert pinned.create_time == agent.create_time
    # Another user is NOT_FOUND for the agent, its revisions and its aliases alike.
    for ref in (agent.id, f"{agent.id}@prod", f"{agent.id}@3"):
        refused = rpc_error(lambda ref=ref: get(stub, reader, ref))  # type: ignore[misc]
        assert (refused.code(), reason_of(refused)) == (NOT_FOUND, "AGENT_NOT_FOUND")
    admin = stack.admin()
    assert get(stub, admin, f"{agent.id}@prod") == pinned

    # The watcher has seen the create, the three edits and the tag; it disconnects here
    # and misses what follows until it resumes with its token.
    watcher.wait_for_kinds(5)
    token = watcher.disconnect()
    seen = list(watcher.changes)

    # Promote: moving the tag is seen at once by the next read through the cache.
    stub.TagAgentRevision(
        agent_pb2.TagAgentRevisionRequest(id=agent.id, revision_id="4", alias="prod"),
        metadata=owner.metadata,
        timeout=TIMEOUT,
    )
    assert get(stub, owner, f"{agent.id}@prod").description == "v4"

    rolled = stub.RollbackAgent(
        agent_pb2.RollbackAgentRequest(id=agent.id, revision_id="2", etag=agent.etag),
        metadata=owner.metadata,
        timeout=TIMEOUT,
    ).agent
    assert (rolled.revision_id, rolled.description) == ("5", "v2")
    assert get(stub, owner, agent.id) == rolled

    deleted = stub.DeleteAgent(
        agent_pb2.DeleteAgentRequest(id=agent.id, etag=rolled.etag),
        metadata=owner.metadata,
        timeout=TIMEOUT,
    ).agent
    assert deleted.HasField("delete_time")
    assert list_all(stub, owner) == []
    blocked = rpc_error(
        lambda: update(stub, owner, agent_pb2.Agent(id=agent.id, description="x"), [])
    )
    assert (blocked.code(), reason_of(blocked)) == (FAILED_PRECONDITION, "AGENT_DELETED")
    restored = stub.UndeleteAgent(
        agent_pb2.UndeleteAgentRequest(id=agent.id, etag=deleted.etag),
        metadata=owner.metadata,
        timeout=TIMEOUT,
    ).agent
    assert not restored.HasField("delete_time")
    assert [a.id for a in list_all(stub, owner)] == [agent.id]

    # The watcher comes back with its token, before the agent is deleted again.
    watcher = Watcher(stub, owner.metadata, token)

    # Deleted again; past its expire_time it is gone for every call, and the worker purges
    # it with its revisions.
    again = stub.DeleteAgent(
        agent_pb2.DeleteAgentRequest(id=agent.id), metadata=owner.metadata, timeout=TIMEOUT
    ).agent
    assert again.HasField("expire_time")
    # Until the server's clock passes expire_time, reads still show it (deleted): wait for
    # the server to say it is gone rather than for this process's clock.
    deadline = time.monotonic() + TIMEOUT
    while not _gone(lambda: get(stub, owner, agent.id)):
        assert time.monotonic() < deadline, "the deleted agent never expired"
        time.sleep(0.2)
    expired = rpc_error(
        lambda: stub.UndeleteAgent(
            agent_pb2.UndeleteAgentRequest(id=agent.id), metadata=owner.metadata, timeout=TIMEOUT
        )
    )
    assert (expired.code(), reason_of(expired)) == (NOT_FOUND, "AGENT_NOT_FOUND")
    env = clean_env(
        AGENT_PROFILE="prod",
        AGENT_DATABASE_URL=stack.agent_database_url,
        AGENT_REDIS_URL=stack.redis_url,
        AGENT_METRICS_PORT="0",
        AGENT_DATA_DIR=str(tmp_path),
    )
    done = command("agent_svc", "worker", "--once", env=env)
    assert done.returncode == 0, done.stderr
    assert "job agent.deleted.purge: done" in done.stderr
    assert "purged=1" in done.stderr
    for ref in (agent.id, f"{agent.id}@2"):
        gone = rpc_error(lambda ref=ref: get(stub, owner, ref))  # type: ignore[misc]
        assert gone.code() == NOT_FOUND

    # Every change exactly once, in commit order, across the disconnection.
    watcher.wait(lambda: any(c.kind == Change.KIND_PURGED for c in watcher.changes))
    watcher.disconnect()
    events = seen + watcher.changes
    events_seen = [
        (Change.Kind.Name(c.kind), c.agent.revision_id, c.alias, c.alias_revision_id)
        for c in events
    ]
    assert events_seen == [
        ("KIND_CREATED", "1", "", ""),
        ("KIND_UPDATED", "2", "", ""),
        ("KIND_UPDATED", "3", "", ""),
        ("KIND_UPDATED", "4", "", ""),
        ("KIND_TAGGED", "4", "prod", "3"),  # the agent as it is; the alias names 3
        ("KIND_TAGGED", "4", "prod", "4"),  # promoted
        ("KIND_UPDATED", "5", "", ""),  # the rollback
        ("KIND_DELETED", "5", "", ""),
        ("KIND_UNDELETED", "5", "", ""),
        ("KIND_DELETED", "5", "", ""),
        ("KIND_PURGED", "", "", ""),  # only its id
    ]
    assert {c.agent_id for c in events} == {agent.id}
    assert len({c.resume_token for c in events}) == len(events)


@pytest.mark.parametrize(
    "ref",
    [
        "{id}@",
        "@prod",
        "{id}@@",
        "{id}@Prod",
        "{id}@0",
        "{id}@ prod",
        "{id}@\uff50",
        "{id}@\u202e",
        "{id}@" + "a" * 64,
        "{id}@" + "1" * 40,
        "{id}@" + "x" * 200_000,
        "{id}@prod@1",
        "{id}@1e3",
    ],
)
def test_hostile_at_forms_are_invalid_argument_never_internal(stack: Stack, ref: str) -> None:
    owner = stack.new_user()
    agent = create(stack.agents, owner, "hostile")
    refused = rpc_error(lambda: get(stack.agents, owner, ref.replace("{id}", agent.id)))
    assert refused.code() == INVALID_ARGUMENT
    assert violated_fields(refused) == {"id"}


def _gone(call: Callable[[], Any]) -> bool:
    try:
        call()
    except grpc.RpcError as error:
        if error.code() != NOT_FOUND:
            raise
        return True
    return False
