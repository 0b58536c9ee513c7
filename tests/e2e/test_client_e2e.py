"""agentplatform.client against real auth_svc and agent_svc processes (embedded backend):
a service account's tokens by client secret, by private_key_jwt and by delegation, the
typed AgentsClient's whole lifecycle, and the typed errors the servers' statuses become."""

from __future__ import annotations

import contextlib
import uuid
import warnings
from collections.abc import Iterator

import pytest
from agentplatform.agent.v1 import agent_pb2
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from agentplatform.client import (
    Aborted,
    AgentsClient,
    AlreadyExists,
    ClientSecret,
    InvalidArgument,
    ModelDeprecatedWarning,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    client_secret,
    connect,
    delegated,
    private_key_jwt,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.e2e.test_agent_e2e import ISSUER, TIMEOUT, Stack, new_agent, run_stack

DEPRECATED = "o3"  # in this module's catalogue: deprecated, sunset 2099-01-01, use o4-mini


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from run_stack(
        "embedded",
        tmp_path_factory.mktemp("client-e2e"),
        agent_settings={"AGENT_DEPRECATED_MODELS": f"{DEPRECATED}@2099-01-01>o4-mini"},
    )


def create_account(stack: Stack, *scopes: str) -> auth_pb2.CreateServiceAccountResponse:
    reply: auth_pb2.CreateServiceAccountResponse = auth_pb2_grpc.ServiceAccountServiceStub(
        stack.channels[0]
    ).CreateServiceAccount(
        auth_pb2.CreateServiceAccountRequest(
            service_account=auth_pb2.ServiceAccount(
                display_name=f"client-{uuid.uuid4().hex[:8]}", scopes=list(scopes)
            )
        ),
        metadata=stack.admin().metadata,
        timeout=TIMEOUT,
    )
    return reply


@contextlib.contextmanager
def account_client(
    stack: Stack, *scopes: str
) -> Iterator[tuple[auth_pb2.CreateServiceAccountResponse, AgentsClient]]:
    """A new service account with `scopes` and a typed client acting as it (client secret)."""
    account = create_account(stack, *scopes)
    with (
        connect(stack.auth.address) as auth,
        connect(
            stack.agent.address,
            client_secret(auth, account.service_account.id, account.client_secret),
        ) as channel,
    ):
        yield account, AgentsClient(channel)


def test_a_service_account_manages_agents_with_the_typed_client(stack: Stack) -> None:
    with account_client(stack, "agents.read", "agents.write") as (account, agents):
        request_id = str(uuid.uuid4())
        created = agents.create(new_agent("client-bot"), request_id=request_id)
        assert created.updated_by == f"serviceAccounts/{account.service_account.id}"
        # The same request_id: the first response, nothing created twice.
        assert agents.create(new_agent("client-bot"), request_id=request_id) == created
        assert agents.get(created.id) == created
        assert [a.id for a in agents.list(filter='name = "client-bot"', page_size=1)] == [
            created.id
        ]

        changed = agent_copy(created, description="now described")
        updated = agents.update(changed, ["description"])
        assert updated.description == "now described"
        with pytest.raises(Aborted) as stale:
            agents.update(changed, ["description"])  # the first etag again
        assert stale.value.reason == "ETAG_MISMATCH"
        assert stale.value.request_id

        with pytest.raises(InvalidArgument) as invalid:
            agents.create(new_agent(""))
        assert invalid.value.field_violations
        # Revisions and aliases: list, tag, read pinned, roll back.
        assert [a.revision_id for a in agents.list_revisions(created.id, page_size=1)] == [
            "2",
            "1",
        ]
        assert agents.tag(created.id, "1", "prod").description == created.description
        assert agents.get_revision(created.id, "prod").revision_id == "1"
        with pytest.raises(InvalidArgument) as bad_alias:
            agents.tag(created.id, "1", "Prod")
        assert [v.field for v in bad_alias.value.field_violations] == ["alias"]
        rolled = agents.rollback(created.id, "prod", etag=updated.etag)
        assert (rolled.revision_id, rolled.description) == ("3", created.description)
        agents.untag(created.id, "prod")
        with pytest.raises(NotFound) as untagged:
            agents.get_revision(created.id, "prod")
        assert untagged.value.reason == "ALIAS_NOT_FOUND"

        # Soft delete: still readable, listed only when asked, undeletable.
        deleted = agents.delete(created.id, etag=rolled.etag)
        assert deleted.HasField("expire_time")
        assert agents.get(created.id) == deleted
        assert [a.id for a in agents.list(filter='name = "client-bot"')] == []
        assert [a.id for a in agents.list(filter='name = "client-bot"', show_deleted=True)] == [
            created.id
        ]
        with pytest.raises(PermissionDenied):  # agents.admin only
            agents.purge(created.id)
        restored = agents.undelete(created.id, etag=deleted.etag)
        assert not restored.HasField("delete_time")
        with pytest.raises(AlreadyExists) as twice:
            agents.undelete(created.id)
        assert twice.value.reason == "AGENT_NOT_DELETED"
        agents.delete(created.id)
        with pytest.raises(NotFound) as gone:
            agents.delete(created.id)
        assert gone.value.reason == "AGENT_NOT_FOUND"


def agent_copy(agent: agent_pb2.Agent, **changes: object) -> agent_pb2.Agent:
    copy = agent_pb2.Agent()
    copy.CopyFrom(agent)
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


def test_a_deprecated_model_works_and_the_typed_client_warns_with_its_notice(
    stack: Stack,
) -> None:
    """Create, update and rollback with a deprecated model succeed; the typed client
    says so with a ModelDeprecatedWarning carrying the catalogue entry (the reply's
    model_notice), and says nothing for an active model."""
    with account_client(stack, "agents.read", "agents.write") as (_, agents):
        with pytest.warns(ModelDeprecatedWarning) as created_warnings:
            old = agents.create(new_agent("client-deprecated", model=DEPRECATED))
        assert old.model == DEPRECATED  # it works
        (notice,) = [w.message for w in created_warnings]
        assert isinstance(notice, ModelDeprecatedWarning)
        assert (notice.model.name, notice.model.sunset_date, notice.model.replacement) == (
            DEPRECATED,
            "2099-01-01",
            "o4-mini",
        )
        assert "o4-mini" in str(notice)
        with warnings.catch_warnings(record=True) as quiet:
            warnings.simplefilter("always")
            moved = agents.update(agent_copy(old, model="o4-mini"), ["model"])
        assert moved.model == "o4-mini"
        assert not [w for w in quiet if issubclass(w.category, ModelDeprecatedWarning)]
        with pytest.warns(ModelDeprecatedWarning):
            back = agents.rollback(old.id, str(old.revision_id))
        assert back.model == DEPRECATED
        with pytest.warns(ModelDeprecatedWarning):
            agents.update(agent_copy(back, description="still old"), ["description"])


def test_private_key_jwt_and_a_missing_scope(stack: Stack) -> None:
    account = create_account(stack, "agents.read")
    key = ed25519.Ed25519PrivateKey.generate()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    auth_pb2_grpc.ServiceAccountServiceStub(stack.channels[0]).AddServiceAccountKey(
        auth_pb2.AddServiceAccountKeyRequest(
            service_account_id=account.service_account.id, public_key_pem=public_pem.decode()
        ),
        metadata=stack.admin().metadata,
        timeout=TIMEOUT,
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with connect(stack.auth.address) as auth:
        tokens = private_key_jwt(
            auth, account.service_account.id, audience=ISSUER, private_key_pem=private_pem
        )
        with connect(stack.agent.address, tokens) as channel:
            agents = AgentsClient(channel)
            assert list(agents.list(page_size=5)) == []
            with pytest.raises(PermissionDenied) as denied:
                agents.create(new_agent("not-allowed"))
            assert denied.value.missing_scope == "agents.write"

        wrong = client_secret(auth, account.service_account.id, "not-the-secret")
        with pytest.raises(Unauthenticated) as refused:
            wrong.token()
        assert refused.value.reason == "INVALID_CLIENT"


def test_delegation_acts_for_the_user(stack: Stack) -> None:
    account = create_account(stack, "agents.read", "agents.write", "delegate")
    user = stack.new_user()
    with connect(stack.auth.address) as auth:
        tokens = delegated(
            auth,
            ClientSecret(account.service_account.id, account.client_secret),
            user.token,
        )
        with connect(stack.agent.address, tokens) as channel:
            created = AgentsClient(channel).create(new_agent("for-the-user"))
    assert created.owner_id == user.user_id
    assert created.updated_via == f"serviceAccounts/{account.service_account.id}"
