"""The auth rules, on in-memory fakes with a real key ring and the in-process limiter."""

from __future__ import annotations

import base64
import logging
from dataclasses import replace

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from sqlalchemy.exc import OperationalError

from services.auth_svc.domain import ADMIN, USER, AuditKind
from services.auth_svc.service.auth_service import hash_refresh_token
from shared.data.db import unavailable_database
from shared.rpc.errors import DomainError, FieldViolation, InvalidArgument, Unavailable
from shared.security.jwk import thumbprint
from shared.security.tokens import Principal, StaticKeyProvider, TokenVerifier
from tests.unit.auth.fakes import (
    AUDIENCE,
    ISSUER,
    AuthWorld,
    build_world,
    key_ring,
)

PASSWORD = "correct horse battery"
EMAIL = "ada@example.com"


@pytest.fixture
def world() -> AuthWorld:
    return build_world()


def register(world: AuthWorld, email: str = EMAIL, password: str = PASSWORD) -> None:
    world.service.register(email=email, password=password, display_name="")


def error_of(excinfo: pytest.ExceptionInfo[DomainError]) -> tuple[grpc.StatusCode, str]:
    return excinfo.value.code, excinfo.value.reason


def violations(excinfo: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in excinfo.value.violations}


def disable(world: AuthWorld, email: str = EMAIL) -> None:
    state = world.database.committed
    user = next(u for u in state.users.values() if u.email == email)
    state.users[user.id] = replace(user, disabled=True)


# -- register ---------------------------------------------------------------------------


def test_register_trims_and_lowercases_the_email_as_a_whole(world: AuthWorld) -> None:
    user = world.service.register(
        email="  Ada.Lovelace@Example.COM \t", password=PASSWORD, display_name=""
    )
    assert user.email == "ada.lovelace@example.com"
    assert world.service.login(email="ADA.lovelace@example.com ", password=PASSWORD)


def test_register_creates_a_plain_user_named_after_the_local_part(world: AuthWorld) -> None:
    user = world.service.register(email=EMAIL, password=PASSWORD, display_name="  ")
    assert user.roles == (USER,)
    assert user.display_name == "ada"
    assert not user.disabled
    assert user.create_time == user.update_time == world.clock.now()
    assert user.password_hash != PASSWORD
    assert PASSWORD not in user.password_hash


def test_register_as_admin_gives_both_roles(world: AuthWorld) -> None:
    user = world.service.register(email=EMAIL, password=PASSWORD, display_name="", admin=True)
    assert set(user.roles) == {USER, ADMIN}
    assert world.audit[-1].kind is AuditKind.ADMIN_CREATED


def test_register_keeps_a_trimmed_display_name(world: AuthWorld) -> None:
    user = world.service.register(email=EMAIL, password=PASSWORD, display_name="  Ada L.  ")
    assert user.display_name == "Ada L."


