"""Signing-key rotation and revocation with auth_svc and two agent_svc replicas, under load.

A rotation (the next key published AUTH_KEY_PUBLISH_AHEAD_SECONDS ahead, here 3 s) while
clients keep logging in and calling both replicas with new and older tokens: not one
verification may fail. Then the active key is revoked: its tokens are refused by both
replicas within the revocation poll (AGENT_REVOCATION_POLL_SECONDS, 2 s), and tokens of the
key that replaced it work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth_svc import SERVICE_NAME as AUTH_SERVICE
from tests.e2e.test_agent_e2e import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    TIMEOUT,
    USER_PASSWORD,
    agent_env,
    auth_env,
    create_admin,
    free_ports,
    grpcurl,
    reason_of,
    start,
    wait_agent_ready,
)

AHEAD = 3
REVOCATION_DEADLINE = 30.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    auth_port, first_port, second_port = free_ports(3)
    env = auth_env(auth_port, tmp_path / "auth-data")
    env["AUTH_KEY_PUBLISH_AHEAD_SECONDS"] = str(AHEAD)
    auth = start("auth_svc", env, auth_port, tmp_path)
    agents = [
        start(
            "agent_svc",
            agent_env(
                port,
                # Each its own SQLite file (two migrating one file at start would contend);
                # what they share here is auth_svc and its keys.
                tmp_path / f"agent-data-{port}",
                auth.address,
                AGENT_JWKS_COOLDOWN_SECONDS="1",
            ),
            port,
            tmp_path,
        )
        for port in (first_port, second_port)
    ]
    try:
        auth.wait_serving(AUTH_SERVICE)
        for agent in agents:
            wait_agent_ready(agent, "")
        create_admin(env)
        yield {"auth": auth, "agents": agents}
    finally:
        for agent in agents:
            agent.stop()
        auth.stop()


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def test_rotation_under_load_fails_nothing_and_a_revoked_key_is_refused_everywhere(
    stack: dict[str, Any], grpcurl_binary: Path
) -> None:
    auth_channel = grpc.insecure_channel(stack["auth"].address)
    channels = [grpc.insecure_channel(a.address) for a in stack["agents"]]
    auth = auth_pb2_grpc.AuthServiceStub(auth_channel)
    keys = auth_pb2_grpc.SigningKeyServiceStub(auth_channel)
    replicas = [agent_pb2_grpc.AgentServiceStub(c) for c in channels]
    email = "load@example.com"
    auth.Register(auth_pb2.RegisterRequest(email=email, password=USER_PASSWORD), timeout=TIMEOUT)

    def login() -> str:
        reply = auth.Login(
            auth_pb2.LoginRequest(email=email, password=USER_PASSWORD), timeout=TIMEOUT
        )
        return str(reply.access_token)

    admin = auth.Login(
        auth_pb2.LoginRequest(email=ADMIN_EMAIL, password=ADMIN_PASSWORD), timeout=TIMEOUT
    ).access_token
    metadata = (("authorization", f"Bearer {admin}"),)
    (first,) = keys.ListSigningKeys(
        auth_pb2.ListSigningKeysRequest(), metadata=metadata, timeout=TIMEOUT
    ).signing_keys
    assert first.state == "active"

    tokens = [login()]
    failures: list[str] = []
    calls = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            tokens.append(login())
            for token in (tokens[-1], tokens[0]):  # the newest, and one from before
                for replica in replicas:
                    try:
                        replica.ListAgents(
                            agent_pb2.ListAgentsRequest(),
                            metadata=(("authorization", f"Bearer {token}"),),
                            timeout=TIMEOUT,
                        )
                        calls[0] += 1
                    except grpc.RpcError as error:
                        failures.append(f"{error.code()} {reason_of(error)} {kid_of(token)}")

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        # The operator's command: grpcurl … SigningKeyService/RotateSigningKey.
        code, rotated = grpcurl(
            grpcurl_binary,
            stack["auth"].address,
            "agentplatform.auth.v1.SigningKeyService/RotateSigningKey",
            {},
            admin,
        )
        assert code == 0, rotated
        nxt = auth_pb2.SigningKey(
            kid=rotated["signing_key"]["kid"], state=rotated["signing_key"]["state"]
        )
        assert nxt.state == "next"
        deadline = time.monotonic() + AHEAD + 30
        while kid_of(tokens[-1]) != nxt.kid:  # the switch, AHEAD seconds later
            assert time.monotonic() < deadline, "the next key never started signing"
            time.sleep(0.1)
        settled = len(tokens)
        while len(tokens) < settled + 10:  # more load past the switch
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(TIMEOUT)
    assert failures == []
    assert calls[0] > 40
    assert {kid_of(t) for t in tokens} == {first.kid, nxt.kid}

    # Revoke the active key: its tokens are refused by both replicas, remembered ones too.
    revoked_token = tokens[-1]
    for replica in replicas:  # remembered by both
        replica.ListAgents(
            agent_pb2.ListAgentsRequest(),
            metadata=(("authorization", f"Bearer {revoked_token}"),),
            timeout=TIMEOUT,
        )
    reply = keys.RevokeSigningKey(
        auth_pb2.RevokeSigningKeyRequest(kid=nxt.kid), metadata=metadata, timeout=TIMEOUT
    )
    assert reply.signing_key.state == "revoked"
    assert reply.active_kid not in ("", nxt.kid)
    started = time.monotonic()
    for replica in replicas:
        while True:
            refusal: grpc.RpcError | None = None
            try:
                replica.ListAgents(
                    agent_pb2.ListAgentsRequest(),
                    metadata=(("authorization", f"Bearer {revoked_token}"),),
                    timeout=TIMEOUT,
                )
            except grpc.RpcError as error:
                refusal = error
            if refusal is not None:
                assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED
                assert reason_of(refusal) == "INVALID_TOKEN"
                break
            assert time.monotonic() - started < REVOCATION_DEADLINE, "still accepted"
            time.sleep(0.05)
    print(
        f"\na revoked key's token refused by both replicas after {time.monotonic() - started:.2f}s"
    )
    fresh = login()
    assert kid_of(fresh) == reply.active_kid
    # The replacement key is fetched on first sight of its kid, at most once per refetch
    # cooldown (AGENT_JWKS_COOLDOWN_SECONDS, 1 s here): within it, "unknown key".
    for replica in replicas:
        accepted_by = time.monotonic() + 10
        while True:
            try:
                replica.ListAgents(
                    agent_pb2.ListAgentsRequest(),
                    metadata=(("authorization", f"Bearer {fresh}"),),
                    timeout=TIMEOUT,
                )
                break
            except grpc.RpcError as error:
                if time.monotonic() > accepted_by or "unknown key" not in (error.details() or ""):
                    raise
            time.sleep(0.1)
    jwks = {k.kid for k in auth.GetJwks(auth_pb2.GetJwksRequest(), timeout=TIMEOUT).keys}
    assert nxt.kid not in jwks
    assert {first.kid, reply.active_kid} <= jwks  # the retired one verifies its tokens on
    for channel in (auth_channel, *channels):
        channel.close()
