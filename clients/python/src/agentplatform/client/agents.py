"""AgentsClient: agentplatform.agent.v1.AgentService, typed, errors decoded."""

from __future__ import annotations

import builtins
import random
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.client.errors import AgentPlatformError, decode

__all__ = ["AgentWatch", "AgentsClient", "ModelDeprecatedWarning"]

# Reasons after which a fresh token is fetched before the stream is opened again.
_TOKEN_REASONS = frozenset({"TOKEN_EXPIRED", "INVALID_TOKEN"})

_Response = TypeVar("_Response")


def _call(method: Callable[..., _Response], request: Any, timeout: float | None) -> _Response:
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as rpc_error:
        raise decode(rpc_error) from rpc_error


class ModelDeprecatedWarning(FutureWarning):
    """The agent was created, updated or rolled back with a deprecated model: it works
    until the model's sunset date. `model` is the catalogue entry (its `sunset_date` and
    `replacement`). Shown once per call site by default; to act on it instead, e.g.
    `warnings.simplefilter("error", ModelDeprecatedWarning)` and catch it, or record it
    with `warnings.catch_warnings(record=True)`."""

    def __init__(self, model: agent_pb2.Model) -> None:
        self.model = model
        until = f" until {model.sunset_date}" if model.sunset_date else ""
        instead = f"; move to {model.replacement}" if model.replacement else ""
        super().__init__(f"model {model.name} is deprecated: it works{until}{instead}")


def _notice(response: Any) -> None:
    """Warns (ModelDeprecatedWarning) when the response carries a model_notice."""
    if response.HasField("model_notice"):
        warnings.warn(ModelDeprecatedWarning(response.model_notice), stacklevel=3)


