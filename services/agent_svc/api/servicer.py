"""AgentService over gRPC: proto ⇄ domain, nothing else. Every method needs a token."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any

from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc

from services.agent_svc.api.convert import (
    agent_input,
    agent_message,
    agent_to_proto,
    get_agent_response,
)
from services.agent_svc.api.watch_wire import ChangeEncoder
from services.agent_svc.service.agent_service import AgentService
from services.agent_svc.service.models import ModelEntry
from services.agent_svc.service.watch import WatchBatch, WatchStream
from shared.rpc.request_path import principal_of

__all__ = ["PUBLIC_METHODS", "AgentServicer"]

PUBLIC_METHODS: frozenset[str] = frozenset()
_ENCODED_BATCHES = 1024


def model_to_proto(entry: ModelEntry, agent_count: int = 0) -> agent_pb2.Model:
    return agent_pb2.Model(
        name=entry.name,
        state=entry.state,
        sunset_date=entry.sunset.isoformat() if entry.sunset else "",
        replacement=entry.replacement or "",
        agent_count=agent_count,
    )


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, service: AgentService, encoder: ChangeEncoder | None = None) -> None:
        self._service = service
        self._encoder = encoder or ChangeEncoder()
        # The latest batches' encodings, by identity (event-loop streams only: one thread).
        self._encoded_batches: dict[int, tuple[WatchBatch, bytes]] = {}

    def CreateAgent(
        self, request: agent_pb2.CreateAgentRequest, context: Any
    ) -> agent_pb2.CreateAgentResponse:
        agent = self._service.create(
            principal=principal_of(context),
            agent=agent_input(request.agent),
            request_id=request.request_id,
            validate_only=request.validate_only,
        )
        # A dry run's agent is never stored: its message is not remembered either.
        message = agent_message(agent) if request.validate_only else agent_to_proto(agent)
        return agent_pb2.CreateAgentResponse(agent=message, model_notice=self._notice(agent.model))

    def GetAgent(  # type: ignore[override]  # the encoded response, see get_agent_response
        self, request: agent_pb2.GetAgentRequest, context: Any
    ) -> bytes:
        agent = self._service.get(principal=principal_of(context), agent_id=request.id)
        return get_agent_response(agent)

    def BatchGetAgents(
        self, request: agent_pb2.BatchGetAgentsRequest, context: Any
    ) -> agent_pb2.BatchGetAgentsResponse:
        agents = self._service.batch_get(principal=principal_of(context), agent_ids=request.ids)
        return agent_pb2.BatchGetAgentsResponse(agents=[agent_to_proto(a) for a in agents])

    def ListAgents(
        self, request: agent_pb2.ListAgentsRequest, context: Any
    ) -> agent_pb2.ListAgentsResponse:
        page = self._service.list(
            principal=principal_of(context),
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            order_by=request.order_by,
            show_deleted=request.show_deleted,
        )
        return agent_pb2.ListAgentsResponse(
            agents=[agent_to_proto(agent) for agent in page.agents],
            next_page_token=page.next_page_token,
        )

    def UpdateAgent(
        self, request: agent_pb2.UpdateAgentRequest, context: Any
    ) -> agent_pb2.UpdateAgentResponse:
        agent = self._service.update(
            principal=principal_of(context),
            agent_id=request.agent.id,
            patch=agent_input(request.agent),
            update_mask=list(request.update_mask.paths),
            etag=request.agent.etag,
            validate_only=request.validate_only,
        )
        # A dry run's agent is never stored: its message is not remembered either.
        message = agent_message(agent) if request.validate_only else agent_to_proto(agent)
        return agent_pb2.UpdateAgentResponse(agent=message, model_notice=self._notice(agent.model))

    def _notice(self, model: str) -> agent_pb2.Model | None:
        entry = self._service.model_notice(model)
        return model_to_proto(entry) if entry is not None else None

    def ListModels(
        self, request: agent_pb2.ListModelsRequest, context: Any
    ) -> agent_pb2.ListModelsResponse:
        models = self._service.models(principal=principal_of(context))
        return agent_pb2.ListModelsResponse(
            models=[model_to_proto(entry, count) for entry, count in models]
        )

    def DeleteAgent(
        self, request: agent_pb2.DeleteAgentRequest, context: Any
    ) -> agent_pb2.DeleteAgentResponse:
        agent = self._service.delete(
            principal=principal_of(context), agent_id=request.id, etag=request.etag
        )
        return agent_pb2.DeleteAgentResponse(agent=agent_to_proto(agent))

    def UndeleteAgent(
        self, request: agent_pb2.UndeleteAgentRequest, context: Any
    ) -> agent_pb2.UndeleteAgentResponse:
        agent = self._service.undelete(
            principal=principal_of(context), agent_id=request.id, etag=request.etag
        )
        return agent_pb2.UndeleteAgentResponse(agent=agent_to_proto(agent))

    def PurgeAgent(
        self, request: agent_pb2.PurgeAgentRequest, context: Any
    ) -> agent_pb2.PurgeAgentResponse:
        self._service.purge(principal=principal_of(context), agent_id=request.id, etag=request.etag)
        return agent_pb2.PurgeAgentResponse()

    def ListAgentRevisions(
        self, request: agent_pb2.ListAgentRevisionsRequest, context: Any
    ) -> agent_pb2.ListAgentRevisionsResponse:
        page = self._service.list_revisions(
            principal=principal_of(context),
            agent_id=request.id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return agent_pb2.ListAgentRevisionsResponse(
            agents=[agent_to_proto(agent) for agent in page.agents],
            next_page_token=page.next_page_token,
            aliases={alias: str(revision) for alias, revision in page.aliases.items()},
        )

    def RollbackAgent(
        self, request: agent_pb2.RollbackAgentRequest, context: Any
    ) -> agent_pb2.RollbackAgentResponse:
        agent = self._service.rollback(
            principal=principal_of(context),
            agent_id=request.id,
            revision_id=request.revision_id,
            etag=request.etag,
        )
        return agent_pb2.RollbackAgentResponse(
            agent=agent_to_proto(agent), model_notice=self._notice(agent.model)
        )

    def TagAgentRevision(
        self, request: agent_pb2.TagAgentRevisionRequest, context: Any
    ) -> agent_pb2.TagAgentRevisionResponse:
        agent = self._service.tag(
            principal=principal_of(context),
            agent_id=request.id,
            revision_id=request.revision_id,
            alias=request.alias,
        )
        return agent_pb2.TagAgentRevisionResponse(agent=agent_to_proto(agent))

    def UntagAgentRevision(
        self, request: agent_pb2.UntagAgentRevisionRequest, context: Any
    ) -> agent_pb2.UntagAgentRevisionResponse:
        self._service.untag(
            principal=principal_of(context), agent_id=request.id, alias=request.alias
        )
        return agent_pb2.UntagAgentRevisionResponse()

    def WatchAgents(  # type: ignore[override]  # yields encoded responses (watch_wire)
        self, request: agent_pb2.WatchAgentsRequest, context: Any
    ) -> Iterator[bytes]:
        stream = self._service.watch(
            principal=principal_of(context),
            filter=request.filter,
            resume_token=request.resume_token,
        )
        if not context.add_callback(stream.cancel):  # the call is over already
            stream.cancel()
        for batch in stream:
            yield self._encoder.batch(batch)

    async def watch_agents_async(
        self, request: agent_pb2.WatchAgentsRequest, context: Any
    ) -> AsyncIterator[bytes]:
        """WatchAgents on the grpc.aio watch server (bootstrap): the same stream as on the
        main port, woken through the event loop. Opening it may read the log (a token's
        position): on a worker thread, never on the loop."""
        opening = asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                self._service.watch,
                principal=principal_of(context),
                filter=request.filter,
                resume_token=request.resume_token,
            ),
        )
        try:
            stream = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the caller left while it opened: free its place
            opening.add_done_callback(_cancel_opened)
            raise
        encoded = self._encoded_batches
        async for batch in stream.batches():
            # Streams given the same batch (a fan-out: ChangeHub.share) send the same bytes.
            known = encoded.get(id(batch))
            if known is not None and known[0] is batch:
                yield known[1]
                continue
            data = self._encoder.batch(batch)
            if len(encoded) >= _ENCODED_BATCHES:
                encoded.clear()
            encoded[id(batch)] = (batch, data)
            yield data


def _cancel_opened(opening: asyncio.Future[WatchStream]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().cancel()