def test_register_same_email_in_other_case_is_already_exists(world: AuthWorld) -> None:
    register(world)
    with pytest.raises(DomainError) as excinfo:
        world.service.register(email=" ADA@example.com", password=PASSWORD, display_name="")
    assert error_of(excinfo) == (grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")
    assert len(world.database.committed.users) == 1


@pytest.mark.parametrize(
    "email",
    [
        "",
        "   ",
        "ada",
        "ada@",
        "@example.com",
        "ada@example",
        "ada@@example.com",
        "a da@example.com",
        "ada@exa mple.com",
        "ada\x00@example.com",
        "a" * 65 + "@example.com",
        "ada@" + "e" * 250 + ".com",
    ],
)
def test_register_malformed_email_is_invalid_argument(world: AuthWorld, email: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        world.service.register(email=email, password=PASSWORD, display_name="")
    assert excinfo.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(excinfo)) == {"email"}
    assert world.database.committed.users == {}


@pytest.mark.parametrize(
    ("password", "ok"),
    [("x" * 7, False), ("x" * 8, True), ("x" * 128, True), ("x" * 129, False)],
)
def test_register_password_length_is_8_to_128(world: AuthWorld, password: str, ok: bool) -> None:
    if ok:
        register(world, password=password)
        return
    with pytest.raises(InvalidArgument) as excinfo:
        register(world, password=password)
    assert set(violations(excinfo)) == {"password"}


def test_register_password_minimum_is_configurable() -> None:
    world = build_world(password_min_length=12)
    with pytest.raises(InvalidArgument) as excinfo:
        register(world, password="x" * 11)
    assert violations(excinfo) == {"password": "must be at least 12 characters"}
    register(world, password="x" * 12)


def test_register_counts_characters_not_bytes(world: AuthWorld) -> None:
    register(world, password="é" * 100)  # 200 bytes in UTF-8, 100 characters


@pytest.mark.parametrize(
    ("display_name", "description"),
    [
        ("x" * 129, "must be at most 128 characters"),
        ("Ada\nLovelace", "must not contain control characters"),
        ("Ada\u202eecalevoL", "must not contain control characters"),
    ],
)
def test_register_display_name_rules(world: AuthWorld, display_name: str, description: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        world.service.register(email=EMAIL, password=PASSWORD, display_name=display_name)
    assert violations(excinfo) == {"display_name": description}


def test_register_display_name_of_128_characters_is_fine(world: AuthWorld) -> None:
    user = world.service.register(email=EMAIL, password=PASSWORD, display_name="x" * 128)
    assert len(user.display_name) == 128


def test_register_lists_every_violation_at_once(world: AuthWorld) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        world.service.register(email="nope", password="short", display_name="x" * 200)
    assert set(violations(excinfo)) == {"email", "password", "display_name"}


# -- login ------------------------------------------------------------------------------


def test_login_returns_a_verifiable_access_token_and_a_refresh_token(world: AuthWorld) -> None:
    register(world)
    issued = world.service.login(email=EMAIL, password=PASSWORD)
    assert issued.expires_in == 900
    assert issued.user.email == EMAIL
    assert len(issued.refresh_token) >= 40
    verifier = TokenVerifier(
        StaticKeyProvider(world.keys.verification_keys),
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=world.clock,
    )
    principal = verifier.verify(issued.access_token)
    assert principal.user_id == str(issued.user.id)
    assert principal.roles == frozenset({USER})
    stored = world.database.committed.tokens
    assert list(stored) == [hash_refresh_token(issued.refresh_token)]  # only the hash is kept


def test_login_wrong_password_and_unknown_email_fail_the_same_way(world: AuthWorld) -> None:
    register(world)
    with pytest.raises(DomainError) as wrong_password:
        world.service.login(email=EMAIL, password="not the password")
    with pytest.raises(DomainError) as unknown_email:
        world.service.login(email="nobody@example.com", password=PASSWORD)
    for excinfo in (wrong_password, unknown_email):
        assert error_of(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert wrong_password.value.message == unknown_email.value.message
    assert wrong_password.value.metadata == unknown_email.value.metadata == {}


def test_login_with_an_unknown_email_still_verifies_a_hash(world: AuthWorld) -> None:
    register(world)
    before = world.hasher.verifies
    with pytest.raises(DomainError):
        world.service.login(email="nobody@example.com", password=PASSWORD)
    assert world.hasher.verifies == before + 1
    with pytest.raises(DomainError):
        world.service.login(email=EMAIL, password="not the password")
    assert world.hasher.verifies == before + 2


def test_login_of_a_disabled_user_is_refused_even_with_the_right_password(
    world: AuthWorld,
) -> None:
    register(world)
    disable(world)
    with pytest.raises(DomainError) as excinfo:
        world.service.login(email=EMAIL, password=PASSWORD)
    assert error_of(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


@pytest.mark.parametrize(("email", "password"), [("", PASSWORD), (EMAIL, ""), ("  ", "")])
def test_login_without_email_or_password_is_invalid_argument(
    world: AuthWorld, email: str, password: str
) -> None:
    with pytest.raises(InvalidArgument):
        world.service.login(email=email, password=password)


def fail_login(world: AuthWorld, email: str = EMAIL) -> DomainError:
    with pytest.raises(DomainError) as excinfo:
        world.service.login(email=email, password="not the password")
    return excinfo.value


def test_login_locks_after_the_limit_with_retry_after(world: AuthWorld) -> None:
    register(world)
    codes = [fail_login(world).code for _ in range(3)]  # the world's limit is 3
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    locked = fail_login(world)
    assert locked.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert locked.reason == "LOGIN_LOCKED"
    assert getattr(locked, "retry_after_seconds", None) == pytest.approx(60.0)
    world.clock.advance(20)
    assert getattr(fail_login(world), "retry_after_seconds", None) == pytest.approx(40.0)


def test_locked_out_login_does_not_check_the_password(world: AuthWorld) -> None:
    register(world)
    for _ in range(3):
        fail_login(world)
    before = world.hasher.verifies
    fail_login(world)
    assert world.hasher.verifies == before


def test_unknown_email_is_locked_out_like_a_known_one(world: AuthWorld) -> None:
    codes = [fail_login(world, "nobody@example.com").code for _ in range(4)]
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_right_password_is_refused_during_the_cool_down(world: AuthWorld) -> None:
    register(world)
    for _ in range(3):
        fail_login(world)
    with pytest.raises(DomainError) as excinfo:
        world.service.login(email=EMAIL, password=PASSWORD)
    assert excinfo.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_lockout_applies_to_the_normalized_email(world: AuthWorld) -> None:
    register(world)
    for variant in ("ADA@example.com", " ada@EXAMPLE.com", "ada@example.com "):
        fail_login(world, variant)
    assert fail_login(world).code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_successful_login_resets_the_failure_count(world: AuthWorld) -> None:
    register(world)
    for _ in range(2):
        fail_login(world)
    world.service.login(email=EMAIL, password=PASSWORD)
    codes = [fail_login(world).code for _ in range(3)]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3


def test_login_works_again_when_the_cool_down_expires(world: AuthWorld) -> None:
    register(world)
    for _ in range(3):
        fail_login(world)
    world.clock.advance(59)
    assert fail_login(world).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    world.clock.advance(1.5)
    assert world.service.login(email=EMAIL, password=PASSWORD).user.email == EMAIL


def test_login_rehashes_a_stale_password_hash(world: AuthWorld) -> None:
    register(world)
    user = next(iter(world.database.committed.users.values()))
    world.hasher.stale_hashes.add(user.password_hash)
    hashes = world.hasher.hashes
    world.service.login(email=EMAIL, password=PASSWORD)
    assert world.hasher.hashes == hashes + 1
    assert world.database.committed.users[user.id].update_time == world.clock.now()


# -- infrastructure errors are not attempts ----------------------------------------------


def assert_unavailable(error: BaseException) -> None:
    """The error is one the interceptor answers UNAVAILABLE (+ RetryInfo)."""
    if not isinstance(error, DomainError):
        translated = unavailable_database(error) if isinstance(error, Exception) else None
        assert translated is not None, error
        error = translated
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_a_database_outage_never_locks_an_account(world: AuthWorld) -> None:
    register(world)
    world.database.down = True
    for _ in range(50):  # an obedient client retrying through the outage
        with pytest.raises(OperationalError) as excinfo:
            world.service.login(email=EMAIL, password=PASSWORD)
        assert_unavailable(excinfo.value)
    world.database.down = False
    assert world.service.login(email=EMAIL, password=PASSWORD).user.email == EMAIL


def test_attempts_during_an_outage_add_nothing_to_earlier_failures(world: AuthWorld) -> None:
    register(world)
    fail_login(world)
    fail_login(world)  # 2 of 3
    world.database.down = True
    for _ in range(10):
        with pytest.raises(OperationalError):
            world.service.login(email=EMAIL, password="not the password")
    world.database.down = False
    assert fail_login(world).code == grpc.StatusCode.UNAUTHENTICATED  # the third
    assert fail_login(world).code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_outage_after_the_password_check_is_not_counted(world: AuthWorld) -> None:
    register(world)
    for _ in range(5):  # the database goes away between the check and the new session
        world.hasher.after_verify = lambda: setattr(world.database, "down", True)
        with pytest.raises(OperationalError):
            world.service.login(email=EMAIL, password=PASSWORD)
        world.database.down = False
    assert world.service.login(email=EMAIL, password=PASSWORD).user.email == EMAIL


def test_a_hash_that_waited_too_long_is_not_counted(world: AuthWorld) -> None:
    register(world)
    principal = principal_for(
        world, world.service.login(email=EMAIL, password=PASSWORD).access_token
    )
    world.hasher.failure = Unavailable("late", retry_after_seconds=1, reason="HASHING_TIMEOUT")
    for _ in range(5):
        with pytest.raises(DomainError) as excinfo:
            world.service.login(email=EMAIL, password=PASSWORD)
        assert excinfo.value.reason == "HASHING_TIMEOUT"
        with pytest.raises(DomainError) as excinfo:
            world.service.change_password(
                principal=principal, current_password=PASSWORD, new_password="a new password"
            )
        assert excinfo.value.reason == "HASHING_TIMEOUT"
    world.hasher.failure = None
    assert world.service.login(email=EMAIL, password=PASSWORD).user.email == EMAIL


def test_a_full_hashing_queue_refuses_before_redis_or_the_database(
    world: AuthWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(world)
    principal = principal_for(
        world, world.service.login(email=EMAIL, password=PASSWORD).access_token
    )
    world.hasher.busy = True
    world.database.down = True  # anything touching the database would fail otherwise
    limited: list[str] = []
    monkeypatch.setattr(world.limiter, "acquire", limited.append)
    for call in (
        lambda: world.service.login(email=EMAIL, password=PASSWORD),
        lambda: world.service.register(email="new@example.com", password=PASSWORD, display_name=""),
        lambda: world.service.change_password(
            principal=principal, current_password=PASSWORD, new_password="a new password"
        ),
    ):
        with pytest.raises(DomainError) as excinfo:
            call()
        assert (excinfo.value.code, excinfo.value.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "HASHING_BUSY",
        )
    assert limited == []  # the limiter (Redis) was not asked either
    world.hasher.busy = False
    world.database.down = False
    monkeypatch.undo()
    assert world.service.login(email=EMAIL, password=PASSWORD).user.email == EMAIL


# -- refresh ----------------------------------------------------------------------------


def logged_in(world: AuthWorld) -> str:
    register(world)
    return world.service.login(email=EMAIL, password=PASSWORD).refresh_token


def refused(world: AuthWorld, refresh_token: str) -> bool:
    """True if the refresh token is refused the way a dead one must be."""
    error: DomainError | None = None
    try:
        world.service.refresh(refresh_token=refresh_token)
    except DomainError as raised:
        error = raised
    if error is None:
        return False
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_REFRESH_TOKEN")
    return True


def test_refresh_rotates_the_refresh_token(world: AuthWorld) -> None:
    first = logged_in(world)
    world.clock.advance(1)
    issued = world.service.refresh(refresh_token=first)
    assert issued.refresh_token != first
    assert issued.access_token
    assert issued.expires_in == 900
    rotated = world.database.committed.tokens[hash_refresh_token(first)]
    assert rotated.rotated_time == world.clock.now()
    second = world.service.refresh(refresh_token=issued.refresh_token)
    assert second.refresh_token not in (first, issued.refresh_token)


def test_reuse_within_the_grace_window_gives_a_new_pair(world: AuthWorld) -> None:
    first = logged_in(world)
    child = world.service.refresh(refresh_token=first).refresh_token
    world.clock.advance(4)  # the grace window is 5 s
    sibling = world.service.refresh(refresh_token=first).refresh_token
    assert sibling != child
    assert not refused(world, child)
    assert not refused(world, sibling)


def test_reuse_after_the_grace_window_revokes_the_whole_family(world: AuthWorld) -> None:
    first = logged_in(world)
    child = world.service.refresh(refresh_token=first).refresh_token
    world.clock.advance(6)
    assert refused(world, first)
    assert refused(world, child)
    assert refused(world, first)
    assert [f.revoked_time for f in world.database.committed.families.values()] == [
        world.clock.now()
    ]
    assert world.audit[-1].kind is AuditKind.REFRESH_REUSE_DETECTED


def test_reuse_revokes_only_its_own_family(world: AuthWorld) -> None:
    first = logged_in(world)
    other_session = world.service.login(email=EMAIL, password=PASSWORD).refresh_token
    world.service.refresh(refresh_token=first)
    world.clock.advance(6)
    assert refused(world, first)
    assert not refused(world, other_session)


def test_with_a_grace_of_zero_any_reuse_revokes_the_family() -> None:
    world = build_world(grace_seconds=0)
    first = logged_in(world)
    child = world.service.refresh(refresh_token=first).refresh_token
    assert refused(world, first)  # same instant: no grace at all
    assert refused(world, child)


def test_refresh_with_an_unknown_token_is_refused(world: AuthWorld) -> None:
    logged_in(world)
    assert refused(world, "not-a-token")


def test_refresh_without_a_token_is_invalid_argument(world: AuthWorld) -> None:
    with pytest.raises(InvalidArgument):
        world.service.refresh(refresh_token="")


def test_an_expired_refresh_token_is_refused() -> None:
    world = build_world(refresh_ttl_seconds=600)
    first = logged_in(world)
    world.clock.advance(601)
    assert refused(world, first)


def test_a_disabled_user_cannot_refresh(world: AuthWorld) -> None:
    first = logged_in(world)
    disable(world)
    assert refused(world, first)


def test_refresh_carries_the_current_roles(world: AuthWorld) -> None:
    first = logged_in(world)
    state = world.database.committed
    user = next(iter(state.users.values()))
    state.users[user.id] = replace(user, roles=(USER, ADMIN))
    access = world.service.refresh(refresh_token=first).access_token
    verifier = TokenVerifier(
        StaticKeyProvider(world.keys.verification_keys),
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=world.clock,
    )
    assert verifier.verify(access).is_admin


# -- logout -----------------------------------------------------------------------------


def test_logout_revokes_the_family(world: AuthWorld) -> None:
    first = logged_in(world)
    child = world.service.refresh(refresh_token=first).refresh_token
    world.service.logout(refresh_token=first)  # an already rotated member names the family
    assert refused(world, child)
    assert refused(world, first)


def test_logout_is_idempotent(world: AuthWorld) -> None:
    first = logged_in(world)
    world.service.logout(refresh_token=first)
    world.service.logout(refresh_token=first)
    assert [e.kind for e in world.audit].count(AuditKind.LOGGED_OUT) == 1


def test_logout_with_an_unknown_token_is_fine(world: AuthWorld) -> None:
    commits = world.database.commits
    world.service.logout(refresh_token="never-issued")
    assert world.database.commits == commits


def test_logout_leaves_other_sessions_alone(world: AuthWorld) -> None:
    first = logged_in(world)
    other = world.service.login(email=EMAIL, password=PASSWORD).refresh_token
    world.service.logout(refresh_token=first)
    assert not refused(world, other)


# -- current user and password change ---------------------------------------------------


def principal_for(world: AuthWorld, access_token: str) -> Principal:
    verifier = TokenVerifier(
        StaticKeyProvider(world.keys.verification_keys),
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=world.clock,
    )
    return verifier.verify(access_token)


def test_current_user_is_the_caller(world: AuthWorld) -> None:
    register(world)
    issued = world.service.login(email=EMAIL, password=PASSWORD)
    user = world.service.current_user(principal=principal_for(world, issued.access_token))
    assert user == issued.user


def test_current_user_of_a_disabled_account_is_unauthenticated(world: AuthWorld) -> None:
    register(world)
    issued = world.service.login(email=EMAIL, password=PASSWORD)
    disable(world)
    with pytest.raises(DomainError) as excinfo:
        world.service.current_user(principal=principal_for(world, issued.access_token))
    assert error_of(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, "ACCOUNT_INACTIVE")


def test_change_password_with_a_wrong_current_password_is_refused(world: AuthWorld) -> None:
    register(world)
    issued = world.service.login(email=EMAIL, password=PASSWORD)
    with pytest.raises(DomainError) as excinfo:
        world.service.change_password(
            principal=principal_for(world, issued.access_token),
            current_password="not the password",
            new_password="a brand new password",
        )
    assert error_of(excinfo) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_PASSWORD")
    assert world.service.login(email=EMAIL, password=PASSWORD)
    assert not refused(world, issued.refresh_token)


def test_change_password_checks_the_new_password(world: AuthWorld) -> None:
    register(world)
    issued = world.service.login(email=EMAIL, password=PASSWORD)
    with pytest.raises(InvalidArgument) as excinfo:
        world.service.change_password(
            principal=principal_for(world, issued.access_token),
            current_password=PASSWORD,
            new_password="short",
        )
    assert set(violations(excinfo)) == {"new_password"}


def test_change_password_replaces_it_and_revokes_every_session(world: AuthWorld) -> None:
    register(world)
    first = world.service.login(email=EMAIL, password=PASSWORD)
    second = world.service.login(email=EMAIL, password=PASSWORD)
    world.service.change_password(
        principal=principal_for(world, first.access_token),
        current_password=PASSWORD,
        new_password="a brand new password",
    )
    assert refused(world, first.refresh_token)
    assert refused(world, second.refresh_token)
    with pytest.raises(DomainError):
        world.service.login(email=EMAIL, password=PASSWORD)
    assert world.service.login(email=EMAIL, password="a brand new password")


def test_wrong_current_passwords_count_towards_the_lockout(world: AuthWorld) -> None:
    register(world)
    principal = principal_for(
        world, world.service.login(email=EMAIL, password=PASSWORD).access_token
    )
    codes = []
    for _ in range(4):
        with pytest.raises(DomainError) as excinfo:
            world.service.change_password(
                principal=principal, current_password="wrong!", new_password="whatever123"
            )
        codes.append(excinfo.value.code)
    assert codes[:3] == [grpc.StatusCode.PERMISSION_DENIED] * 3
    assert codes[3] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert AuditKind.LOCKED_OUT in [e.kind for e in world.audit]


# -- a password change racing a login or another change -----------------------------------

NEW_PASSWORD = "a brand new password"


def signed_in(world: AuthWorld) -> Principal:
    register(world)
    return principal_for(world, world.service.login(email=EMAIL, password=PASSWORD).access_token)


def live_families(world: AuthWorld) -> int:
    return sum(f.revoked_time is None for f in world.database.committed.families.values())


def test_a_password_change_between_the_check_and_the_session_ends_the_login(
    world: AuthWorld,
) -> None:
    principal = signed_in(world)
    world.hasher.after_verify = lambda: world.service.change_password(
        principal=principal, current_password=PASSWORD, new_password=NEW_PASSWORD
    )
    with pytest.raises(DomainError) as excinfo:
        world.service.login(email=EMAIL, password=PASSWORD)
    assert error_of(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert live_families(world) == 0
    failures = [e for e in world.audit if e.kind is AuditKind.LOGIN_FAILED]
    assert failures[-1].detail == {"reason": "password_changed"}
    assert world.service.login(email=EMAIL, password=NEW_PASSWORD)


def test_a_rehash_never_puts_the_old_password_back(world: AuthWorld) -> None:
    principal = signed_in(world)
    user = next(iter(world.database.committed.users.values()))
    world.hasher.stale_hashes.add(user.password_hash)  # the next login would rehash
    world.hasher.after_verify = lambda: world.service.change_password(
        principal=principal, current_password=PASSWORD, new_password=NEW_PASSWORD
    )
    with pytest.raises(DomainError):
        world.service.login(email=EMAIL, password=PASSWORD)
    assert world.service.login(email=EMAIL, password=NEW_PASSWORD)
    with pytest.raises(DomainError):
        world.service.login(email=EMAIL, password=PASSWORD)


def test_an_account_disabled_between_the_check_and_the_session_gets_none(
    world: AuthWorld,
) -> None:
    register(world)
    world.hasher.after_verify = lambda: disable(world)
    with pytest.raises(DomainError) as excinfo:
        world.service.login(email=EMAIL, password=PASSWORD)
    assert error_of(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert live_families(world) == 0


def test_of_two_racing_password_changes_the_later_check_loses(world: AuthWorld) -> None:
    principal = signed_in(world)
    world.hasher.after_verify = lambda: world.service.change_password(
        principal=principal, current_password=PASSWORD, new_password=NEW_PASSWORD
    )
    with pytest.raises(DomainError) as excinfo:
        world.service.change_password(
            principal=principal, current_password=PASSWORD, new_password="yet another password"
        )
    assert error_of(excinfo) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_PASSWORD")
    assert world.service.login(email=EMAIL, password=NEW_PASSWORD)


def test_a_changed_password_keeps_its_new_hash_parameters(world: AuthWorld) -> None:
    principal = signed_in(world)
    world.service.change_password(
        principal=principal, current_password=PASSWORD, new_password=NEW_PASSWORD
    )
    user = next(iter(world.database.committed.users.values()))
    with world.hasher.reserve() as slot:
        assert slot.verify(user.password_hash, NEW_PASSWORD)
    assert user.update_time == world.clock.now()


# -- audit ------------------------------------------------------------------------------


def test_every_event_kind_is_audited_without_passwords_or_tokens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agentplatform.audit")
    world = build_world(max_failures=2)
    secrets = [PASSWORD, "wrong password 1", "a brand new password"]
    world.service.register(email="root@example.com", password=PASSWORD, display_name="", admin=True)
    register(world)
    issued = world.service.login(email=EMAIL, password=PASSWORD)
    refreshed = world.service.refresh(refresh_token=issued.refresh_token)
    world.clock.advance(6)
    assert refused(world, issued.refresh_token)  # reuse detected
    fresh = world.service.login(email=EMAIL, password=PASSWORD)
    world.service.logout(refresh_token=fresh.refresh_token)
    world.service.change_password(
        principal=principal_for(world, fresh.access_token),
        current_password=PASSWORD,
        new_password="a brand new password",
    )
    for _ in range(2):
        with pytest.raises(DomainError):
            world.service.login(email=EMAIL, password="wrong password 1")
    secrets += [
        t
        for i in (issued, refreshed, fresh)
        for t in (i.access_token, i.refresh_token, hash_refresh_token(i.refresh_token))
    ]

    # Service accounts' events: tests/unit/auth/test_service_accounts.py; administrators'
    # actions: tests/unit/auth/test_admin.py.
    account_kinds = {
        k
        for k in AuditKind
        if k.value.startswith(("service_", "client_", "token_", "user_", "session", "signing_"))
    }
    assert {e.kind for e in world.audit} == set(AuditKind) - account_kinds
    assert {r.getMessage().removeprefix("audit ") for r in caplog.records} == {
        k.value for k in set(AuditKind) - account_kinds
    }
    recorded = [repr(e) for e in world.audit] + [
        repr(r.__dict__) + r.getMessage() for r in caplog.records
    ]
    for secret in secrets:
        assert not any(secret in text for text in recorded)
    failures = [e for e in world.audit if e.kind is AuditKind.LOGIN_FAILED]
    assert failures[0].email == EMAIL
    assert failures[0].detail == {"reason": "wrong_password"}


def test_failed_login_audit_says_why_without_revealing_it_to_the_caller(
    world: AuthWorld,
) -> None:
    register(world)
    fail_login(world)
    fail_login(world, "nobody@example.com")
    reasons = [e.detail.get("reason") for e in world.audit if e.kind is AuditKind.LOGIN_FAILED]
    assert reasons == ["wrong_password", "unknown_email"]


# -- jwks -------------------------------------------------------------------------------


def test_jwks_publishes_the_signing_key_as_an_okp_jwk(world: AuthWorld) -> None:
    (jwk,) = world.service.jwks()
    (key,) = world.keys.verification_keys
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": jwk["x"],
        "kid": thumbprint(key.key),
        "alg": "EdDSA",
        "use": "sig",
    }
    raw = key.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4)) == raw
    assert "d" not in jwk  # never the private part


def test_jwks_includes_verify_only_keys_for_rotation(world: AuthWorld) -> None:
    old_ec = ec.generate_private_key(ec.SECP256R1()).public_key()
    old_okp = ed25519.Ed25519PrivateKey.generate().public_key()
    pems = "\n".join(
        k.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        for k in (old_ec, old_okp)
    )
    ring = key_ring(world.clock, verify_keys_pem=pems)
    jwks = ring.public_jwks()
    assert [(k["kty"], k["alg"]) for k in jwks] == [
        ("OKP", "EdDSA"),
        ("EC", "ES256"),
        ("OKP", "EdDSA"),
    ]
    ec_jwk = jwks[1]
    assert ec_jwk["crv"] == "P-256"
    assert {"x", "y"} <= set(ec_jwk)
    assert len({k["kid"] for k in jwks}) == 3


def test_field_violation_is_a_value(world: AuthWorld) -> None:
    # Domain errors carry FieldViolation values the interceptor turns into BadRequest.
    with pytest.raises(InvalidArgument) as excinfo:
        world.service.register(email="x", password=PASSWORD, display_name="")
    assert excinfo.value.violations == [FieldViolation("email", "not a valid email address")]


# -- a replica that cannot sign writes nothing --------------------------------------------


class _CannotSign:
    """A token issuer with no usable signing key (a replica whose key store is not ready)."""

    def __init__(self, keys: object) -> None:
        self._keys = keys

    def __getattr__(self, name: str) -> object:
        return getattr(self._keys, name)

    def issue_access_token(self, user: object, *, issued_at: int | None = None) -> str:
        raise Unavailable("no signing key is ready", retry_after_seconds=1.0)


def test_a_login_that_cannot_sign_its_token_leaves_no_session_behind(world: AuthWorld) -> None:
    register(world)
    world.service._tokens = _CannotSign(world.keys)  # type: ignore[assignment]
    with pytest.raises(Unavailable):
        world.service.login(email=EMAIL, password=PASSWORD)
    state = world.database.committed
    assert state.families == {}
    assert state.tokens == {}
    assert AuditKind.LOGIN_SUCCEEDED not in [event.kind for event in world.audit]


def test_a_refresh_that_cannot_sign_keeps_the_presented_token_usable(world: AuthWorld) -> None:
    register(world)
    first = world.service.login(email=EMAIL, password=PASSWORD)
    world.service._tokens = _CannotSign(world.keys)  # type: ignore[assignment]
    with pytest.raises(Unavailable):
        world.service.refresh(refresh_token=first.refresh_token)
    [stored] = world.database.committed.tokens.values()
    assert stored.rotated_time is None  # not spent: no new token was handed out
    world.service._tokens = world.keys
    world.clock.advance(60)  # past the reuse grace: a spent token would kill the family
    assert world.service.refresh(refresh_token=first.refresh_token).access_token
