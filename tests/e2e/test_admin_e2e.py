"""An operator's controls through grpcurl against real auth_svc and agent_svc processes:
users listed, one disabled (its tokens refused by agent_svc within the revocation poll),
another unlocked, sessions listed and revoked, and the audit trail of all of it.

    grpcurl -plaintext -H "authorization: Bearer $ADMIN_TOKEN" -d '{"email_prefix": "ada"}' \\
        127.0.0.1:50051 agentplatform.auth.v1.UserService/ListUsers
    grpcurl -plaintext -H "authorization: Bearer $ADMIN_TOKEN" -d '{"id": "'$ID'"}' \\
        127.0.0.1:50051 agentplatform.auth.v1.UserService/DisableUser
    grpcurl -plaintext -H "authorization: Bearer $ADMIN_TOKEN" -d '{"user_id": "'$ID'"}' \\
        127.0.0.1:50051 agentplatform.auth.v1.AuditService/ListAuditEvents
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from google.protobuf import timestamp_pb2

from tests.e2e.test_agent_e2e import (
    TIMEOUT,
    USER_PASSWORD,
    Caller,
    Stack,
    grpcurl,
    login,
    new_agent,
    reason_of,
    rpc_error,
    run_stack,
)

AUTH = "agentplatform.auth.v1."
# agent_svc asks for revocations every AGENT_REVOCATION_POLL_SECONDS (2 s by default): a
# revoked token is refused within that and a call's time. Generous for a loaded machine.
REVOCATION_DEADLINE = 30.0


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from run_stack("embedded", tmp_path_factory.mktemp("admin-e2e-embedded"))


@pytest.fixture(scope="module")
def postgres_redis(
    tmp_path_factory: pytest.TempPathFactory,
    new_postgres_database: Callable[[], str],
    redis_server_url: str,
) -> Iterator[Stack]:
    yield from run_stack(
        "postgres_redis",
        tmp_path_factory.mktemp("admin-e2e-postgres"),
        auth_database_url=new_postgres_database(),
        agent_database_url=new_postgres_database(),
        redis_url=redis_server_url,
    )


@pytest.fixture(scope="module", params=["embedded", "postgres_redis"])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def call(binary: Path, stack: Stack, method: str, data: dict[str, Any], token: str) -> Any:
    code, reply = grpcurl(binary, stack.auth.address, AUTH + method, data, token)
    assert code == 0, reply
    return reply


def refused_within(stack: Stack, caller: Caller, agent_id: str) -> float:
    """Seconds until agent_svc refuses the caller's token (TOKEN_REVOKED)."""
    started = time.monotonic()
    while time.monotonic() - started < REVOCATION_DEADLINE:
        refusal: grpc.RpcError | None = None
        try:
            stack.agents.GetAgent(
                agent_pb2.GetAgentRequest(id=agent_id), metadata=caller.metadata, timeout=TIMEOUT
            )
        except grpc.RpcError as error:
            refusal = error
        if refusal is not None:
            assert (refusal.code(), reason_of(refusal)) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_REVOKED",
            )
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"the revoked token was still accepted after {REVOCATION_DEADLINE}s")


def test_disabling_a_user_ends_their_access_everywhere(stack: Stack, grpcurl_binary: Path) -> None:
    user = stack.new_user()
    email = call(grpcurl_binary, stack, "AuthService/GetCurrentUser", {}, user.token)["user"][
        "email"
    ]
    agent = stack.agents.CreateAgent(
        agent_pb2.CreateAgentRequest(agent=new_agent("to-be-cut-off")),
        metadata=user.metadata,
        timeout=TIMEOUT,
    ).agent
    admin = stack.admin().token
    listed = call(grpcurl_binary, stack, "UserService/ListUsers", {"email_prefix": email}, admin)
    assert [u["id"] for u in listed["users"]] == [user.user_id]
    assert listed["users"][0]["etag"]
    disabled = call(grpcurl_binary, stack, "UserService/DisableUser", {"id": user.user_id}, admin)
    assert disabled["user"]["disabled"] is True
    delay = refused_within(stack, user, agent.id)
    print(f"\n[{stack.backend}] a disabled user's token refused by agent_svc after {delay:.2f}s")
    error = rpc_error(lambda: login(stack.auth_stub, email, USER_PASSWORD))
    assert reason_of(error) == "INVALID_CREDENTIALS"
    events = call(
        grpcurl_binary,
        stack,
        "AuditService/ListAuditEvents",
        {"user_id": user.user_id, "kind": "user_disabled"},
        admin,
    )["audit_events"]
    assert len(events) == 1
    assert events[0]["actor"].startswith("users/")
    assert events[0]["peer"].startswith(("ipv4:", "ipv6:"))
    assert events[0]["request_id"]
    call(grpcurl_binary, stack, "UserService/EnableUser", {"id": user.user_id}, admin)
    # Enabled again, the user logs in and works at once.
    again = login(stack.auth_stub, email, USER_PASSWORD)
    stack.agents.GetAgent(
        agent_pb2.GetAgentRequest(id=agent.id), metadata=again.metadata, timeout=TIMEOUT
    )


