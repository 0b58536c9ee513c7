"""Signing keys with a lifecycle, on fakes: next → active → retired → removed, revoked,
imported once, rotated on schedule, re-sealed under a new key-encryption key."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta

import grpc
import jwt
import pytest

from services.auth_svc.domain import AuditKind
from services.auth_svc.infra.keystore import (
    DatabaseKeyRing,
    KeyEncryption,
    KeyFactory,
    NoSigningKey,
    key_from_pem,
)
from services.auth_svc.service.signing_keys import REMOVAL_MARGIN, SigningKeyAdmin
from shared.rpc.errors import DomainError, Unauthenticated
from shared.security.tokens import Principal, TokenVerifier
from tests.helpers import FakeClock
from tests.unit.auth.fakes import AUDIENCE, ISSUER, FakeDatabase, ed25519_pem, store_admin

ADMIN_ID = uuid.UUID("a0000000-0000-0000-0000-000000000001")
ADMIN = Principal(user_id=str(ADMIN_ID), roles=frozenset({"user", "admin"}), subject=ADMIN_ID)
AHEAD = 600.0
TTL = 900


@dataclass
class World:
    clock: FakeClock
    database: FakeDatabase
    ring: DatabaseKeyRing
    admin: SigningKeyAdmin
    encryption: KeyEncryption

    def kids(self) -> list[str]:
        return [jwk["kid"] for jwk in self.ring.public_jwks()]

    def signed_by(self, token: str) -> str:
        return str(jwt.get_unverified_header(token)["kid"])

    def token(self) -> str:
        return self.ring.issue_token(
            subject="svc", client_id="svc", scopes=["agents.read"], lifetime_seconds=TTL
        )


def make_world(
    keks: dict[str, bytes] | None = None,
    *,
    rotation_days: float = 30,
    database: FakeDatabase | None = None,
    clock: FakeClock | None = None,
) -> World:
    clock = clock or FakeClock()
    if database is None:
        database = FakeDatabase()
        store_admin(database, ADMIN_ID)
    encryption = KeyEncryption(keks or {"k1": os.urandom(32)})

    def load() -> list:  # type: ignore[type-arg]
        with database.unit_of_work() as uow:
            return uow.signing_keys.all()

    ring = DatabaseKeyRing(
        load,
        encryption,
        issuer=ISSUER,
        audience=AUDIENCE,
        access_token_ttl_seconds=TTL,
        clock=clock,
    )
    admin = SigningKeyAdmin(
        uow=database.unit_of_work,
        keys=KeyFactory(encryption),
        reload=ring.reload,
        clock=clock,
        publish_ahead_seconds=AHEAD,
        token_lifetime_seconds=TTL,
        rotation_days=rotation_days,
    )
    return World(clock, database, ring, admin, encryption)


@pytest.fixture
def world() -> World:
    made = make_world()
    made.admin.ensure(signing_pem=None)
    return made


def verifier(world: World) -> TokenVerifier:
    return TokenVerifier(world.ring, issuer=ISSUER, audience=AUDIENCE, clock=world.clock)


def test_the_first_start_generates_one_key_and_later_starts_keep_it(world: World) -> None:
    (kid,) = world.kids()
    assert world.signed_by(world.token()) == kid
    assert world.admin.ensure(signing_pem=None).startswith("the stored keys")
    assert world.kids() == [kid]
    stored = world.database.committed.signing_keys[kid]
    assert b"PRIVATE KEY" not in stored.private_blob  # sealed
    assert stored.kek_id == "k1"


def test_the_environments_key_is_imported_with_its_kid_and_old_keys_verify() -> None:
    pem = ed25519_pem()
    old_private = ed25519_pem()
    old = key_from_pem(old_private)
    made = make_world()
    made.admin.ensure(signing_pem=pem, verify_pems=[old.public_pem])
    kid = key_from_pem(pem).kid
    assert made.signed_by(made.token()) == kid  # the same kid as before the upgrade
    assert set(made.kids()) == {kid, old.kid}
    # A token the old key signed before the upgrade still verifies.
    now = int(made.clock.now().timestamp())
    legacy = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "u", "iat": now, "exp": now + 60, "jti": "j"},
        key_from_pem(old_private).private_pem,
        algorithm="EdDSA",
        headers={"kid": old.kid, "typ": "at+jwt"},
    )
    assert verifier(made).verify(legacy).user_id == "u"
    made.clock.advance(TTL + REMOVAL_MARGIN.total_seconds() + 1)
    made.ring.reload()
    assert made.kids() == [kid]  # removed once its tokens have expired


def test_a_rotation_publishes_ahead_then_switches_then_retires(world: World) -> None:
    (first,) = world.kids()
    nxt = world.admin.rotate(principal=ADMIN)
    assert world.admin.rotate(principal=ADMIN) == nxt  # pending: the same one
    assert set(world.kids()) == {first, nxt.kid}  # published at once…
    assert world.signed_by(world.token()) == first  # …signing later
    records, signer = world.admin.list_keys(principal=ADMIN)
    states = {r.kid: r.state(world.clock.now(), signer) for r in records}
    assert states == {first: "active", nxt.kid: "next"}
    old_token = world.token()
    world.clock.advance(AHEAD)
    assert world.signed_by(world.token()) == nxt.kid
    assert verifier(world).verify(old_token).user_id == "svc"  # the retired key verifies
    records, signer = world.admin.list_keys(principal=ADMIN)
    assert {r.kid: r.state(world.clock.now(), signer) for r in records} == {
        first: "retired",
        nxt.kid: "active",
    }
    world.clock.advance(TTL + REMOVAL_MARGIN.total_seconds())
    world.ring.reload()
    assert world.kids() == [nxt.kid]
    assert [e.kind for e in world.database.committed.audit][-1] is AuditKind.SIGNING_KEY_CREATED


def test_revoking_the_active_key_signs_with_a_new_one_at_once(world: World) -> None:
    (first,) = world.kids()
    token = world.token()
    check = verifier(world)
    check.verify(token)  # remembered
    revoked, active = world.admin.revoke(principal=ADMIN, kid=first)
    assert revoked.revoke_time == world.clock.now()
    assert active is not None
    assert active != first
    assert world.kids() == [active]
    assert world.signed_by(world.token()) == active
    assert world.admin.revoked_kids() == [first]
    with pytest.raises(Unauthenticated) as caught:
        check.verify(token)  # remembered, and still refused: the key left
    assert caught.value.reason == "INVALID_TOKEN"
    assert world.database.committed.signing_keys[first].private_blob == b""  # wiped
    with pytest.raises(DomainError) as again:
        world.admin.revoke(principal=ADMIN, kid=first)
    assert (again.value.code, again.value.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "SIGNING_KEY_NOT_FOUND",
    )
    world.clock.advance(TTL + REMOVAL_MARGIN.total_seconds() + 1)
    assert world.admin.revoked_kids() == []  # no token of it can be live any more


def test_only_administrators(world: World) -> None:
    user = Principal(user_id="u", roles=frozenset({"user"}))
    for call in (
        lambda: world.admin.list_keys(principal=user),
        lambda: world.admin.rotate(principal=user),
        lambda: world.admin.revoke(principal=user, kid="x"),
    ):
        with pytest.raises(DomainError) as caught:
            call()
        assert caught.value.reason == "ADMIN_REQUIRED"


def test_the_worker_rotates_on_schedule_and_wipes_removed_keys() -> None:
    made = make_world(rotation_days=1)
    made.admin.ensure(signing_pem=None)
    (first,) = made.kids()
    assert made.admin.maintain() == {"rotated": 0, "wiped": 0, "resealed": 0, "unreadable": 0}
    made.clock.advance(timedelta(days=1).total_seconds())
    assert made.admin.maintain()["rotated"] == 1
    assert made.admin.maintain()["rotated"] == 0  # one pending is enough
    made.clock.advance(AHEAD + TTL + REMOVAL_MARGIN.total_seconds())
    counts = made.admin.maintain()
    assert counts["wiped"] == 1
    assert made.database.committed.signing_keys[first].private_blob == b""
    assert first not in made.kids()


def test_the_key_encryption_key_rotates_without_a_gap() -> None:
    old, new = os.urandom(32), os.urandom(32)
    made = make_world({"old": old})
    made.admin.ensure(signing_pem=None)
    (kid,) = made.kids()
    # A new KEK first, the old one still listed: the worker re-seals, then old can go.
    both = make_world({"new": new, "old": old}, database=made.database, clock=made.clock)
    assert both.admin.maintain()["resealed"] == 1
    assert made.database.committed.signing_keys[kid].kek_id == "new"
    only_new = make_world({"new": new}, database=made.database, clock=made.clock)
    only_new.ring.reload()
    assert only_new.signed_by(only_new.token()) == kid


def test_a_sealed_key_does_not_open_under_another_kid_or_kek() -> None:
    encryption = KeyEncryption({"k": os.urandom(32)})
    kek, blob = encryption.encrypt(b"secret", kid="a")
    assert encryption.decrypt(kek, blob, kid="a") == b"secret"
    with pytest.raises(ValueError, match="does not decrypt"):
        encryption.decrypt(kek, blob, kid="b")
    with pytest.raises(ValueError, match="not configured"):
        encryption.decrypt("other", blob, kid="a")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(ValueError, match="does not decrypt"):
        encryption.decrypt(kek, tampered, kid="a")


def test_revoking_the_pending_key_leaves_the_active_one_signing(world: World) -> None:
    """A revoked next key must not leave the active key scheduled for removal with no
    successor (then nothing could sign once the time passed)."""
    (first,) = world.kids()
    nxt = world.admin.rotate(principal=ADMIN)
    world.admin.revoke(principal=ADMIN, kid=nxt.kid)
    assert world.database.committed.signing_keys[first].remove_time is None
    world.clock.advance(AHEAD + TTL + REMOVAL_MARGIN.total_seconds() + 60)
    world.ring.reload()
    assert world.kids() == [first]
    assert world.signed_by(world.token()) == first
    assert world.admin.maintain()["wiped"] == 0


def test_the_worker_and_the_start_repair_a_ring_that_cannot_sign(world: World) -> None:
    (first,) = world.kids()
    with world.database.unit_of_work() as uow:  # as a bug of an older release left it
        record = uow.signing_keys.all()[0]
        uow.signing_keys.save(replace(record, remove_time=world.clock.now()))
        uow.commit()
    world.clock.advance(1)
    world.ring.reload()
    assert not world.ring.can_sign()
    assert world.admin.maintain()["rotated"] == 1
    assert world.ring.can_sign()
    assert world.signed_by(world.token()) != first
    # The start does the same (no worker needed): a ring with no signer gets one.
    with world.database.unit_of_work() as uow:
        for record in uow.signing_keys.all():
            uow.signing_keys.save(replace(record, remove_time=world.clock.now()))
        uow.commit()
    world.clock.advance(1)
    assert world.admin.ensure(signing_pem=None).startswith("no stored key could sign")
    assert world.ring.can_sign()


def test_a_replica_keeps_signing_while_the_worker_reseals_under_a_kek_it_lacks() -> None:
    old, new = os.urandom(32), os.urandom(32)
    server = make_world({"old": old})  # a replica not yet rolled out with the new KEK
    server.admin.ensure(signing_pem=None)
    worker = make_world({"new": new, "old": old}, database=server.database, clock=server.clock)
    assert worker.admin.maintain()["resealed"] == 1
    server.ring.reload()
    assert server.ring.can_sign()
    assert server.token()


def test_the_signing_keys_own_half_among_the_old_keys_is_imported_once() -> None:
    pem = ed25519_pem()
    own = key_from_pem(pem).public_pem
    old = key_from_pem(ed25519_pem()).public_pem
    made = make_world()
    made.admin.ensure(signing_pem=pem, verify_pems=[old, own, old])
    assert len(made.kids()) == 2
    assert made.signed_by(made.token()) == key_from_pem(pem).kid


def test_one_damaged_key_does_not_stop_the_others_being_maintained() -> None:
    old, new = os.urandom(32), os.urandom(32)
    made = make_world({"old": old})
    made.admin.ensure(signing_pem=None)
    made.admin.rotate(principal=ADMIN)
    with made.database.unit_of_work() as uow:
        first = uow.signing_keys.all()[0]
        uow.signing_keys.save(replace(first, private_blob=first.private_blob[:-1] + b"x"))
        uow.commit()
    worker = make_world({"new": new, "old": old}, database=made.database, clock=made.clock)
    counts = worker.admin.maintain()
    assert (counts["unreadable"], counts["resealed"]) == (1, 1)


def test_a_replica_that_cannot_open_the_active_key_does_not_sign_with_an_older_one() -> None:
    """Its tokens would outlive the older key's place in the JWKS: it is unready instead."""
    old, new = os.urandom(32), os.urandom(32)
    lagging = make_world({"old": old})  # not yet rolled out with the new KEK
    lagging.admin.ensure(signing_pem=None)
    (first,) = lagging.kids()
    rolled = make_world({"new": new, "old": old}, database=lagging.database, clock=lagging.clock)
    nxt = rolled.admin.rotate(principal=ADMIN)  # sealed under the new KEK
    lagging.ring.reload()
    assert lagging.signed_by(lagging.token()) == first  # before the switch: fine
    lagging.clock.advance(AHEAD)
    lagging.ring.reload()
    assert not lagging.ring.can_sign()
    with pytest.raises(NoSigningKey) as caught:
        lagging.token()
    assert caught.value.reason == "KEYS_UNAVAILABLE"
    rolled.ring.reload()
    assert rolled.signed_by(rolled.token()) == nxt.kid
