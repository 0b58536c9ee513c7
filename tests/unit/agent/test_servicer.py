"""AgentService over gRPC (grpcio-testing), through the real request path and a real token
verifier (tokens signed here with an Ed25519 key), on in-memory fakes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import grpc
import grpc_testing
import jwt
import pytest
from agentplatform.agent.v1 import agent_pb2
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import field_mask_pb2, message, struct_pb2
from google.rpc import error_details_pb2, status_pb2

from services.agent_svc import SERVICE_NAME
from services.agent_svc.api.servicer import PUBLIC_METHODS, AgentServicer
from services.agent_svc.service.models import (
    ACTIVE,
    DEPRECATED,
    RETIRED,
    ModelCatalogue,
    ModelEntry,
)
from shared.config.clock import SystemClock
from shared.rpc.metrics import RpcMetrics
from shared.rpc.request_path import RequestPath
from shared.security.jwk import VerificationKey
from shared.security.tokens import StaticKeyProvider, TokenVerifier
from tests.helpers import Intercepted, error_detail, rich_status
from tests.unit.agent.fakes import World, make_world

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
ISSUER, AUDIENCE, KID = "test-issuer", "test-audience", "test-key"


@dataclass
class Reply:
    response: Any
    code: grpc.StatusCode
    details: str
    status: status_pb2.Status | None

    def reason(self) -> str:
        return str(error_detail(self.status, error_details_pb2.ErrorInfo).reason)

    def violations(self) -> list[str]:
        bad_request = error_detail(self.status, error_details_pb2.BadRequest)
        return [v.field for v in bad_request.field_violations] if bad_request else []


class Client:
    def __init__(self, world: World) -> None:
        self.world = world
        self._key = ed25519.Ed25519PrivateKey.generate()
        verifier = TokenVerifier(
            StaticKeyProvider([VerificationKey(KID, "EdDSA", self._key.public_key())]),
            issuer=ISSUER,
            audience=AUDIENCE,
            clock=SystemClock(),
        )
        path = RequestPath(
            domain="agent.agentplatform",
            verifier=verifier,
            public_methods=PUBLIC_METHODS,
            metrics=RpcMetrics(),
        )
        self._server = grpc_testing.server_from_dictionary(
            {SERVICE: Intercepted(AgentServicer(world.service), SERVICE_NAME, path)},
            grpc_testing.strict_real_time(),
        )

    def token(self, user_id: str | None = None, roles: Sequence[str] = ("user",)) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": user_id or str(uuid.uuid4()),
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "roles": list(roles),
        }
        return jwt.encode(
            claims, self._key, algorithm="EdDSA", headers={"kid": KID, "typ": "at+jwt"}
        )

    def call(self, method: str, request: message.Message, *, token: str | None) -> Reply:
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        return self.raw_call(method, request, metadata)

    def raw_call(
        self, method: str, request: message.Message, metadata: Sequence[tuple[str, str]]
    ) -> Reply:
        rpc = self._server.invoke_unary_unary(
            SERVICE.methods_by_name[method], metadata, request, None
        )
        response, trailing, code, details = rpc.termination()
        return Reply(response, code, details, rich_status(trailing))

    def ok(self, method: str, request: message.Message, *, token: str) -> Any:
        reply = self.call(method, request, token=token)
        assert reply.code == grpc.StatusCode.OK, reply.details
        return reply.response


@pytest.fixture
def client() -> Client:
    return Client(make_world())


def test_a_create_over_the_quota_is_resource_exhausted_with_a_quota_failure() -> None:
    client = Client(make_world(max_agents_per_owner=1))
    owner = str(uuid.uuid4())
    token = client.token(owner)
    create(client, token)
    reply = client.call(
        "CreateAgent", agent_pb2.CreateAgentRequest(agent=new_agent(name="second")), token=token
    )
    assert (reply.code, reply.reason()) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "AGENT_QUOTA_EXCEEDED",
    )
    failure = error_detail(reply.status, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in failure.violations] == [
        (f"owners/{owner}", "at most 1 agent per owner")
    ]
    assert error_detail(reply.status, error_details_pb2.RetryInfo) is None


def parameters(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def new_agent(**overrides: Any) -> agent_pb2.Agent:
    values: dict[str, Any] = {
        "name": "support bot",
        "model": "gpt-4o",
        "instructions": "Be helpful.",
        "tools": [
            agent_pb2.Tool(
                name="lookup",
                description="Looks up",
                parameters=parameters(
                    {"type": "object", "properties": {"id": {"type": "string"}}, "required": []}
                ),
            )
        ],
        "metadata": {"team": "support"},
        "temperature": 0.5,
    }
    values.update(overrides)
    return agent_pb2.Agent(**values)


def create(client: Client, token: str, **overrides: Any) -> agent_pb2.Agent:
    reply = client.ok(
        "CreateAgent", agent_pb2.CreateAgentRequest(agent=new_agent(**overrides)), token=token
    )
    agent: agent_pb2.Agent = reply.agent
    return agent


def test_create_returns_the_agent_with_server_fields(client: Client) -> None:
    owner = str(uuid.uuid4())
    agent = create(client, client.token(owner), id="ignored", owner_id="ignored", etag="x")
    assert uuid.UUID(agent.id)
    assert agent.owner_id == owner
    assert agent.updated_by == f"users/{owner}"
    assert agent.updated_via == ""
    assert agent.etag
    assert agent.etag != "x"
    assert agent.create_time.seconds > 0
    assert agent.update_time == agent.create_time
    assert agent.HasField("temperature")
    assert agent.temperature == 0.5
    assert not agent.HasField("top_p")
    assert dict(agent.metadata) == {"team": "support"}
    assert agent.tools[0].parameters.fields["properties"].struct_value.fields["id"] == (
        struct_pb2.Value(struct_value=parameters({"type": "string"}))
    )


def test_get_round_trips_every_field(client: Client) -> None:
    token = client.token()
    created = create(client, token, top_p=0.0, description="d")
    got = client.ok("GetAgent", agent_pb2.GetAgentRequest(id=created.id), token=token).agent
    assert got == created
    assert got.HasField("top_p")
    assert got.top_p == 0.0


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_every_method_needs_a_token(client: Client, method: str) -> None:
    request_type = getattr(agent_pb2, SERVICE.methods_by_name[method].input_type.name)
    reply = client.call(method, request_type(), token=None)
    assert (reply.code, reply.reason()) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")


def test_a_token_signed_by_another_key_is_unauthenticated(client: Client) -> None:
    other = Client(client.world)
    reply = client.call(
        "ListAgents", agent_pb2.ListAgentsRequest(), token=other.token(str(uuid.uuid4()))
    )
    assert (reply.code, reply.reason()) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "bearer-less-token"],
)
def test_an_authorization_header_without_a_bearer_token_is_a_missing_token(
    client: Client, header: str
) -> None:
    rpc = client.raw_call("ListAgents", agent_pb2.ListAgentsRequest(), (("authorization", header),))
    assert (rpc.code, rpc.reason()) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")


@pytest.mark.parametrize(
    "token",
    ["not-a-jwt", "a.b.c", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."],
)
def test_a_malformed_or_unsigned_token_is_an_invalid_token(client: Client, token: str) -> None:
    reply = client.call("ListAgents", agent_pb2.ListAgentsRequest(), token=token)
    assert (reply.code, reply.reason()) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")


def test_invalid_create_carries_field_violations(client: Client) -> None:
    reply = client.call(
        "CreateAgent",
        agent_pb2.CreateAgentRequest(
            agent=new_agent(name="", model="nope", tools=[agent_pb2.Tool(name="bad name")]),
            request_id="not-a-uuid",
        ),
        token=client.token(),
    )
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.violations() == ["request_id"]
    reply = client.call(
        "CreateAgent",
        agent_pb2.CreateAgentRequest(
            agent=new_agent(name="", model="nope", tools=[agent_pb2.Tool(name="bad name")]),
        ),
        token=client.token(),
    )
    assert reply.violations() == ["agent.name", "agent.model", "agent.tools[0].name"]
    assert reply.reason() == "INVALID_ARGUMENT"


def test_nan_in_tool_parameters_is_invalid_not_internal(client: Client) -> None:
    tool = agent_pb2.Tool(name="t", parameters=parameters({"x": float("nan")}))
    reply = client.call(
        "CreateAgent",
        agent_pb2.CreateAgentRequest(agent=new_agent(tools=[tool])),
        token=client.token(),
    )
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.violations() == ["agent.tools[0].parameters"]


def deep_struct(levels: int) -> struct_pb2.Struct:
    """A Struct `levels` objects deep: {"a": {"a": … {}}}."""
    data: dict[str, Any] = {}
    for _ in range(levels - 1):
        data = {"a": data}
    return parameters(data)


def test_nul_anywhere_in_an_agent_is_invalid_argument_on_each_field(client: Client) -> None:
    nul = "\x00"
    hostile = new_agent(
        name=f"bot{nul}",
        description=f"d{nul}",
        instructions=f"i{nul}",
        metadata={f"k{nul}": "v", "team": f"v{nul}"},
        tools=[
            agent_pb2.Tool(
                name=f"t{nul}",
                description=f"d{nul}",
                parameters=parameters({f"k{nul}": "v"}),
            ),
            agent_pb2.Tool(
                name="strings", parameters=parameters({"enum": [{"nested": f"v{nul}"}]})
            ),
            agent_pb2.Tool(name="deep", parameters=deep_struct(33)),
        ],
    )
    reply = client.call(
        "CreateAgent", agent_pb2.CreateAgentRequest(agent=hostile), token=client.token()
    )
    assert (reply.code, reply.reason()) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert sorted(reply.violations()) == sorted(
        [
            "agent.name",
            "agent.description",
            "agent.instructions",
            'agent.metadata["k\\u0000"]',
            'agent.metadata["team"]',
            "agent.tools[0].name",
            "agent.tools[0].description",
            "agent.tools[0].parameters",
            "agent.tools[1].parameters",
            "agent.tools[2].parameters",
        ]
    )
    assert client.world.database.commits == 0


def test_a_struct_32_levels_deep_is_accepted(client: Client) -> None:
    tool = agent_pb2.Tool(name="deep", parameters=deep_struct(32))
    created = create(client, client.token(), tools=[tool])
    assert created.tools[0].parameters == tool.parameters


def test_nul_in_a_filter_value_is_invalid_argument_on_filter(client: Client) -> None:
    reply = client.call(
        "ListAgents",
        agent_pb2.ListAgentsRequest(filter='metadata.team = "a\x00"'),
        token=client.token(),
    )
    assert (reply.code, reply.violations()) == (grpc.StatusCode.INVALID_ARGUMENT, ["filter"])


def test_idempotent_create(client: Client) -> None:
    token, request_id = client.token(str(uuid.uuid4())), str(uuid.uuid4())
    request = agent_pb2.CreateAgentRequest(agent=new_agent(), request_id=request_id)
    first = client.ok("CreateAgent", request, token=token).agent
    second = client.ok("CreateAgent", request, token=token).agent
    assert first == second


def test_a_request_id_reused_for_another_agent_is_invalid_argument(client: Client) -> None:
    token, request_id = client.token(str(uuid.uuid4())), str(uuid.uuid4())
    first = agent_pb2.CreateAgentRequest(agent=new_agent(), request_id=request_id)
    client.ok("CreateAgent", first, token=token)
    other = agent_pb2.CreateAgentRequest(agent=new_agent(name="other"), request_id=request_id)
    reply = client.call("CreateAgent", other, token=token)
    assert (reply.code, reply.reason(), reply.violations()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        ["request_id"],
    )


def test_duplicate_name_is_already_exists(client: Client) -> None:
    token = client.token(str(uuid.uuid4()))
    create(client, token)
    reply = client.call("CreateAgent", agent_pb2.CreateAgentRequest(agent=new_agent()), token=token)
    assert reply.code == grpc.StatusCode.ALREADY_EXISTS
    assert reply.reason() == "AGENT_NAME_TAKEN"


def test_someone_elses_agent_is_not_found_and_an_admin_sees_it(client: Client) -> None:
    agent = create(client, client.token())
    stranger = client.call("GetAgent", agent_pb2.GetAgentRequest(id=agent.id), token=client.token())
    missing = client.call(
        "GetAgent", agent_pb2.GetAgentRequest(id=str(uuid.uuid4())), token=client.token()
    )
    assert stranger.code == missing.code == grpc.StatusCode.NOT_FOUND
    assert stranger.reason() == missing.reason()
    boss = client.token(roles=("user", "admin"))
    assert client.ok("GetAgent", agent_pb2.GetAgentRequest(id=agent.id), token=boss).agent == agent


def test_malformed_id_is_invalid_argument_on_id(client: Client) -> None:
    reply = client.call("GetAgent", agent_pb2.GetAgentRequest(id="x"), token=client.token())
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.violations() == ["id"]


def test_list_pages_with_filter_and_order(client: Client) -> None:
    token = client.token(str(uuid.uuid4()))
    for index in range(5):
        create(client, token, name=f"sup-{index}", metadata={"team": "a" if index % 2 else "b"})
    create(client, token, name="other", metadata={"team": "a"})
    request = agent_pb2.ListAgentsRequest(
        page_size=1, filter='name = "sup*" AND metadata.team = "a"', order_by="name desc"
    )
    seen = []
    while True:
        reply = client.ok("ListAgents", request, token=token)
        seen += [a.name for a in reply.agents]
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert seen == ["sup-3", "sup-1"]


def test_every_page_of_big_agents_fits_a_default_clients_receive_limit(client: Client) -> None:
    token = client.token(str(uuid.uuid4()))
    names = [f"big-{index:02d}" for index in range(20)]
    for name in names:  # ~600 KB each
        create(client, token, name=name, tools=[], instructions="€" * 200_000)
    request = agent_pb2.ListAgentsRequest(page_size=20, order_by="name")
    seen, pages = [], 0
    while True:
        reply = client.ok("ListAgents", request, token=token)
        assert reply.agents
        assert reply.ByteSize() < 4 * 1024 * 1024
        seen += [a.name for a in reply.agents]
        pages += 1
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert seen == names
    assert pages > 1


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"filter": "name ~ 'x'"}, "filter"),
        ({"order_by": "model"}, "order_by"),
        ({"page_token": "forged"}, "page_token"),
    ],
)
def test_bad_list_requests_name_the_field(
    client: Client, request_fields: dict[str, Any], field: str
) -> None:
    reply = client.call(
        "ListAgents", agent_pb2.ListAgentsRequest(**request_fields), token=client.token()
    )
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.violations() == [field]


def test_a_user_filtering_by_owner_is_permission_denied(client: Client) -> None:
    me = str(uuid.uuid4())
    reply = client.call(
        "ListAgents",
        agent_pb2.ListAgentsRequest(filter=f'owner_id = "{me}"'),
        token=client.token(me),
    )
    assert (reply.code, reply.reason()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "OWNER_FILTER_NOT_ALLOWED",
    )


def test_update_with_a_mask_and_etag(client: Client) -> None:
    token = client.token(str(uuid.uuid4()))
    agent = create(client, token)
    patch = agent_pb2.Agent(id=agent.id, etag=agent.etag, description="new", name="ignored")
    updated = client.ok(
        "UpdateAgent",
        agent_pb2.UpdateAgentRequest(
            agent=patch, update_mask=field_mask_pb2.FieldMask(paths=["description"])
        ),
        token=token,
    ).agent
    assert (updated.description, updated.name) == ("new", agent.name)
    assert updated.etag != agent.etag
    stale = client.call(
        "UpdateAgent",
        agent_pb2.UpdateAgentRequest(
            agent=patch, update_mask=field_mask_pb2.FieldMask(paths=["description"])
        ),
        token=token,
    )
    assert stale.code == grpc.StatusCode.ABORTED
    assert stale.reason() == "ETAG_MISMATCH"


def test_update_optional_fields_follow_presence(client: Client) -> None:
    token = client.token(str(uuid.uuid4()))
    agent = create(client, token)
    # An empty mask: temperature is present (0.0) so it is set; top_p is absent.
    updated = client.ok(
        "UpdateAgent",
        agent_pb2.UpdateAgentRequest(agent=agent_pb2.Agent(id=agent.id, temperature=0.0)),
        token=token,
    ).agent
    assert updated.HasField("temperature")
    assert updated.temperature == 0.0
    # Named in the mask but absent: cleared.
    cleared = client.ok(
        "UpdateAgent",
        agent_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=agent.id),
            update_mask=field_mask_pb2.FieldMask(paths=["temperature"]),
        ),
        token=token,
    ).agent
    assert not cleared.HasField("temperature")


@pytest.mark.parametrize("path", ["owner_id", "id", "nonsense"])
def test_update_mask_errors(client: Client, path: str) -> None:
    token = client.token(str(uuid.uuid4()))
    agent = create(client, token)
    reply = client.call(
        "UpdateAgent",
        agent_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=agent.id), update_mask=field_mask_pb2.FieldMask(paths=[path])
        ),
        token=token,
    )
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.violations() == ["update_mask"]


def test_delete_rules(client: Client) -> None:
    token = client.token(str(uuid.uuid4()))
    agent = create(client, token)
    stranger = client.call(
        "DeleteAgent", agent_pb2.DeleteAgentRequest(id=agent.id), token=client.token()
    )
    assert stranger.code == grpc.StatusCode.NOT_FOUND
    wrong = client.call(
        "DeleteAgent", agent_pb2.DeleteAgentRequest(id=agent.id, etag="stale"), token=token
    )
    assert wrong.code == grpc.StatusCode.ABORTED
    reply = client.ok(
        "DeleteAgent", agent_pb2.DeleteAgentRequest(id=agent.id, etag=agent.etag), token=token
    )
    assert reply.agent.HasField("delete_time")
    assert reply.agent.HasField("expire_time")
    again = client.call("DeleteAgent", agent_pb2.DeleteAgentRequest(id=agent.id), token=token)
    assert again.code == grpc.StatusCode.NOT_FOUND  # AIP-164: deleting a deleted agent
    kept = client.ok("GetAgent", agent_pb2.GetAgentRequest(id=agent.id), token=token)
    assert kept.agent == reply.agent  # AIP-164: Get returns the soft-deleted agent


def test_batch_get_returns_the_agents_in_order_and_names_a_missing_one(client: Client) -> None:
    token = client.token()
    first, second = create(client, token, name="first"), create(client, token, name="second")
    reply = client.ok(
        "BatchGetAgents",
        agent_pb2.BatchGetAgentsRequest(ids=[second.id, first.id]),
        token=token,
    )
    assert list(reply.agents) == [second, first]
    missing = str(uuid.uuid4())
    refused = client.call(
        "BatchGetAgents", agent_pb2.BatchGetAgentsRequest(ids=[first.id, missing]), token=token
    )
    assert (refused.code, refused.reason()) == (grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
    assert missing in refused.details
    bad = client.call(
        "BatchGetAgents", agent_pb2.BatchGetAgentsRequest(ids=[first.id, "x"]), token=token
    )
    assert (bad.code, bad.violations()) == (grpc.StatusCode.INVALID_ARGUMENT, ["ids[1]"])


def test_validate_only_answers_the_would_be_agent_and_writes_nothing(client: Client) -> None:
    token = client.token()
    request = agent_pb2.CreateAgentRequest(agent=new_agent(name="dry"), validate_only=True)
    would = client.ok("CreateAgent", request, token=token).agent
    assert would.name == "dry"
    got = client.call("GetAgent", agent_pb2.GetAgentRequest(id=would.id), token=token)
    assert got.code == grpc.StatusCode.NOT_FOUND
    real = create(client, token, name="real")
    update = agent_pb2.UpdateAgentRequest(
        agent=agent_pb2.Agent(id=real.id, description="changed", etag=real.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        validate_only=True,
    )
    assert client.ok("UpdateAgent", update, token=token).agent.description == "changed"
    stored = client.ok("GetAgent", agent_pb2.GetAgentRequest(id=real.id), token=token).agent
    assert stored == real


def test_a_dry_run_never_stands_in_for_the_real_write_that_follows(client: Client) -> None:
    """The dry run's agent has the id and version the next real update gets: what
    callers read afterwards must be what was committed, not the dry run's content."""
    token = client.token()
    real = create(client, token, name="poison")
    mask = field_mask_pb2.FieldMask(paths=["description"])
    dry = agent_pb2.UpdateAgentRequest(
        agent=agent_pb2.Agent(id=real.id, description="dry run"),
        update_mask=mask,
        validate_only=True,
    )
    assert client.ok("UpdateAgent", dry, token=token).agent.description == "dry run"
    live = agent_pb2.UpdateAgentRequest(
        agent=agent_pb2.Agent(id=real.id, description="committed"), update_mask=mask
    )
    assert client.ok("UpdateAgent", live, token=token).agent.description == "committed"
    got = client.ok("GetAgent", agent_pb2.GetAgentRequest(id=real.id), token=token).agent
    assert got.description == "committed"
    listed = client.ok("ListAgents", agent_pb2.ListAgentsRequest(), token=token).agents
    assert [a.description for a in listed if a.id == real.id] == ["committed"]