def test_a_login_right_after_revoking_every_session_works_at_once(stack: Stack) -> None:
    """Tokens carry their issue time in whole seconds and a revocation refuses those issued
    before the second after it: a login in the same second must still get a working
    token (it was refused within a second, once agent_svc had polled the revocation)."""
    user = stack.new_user()
    agent = stack.agents.CreateAgent(
        agent_pb2.CreateAgentRequest(agent=new_agent("signed-in-again")),
        metadata=user.metadata,
        timeout=TIMEOUT,
    ).agent
    email = stack.auth_stub.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=user.metadata, timeout=TIMEOUT
    ).user.email
    with grpc.insecure_channel(stack.auth.address) as channel:
        sessions = auth_pb2_grpc.SessionServiceStub(channel)
        # At the start of a second, so that what follows falls in the revocation's.
        time.sleep(1 - time.time() % 1)
        sessions.RevokeAllSessions(
            auth_pb2.RevokeAllSessionsRequest(), metadata=user.metadata, timeout=TIMEOUT
        )
        again = login(stack.auth_stub, email, USER_PASSWORD)
        # A second revocation in that second must refuse the token issued between the two
        # (it carries the next second as its issue time: an outside review found it
        # outliving the second revocation).
        sessions.RevokeAllSessions(
            auth_pb2.RevokeAllSessionsRequest(), metadata=again.metadata, timeout=TIMEOUT
        )
    third = login(stack.auth_stub, email, USER_PASSWORD)
    refused_within(stack, user, agent.id)  # agent_svc has the revocations now
    refused_within(stack, again, agent.id)
    got = stack.agents.GetAgent(
        agent_pb2.GetAgentRequest(id=agent.id), metadata=third.metadata, timeout=TIMEOUT
    )
    assert got.agent.id == agent.id
    me = stack.auth_stub.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=third.metadata, timeout=TIMEOUT
    )
    assert me.user.email == email


def test_sessions_are_listed_and_revoked_and_a_lockout_lifted(
    embedded: Stack, grpcurl_binary: Path
) -> None:
    stack = embedded
    user = stack.new_user()
    email = call(grpcurl_binary, stack, "AuthService/GetCurrentUser", {}, user.token)["user"][
        "email"
    ]
    second = stack.auth_stub.Login(
        auth_pb2.LoginRequest(email=email, password=USER_PASSWORD), timeout=TIMEOUT
    )
    mine = call(grpcurl_binary, stack, "SessionService/ListSessions", {}, user.token)["sessions"]
    assert len(mine) == 2
    assert all(s["client_peer"] for s in mine)
    admin = stack.admin().token
    theirs = call(
        grpcurl_binary, stack, "SessionService/ListSessions", {"user_id": user.user_id}, admin
    )["sessions"]
    assert {s["id"] for s in theirs} == {s["id"] for s in mine}
    call(grpcurl_binary, stack, "SessionService/RevokeSession", {"id": mine[0]["id"]}, admin)
    left = call(grpcurl_binary, stack, "SessionService/ListSessions", {}, user.token)
    assert [s["id"] for s in left["sessions"]] == [mine[1]["id"]]
    everywhere = call(
        grpcurl_binary, stack, "SessionService/RevokeAllSessions", {}, second.access_token
    )
    assert everywhere == {"revoked_count": 1}
    error = rpc_error(
        lambda: stack.auth_stub.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=second.refresh_token), timeout=TIMEOUT
        )
    )
    assert reason_of(error) == "INVALID_REFRESH_TOKEN"
    # A lockout (10 failures by default), lifted by an administrator.
    for _ in range(10):
        rpc_error(lambda: login(stack.auth_stub, email, "not the password at all"))
    error = rpc_error(lambda: login(stack.auth_stub, email, USER_PASSWORD))
    assert reason_of(error) == "LOGIN_LOCKED"
    call(grpcurl_binary, stack, "UserService/UnlockUser", {"id": user.user_id}, admin)
    assert login(stack.auth_stub, email, USER_PASSWORD).token
    kinds = [
        e["kind"]
        for e in call(
            grpcurl_binary,
            stack,
            "AuditService/ListAuditEvents",
            {"user_id": user.user_id, "page_size": 100},
            admin,
        )["audit_events"]
    ]
    assert kinds[0] == "login_succeeded"  # newest first
    for kind in ("user_unlocked", "lockout", "sessions_revoked", "session_revoked"):
        assert kind in kinds


def test_a_user_cannot_administer(embedded: Stack, grpcurl_binary: Path) -> None:
    user = embedded.new_user()
    code, reply = grpcurl(
        grpcurl_binary, embedded.auth.address, AUTH + "UserService/ListUsers", {}, user.token
    )
    assert code == 64 + 7, reply  # PERMISSION_DENIED
    assert "ADMIN_REQUIRED" in reply


def test_out_of_range_timestamps_are_a_bad_request(embedded: Stack) -> None:
    stub = embedded.auth_stub
    admin = embedded.admin()
    audit = auth_pb2_grpc.AuditServiceStub(embedded.channels[0])
    for seconds, nanos in ((10_000_000_000_000, 0), (1, -5), (-70_000_000_000, 0)):
        stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
        error = rpc_error(
            lambda s=stamp: stub.GetRevocations(  # type: ignore[misc]
                auth_pb2.GetRevocationsRequest(since_time=s), timeout=TIMEOUT
            )
        )
        assert (error.code(), reason_of(error)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert "since_time" in (error.details() or "")
        error = rpc_error(
            lambda s=stamp: audit.ListAuditEvents(  # type: ignore[misc]
                auth_pb2.ListAuditEventsRequest(end_time=s),
                metadata=admin.metadata,
                timeout=TIMEOUT,
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "end_time" in (error.details() or "")