class AgentsClient:
    """The agent registry. Use a channel from `connect(target, credentials)`; every
    method raises an AgentPlatformError subclass on failure (NotFound, Aborted, ...).
    `timeout` (seconds) overrides the channel's default deadline for one call."""

    def __init__(self, channel: Any, *, watch_channel: Any = None) -> None:
        """`watch_channel`: a channel to agent_svc's WatchAgents port (`AGENT_WATCH_PORT`,
        50053 by default; made like `channel`, with a watch channel's small stream window:
        `connect("agent:50053", tokens, tls=tls, watch=True)`), where a stream costs the
        server far less (a grpc.aio server). Without it `watch()` uses `channel`: the main
        port serves WatchAgents too."""
        self._stub = agent_pb2_grpc.AgentServiceStub(channel)
        self._watch_stub = (
            agent_pb2_grpc.AgentServiceStub(watch_channel)
            if watch_channel is not None
            else self._stub
        )

    def create(
        self,
        agent: agent_pb2.Agent,
        *,
        request_id: str | None = None,
        validate_only: bool = False,
        timeout: float | None = None,
    ) -> agent_pb2.Agent:
        """Creates `agent`. A request_id (a new UUID unless given) makes the create
        idempotent: the channel's retries, and yours with the same request_id within
        24 hours, return the first response instead of creating twice. `validate_only`:
        a dry run (AIP-163) that raises what the create would and stores nothing. A
        deprecated model warns (ModelDeprecatedWarning)."""
        request = agent_pb2.CreateAgentRequest(
            agent=agent,
            request_id=request_id or str(uuid.uuid4()),
            validate_only=validate_only,
        )
        response: agent_pb2.CreateAgentResponse = _call(self._stub.CreateAgent, request, timeout)
        _notice(response)
        return response.agent

    def get(self, agent_id: str, *, timeout: float | None = None) -> agent_pb2.Agent:
        request = agent_pb2.GetAgentRequest(id=agent_id)
        response: agent_pb2.GetAgentResponse = _call(self._stub.GetAgent, request, timeout)
        return response.agent

    def batch_get(
        self, agent_ids: list[str], *, timeout: float | None = None
    ) -> list[agent_pb2.Agent]:
        """Up to 100 agents in the order asked; NotFound if any is missing (AIP-231)."""
        request = agent_pb2.BatchGetAgentsRequest(ids=agent_ids)
        response: agent_pb2.BatchGetAgentsResponse = _call(
            self._stub.BatchGetAgents, request, timeout
        )
        return list(response.agents)

    def list_pages(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        show_deleted: bool = False,
        timeout: float | None = None,
    ) -> Iterator[agent_pb2.ListAgentsResponse]:
        """Every page, fetched as the iteration reaches it (`timeout` per page). A page
        may hold fewer than page_size agents; only an empty next_page_token ends.
        `show_deleted`: soft-deleted agents too."""
        request = agent_pb2.ListAgentsRequest(
            filter=filter, order_by=order_by, page_size=page_size, show_deleted=show_deleted
        )
        while True:
            page: agent_pb2.ListAgentsResponse = _call(self._stub.ListAgents, request, timeout)
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def list(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        show_deleted: bool = False,
        timeout: float | None = None,
    ) -> Iterator[agent_pb2.Agent]:
        """Every agent that matches, page after page (see list_pages)."""
        for page in self.list_pages(
            filter=filter,
            order_by=order_by,
            page_size=page_size,
            show_deleted=show_deleted,
            timeout=timeout,
        ):
            yield from page.agents

    def update(
        self,
        agent: agent_pb2.Agent,
        paths: Sequence[str],
        *,
        etag: str | None = None,
        validate_only: bool = False,
        timeout: float | None = None,
    ) -> agent_pb2.Agent:
        """Sets the fields named by `paths` (e.g. ["description", "metadata"]) to
        `agent`'s values. The update is conditional on `etag` (default: agent.etag; ""
        for an unconditional one): a stale etag raises Aborted (ETAG_MISMATCH); read the
        agent again, then decide. `validate_only`: a dry run (nothing stored). A deprecated
        model warns (ModelDeprecatedWarning)."""
        if not paths:
            raise ValueError("name the fields to update (paths)")
        sent = agent_pb2.Agent()
        sent.CopyFrom(agent)
        if etag is not None:
            sent.etag = etag
        request = agent_pb2.UpdateAgentRequest(
            agent=sent,
            update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
            validate_only=validate_only,
        )
        response: agent_pb2.UpdateAgentResponse = _call(self._stub.UpdateAgent, request, timeout)
        _notice(response)
        return response.agent

    def models(self, *, timeout: float | None = None) -> builtins.list[agent_pb2.Model]:
        """The model catalogue (ListModels): each model's state (active, deprecated with
        its sunset date and replacement, retired) and how many of your agents (an admin:
        all) use it."""
        response: agent_pb2.ListModelsResponse = _call(
            self._stub.ListModels, agent_pb2.ListModelsRequest(), timeout
        )
        return list(response.models)

    def delete(
        self, agent_id: str, *, etag: str = "", timeout: float | None = None
    ) -> agent_pb2.Agent:
        """Soft-deletes the agent (only if its etag still is `etag`, when given); the
        agent as deleted, with its expire_time. UndeleteAgent restores it until then."""
        request = agent_pb2.DeleteAgentRequest(id=agent_id, etag=etag)
        response: agent_pb2.DeleteAgentResponse = _call(self._stub.DeleteAgent, request, timeout)
        return response.agent

    def undelete(
        self, agent_id: str, *, etag: str = "", timeout: float | None = None
    ) -> agent_pb2.Agent:
        """Restores a soft-deleted agent; AlreadyExists (AGENT_NOT_DELETED) if it is not."""
        request = agent_pb2.UndeleteAgentRequest(id=agent_id, etag=etag)
        response: agent_pb2.UndeleteAgentResponse = _call(
            self._stub.UndeleteAgent, request, timeout
        )
        return response.agent

    def purge(self, agent_id: str, *, etag: str = "", timeout: float | None = None) -> None:
        """Removes the agent and its revisions at once (the agents.admin scope)."""
        request = agent_pb2.PurgeAgentRequest(id=agent_id, etag=etag)
        _call(self._stub.PurgeAgent, request, timeout)

    def get_revision(
        self, agent_id: str, revision: str, *, timeout: float | None = None
    ) -> agent_pb2.Agent:
        """The agent as it was at `revision`: a revision id ("3") or an alias ("prod")."""
        return self.get(f"{agent_id}@{revision}", timeout=timeout)

    def list_revision_pages(
        self, agent_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[agent_pb2.ListAgentRevisionsResponse]:
        """The agent's kept revisions, newest first, page after page (each page carries
        the agent's aliases)."""
        request = agent_pb2.ListAgentRevisionsRequest(id=agent_id, page_size=page_size)
        while True:
            page: agent_pb2.ListAgentRevisionsResponse = _call(
                self._stub.ListAgentRevisions, request, timeout
            )
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def list_revisions(
        self, agent_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[agent_pb2.Agent]:
        """Every kept revision of the agent, newest first."""
        for page in self.list_revision_pages(agent_id, page_size=page_size, timeout=timeout):
            yield from page.agents

    def rollback(
        self, agent_id: str, revision: str, *, etag: str = "", timeout: float | None = None
    ) -> agent_pb2.Agent:
        """Makes the configuration of `revision` (an id or an alias) the agent's next
        revision; conditional on `etag` when given. A deprecated model warns
        (ModelDeprecatedWarning)."""
        request = agent_pb2.RollbackAgentRequest(id=agent_id, revision_id=revision, etag=etag)
        response: agent_pb2.RollbackAgentResponse = _call(
            self._stub.RollbackAgent, request, timeout
        )
        _notice(response)
        return response.agent

    def tag(
        self, agent_id: str, revision: str, alias: str, *, timeout: float | None = None
    ) -> agent_pb2.Agent:
        """Points `alias` at `revision` (an id, or another alias to promote what it names);
        the agent at that revision."""
        request = agent_pb2.TagAgentRevisionRequest(id=agent_id, revision_id=revision, alias=alias)
        response: agent_pb2.TagAgentRevisionResponse = _call(
            self._stub.TagAgentRevision, request, timeout
        )
        return response.agent

    def untag(self, agent_id: str, alias: str, *, timeout: float | None = None) -> None:
        """Removes the alias."""
        request = agent_pb2.UntagAgentRevisionRequest(id=agent_id, alias=alias)
        _call(self._stub.UntagAgentRevision, request, timeout)

    def watch(
        self,
        *,
        filter: str = "",
        resume_token: str = "",
        max_backoff: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> AgentWatch:
        """The committed changes of the agents you may see (WatchAgents), filtered like
        `list`, for as long as you iterate: yields each AgentChange in commit order. A
        stream that ends UNAVAILABLE (a server shutting down, a lost connection) or
        RESOURCE_EXHAUSTED (TOO_MANY_WATCHERS) is opened again with the last resume token,
        after a backoff growing to `max_backoff` seconds (reset by every message), so
        nothing is missed nor repeated. `AgentWatch.resume_token` is the position to keep
        to resume later. A token past the server's retention raises FailedPrecondition
        (reason RESUME_TOKEN_EXPIRED): list again, then watch without a token. Other
        errors are raised as they come. On the client's `watch_channel` when it has one."""
        return AgentWatch(
            self._watch_stub, filter, resume_token, max_backoff=max_backoff, sleep=sleep
        )


# RESOURCE_EXHAUSTED only with this reason: the same code without it is gRPC's own (a
# message over the channel's receive limit), which a resume from the same token repeats.
_RESUMABLE_EXHAUSTED = "TOO_MANY_WATCHERS"


class AgentWatch:
    """An iterator of AgentChange that resumes by itself (see AgentsClient.watch)."""

    def __init__(
        self,
        stub: Any,
        filter: str,
        resume_token: str,
        *,
        max_backoff: float,
        sleep: Callable[[float], None],
    ) -> None:
        self._stub = stub
        self._filter = filter
        self.resume_token = resume_token
        """Resume after everything yielded so far (and past what the filter left out)."""
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._call: Any = None
        self._closed = False
        self.reconnects = 0

    def close(self) -> None:
        """Ends the stream (from any thread); the iteration stops."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    def __iter__(self) -> Iterator[agent_pb2.AgentChange]:
        backoff = 0.0
        refreshed = False
        while not self._closed:
            request = agent_pb2.WatchAgentsRequest(
                filter=self._filter, resume_token=self.resume_token
            )
            self._call = self._stub.WatchAgents(request)
            try:
                for response in self._call:
                    backoff = 0.0
                    refreshed = False
                    for change in response.changes:
                        self.resume_token = change.resume_token
                        yield change
                    self.resume_token = response.resume_token or self.resume_token
                return  # the server ended the stream without an error: nothing more
            except grpc.RpcError as rpc_error:
                if self._closed:
                    return
                error = decode(rpc_error)
                if not self._resumable(error, refreshed):
                    raise error from rpc_error
                refreshed = error.code == grpc.StatusCode.UNAUTHENTICATED
            self.reconnects += 1
            delay = error.retry_delay if error.retry_delay is not None else 0.0
            backoff = min(self._max_backoff, max(backoff * 2, 0.1, delay))
            self._sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311 - jitter

    @staticmethod
    def _resumable(error: AgentPlatformError, refreshed: bool) -> bool:
        if error.code == grpc.StatusCode.UNAVAILABLE:
            return True
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return error.reason == _RESUMABLE_EXHAUSTED
        # The token source hands a fresh token to the next attempt (once in a row).
        return (
            error.code == grpc.StatusCode.UNAUTHENTICATED
            and error.reason in _TOKEN_REASONS
            and not refreshed
        )
