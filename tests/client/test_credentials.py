"""Token sources: refresh before expiry, single flight, failures; private_key_jwt
assertions (RFC 7523) verified with PyJWT, their kid the servers' key thumbprint."""

from __future__ import annotations

import threading
from typing import Any

import jwt
import pytest
from agentplatform.auth.v1 import auth_pb2
from agentplatform.client.credentials import (
    AccessToken,
    CachedTokenSource,
    PrivateKeyJwt,
    StaticToken,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shared.security.jwk import thumbprint


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_token_is_reused_then_refreshed_before_it_expires() -> None:
    clock = Clock()
    fetched: list[str] = []

    def fetch() -> AccessToken:
        fetched.append(f"t{len(fetched) + 1}")
        return AccessToken(fetched[-1], expires_at=clock.now + 900)

    source = CachedTokenSource(fetch, refresh_before=60, clock=clock)
    assert source.token() == "t1"
    clock.now += 839
    assert source.token() == "t1"
    clock.now += 2  # 59 s left: inside the refresh window
    assert source.token() == "t2"
    source.invalidate("t1")  # not the cached one: nothing happens
    assert source.token() == "t2"
    source.invalidate("t2")
    assert source.token() == "t3"


def test_a_short_lived_token_is_refreshed_at_half_its_lifetime() -> None:
    clock = Clock()
    source = CachedTokenSource(
        lambda: AccessToken("t", expires_at=clock.now + 30), refresh_before=60, clock=clock
    )
    source.token()
    assert source.current is not None
    clock.now += 14
    assert source.token() == "t"


def test_one_fetch_for_many_callers_and_the_current_token_while_refreshing() -> None:
    clock = Clock()
    release = threading.Event()
    calls = 0

    def fetch() -> AccessToken:
        nonlocal calls
        calls += 1
        release.wait(5)
        return AccessToken(f"t{calls}", expires_at=clock.now + 900)

    source = CachedTokenSource(fetch, refresh_before=60, clock=clock)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(source.token())) for _ in range(8)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(5)
    assert results == ["t1"] * 8
    assert calls == 1

    # In the refresh window: one caller refreshes (blocked), the others keep t1.
    release.clear()
    clock.now += 850
    refresher = threading.Thread(target=lambda: results.append(source.token()))
    refresher.start()
    while calls < 2:
        threading.Event().wait(0.01)
    assert source.token() == "t1"
    release.set()
    refresher.join(5)
    assert results[-1] == "t2"
    assert source.token() == "t2"


def test_a_failed_refresh_keeps_the_valid_token_and_raises_without_one() -> None:
    clock = Clock()
    outcomes: list[AccessToken | Exception] = [
        AccessToken("t1", expires_at=clock.now + 100),
        RuntimeError("down"),
    ]

    def fetch() -> AccessToken:
        outcome = outcomes.pop(0) if outcomes else RuntimeError("down")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    source = CachedTokenSource(fetch, refresh_before=60, clock=clock)
    assert source.token() == "t1"
    clock.now += 60  # refresh due, fails: t1 still valid
    assert source.token() == "t1"
    clock.now += 41  # expired, and the fetch still fails
    with pytest.raises(RuntimeError, match="down"):
        source.token()


def test_a_static_token_is_what_it_is() -> None:
    source = StaticToken("abc")
    source.invalidate("abc")
    assert source.token() == "abc"
    with pytest.raises(ValueError, match="empty"):
        StaticToken("")


def _pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
)
def test_private_key_jwt_assertions_follow_rfc_7523(key: Any, alg: str) -> None:
    client = PrivateKeyJwt("sa-1", audience="agentplatform-auth", private_key_pem=_pem(key))
    first, second = client.assertion(), client.assertion()
    header = jwt.get_unverified_header(first)
    assert header["alg"] == alg
    assert header["kid"] == thumbprint(key.public_key())  # what the server calls the key
    claims = jwt.decode(first, key.public_key(), algorithms=[alg], audience="agentplatform-auth")
    assert claims["iss"] == claims["sub"] == "sa-1"
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert (
        claims["jti"]
        != jwt.decode(second, key.public_key(), algorithms=[alg], audience="agentplatform-auth")[
            "jti"
        ]
    )

    request = auth_pb2.IssueTokenRequest()
    client.authenticate(request)
    assert request.client_id == "sa-1"
    assert request.client_assertion_type == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    assert not request.client_secret


def test_private_key_jwt_takes_a_callable_instead_of_a_key() -> None:
    client = PrivateKeyJwt("sa-1", assertion=lambda: "signed-elsewhere")
    request = auth_pb2.IssueTokenRequest()
    client.authenticate(request)
    assert request.client_assertion == "signed-elsewhere"
    with pytest.raises(ValueError, match="exactly one"):
        PrivateKeyJwt("sa-1")
    with pytest.raises(ValueError, match="lifetime"):
        PrivateKeyJwt("sa-1", assertion=lambda: "x", lifetime=301)
