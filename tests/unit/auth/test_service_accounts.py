"""Service accounts and the token endpoint, on fakes: the rules a machine caller relies on."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from services.auth_svc.domain import USER, AuditKind
from services.auth_svc.infra.throttle import FailureThrottle
from services.auth_svc.service.admin import Sessions, revoke_tokens
from services.auth_svc.service.service_accounts import (
    CLIENT_CREDENTIALS,
    JWT_BEARER,
    TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
    SecretHasher,
    ServiceAccountAdmin,
    TokenEndpoint,
    TokenRequest,
)
from shared.rpc.errors import DomainError, InvalidArgument, ResourceExhausted
from shared.rpc.ratelimit import Limit, RateLimiter
from shared.security.tokens import Principal, StaticKeyProvider, TokenVerifier
from tests.unit.auth.fakes import AUDIENCE, ISSUER, AuthWorld, build_world, store_admin

ADMIN_ID = uuid.uuid4()
ADMIN = Principal(user_id=str(ADMIN_ID), roles=frozenset({"user", "admin"}), subject=ADMIN_ID)
NOT_ADMIN = Principal(user_id=str(uuid.uuid4()), roles=frozenset({"user"}))


@dataclass
class World:
    auth: AuthWorld
    admin: ServiceAccountAdmin
    endpoint: TokenEndpoint
    verifier: TokenVerifier
    issued: list[tuple[str, str]]

    def verify(self, token: str) -> Principal:
        return self.verifier.verify(token)

    def claims(self, token: str) -> dict[str, Any]:
        return jwt.decode(token, options={"verify_signature": False})


@pytest.fixture
def world() -> World:
    auth = build_world()
    store_admin(auth.database, ADMIN_ID)
    clock = auth.clock
    verifier = TokenVerifier(
        StaticKeyProvider(auth.keys.verification_keys),
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=clock,
    )
    hasher = SecretHasher(b"k" * 32)
    issued: list[tuple[str, str]] = []
    endpoint = TokenEndpoint(
        uow=auth.database.unit_of_work,
        secrets=hasher,
        tokens=auth.keys,
        throttle=FailureThrottle(RateLimiter({}, monotonic=clock.monotonic), Limit(0.2, 3)),
        verify_subject=verifier.verify,
        clock=clock,
        lifetime_seconds=600,
        on_result=lambda grant, result: issued.append((grant, result)),
    )
    admin = ServiceAccountAdmin(uow=auth.database.unit_of_work, secrets=hasher, clock=clock)
    return World(auth, admin, endpoint, verifier, issued)


def error_of(excinfo: pytest.ExceptionInfo[DomainError]) -> tuple[grpc.StatusCode, str]:
    return excinfo.value.code, excinfo.value.reason


def create(world: World, *scopes: str, name: str = "billing") -> tuple[str, str]:
    account, secret = world.admin.create(
        principal=ADMIN, display_name=name, scopes=scopes or ("agents.read", "agents.write")
    )
    return str(account.id), secret


def by_secret(client_id: str, secret: str, scope: str = "") -> TokenRequest:
    return TokenRequest(
        grant_type=CLIENT_CREDENTIALS, client_id=client_id, client_secret=secret, scope=scope
    )


def ed25519_key() -> tuple[ed25519.Ed25519PrivateKey, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return key, pem


def assertion(
    world: World, client_id: str, key: Any, kid: str, alg: str = "EdDSA", **overrides: Any
) -> str:
    now = int(world.auth.clock.now().timestamp())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": ISSUER,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
        **overrides,
    }
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def by_assertion(token: str, client_id: str = "", scope: str = "") -> TokenRequest:
    return TokenRequest(
        grant_type=CLIENT_CREDENTIALS,
        client_id=client_id,
        client_assertion_type=JWT_BEARER,
        client_assertion=token,
        scope=scope,
    )


# -- administration -----------------------------------------------------------------------


def test_only_an_administrator_acting_for_themselves_manages_accounts(world: World) -> None:
    delegated_admin = Principal(
        user_id=ADMIN.user_id, roles=ADMIN.roles, client_id="svc", actor="svc"
    )
    for principal in (NOT_ADMIN, delegated_admin):
        with pytest.raises(DomainError) as caught:
            world.admin.create(principal=principal, display_name="x", scopes=["agents.read"])
        assert error_of(caught) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    assert world.auth.database.committed.service_accounts == {}


def test_a_bad_account_is_refused_field_by_field_and_nothing_is_stored(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.admin.create(principal=ADMIN, display_name=" ", scopes=["agents.read", "root"])
    fields = {v.field: v.description for v in caught.value.violations}
    assert fields["service_account.display_name"] == "required"
    assert "root" in fields["service_account.scopes"]
    with pytest.raises(InvalidArgument) as caught:
        world.admin.create(principal=ADMIN, display_name="ok", scopes=[])
    assert caught.value.violations[0].field == "service_account.scopes"
    assert world.auth.database.committed.service_accounts == {}


def test_the_secret_is_shown_once_and_stored_only_as_a_keyed_hash(world: World) -> None:
    client_id, secret = create(world)
    assert len(secret) >= 43  # 256 bits, base64url
    stored = world.auth.database.committed.service_accounts[uuid.UUID(client_id)]
    assert secret not in repr(stored)
    assert [s.secret_hash for s in stored.secrets] == [SecretHasher(b"k" * 32).digest(secret)]
    audit = world.auth.audit[-1]
    assert audit.kind is AuditKind.SERVICE_ACCOUNT_CREATED
    assert audit.detail == {"service_account_id": client_id}
    assert (audit.actor, audit.actor_via) == (f"users/{ADMIN.user_id}", None)


def test_accounts_are_listed_oldest_first_in_pages(world: World) -> None:
    ids = []
    for n in range(5):
        ids.append(create(world, name=f"svc-{n}")[0])
        world.auth.clock.advance(1)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = world.admin.list(principal=ADMIN, page_size=2, page_token=token)
        seen += [str(a.id) for a in page]
        pages += 1
        if not token:
            break
    assert seen == ids
    assert pages == 3
    with pytest.raises(InvalidArgument) as caught:
        world.admin.list(principal=ADMIN, page_size=2, page_token="garbage!")
    assert caught.value.violations[0].field == "page_token"


def test_unknown_accounts_secrets_and_keys_are_not_found(world: World) -> None:
    client_id, _ = create(world)
    missing = str(uuid.uuid4())
    calls: list[Callable[[], object]] = [
        lambda: world.admin.get(principal=ADMIN, account_id=missing),
        lambda: world.admin.delete(principal=ADMIN, account_id=missing),
        lambda: world.admin.add_secret(principal=ADMIN, account_id=missing),
        lambda: world.admin.remove_secret(principal=ADMIN, account_id=client_id, secret_id=missing),
        lambda: world.admin.remove_key(principal=ADMIN, account_id=client_id, kid="nope"),
    ]
    for call in calls:
        with pytest.raises(DomainError) as caught:
            call()
        assert error_of(caught) == (grpc.StatusCode.NOT_FOUND, "SERVICE_ACCOUNT_NOT_FOUND")
    with pytest.raises(InvalidArgument) as bad_id:
        world.admin.get(principal=ADMIN, account_id="not-a-uuid")
    assert bad_id.value.violations[0].field == "id"


def test_keys_must_be_ed25519_or_p256_and_are_named_by_thumbprint(world: World) -> None:
    client_id, _ = create(world)
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    for pem in ("not a key", rsa_pem):
        with pytest.raises(InvalidArgument) as caught:
            world.admin.add_key(principal=ADMIN, account_id=client_id, public_key_pem=pem)
        assert caught.value.violations[0].field == "public_key_pem"
    _, pem = ed25519_key()
    key = world.admin.add_key(principal=ADMIN, account_id=client_id, public_key_pem=pem)
    assert key.alg == "EdDSA"
    assert len(key.kid) == 43
    with pytest.raises(DomainError) as duplicate:
        world.admin.add_key(principal=ADMIN, account_id=client_id, public_key_pem=pem)
    assert duplicate.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_at_most_five_secrets_at_once(world: World) -> None:
    client_id, _ = create(world)
    for _ in range(4):
        world.admin.add_secret(principal=ADMIN, account_id=client_id)
    with pytest.raises(ResourceExhausted) as caught:
        world.admin.add_secret(principal=ADMIN, account_id=client_id)
    assert caught.value.quota_violations[0].subject == f"serviceAccounts/{client_id}"


# -- client credentials -----------------------------------------------------------------------


def test_a_client_secret_gets_an_access_token_for_the_account(world: World) -> None:
    client_id, secret = create(world)
    issued = world.endpoint.issue(by_secret(client_id, secret))
    assert issued.scopes == ("agents.read", "agents.write")
    assert issued.expires_in == 600
    principal = world.verify(issued.access_token)
    assert principal.user_id == client_id
    assert principal.client_id == client_id
    assert principal.is_service_account
    assert principal.granted == {"agents.read", "agents.write"}
    assert principal.roles == frozenset()
    assert jwt.get_unverified_header(issued.access_token)["typ"] == "at+jwt"
    assert world.issued == [(CLIENT_CREDENTIALS, "issued")]


def test_asking_for_fewer_scopes_narrows_the_token_and_more_is_refused(world: World) -> None:
    client_id, secret = create(world)
    narrow = world.endpoint.issue(by_secret(client_id, secret, scope="agents.read"))
    assert world.verify(narrow.access_token).granted == {"agents.read"}
    for scope in ("agents.admin", "agents.read bogus"):
        with pytest.raises(InvalidArgument) as caught:
            world.endpoint.issue(by_secret(client_id, secret, scope=scope))
        assert caught.value.reason == "INVALID_SCOPE"
        assert caught.value.violations[0].field == "scope"


def test_the_delegate_scope_is_never_put_in_a_token(world: World) -> None:
    client_id, secret = create(world, "agents.read", "delegate")
    issued = world.endpoint.issue(by_secret(client_id, secret))
    assert world.verify(issued.access_token).granted == {"agents.read"}
    with pytest.raises(InvalidArgument) as caught:
        world.endpoint.issue(by_secret(client_id, secret, scope="delegate"))
    assert caught.value.reason == "INVALID_SCOPE"


def test_wrong_secret_and_unknown_client_are_the_same_refusal(world: World) -> None:
    client_id, secret = create(world)
    refusals = []
    for request in (
        by_secret(client_id, secret + "x"),
        by_secret(str(uuid.uuid4()), secret),
        by_secret("not-a-uuid", secret),
    ):
        with pytest.raises(DomainError) as caught:
            world.endpoint.issue(request)
        refusals.append((caught.value.code, caught.value.reason, caught.value.message))
    assert (
        refusals
        == [(grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT", "invalid client credentials")] * 3
    )


def test_a_grant_other_than_the_two_is_unsupported(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.endpoint.issue(TokenRequest(grant_type="password"))
    assert caught.value.reason == "UNSUPPORTED_GRANT_TYPE"
    assert caught.value.violations[0].field == "grant_type"
    with pytest.raises(InvalidArgument) as caught:
        world.endpoint.issue(TokenRequest(grant_type=CLIENT_CREDENTIALS, client_id="x"))
    assert caught.value.violations[0].field == "client_secret"


def test_a_second_secret_rotates_without_a_gap(world: World) -> None:
    client_id, old = create(world)
    secret, new = world.admin.add_secret(principal=ADMIN, account_id=client_id)
    world.endpoint.issue(by_secret(client_id, old))
    world.endpoint.issue(by_secret(client_id, new))
    first = world.admin.get(principal=ADMIN, account_id=client_id).secrets[0]
    world.admin.remove_secret(principal=ADMIN, account_id=client_id, secret_id=str(first.id))
    world.endpoint.issue(by_secret(client_id, new))
    with pytest.raises(DomainError) as caught:
        world.endpoint.issue(by_secret(client_id, old))
    assert caught.value.reason == "INVALID_CLIENT"
    remaining = world.admin.get(principal=ADMIN, account_id=client_id).secrets
    assert [s.id for s in remaining] == [secret.id]


def test_a_deleted_account_gets_no_token_from_then_on(world: World) -> None:
    client_id, secret = create(world)
    world.endpoint.issue(by_secret(client_id, secret))
    world.admin.delete(principal=ADMIN, account_id=client_id)
    with pytest.raises(DomainError) as caught:
        world.endpoint.issue(by_secret(client_id, secret))
    assert caught.value.reason == "INVALID_CLIENT"


def test_a_client_that_keeps_failing_is_slowed_for_seconds_not_locked_out(world: World) -> None:
    client_id, secret = create(world)
    for _ in range(3):  # the burst: plain refusals
        with pytest.raises(DomainError) as refused:
            world.endpoint.issue(by_secret(client_id, "wrong"))
        assert refused.value.reason == "INVALID_CLIENT"
    with pytest.raises(ResourceExhausted) as caught:
        world.endpoint.issue(by_secret(client_id, "wrong"))
    assert caught.value.reason == "CLIENT_THROTTLED"
    assert 0 < caught.value.retry_after_seconds <= 5
    # The right secret is never turned away, whoever failed with this id before.
    assert world.endpoint.issue(by_secret(client_id, secret)).access_token
    world.auth.clock.advance(caught.value.retry_after_seconds)
    with pytest.raises(DomainError) as later:
        world.endpoint.issue(by_secret(client_id, "wrong"))
    assert later.value.reason == "INVALID_CLIENT"  # one more allowed after the wait
    other_id, other_secret = create(world, name="other")
    assert world.endpoint.issue(by_secret(other_id, other_secret)).access_token


def test_last_use_is_recorded_at_most_once_a_minute(world: World) -> None:
    client_id, secret = create(world)
    account_id = uuid.UUID(client_id)
    world.endpoint.issue(by_secret(client_id, secret))
    first = world.auth.database.committed.service_accounts[account_id].last_used_time
    assert first == world.auth.clock.now()
    world.auth.clock.advance(30)
    world.endpoint.issue(by_secret(client_id, secret))
    assert world.auth.database.committed.service_accounts[account_id].last_used_time == first
    world.auth.clock.advance(31)
    world.endpoint.issue(by_secret(client_id, secret))
    later = world.auth.database.committed.service_accounts[account_id].last_used_time
    assert later == world.auth.clock.now()


# -- private_key_jwt ----------------------------------------------------------------------------


def test_a_signed_assertion_authenticates_once(world: World) -> None:
    client_id, _ = create(world)
    key, pem = ed25519_key()
    kid = world.admin.add_key(principal=ADMIN, account_id=client_id, public_key_pem=pem).kid
    token = assertion(world, client_id, key, kid)
    issued = world.endpoint.issue(by_assertion(token))  # client_id is optional
    assert world.verify(issued.access_token).user_id == client_id
    with pytest.raises(DomainError) as caught:
        world.endpoint.issue(by_assertion(token, client_id))  # replayed
    assert caught.value.reason == "INVALID_CLIENT"


def test_p256_assertions_work_too(world: World) -> None:
    client_id, _ = create(world)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    added = world.admin.add_key(principal=ADMIN, account_id=client_id, public_key_pem=pem)
    assert added.alg == "ES256"
    token = assertion(world, client_id, key, added.kid, alg="ES256")
    assert world.endpoint.issue(by_assertion(token, client_id)).access_token


def test_assertions_that_break_a_rule_are_refused(world: World) -> None:
    client_id, _ = create(world)
    key, pem = ed25519_key()
    kid = world.admin.add_key(principal=ADMIN, account_id=client_id, public_key_pem=pem).kid
    stranger, _ = ed25519_key()
    now = int(world.auth.clock.now().timestamp())
    bad = {
        "wrong audience": assertion(world, client_id, key, kid, aud="someone-else"),
        "lives over 5 minutes": assertion(world, client_id, key, kid, exp=now + 3600),
        "expired": assertion(world, client_id, key, kid, exp=now - 120, iat=now - 180),
        "no jti": assertion(world, client_id, key, kid, jti=None),
        "iss is not the client": assertion(world, client_id, key, kid, iss=str(uuid.uuid4())),
        "signed by another key": assertion(world, client_id, stranger, kid),
        "unknown kid": assertion(world, client_id, key, "other-kid"),
        "garbage": "a.b.c",
    }
    for why, token in bad.items():
        with pytest.raises(DomainError) as caught:
            world.endpoint.issue(by_assertion(token, client_id))
        assert error_of(caught) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT"), why
        world.auth.clock.advance(10)  # stay under the throttle


def test_an_assertion_with_the_wrong_type_or_with_a_secret_is_a_bad_request(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        world.endpoint.issue(TokenRequest(grant_type=CLIENT_CREDENTIALS, client_assertion="x.y.z"))
    assert caught.value.violations[0].field == "client_assertion_type"
    with pytest.raises(InvalidArgument) as caught:
        world.endpoint.issue(
            TokenRequest(
                grant_type=CLIENT_CREDENTIALS,
                client_assertion_type=JWT_BEARER,
                client_assertion="x.y.z",
                client_secret="s",
            )
        )
    assert caught.value.violations[0].field == "client_secret"


# -- token exchange -----------------------------------------------------------------------------


def user_token(world: World, *, admin: bool = False) -> tuple[str, str]:
    world.auth.service.register(
        email="ada@example.com", password="correct horse", display_name="Ada", admin=admin
    )
    issued = world.auth.service.login(email="ada@example.com", password="correct horse")
    return issued.access_token, str(issued.user.id)


def exchange(client_id: str, secret: str, subject: str, scope: str = "") -> TokenRequest:
    return TokenRequest(
        grant_type=TOKEN_EXCHANGE,
        client_id=client_id,
        client_secret=secret,
        subject_token=subject,
        subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        scope=scope,
    )


def test_a_delegate_acts_as_the_user_with_what_both_hold(world: World) -> None:
    client_id, secret = create(world, "agents.read", "agents.admin", "delegate")
    subject, user_id = user_token(world)
    world.auth.clock.advance(100)
    issued = world.endpoint.issue(exchange(client_id, secret, subject))
    principal = world.verify(issued.access_token)
    assert principal.user_id == user_id
    assert principal.actor == client_id
    assert principal.client_id == client_id
    assert principal.roles == {USER}
    # The user holds read and write, the account read, admin and delegate: only read.
    assert principal.granted == {"agents.read"}
    user_expiry = world.verify(subject).expires_at
    assert principal.expires_at <= user_expiry
    assert issued.expires_in == 600  # the user token has 800 s left, the cap is 600
    assert world.claims(issued.access_token)["act"] == {"sub": client_id}
    world.auth.clock.advance(500)  # the user token has 300 s left
    shorter = world.endpoint.issue(exchange(client_id, secret, subject))
    assert shorter.expires_in == 300
    assert world.verify(shorter.access_token).expires_at == user_expiry


def test_scopes_asked_for_narrow_the_delegated_token(world: World) -> None:
    client_id, secret = create(world, "agents.read", "agents.write", "delegate")
    subject, _ = user_token(world)
    issued = world.endpoint.issue(exchange(client_id, secret, subject, scope="agents.write"))
    assert world.verify(issued.access_token).granted == {"agents.write"}
    with pytest.raises(InvalidArgument) as caught:
        world.endpoint.issue(exchange(client_id, secret, subject, scope="agents.admin"))
    assert caught.value.reason == "INVALID_SCOPE"


def test_without_delegate_the_exchange_is_denied_naming_the_scope(world: World) -> None:
    client_id, secret = create(world)
    subject, _ = user_token(world)
    with pytest.raises(DomainError) as caught:
        world.endpoint.issue(exchange(client_id, secret, subject))
    assert error_of(caught) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
    assert caught.value.metadata == {"scope": "delegate"}


def test_only_a_live_users_own_token_can_be_exchanged(world: World) -> None:
    client_id, secret = create(world, "agents.read", "delegate")
    service_token = world.endpoint.issue(by_secret(client_id, secret)).access_token
    subject, user_id = user_token(world)
    delegated = world.endpoint.issue(exchange(client_id, secret, subject)).access_token
    for token in (service_token, delegated, "not-a-token"):
        with pytest.raises(DomainError) as caught:
            world.endpoint.issue(exchange(client_id, secret, token))
        assert error_of(caught) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_GRANT")
    with world.auth.database.unit_of_work() as uow:
        user = uow.users.get(uuid.UUID(user_id))
        assert user is not None
        uow._state.users[user.id] = replace(user, disabled=True)
        uow.commit()
    with pytest.raises(DomainError) as caught:
        world.endpoint.issue(exchange(client_id, secret, subject))
    assert error_of(caught) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_GRANT")
    wrong_type = replace(exchange(client_id, secret, subject), subject_token_type="id_token")
    with pytest.raises(InvalidArgument) as caught:
        world.endpoint.issue(wrong_type)
    assert caught.value.violations[0].field == "subject_token_type"


def test_a_secret_matches_only_under_the_same_key() -> None:
    hasher = SecretHasher(b"k" * 32)
    value, digest = hasher.new()
    assert hasher.matches(value, ["0" * 64, digest])
    assert not hasher.matches(value + "x", [digest])
    assert not SecretHasher(b"j" * 32).matches(value, [digest])


def test_every_account_event_is_audited_without_secrets_or_tokens(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentplatform.audit")
    client_id, secret = create(world, "agents.read", "delegate")
    _, second = world.admin.add_secret(principal=ADMIN, account_id=client_id)
    first = world.admin.get(principal=ADMIN, account_id=client_id).secrets[0]
    world.admin.remove_secret(principal=ADMIN, account_id=client_id, secret_id=str(first.id))
    key, pem = ed25519_key()
    kid = world.admin.add_key(principal=ADMIN, account_id=client_id, public_key_pem=pem).kid
    signed = assertion(world, client_id, key, kid)
    tokens = [world.endpoint.issue(by_assertion(signed)).access_token]
    subject, _ = user_token(world)
    tokens.append(world.endpoint.issue(exchange(client_id, second, subject)).access_token)
    with pytest.raises(DomainError):
        world.endpoint.issue(by_secret(client_id, secret))  # removed: refused
    world.admin.remove_key(principal=ADMIN, account_id=client_id, kid=kid)
    world.admin.delete(principal=ADMIN, account_id=client_id)

    account_kinds = {k for k in AuditKind if k.value.startswith(("service_", "client_", "token_"))}
    rows = {e.kind for e in world.auth.audit} & account_kinds
    lines = {r.getMessage().removeprefix("audit ") for r in caplog.records}
    # Changes to accounts are rows; issuance and refusal are log lines only (no write per token).
    assert rows == account_kinds - {AuditKind.TOKEN_ISSUED, AuditKind.TOKEN_REFUSED}
    assert {k.value for k in account_kinds} <= lines
    issued = [r.__dict__["audit"] for r in caplog.records if r.getMessage() == "audit token_issued"]
    assert [i["grant"] for i in issued] == [CLIENT_CREDENTIALS, TOKEN_EXCHANGE]
    assert all(i["client_id"] == client_id for i in issued)
    recorded = [repr(e) for e in world.auth.audit] + [repr(r.__dict__) for r in caplog.records]
    for text in (secret, second, signed, subject, *tokens):
        assert not any(text in line for line in recorded)


def test_failures_on_other_replicas_count_toward_the_same_throttle(world: World) -> None:
    client_id, secret = create(world)
    shared = FailureThrottle(RateLimiter({}, monotonic=world.auth.clock.monotonic), Limit(0.2, 3))

    def replica() -> TokenEndpoint:
        return TokenEndpoint(
            uow=world.auth.database.unit_of_work,
            secrets=SecretHasher(b"k" * 32),
            tokens=world.auth.keys,
            throttle=shared,
            verify_subject=world.verify,
            clock=world.auth.clock,
            lifetime_seconds=600,
        )

    for endpoint in [replica() for _ in range(3)]:  # one failure on each: the burst is spent
        with pytest.raises(DomainError) as caught:
            endpoint.issue(by_secret(client_id, "wrong"))
        assert caught.value.reason == "INVALID_CLIENT"
    fresh = replica()  # has seen no failure itself
    with pytest.raises(ResourceExhausted) as throttled:
        fresh.issue(by_secret(client_id, "wrong"))
    assert throttled.value.reason == "CLIENT_THROTTLED"
    assert fresh.issue(by_secret(client_id, secret)).access_token


def test_a_revoked_user_token_cannot_be_exchanged_and_delegation_inherits_its_issue_time(
    world: World,
) -> None:
    client_id, secret = create(world, "agents.read", "agents.admin", "delegate")
    subject, user_id = user_token(world, admin=True)
    delegated = world.endpoint.issue(exchange(client_id, secret, subject)).access_token
    assert world.claims(delegated)["iat"] == world.claims(subject)["iat"]
    assert world.verify(delegated).granted == {"agents.read", "agents.admin"}
    # Demoted in the database: the token still says admin, the exchange says what is held.
    with world.auth.database.unit_of_work() as uow:
        user = uow.users.get(uuid.UUID(user_id))
        assert user is not None
        uow.users.save(replace(user, roles=("user",)))
        uow.commit()
    narrowed = world.endpoint.issue(exchange(client_id, secret, subject)).access_token
    assert world.verify(narrowed).granted == {"agents.read"}
    # Revoked (the verifier of this replica has not polled yet): refused in the database.
    world.auth.clock.advance(1)
    with world.auth.database.unit_of_work() as uow:
        revoke_tokens(uow, user_id, world.auth.clock.now(), token_lifetime_seconds=900)
        uow.commit()
    with pytest.raises(DomainError) as caught:
        world.endpoint.issue(exchange(client_id, secret, subject))
    assert caught.value.reason == "INVALID_GRANT"
    assert "revoked" in caught.value.message


def test_a_delegated_token_from_a_token_issued_in_a_revocations_second_dies_with_its_account(
    world: World,
) -> None:
    """A user token issued in the second of the user's revocation carries the next second;
    a delegated token inherits it (so the user's later revocations cover it), and its
    account's deletion in that second covers it too (an outside review found it escaping
    the deletion)."""
    client_id, secret = create(world, "agents.read", "delegate")
    _, user_id = user_token(world)
    now = world.auth.clock.now().timestamp()
    world.auth.clock.advance(1 + 0.1 - now % 1)  # early in a second
    with world.auth.database.unit_of_work() as uow:
        revoke_tokens(uow, user_id, world.auth.clock.now(), token_lifetime_seconds=900)
        uow.commit()
    world.auth.clock.advance(0.1)
    subject = world.auth.service.login(email="ada@example.com", password="correct horse")
    user_iat = world.claims(subject.access_token)["iat"]
    assert user_iat > world.auth.clock.now().timestamp()
    delegated = world.endpoint.issue(exchange(client_id, secret, subject.access_token))
    issued_at = world.claims(delegated.access_token)["iat"]
    assert issued_at == user_iat
    with world.auth.database.unit_of_work() as uow:
        assert not uow.revocations.covers(user_id, issued_at, world.auth.clock.now())
    world.admin.delete(principal=ADMIN, account_id=client_id)
    with world.auth.database.unit_of_work() as uow:
        assert uow.revocations.covers(client_id, issued_at, world.auth.clock.now())


def test_a_deleted_accounts_revocation_covers_a_token_issued_while_it_commits(
    world: World,
) -> None:
    """A client that authenticated just before the delete gets its token signed a moment
    after the delete read its clock: in the next second, it outlived the revocation (an
    outside review). An account deleted gets no token again: every one is covered."""
    client_id, secret = create(world, "agents.read")
    world.endpoint.issue(by_secret(client_id, secret))
    world.admin.delete(principal=ADMIN, account_id=client_id)
    now = world.auth.clock.now()
    with world.auth.database.unit_of_work() as uow:
        for later in (1, 2, 60):  # signed that much after the delete's clock read
            assert uow.revocations.covers(client_id, int(now.timestamp()) + later, now)


def test_assertion_times_that_are_not_numbers_are_refused(world: World) -> None:
    client_id, _ = create(world)
    key, pem = ed25519_key()
    kid = world.admin.add_key(principal=ADMIN, account_id=client_id, public_key_pem=pem).kid
    for claim in ("exp", "iat", "nbf"):
        nan: dict[str, Any] = {claim: float("nan")}
        token = assertion(world, client_id, key, kid, **nan)
        with pytest.raises(DomainError) as caught:
            world.endpoint.issue(by_assertion(token, client_id))
        assert (caught.value.code, caught.value.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_CLIENT",
        ), claim


def test_a_kid_that_cannot_be_a_thumbprint_is_no_key(world: World) -> None:
    """It never reaches the database (NUL there was INTERNAL on PostgreSQL)."""
    client_id, _ = create(world)
    for kid in ("a\x00b", "x" * 65, "not base64url!"):
        with pytest.raises(DomainError) as caught:
            world.admin.remove_key(principal=ADMIN, account_id=client_id, kid=kid)
        assert caught.value.reason == "SERVICE_ACCOUNT_NOT_FOUND"


def test_a_deleted_accounts_delegated_token_cannot_revoke_its_users_sessions(
    world: World,
) -> None:
    """The calls that ask the database whether the caller's token is revoked (before any
    verifier's poll) ask it of the delegating account too: the account's deletion revokes
    its delegated tokens, and one of them ended the user's sessions until the next poll
    (third review)."""
    client_id, secret = create(world, "agents.read", "delegate")
    subject, _ = user_token(world)
    delegated = world.verify(
        world.endpoint.issue(exchange(client_id, secret, subject)).access_token
    )
    sessions = Sessions(
        uow=world.auth.database.unit_of_work, clock=world.auth.clock, token_lifetime_seconds=900
    )
    world.admin.delete(principal=ADMIN, account_id=client_id)
    with pytest.raises(DomainError) as caught:
        sessions.revoke_all(principal=delegated, user_id="")
    assert error_of(caught) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    assert sessions.revoke_all(principal=world.verify(subject), user_id="") == 1  # the user's
