"""Machine callers end to end: service accounts, client credentials, JWT assertions and
delegation, against real auth_svc and agent_svc processes on both backends.

An operator's session, with the test's ports for the defaults (`$ADMIN_TOKEN` from a
login, `$ID` and `$SECRET` from the create reply)::

    grpcurl -plaintext -H "authorization: Bearer $ADMIN_TOKEN" \\
        -d '{"service_account": {"display_name": "billing",
                                 "scopes": ["agents.read", "agents.write"]}}' \\
        127.0.0.1:50051 agentplatform.auth.v1.ServiceAccountService/CreateServiceAccount
    grpcurl -plaintext -d '{"grant_type": "client_credentials",
                            "client_id": "'$ID'", "client_secret": "'$SECRET'"}' \\
        127.0.0.1:50051 agentplatform.auth.v1.TokenService/IssueToken
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from agentplatform.agent.v1 import agent_pb2
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import field_mask_pb2

from tests.e2e.test_agent_e2e import (
    ISSUER,
    TIMEOUT,
    Caller,
    Stack,
    grpcurl,
    json_log,
    new_agent,
    reason_of,
    rpc_error,
    run_stack,
)

CLIENT_CREDENTIALS = "client_credentials"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from run_stack("embedded", tmp_path_factory.mktemp("sa-e2e-embedded"))


@pytest.fixture(scope="module")
def postgres_redis(
    tmp_path_factory: pytest.TempPathFactory,
    new_postgres_database: Callable[[], str],
    redis_server_url: str,
) -> Iterator[Stack]:
    yield from run_stack(
        "postgres_redis",
        tmp_path_factory.mktemp("sa-e2e-postgres"),
        auth_database_url=new_postgres_database(),
        agent_database_url=new_postgres_database(),
        redis_url=redis_server_url,
    )


@pytest.fixture(scope="module", params=["embedded", "postgres_redis"])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def accounts(stack: Stack) -> auth_pb2_grpc.ServiceAccountServiceStub:
    return auth_pb2_grpc.ServiceAccountServiceStub(stack.channels[0])


def token_stub(stack: Stack) -> auth_pb2_grpc.TokenServiceStub:
    return auth_pb2_grpc.TokenServiceStub(stack.channels[0])


def create_account(stack: Stack, *scopes: str) -> auth_pb2.CreateServiceAccountResponse:
    reply: auth_pb2.CreateServiceAccountResponse = accounts(stack).CreateServiceAccount(
        auth_pb2.CreateServiceAccountRequest(
            service_account=auth_pb2.ServiceAccount(
                display_name=f"svc-{uuid.uuid4().hex[:8]}",
                scopes=list(scopes or ("agents.read", "agents.write")),
            )
        ),
        metadata=stack.admin().metadata,
        timeout=TIMEOUT,
    )
    return reply


def issue(stack: Stack, **fields: Any) -> auth_pb2.IssueTokenResponse:
    reply: auth_pb2.IssueTokenResponse = token_stub(stack).IssueToken(
        auth_pb2.IssueTokenRequest(**fields), timeout=TIMEOUT
    )
    return reply


def as_caller(reply: auth_pb2.IssueTokenResponse) -> Caller:
    return Caller(
        str(jwt.decode(reply.access_token, options={"verify_signature": False})["sub"]),
        reply.access_token,
    )


def by_secret(stack: Stack, created: auth_pb2.CreateServiceAccountResponse, **more: Any) -> Caller:
    return as_caller(
        issue(
            stack,
            grant_type=CLIENT_CREDENTIALS,
            client_id=created.service_account.id,
            client_secret=created.client_secret,
            **more,
        )
    )


def test_a_service_account_works_with_its_own_agents(stack: Stack) -> None:
    created = create_account(stack)
    account_id = created.service_account.id
    assert created.secret_id == created.service_account.secrets[0].id
    reply = issue(
        stack,
        grant_type=CLIENT_CREDENTIALS,
        client_id=account_id,
        client_secret=created.client_secret,
    )
    assert (reply.token_type, reply.scope, reply.issued_token_type) == (
        "Bearer",
        "agents.read agents.write",
        ACCESS_TOKEN,
    )
    caller = as_caller(reply)
    assert caller.user_id == account_id
    agent = stack.agents.CreateAgent(
        agent_pb2.CreateAgentRequest(agent=new_agent("billing-bot")),
        metadata=caller.metadata,
        timeout=TIMEOUT,
    ).agent
    assert agent.owner_id == account_id
    assert agent.updated_by == f"serviceAccounts/{account_id}"
    listed = stack.agents.ListAgents(
        agent_pb2.ListAgentsRequest(), metadata=caller.metadata, timeout=TIMEOUT
    )
    assert [a.id for a in listed.agents] == [agent.id]
    someone = stack.new_user()
    error = rpc_error(
        lambda: stack.agents.GetAgent(
            agent_pb2.GetAgentRequest(id=agent.id), metadata=someone.metadata, timeout=TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    stored = (
        accounts(stack)
        .GetServiceAccount(
            auth_pb2.GetServiceAccountRequest(id=account_id),
            metadata=stack.admin().metadata,
            timeout=TIMEOUT,
        )
        .service_account
    )
    assert stored.HasField("last_used_time")
    assert [s.id for s in stored.secrets] == [created.secret_id]


def test_a_read_only_account_is_denied_writes_naming_the_scope(stack: Stack) -> None:
    caller = by_secret(stack, create_account(stack, "agents.read"))
    error = rpc_error(
        lambda: stack.agents.CreateAgent(
            agent_pb2.CreateAgentRequest(agent=new_agent("nope")),
            metadata=caller.metadata,
            timeout=TIMEOUT,
        )
    )
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
    assert "agents.write" in (error.details() or "")
    listed = stack.agents.ListAgents(
        agent_pb2.ListAgentsRequest(), metadata=caller.metadata, timeout=TIMEOUT
    )
    assert list(listed.agents) == []


def test_wrong_credentials_and_unknown_clients_get_the_same_answer(stack: Stack) -> None:
    created = create_account(stack)
    answers = set()
    for client_id, secret in (
        (created.service_account.id, created.client_secret[:-2] + "xx"),
        (str(uuid.uuid4()), created.client_secret),
    ):
        error = rpc_error(
            lambda c=client_id, s=secret: issue(  # type: ignore[misc]
                stack, grant_type=CLIENT_CREDENTIALS, client_id=c, client_secret=s
            )
        )
        answers.add((error.code(), reason_of(error), error.details()))
    assert answers == {
        (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT", "invalid client credentials")
    }


def test_a_signed_assertion_authenticates_once(stack: Stack) -> None:
    created = create_account(stack)
    account_id = created.service_account.id
    private = ed25519.Ed25519PrivateKey.generate()
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    key = (
        accounts(stack)
        .AddServiceAccountKey(
            auth_pb2.AddServiceAccountKeyRequest(service_account_id=account_id, public_key_pem=pem),
            metadata=stack.admin().metadata,
            timeout=TIMEOUT,
        )
        .key
    )
    now = int(time.time())
    assertion = jwt.encode(
        {
            "iss": account_id,
            "sub": account_id,
            "aud": ISSUER,
            "iat": now,
            "exp": now + 60,
            "jti": uuid.uuid4().hex,
        },
        private,
        algorithm="EdDSA",
        headers={"kid": key.kid},
    )
    fields = {
        "grant_type": CLIENT_CREDENTIALS,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }
    caller = as_caller(issue(stack, **fields))
    assert caller.user_id == account_id
    error = rpc_error(lambda: issue(stack, **fields))
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")


def test_a_delegate_changes_a_users_agent_as_the_user(stack: Stack) -> None:
    user = stack.new_user()
    agent = stack.agents.CreateAgent(
        agent_pb2.CreateAgentRequest(agent=new_agent("assistant")),
        metadata=user.metadata,
        timeout=TIMEOUT,
    ).agent
    created = create_account(stack, "agents.read", "agents.write", "delegate")
    account_id = created.service_account.id
    reply = issue(
        stack,
        grant_type=TOKEN_EXCHANGE,
        client_id=account_id,
        client_secret=created.client_secret,
        subject_token=user.token,
        subject_token_type=ACCESS_TOKEN,
    )
    claims = jwt.decode(reply.access_token, options={"verify_signature": False})
    assert claims["sub"] == user.user_id
    assert claims["act"] == {"sub": account_id}
    user_claims = jwt.decode(user.token, options={"verify_signature": False})
    assert claims["exp"] <= user_claims["exp"]
    delegated = Caller(user.user_id, reply.access_token)
    updated = stack.agents.UpdateAgent(
        agent_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=agent.id, description="tuned by the runtime", etag=agent.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        metadata=delegated.metadata,
        timeout=TIMEOUT,
    ).agent
    assert updated.owner_id == user.user_id
    assert updated.updated_by == f"users/{user.user_id}"
    assert updated.updated_via == f"serviceAccounts/{account_id}"
    logged = [
        line
        for line in json_log(stack.agent)
        if line.get("method", "").endswith("/UpdateAgent") and line.get("actor") == account_id
    ]
    assert logged, "the call log names the service acting for the user"
    # Without delegate: denied, naming the scope.
    plain = create_account(stack)
    error = rpc_error(
        lambda: issue(
            stack,
            grant_type=TOKEN_EXCHANGE,
            client_id=plain.service_account.id,
            client_secret=plain.client_secret,
            subject_token=user.token,
            subject_token_type=ACCESS_TOKEN,
        )
    )
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")


def test_rotation_and_deletion_take_effect_at_once(stack: Stack) -> None:
    created = create_account(stack)
    account_id = created.service_account.id
    admin = stack.admin().metadata
    added = accounts(stack).AddServiceAccountSecret(
        auth_pb2.AddServiceAccountSecretRequest(service_account_id=account_id),
        metadata=admin,
        timeout=TIMEOUT,
    )
    old = {"client_id": account_id, "client_secret": created.client_secret}
    new = {"client_id": account_id, "client_secret": added.client_secret}
    issue(stack, grant_type=CLIENT_CREDENTIALS, **old)
    issue(stack, grant_type=CLIENT_CREDENTIALS, **new)
    accounts(stack).RemoveServiceAccountSecret(
        auth_pb2.RemoveServiceAccountSecretRequest(
            service_account_id=account_id, secret_id=created.secret_id
        ),
        metadata=admin,
        timeout=TIMEOUT,
    )
    error = rpc_error(lambda: issue(stack, grant_type=CLIENT_CREDENTIALS, **old))
    assert reason_of(error) == "INVALID_CLIENT"
    issue(stack, grant_type=CLIENT_CREDENTIALS, **new)
    accounts(stack).DeleteServiceAccount(
        auth_pb2.DeleteServiceAccountRequest(id=account_id), metadata=admin, timeout=TIMEOUT
    )
    error = rpc_error(lambda: issue(stack, grant_type=CLIENT_CREDENTIALS, **new))
    assert reason_of(error) == "INVALID_CLIENT"
    error = rpc_error(
        lambda: accounts(stack).GetServiceAccount(
            auth_pb2.GetServiceAccountRequest(id=account_id), metadata=admin, timeout=TIMEOUT
        )
    )
    assert (error.code(), reason_of(error)) == (
        grpc.StatusCode.NOT_FOUND,
        "SERVICE_ACCOUNT_NOT_FOUND",
    )


def test_only_administrators_manage_service_accounts(stack: Stack) -> None:
    user = stack.new_user()
    service = by_secret(stack, create_account(stack))
    for caller in (user, service):
        error = rpc_error(
            lambda c=caller: accounts(stack).ListServiceAccounts(  # type: ignore[misc]
                auth_pb2.ListServiceAccountsRequest(), metadata=c.metadata, timeout=TIMEOUT
            )
        )
        assert (error.code(), reason_of(error)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ADMIN_REQUIRED",
        )
    error = rpc_error(
        lambda: accounts(stack).ListServiceAccounts(
            auth_pb2.ListServiceAccountsRequest(), timeout=TIMEOUT
        )
    )
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")


def test_grpcurl_shows_the_new_services_with_their_comments(
    embedded: Stack, grpcurl_binary: Path
) -> None:
    code, listing = grpcurl(grpcurl_binary, embedded.auth.address, "list")
    assert code == 0, listing
    assert {
        "agentplatform.auth.v1.TokenService",
        "agentplatform.auth.v1.ServiceAccountService",
    } <= set(listing.split())
    code, described = grpcurl(
        grpcurl_binary,
        embedded.auth.address,
        "describe",
        target="agentplatform.auth.v1.TokenService",
    )
    assert code == 0, described
    assert "RFC 8693" in described
    assert "rpc IssueToken" in described
    created = create_account(embedded)
    code, reply = grpcurl(
        grpcurl_binary,
        embedded.auth.address,
        "agentplatform.auth.v1.TokenService/IssueToken",
        {
            "grant_type": CLIENT_CREDENTIALS,
            "client_id": created.service_account.id,
            "client_secret": created.client_secret,
        },
    )
    assert code == 0, reply
    assert reply["token_type"] == "Bearer"
    assert reply["scope"] == "agents.read agents.write"