def test_list_models_and_the_notice_of_a_deprecated_model() -> None:
    catalogue = ModelCatalogue(
        [
            ModelEntry("gpt-4.1", ACTIVE),
            ModelEntry("gpt-4o", DEPRECATED, date(2027, 3, 1), "gpt-4.1"),
            ModelEntry("gpt-3.5", RETIRED, None, "gpt-4.1"),
        ]
    )
    client = Client(make_world(catalogue=catalogue))
    token = client.token()
    reply = client.ok(
        "CreateAgent", agent_pb2.CreateAgentRequest(agent=new_agent(model="gpt-4o")), token=token
    )
    assert reply.model_notice == agent_pb2.Model(
        name="gpt-4o", state="deprecated", sunset_date="2027-03-01", replacement="gpt-4.1"
    )
    fresh = client.ok(
        "CreateAgent",
        agent_pb2.CreateAgentRequest(agent=new_agent(model="gpt-4.1", name="fresh")),
        token=token,
    )
    assert not fresh.HasField("model_notice")
    retired = client.call(
        "CreateAgent",
        agent_pb2.CreateAgentRequest(agent=new_agent(model="gpt-3.5", name="old")),
        token=token,
    )
    assert (retired.code, retired.violations()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["agent.model"],
    )
    assert "use gpt-4.1" in retired.details
    models = client.ok("ListModels", agent_pb2.ListModelsRequest(), token=token).models
    assert [(m.name, m.state, m.agent_count) for m in models] == [
        ("gpt-4.1", "active", 1),
        ("gpt-4o", "deprecated", 1),
        ("gpt-3.5", "retired", 0),
    ]
    # A rollback to a revision on a deprecated model says so too.
    moved = client.ok(
        "UpdateAgent",
        agent_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=reply.agent.id, model="gpt-4.1"),
            update_mask=field_mask_pb2.FieldMask(paths=["model"]),
        ),
        token=token,
    )
    assert not moved.HasField("model_notice")
    back = client.ok(
        "RollbackAgent",
        agent_pb2.RollbackAgentRequest(id=reply.agent.id, revision_id="1"),
        token=token,
    )
    assert (back.agent.model, back.model_notice.name) == ("gpt-4o", "gpt-4o")


