"""TokenVerifier: every way a forged, stale or misdirected access token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shared.rpc.errors import Unauthenticated
from shared.security.jwk import VerificationKey, algorithm_for, thumbprint
from shared.security.tokens import StaticKeyProvider, TokenVerifier
from tests.helpers import FakeClock

ISSUER = "https://auth.test"
AUDIENCE = "agentplatform-test"
LEEWAY = 30.0

Signer = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


class Keys:
    def __init__(self) -> None:
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.outsider = ed25519.Ed25519PrivateKey.generate()

    @staticmethod
    def kid(key: Signer) -> str:
        return thumbprint(key.public_key())

    def verification_keys(self) -> list[VerificationKey]:
        return [
            VerificationKey(self.kid(k), algorithm_for(k.public_key()), k.public_key())
            for k in (self.ed, self.ec)
        ]


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def results() -> list[str]:
    return []


@pytest.fixture
def verifier(keys: Keys, clock: FakeClock, results: list[str]) -> TokenVerifier:
    return TokenVerifier(
        StaticKeyProvider(keys.verification_keys()),
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=clock,
        leeway_seconds=LEEWAY,
        on_result=results.append,
    )


def claims(clock: FakeClock, **changes: Any) -> dict[str, Any]:
    now = int(clock.now().timestamp())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        "roles": ["user"],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    key: Signer,
    payload: dict[str, Any],
    *,
    kid: str | None = "auto",
    typ: str | None = "at+jwt",
    alg: str | None = None,
) -> str:
    headers: dict[str, Any] = {}
    if kid is not None:
        headers["kid"] = Keys.kid(key) if kid == "auto" else kid
    if typ is not None:
        headers["typ"] = typ
    token = jwt.encode(
        payload, key, algorithm=alg or algorithm_for(key.public_key()), headers=headers
    )
    if typ is None:  # PyJWT adds "typ: JWT" unless told otherwise; strip it by hand
        header_b64, body, _ = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
        header.pop("typ", None)
        unsigned = f"{segment(header)}.{body}"
        return f"{unsigned}.{b64(_raw_signature(key, unsigned.encode()))}"
    return token


def _raw_signature(key: Signer, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    algorithm = jwt.get_algorithm_by_name("ES256")
    return algorithm.sign(data, key)


def assert_refused(
    verifier: TokenVerifier, token: str, detail: str | None = None, reason: str = "INVALID_TOKEN"
) -> None:
    with pytest.raises(Unauthenticated) as excinfo:
        verifier.verify(token)
    assert excinfo.value.reason == reason
    if detail is not None:
        assert detail in excinfo.value.message


def test_a_valid_token_gives_the_principal_with_its_roles(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    payload = claims(clock, roles=["user", "admin"])
    principal = verifier.verify(sign(keys.ed, payload))
    assert principal.user_id == payload["sub"]
    assert principal.roles == frozenset({"user", "admin"})
    assert principal.is_admin
    assert principal.expires_at == payload["exp"]


def test_application_at_jwt_type_is_accepted(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    assert verifier.verify(sign(keys.ed, claims(clock), typ="application/at+jwt"))


def test_an_es256_key_is_accepted(verifier: TokenVerifier, keys: Keys, clock: FakeClock) -> None:
    assert verifier.verify(sign(keys.ec, claims(clock))).roles == frozenset({"user"})


def test_alg_none_is_refused(verifier: TokenVerifier, keys: Keys, clock: FakeClock) -> None:
    header = {"alg": "none", "typ": "at+jwt", "kid": Keys.kid(keys.ed)}
    assert_refused(verifier, f"{segment(header)}.{segment(claims(clock))}.", "algorithm")


@pytest.mark.parametrize("form", ["pem", "raw", "der"])
def test_hs256_signed_with_the_public_key_is_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock, form: str
) -> None:
    public = keys.ed.public_key()
    secret = {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "raw": public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }[form]
    header = {"alg": "HS256", "typ": "at+jwt", "kid": Keys.kid(keys.ed)}
    unsigned = f"{segment(header)}.{segment(claims(clock))}"
    mac = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
    assert_refused(verifier, f"{unsigned}.{b64(mac)}", "algorithm")


def test_an_expired_token_is_refused(verifier: TokenVerifier, keys: Keys, clock: FakeClock) -> None:
    now = int(clock.now().timestamp())
    token = sign(keys.ed, claims(clock, iat=now - 1000, nbf=now - 1000, exp=now - 31))
    assert_refused(verifier, token, "expired", reason="TOKEN_EXPIRED")


def test_a_token_just_expired_within_the_leeway_is_accepted(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    now = int(clock.now().timestamp())
    assert verifier.verify(sign(keys.ed, claims(clock, iat=now - 1000, exp=now - 20)))


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_token_not_yet_valid_is_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock, claim: str
) -> None:
    later = int(clock.now().timestamp()) + 120
    token = sign(keys.ed, claims(clock, **{claim: later}))
    assert_refused(verifier, token)


def test_a_small_clock_skew_is_absorbed(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    soon = int(clock.now().timestamp()) + 10
    assert verifier.verify(sign(keys.ed, claims(clock, iat=soon, nbf=soon)))


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"iss": "https://evil.test"}, "InvalidIssuerError"),
        ({"aud": "another-service"}, "InvalidAudienceError"),
        ({"iss": None}, "MissingRequiredClaimError"),
        ({"aud": None}, "MissingRequiredClaimError"),
        ({"sub": None}, "MissingRequiredClaimError"),
        ({"jti": None}, "MissingRequiredClaimError"),
        ({"exp": None}, "MissingRequiredClaimError"),
        ({"iat": None}, "MissingRequiredClaimError"),
        ({"exp": "tomorrow"}, "bad time claims"),
        ({"roles": "admin"}, "bad roles"),
        ({"roles": [1, 2]}, "bad roles"),
    ],
)
def test_wrong_or_missing_claims_are_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock, changes: dict[str, Any], detail: str
) -> None:
    assert_refused(verifier, sign(keys.ed, claims(clock, **changes)), detail)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt+x", ""])
def test_a_wrong_type_is_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock, typ: str
) -> None:
    assert_refused(verifier, sign(keys.ed, claims(clock), typ=typ), "wrong type")


def test_a_missing_type_is_refused(verifier: TokenVerifier, keys: Keys, clock: FakeClock) -> None:
    token = sign(keys.ed, claims(clock), typ=None)
    assert "typ" not in jwt.get_unverified_header(token)
    assert_refused(verifier, token, "wrong type")


def test_a_tampered_payload_is_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    header, _, signature = sign(keys.ed, claims(clock)).split(".")
    forged = segment(claims(clock, roles=["user", "admin"]))
    assert_refused(verifier, f"{header}.{forged}.{signature}", "InvalidSignatureError")


def test_a_token_from_an_unknown_key_is_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    assert_refused(verifier, sign(keys.outsider, claims(clock)), "unknown key")


def test_a_known_kid_on_a_foreign_signature_is_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    token = sign(keys.outsider, claims(clock), kid=Keys.kid(keys.ed))
    assert_refused(verifier, token, "InvalidSignatureError")


@pytest.mark.parametrize("kid", [None, ""])
def test_a_missing_kid_is_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock, kid: str | None
) -> None:
    assert_refused(verifier, sign(keys.ed, claims(clock), kid=kid), "no key id")


def test_an_algorithm_that_does_not_match_the_key_is_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    # Signed correctly with ES256, but naming the Ed25519 key: the key decides the algorithm.
    token = sign(keys.ec, claims(clock), kid=Keys.kid(keys.ed))
    assert_refused(verifier, token, "does not match")


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.e30."])
def test_garbage_is_refused(verifier: TokenVerifier, token: str) -> None:
    assert_refused(verifier, token)


def test_a_verified_token_is_cached_until_it_expires(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock, results: list[str]
) -> None:
    now = int(clock.now().timestamp())
    token = sign(keys.ed, claims(clock, exp=now + 60))
    verifier.verify(token)
    verifier.verify(token)
    assert results == ["verified", "cached"]
    clock.advance(60 + LEEWAY + 1)
    assert_refused(verifier, token, "expired", reason="TOKEN_EXPIRED")
    assert results[-1] == "rejected"


def test_the_cache_is_bounded(keys: Keys, clock: FakeClock, results: list[str]) -> None:
    verifier = TokenVerifier(
        StaticKeyProvider(keys.verification_keys()),
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=clock,
        cache_size=2,
        on_result=results.append,
    )
    tokens = [sign(keys.ed, claims(clock)) for _ in range(3)]
    for token in tokens:
        verifier.verify(token)
    verifier.verify(tokens[0])  # evicted by the third
    verifier.verify(tokens[2])
    assert results == ["verified"] * 4 + ["cached"]


# -- scopes, clients and actors ---------------------------------------------------------------


def test_the_scope_claim_is_what_the_token_may_do(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    principal = verifier.verify(sign(keys.ed, claims(clock, scope="agents.read  delegate")))
    assert principal.scopes == frozenset({"agents.read", "delegate"})
    assert principal.granted == frozenset({"agents.read", "delegate"})


@pytest.mark.parametrize(
    ("roles", "granted"),
    [
        (["user"], {"agents.read", "agents.write"}),
        (["user", "admin"], {"agents.read", "agents.write", "agents.admin"}),
    ],
)
def test_a_token_from_before_scopes_may_do_what_a_user_token_of_its_roles_may(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock, roles: list[str], granted: set[str]
) -> None:
    principal = verifier.verify(sign(keys.ed, claims(clock, roles=roles)))
    assert principal.scopes is None
    assert principal.granted == frozenset(granted)


def test_a_service_account_acting_for_itself_and_one_acting_for_a_user(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock
) -> None:
    account, user = str(uuid.uuid4()), str(uuid.uuid4())
    own = verifier.verify(sign(keys.ed, claims(clock, sub=account, client_id=account, roles=[])))
    assert own.is_service_account
    assert own.actor == ""
    delegated = verifier.verify(
        sign(keys.ed, claims(clock, sub=user, client_id=account, act={"sub": account}))
    )
    assert not delegated.is_service_account
    assert (delegated.user_id, delegated.actor) == (user, account)


@pytest.mark.parametrize(
    "changes",
    [
        {"scope": ["agents.read"]},
        {"client_id": 7},
        {"act": "someone"},
        {"act": {"sub": 7}},
        {"act": {"sub": "a", "act": {"sub": "b"}}},
    ],
    ids=["scope-not-a-string", "client-id", "act-not-an-object", "act-sub", "nested-act"],
)
def test_malformed_scope_client_or_actor_claims_are_refused(
    verifier: TokenVerifier, keys: Keys, clock: FakeClock, changes: dict[str, Any]
) -> None:
    assert_refused(verifier, sign(keys.ed, claims(clock, **changes)))
