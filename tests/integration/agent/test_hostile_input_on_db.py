"""Hostile text through AgentService on a real database (SQLite and PostgreSQL): every field
that would carry NUL to the database is INVALID_ARGUMENT on that field, nothing is written,
and listings (filtered ones included) keep working. Without the rules, PostgreSQL refuses
NUL in text (an INTERNAL), and stores it inside JSON where it breaks every metadata filter
that reads the row."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import DataError

from services.agent_svc.domain import AgentInput, Tool
from services.agent_svc.infra.nocache import NoCache
from services.agent_svc.repository.models import AgentRow
from services.agent_svc.repository.sql import SqlAgentUnitOfWork
from services.agent_svc.service.agent_service import AgentService
from services.agent_svc.service.filtering import AgentFilter, MetadataEquals, Ordering
from services.agent_svc.service.paging import PageTokens
from services.agent_svc.service.ports import AgentQuery
from shared.config.clock import SystemClock
from shared.data import migrations
from shared.data.db import make_engine, session_factory
from shared.rpc.errors import InvalidArgument, NotFound
from shared.security.tokens import Principal
from tests.unit.agent.fakes import MODELS, SECRET, agent_input

UowFactory = Callable[[], SqlAgentUnitOfWork]
NUL = "\x00"


def service(uow: UowFactory) -> AgentService:
    return AgentService(
        uow=uow,
        cache=NoCache(),
        clock=SystemClock(),
        allowed_models=MODELS,
        page_tokens=PageTokens(SECRET),
    )


def a_user() -> Principal:
    return Principal(user_id=str(uuid.uuid4()), roles=frozenset({"user"}))


def with_parameters(parameters: dict[str, Any]) -> dict[str, object]:
    return {"tools": (Tool("lookup", "finds", parameters),)}


HOSTILE: list[tuple[str, dict[str, object]]] = [
    ("agent.name", {"name": f"bot{NUL}"}),
    ("agent.description", {"description": f"d{NUL}"}),
    ("agent.instructions", {"instructions": f"be{NUL}kind"}),
    ("agent.model", {"model": f"gpt-4o{NUL}"}),
    ("agent.tools[0].name", {"tools": (Tool(f"lookup{NUL}"),)}),
    ("agent.tools[0].description", {"tools": (Tool("lookup", f"finds{NUL}"),)}),
    ("agent.tools[0].parameters", with_parameters({"type": f"object{NUL}"})),
    ("agent.tools[0].parameters", with_parameters({f"ty{NUL}pe": "object"})),
    ("agent.tools[0].parameters", with_parameters({"a": {"b": [{"c": [f"deep{NUL}"]}]}})),
    ('agent.metadata["team"]', {"metadata": {"team": f"se{NUL}arch"}}),
    ('agent.metadata["te\\u0000am"]', {"metadata": {f"te{NUL}am": "search"}}),
]


@pytest.mark.parametrize(("field", "fields"), HOSTILE)
def test_nul_in_a_create_is_invalid_on_its_field_and_writes_nothing(
    uow: UowFactory, field: str, fields: dict[str, object]
) -> None:
    agents, me = service(uow), a_user()
    with pytest.raises(InvalidArgument) as caught:
        agents.create(principal=me, agent=agent_input(**fields))
    assert [v.field for v in caught.value.violations] == [field]
    assert agents.list(principal=me).agents == ()


@pytest.mark.parametrize(("field", "fields"), HOSTILE)
def test_nul_in_an_update_is_invalid_on_its_field_and_changes_nothing(
    uow: UowFactory, field: str, fields: dict[str, object]
) -> None:
    agents, me = service(uow), a_user()
    agent = agents.create(principal=me, agent=agent_input())
    with pytest.raises(InvalidArgument) as caught:
        agents.update(
            principal=me,
            agent_id=str(agent.id),
            patch=AgentInput(**fields),  # type: ignore[arg-type]
            update_mask=list(fields),
        )
    assert [v.field for v in caught.value.violations] == [field]
    assert agents.get(principal=me, agent_id=str(agent.id)) == agent


def test_metadata_with_nul_is_never_stored_so_filtered_listings_keep_working(
    uow: UowFactory,
) -> None:
    agents, me = service(uow), a_user()
    kept = agents.create(principal=me, agent=agent_input(name="kept"))
    with pytest.raises(InvalidArgument):
        agents.create(principal=me, agent=agent_input(name="poison", metadata={"x": NUL}))
    for text in ('metadata.team = "support"', 'metadata.x = "y"'):
        assert agents.list(principal=me, filter=text).agents == ((kept,) if "team" in text else ())


@pytest.mark.parametrize(
    "text", ['metadata.team = "a\x00"', 'name = "\x00*"', 'model = "gpt-4o\x00"']
)
def test_nul_in_a_filter_value_is_invalid_on_filter(uow: UowFactory, text: str) -> None:
    agents, me = service(uow), a_user()
    agents.create(principal=me, agent=agent_input())
    with pytest.raises(InvalidArgument) as caught:
        agents.list(principal=me, filter=text)
    assert [v.field for v in caught.value.violations] == ["filter"]


@pytest.mark.postgres
def test_why_nul_is_refused_one_stored_in_metadata_breaks_every_metadata_filter(
    postgres_url: str,
) -> None:
    """What the rules prevent, shown by writing the row past them: on PostgreSQL a NUL
    inside a JSON column is stored (as the escape \\u0000), but every `->>` that reads the
    row fails, whichever key it asks for."""
    migrations.upgrade("agent", postgres_url)
    engine = make_engine(postgres_url, pool_size=1)
    try:
        owner = uuid.uuid4()
        poisoned = agent_input(metadata={"team": f"a{NUL}", "other": "b"})
        with engine.begin() as connection:
            connection.execute(
                insert(AgentRow.__table__),  # type: ignore[arg-type]
                [_row(owner, poisoned)],
            )
        sessions = session_factory(engine)
        for condition in (MetadataEquals("team", "a"), MetadataEquals("other", "b")):
            with (
                SqlAgentUnitOfWork(sessions) as work,
                pytest.raises(DataError, match="cannot be converted to text"),
            ):
                work.agents.list_page(
                    AgentQuery(owner, AgentFilter((condition,)), Ordering(), None, 10)
                )
    finally:
        engine.dispose()


def _row(owner: uuid.UUID, fields: AgentInput) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": uuid.uuid4(),
        "owner_id": owner,
        "name": fields.name,
        "description": fields.description,
        "model": fields.model,
        "instructions": fields.instructions,
        "tools": [],
        "metadata": dict(fields.metadata),
        "temperature": None,
        "top_p": None,
        "revision": 1,
        "create_time": now,
        "update_time": now,
    }


@pytest.mark.parametrize("revision_id", ["2147483648", "9999999999", "999999999999999999"])
def test_a_revision_id_beyond_the_column_is_not_found(uow: UowFactory, revision_id: str) -> None:
    """Revision ids are a 32-bit column: a larger one given to RollbackAgent or
    TagAgentRevision is a revision that does not exist (NOT_FOUND), not INTERNAL
    (PostgreSQL's "integer out of range")."""
    agents, me = service(uow), a_user()
    agent = agents.create(principal=me, agent=agent_input())
    with pytest.raises(NotFound) as rolled:
        agents.rollback(principal=me, agent_id=str(agent.id), revision_id=revision_id)
    assert rolled.value.reason == "REVISION_NOT_FOUND"
    with pytest.raises(NotFound) as tagged:
        agents.tag(principal=me, agent_id=str(agent.id), revision_id=revision_id, alias="prod")
    assert tagged.value.reason == "REVISION_NOT_FOUND"