def test_revisions_aliases_and_undelete_through_the_servicer(client: Client) -> None:
    token = client.token(str(uuid.uuid4()))
    agent = create(client, token)
    updated = client.ok(
        "UpdateAgent",
        agent_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=agent.id, description="second"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        token=token,
    ).agent
    assert (agent.revision_id, updated.revision_id) == ("1", "2")
    assert updated.revision_create_time == updated.update_time
    tagged = client.ok(
        "TagAgentRevision",
        agent_pb2.TagAgentRevisionRequest(id=agent.id, revision_id="1", alias="prod"),
        token=token,
    ).agent
    assert (tagged.revision_id, tagged.etag) == ("1", "")
    listed = client.ok(
        "ListAgentRevisions", agent_pb2.ListAgentRevisionsRequest(id=agent.id), token=token
    )
    assert [a.revision_id for a in listed.agents] == ["2", "1"]
    assert dict(listed.aliases) == {"prod": "1"}
    pinned = client.ok("GetAgent", agent_pb2.GetAgentRequest(id=f"{agent.id}@prod"), token=token)
    assert pinned.agent == tagged
    rolled = client.ok(
        "RollbackAgent",
        agent_pb2.RollbackAgentRequest(id=agent.id, revision_id="prod"),
        token=token,
    ).agent
    assert (rolled.revision_id, rolled.description) == ("3", agent.description)
    client.ok(
        "UntagAgentRevision",
        agent_pb2.UntagAgentRevisionRequest(id=agent.id, alias="prod"),
        token=token,
    )
    deleted = client.ok("DeleteAgent", agent_pb2.DeleteAgentRequest(id=agent.id), token=token)
    restored = client.ok(
        "UndeleteAgent",
        agent_pb2.UndeleteAgentRequest(id=agent.id, etag=deleted.agent.etag),
        token=token,
    ).agent
    assert not restored.HasField("delete_time")
    refused = client.call("PurgeAgent", agent_pb2.PurgeAgentRequest(id=agent.id), token=token)
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    bad = client.call("GetAgent", agent_pb2.GetAgentRequest(id=f"{agent.id}@"), token=token)
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
