"""Operators' controls on fakes: users, sessions, the audit trail, revocations."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

import grpc
import pytest

from services.auth_svc.domain import AuditKind
from services.auth_svc.service.admin import (
    MAX_IAT_AHEAD_SECONDS,
    AuditReader,
    RevocationFeed,
    Sessions,
    UserAdmin,
    etag_of,
)
from shared.rpc.errors import DomainError, InvalidArgument
from shared.security.tokens import Principal, StaticKeyProvider, TokenVerifier
from tests.unit.auth.fakes import AUDIENCE, ISSUER, AuthWorld, build_world

PASSWORD = "correct horse battery"


@dataclass
class World:
    auth: AuthWorld
    users: UserAdmin
    sessions: Sessions
    audit: AuditReader
    feed: RevocationFeed

    def principal(self, email: str, password: str = PASSWORD) -> Principal:
        return self.verify(self.auth.service.login(email=email, password=password).access_token)

    def verify(self, token: str) -> Principal:
        verifier = TokenVerifier(
            StaticKeyProvider(self.auth.keys.verification_keys),
            issuer=ISSUER,
            audience=AUDIENCE,
            clock=self.auth.clock,
        )
        return verifier.verify(token)

    def demote(self, admin: Principal, user_id: str) -> None:
        """Takes the admin role away (a revocation of the user's tokens)."""
        with self.auth.database.unit_of_work() as uow:
            user = uow.users.get(uuid.UUID(user_id))
        assert user is not None
        self.users.update(
            principal=admin,
            user_id=user_id,
            etag=etag_of(user),
            paths=["roles"],
            display_name="",
            roles=["user"],
        )

    def register(self, email: str, *, admin: bool = False) -> str:
        user = self.auth.service.register(
            email=email, password=PASSWORD, display_name="", admin=admin
        )
        self.auth.clock.advance(1)
        return str(user.id)


@pytest.fixture
def world() -> World:
    auth = build_world(max_failures=2)
    uow = auth.database.unit_of_work
    return World(
        auth,
        UserAdmin(uow=uow, limiter=auth.limiter, clock=auth.clock, token_lifetime_seconds=900),
        Sessions(uow=uow, clock=auth.clock, token_lifetime_seconds=900),
        AuditReader(uow=uow, clock=auth.clock),
        RevocationFeed(uow=uow, clock=auth.clock),
    )


@pytest.fixture
def admin(world: World) -> Principal:
    world.register("root@example.com", admin=True)
    return world.principal("root@example.com")


def reason(excinfo: pytest.ExceptionInfo[DomainError]) -> tuple[grpc.StatusCode, str]:
    return excinfo.value.code, excinfo.value.reason


def test_only_administrators_acting_for_themselves(world: World, admin: Principal) -> None:
    world.register("ada@example.com")
    user = world.principal("ada@example.com")
    delegated = Principal(
        user_id=admin.user_id, roles=admin.roles, subject=admin.subject, actor="svc"
    )
    for principal in (user, delegated):
        with pytest.raises(DomainError) as caught:
            world.users.list(principal=principal, page_size=0, page_token="")
        assert reason(caught) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
        with pytest.raises(DomainError) as caught:
            world.audit.list(
                principal=principal,
                user_id="",
                kind="",
                start=None,
                end=None,
                page_size=0,
                page_token="",
            )
        assert reason(caught) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")


def test_users_are_listed_in_pages_by_filter(world: World, admin: Principal) -> None:
    ids = [world.register(f"user{n}@example.com") for n in range(5)]
    world.register("other@corp.example")
    disabled = ids[1]
    world.users.set_disabled(principal=admin, user_id=disabled, disabled=True)
    seen, token = [], ""
    while True:
        page, token = world.users.list(
            principal=admin, page_size=2, page_token=token, email_prefix="USER"
        )
        seen += [str(u.id) for u in page]
        if not token:
            break
    assert seen == ids
    enabled, _ = world.users.list(
        principal=admin, page_size=0, page_token="", email_prefix="user", disabled=False
    )
    assert [str(u.id) for u in enabled] == [i for i in ids if i != disabled]
    admins, _ = world.users.list(principal=admin, page_size=0, page_token="", role="admin")
    assert [u.email for u in admins] == ["root@example.com"]
    _, token = world.users.list(principal=admin, page_size=1, page_token="", email_prefix="user")
    with pytest.raises(InvalidArgument) as caught:  # a token of another query
        world.users.list(principal=admin, page_size=1, page_token=token, email_prefix="u")
    assert caught.value.violations[0].field == "page_token"


def test_update_checks_the_etag_and_demotion_ends_sessions_and_tokens(
    world: World, admin: Principal
) -> None:
    user_id = world.register("ada@example.com", admin=True)
    issued = world.auth.service.login(email="ada@example.com", password=PASSWORD)
    user = world.users.get(principal=admin, user_id=user_id)
    world.auth.clock.advance(1)
    renamed = world.users.update(
        principal=admin,
        user_id=user_id,
        etag=etag_of(user),
        paths=["display_name"],
        display_name=" Ada L. ",
        roles=[],
    )
    assert renamed.display_name == "Ada L."
    assert etag_of(renamed) != etag_of(user)
    with pytest.raises(DomainError) as caught:  # the etag read before the rename
        world.users.update(
            principal=admin,
            user_id=user_id,
            etag=etag_of(user),
            paths=["roles"],
            display_name="",
            roles=["user"],
        )
    assert reason(caught) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert world.feed.since(None)[0] == []
    demoted = world.users.update(
        principal=admin,
        user_id=user_id,
        etag=etag_of(renamed),
        paths=["roles"],
        display_name="",
        roles=["user"],
    )
    assert demoted.roles == ("user",)
    with pytest.raises(DomainError):
        world.auth.service.refresh(refresh_token=issued.refresh_token)
    (revocation,) = world.feed.since(None)[0]
    assert revocation.subject == user_id
    assert revocation.not_before > world.auth.clock.now()
    kinds = [e.kind for e in world.auth.audit if e.user_id == demoted.id]
    assert kinds[-2:] == [AuditKind.USER_UPDATED, AuditKind.USER_UPDATED]
    assert world.auth.audit[-1].actor == f"users/{admin.user_id}"


def test_bad_updates_are_refused_field_by_field(world: World, admin: Principal) -> None:
    user_id = world.register("ada@example.com")
    with pytest.raises(InvalidArgument) as caught:
        world.users.update(
            principal=admin,
            user_id=user_id,
            etag="",
            paths=["email", "roles", "display_name"],
            display_name="",
            roles=["root"],
        )
    fields = {v.field for v in caught.value.violations}
    assert fields == {"update_mask", "user.roles", "user.display_name"}
    with pytest.raises(InvalidArgument) as caught:
        world.users.update(
            principal=admin,
            user_id=admin.user_id,
            etag="",
            paths=["roles"],
            display_name="",
            roles=["user"],
        )
    assert "their own admin role" in caught.value.violations[0].description


def test_disabling_ends_everything_and_enabling_lets_the_user_back(
    world: World, admin: Principal
) -> None:
    user_id = world.register("ada@example.com")
    issued = world.auth.service.login(email="ada@example.com", password=PASSWORD)
    disabled = world.users.set_disabled(principal=admin, user_id=user_id, disabled=True)
    assert disabled.disabled
    assert world.users.set_disabled(principal=admin, user_id=user_id, disabled=True) == disabled
    with pytest.raises(DomainError) as caught:
        world.auth.service.login(email="ada@example.com", password=PASSWORD)
    assert reason(caught) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    with pytest.raises(DomainError):
        world.auth.service.refresh(refresh_token=issued.refresh_token)
    assert [r.subject for r in world.feed.since(None)[0]] == [user_id]
    world.users.set_disabled(principal=admin, user_id=user_id, disabled=False)
    assert world.auth.service.login(email="ada@example.com", password=PASSWORD).access_token
    kinds = [e.kind for e in world.auth.audit if str(e.user_id) == user_id]
    assert AuditKind.USER_DISABLED in kinds
    assert AuditKind.USER_ENABLED in kinds
    with pytest.raises(InvalidArgument):
        world.users.set_disabled(principal=admin, user_id=admin.user_id, disabled=True)


def test_unlock_ends_a_lockout(world: World, admin: Principal) -> None:
    user_id = world.register("ada@example.com")
    for _ in range(2):
        with pytest.raises(DomainError):
            world.auth.service.login(email="ada@example.com", password="wrong password")
    with pytest.raises(DomainError) as caught:
        world.auth.service.login(email="ada@example.com", password=PASSWORD)
    assert reason(caught) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_LOCKED")
    world.users.unlock(principal=admin, user_id=user_id)
    assert world.auth.service.login(email="ada@example.com", password=PASSWORD).access_token
    assert world.auth.audit[-2].kind is AuditKind.USER_UNLOCKED


def test_unknown_users_are_not_found(world: World, admin: Principal) -> None:
    missing = str(uuid.uuid4())
    for call in (
        lambda: world.users.get(principal=admin, user_id=missing),
        lambda: world.users.set_disabled(principal=admin, user_id=missing, disabled=True),
        lambda: world.users.unlock(principal=admin, user_id=missing),
    ):
        with pytest.raises(DomainError) as caught:
            call()
        assert reason(caught) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


def test_a_user_sees_and_ends_their_own_sessions_only(world: World, admin: Principal) -> None:
    user_id = world.register("ada@example.com")
    world.register("bob@example.com")
    first = world.auth.service.login(email="ada@example.com", password=PASSWORD)
    world.auth.clock.advance(1)
    second = world.auth.service.login(email="ada@example.com", password=PASSWORD)
    ada = world.principal("ada@example.com")  # a third session
    bob = world.principal("bob@example.com")
    sessions, _ = world.sessions.list(principal=ada, user_id="", page_size=0, page_token="")
    assert len(sessions) == 3
    assert sessions[0].create_time >= sessions[-1].create_time  # newest first
    with pytest.raises(DomainError) as caught:
        world.sessions.list(principal=bob, user_id=user_id, page_size=0, page_token="")
    assert reason(caught) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    with pytest.raises(DomainError) as caught:
        world.sessions.revoke(principal=bob, session_id=str(sessions[-1].id))
    assert reason(caught) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    oldest = sessions[-1]
    world.sessions.revoke(principal=ada, session_id=str(oldest.id))
    with pytest.raises(DomainError):
        world.auth.service.refresh(refresh_token=first.refresh_token)
    assert world.auth.service.refresh(refresh_token=second.refresh_token).access_token
    left, _ = world.sessions.list(principal=admin, user_id=user_id, page_size=0, page_token="")
    assert oldest.id not in {s.id for s in left}
    assert world.sessions.revoke_all(principal=admin, user_id=user_id) == 2
    assert world.sessions.list(principal=ada, user_id="", page_size=0, page_token="")[0] == []
    assert [r.subject for r in world.feed.since(None)[0]] == [user_id]


def test_the_audit_trail_is_newest_first_with_its_actors(world: World, admin: Principal) -> None:
    user_id = world.register("ada@example.com")
    world.users.set_disabled(principal=admin, user_id=user_id, disabled=True)
    world.auth.clock.advance(5)
    world.users.set_disabled(principal=admin, user_id=user_id, disabled=False)
    events, token = world.audit.list(
        principal=admin,
        user_id=user_id,
        kind="",
        start=None,
        end=None,
        page_size=2,
        page_token="",
    )
    assert [e.kind for e in events] == [AuditKind.USER_ENABLED, AuditKind.USER_DISABLED]
    assert {e.actor for e in events} == {f"users/{admin.user_id}"}
    rest, last = world.audit.list(
        principal=admin,
        user_id=user_id,
        kind="",
        start=None,
        end=None,
        page_size=2,
        page_token=token,
    )
    assert [e.kind for e in rest] == [AuditKind.REGISTERED]
    assert last == ""
    window, _ = world.audit.list(
        principal=admin,
        user_id="",
        kind="user_disabled",
        start=world.auth.clock.now() - timedelta(seconds=10),
        end=None,
        page_size=0,
        page_token="",
    )
    assert [str(e.user_id) for e in window] == [user_id]
    with pytest.raises(InvalidArgument):
        world.audit.list(
            principal=admin,
            user_id="",
            kind="no_such_kind",
            start=None,
            end=None,
            page_size=0,
            page_token="",
        )


def test_a_password_change_revokes_the_tokens_issued_before(world: World) -> None:
    user_id = world.register("ada@example.com")
    ada = world.principal("ada@example.com")
    world.auth.service.change_password(
        principal=ada, current_password=PASSWORD, new_password="a brand new password"
    )
    revocations, now, more = world.feed.since(None)
    assert [r.subject for r in revocations] == [user_id]
    assert now == world.auth.clock.now()
    assert not more
    later, _, _ = world.feed.since(now + timedelta(seconds=1))
    assert later == []


def into_a_second(world: World, fraction: float) -> None:
    """Moves the clock to `fraction` of a second past a whole second."""
    now = world.auth.clock.now().timestamp()
    world.auth.clock.advance(1 + fraction - now % 1)


def revoked(world: World, token: Principal) -> bool:
    """Whether a revocation covers the token (as every verifier judges it)."""
    with world.auth.database.unit_of_work() as uow:
        return uow.revocations.covers(token.user_id, token.issued_at, world.auth.clock.now())


@pytest.mark.parametrize("revoke", ["change_password", "revoke_all"])
def test_a_login_in_the_second_of_a_revocation_gets_a_token_that_works(
    world: World, revoke: str
) -> None:
    """Tokens carry `iat` in whole seconds, and a revocation refuses every token issued
    before the second after it; a login later in that second (right after ChangePassword or
    RevokeAllSessions) must still get a working token."""
    world.register("ada@example.com")
    into_a_second(world, 0.2)
    before = world.principal("ada@example.com")
    world.auth.clock.advance(0.1)
    if revoke == "change_password":
        world.auth.service.change_password(
            principal=before, current_password=PASSWORD, new_password="a brand new password"
        )
        password = "a brand new password"
    else:
        world.sessions.revoke_all(principal=before, user_id="")
        password = PASSWORD
    world.auth.clock.advance(0.3)  # the same second
    after = world.auth.service.login(email="ada@example.com", password=password)
    fresh = world.verify(after.access_token)
    (revocation,), _, _ = world.feed.since(None)
    assert revoked(world, before)
    assert not revoked(world, fresh)
    assert fresh.issued_at == revocation.not_before.timestamp()  # the next whole second
    refreshed = world.verify(
        world.auth.service.refresh(refresh_token=after.refresh_token).access_token
    )
    assert not revoked(world, refreshed)
    world.auth.clock.advance(1)  # a later second: a token takes its own time again
    again = world.verify(
        world.auth.service.login(email="ada@example.com", password=password).access_token
    )
    assert again.issued_at == int(world.auth.clock.now().timestamp())


def test_a_token_issued_after_a_demotion_in_its_second_carries_the_demoted_roles(
    world: World, admin: Principal
) -> None:
    user_id = world.register("ada@example.com", admin=True)
    into_a_second(world, 0.1)
    world.demote(admin, user_id)
    world.auth.clock.advance(0.5)
    token = world.principal("ada@example.com")
    assert not revoked(world, token)
    assert token.roles == frozenset({"user"})


@pytest.mark.parametrize("second", ["change_password", "disable", "demote", "revoke_all"])
def test_a_second_revocation_in_that_second_covers_the_token_issued_between(
    world: World, admin: Principal, second: str
) -> None:
    """The token of a login after a revocation carries the next second as its `iat`; a
    second revocation in the same second (a demotion the user saw coming, a disable) must
    still refuse it (found by an outside review: it was accepted for its whole life)."""
    user_id = world.register("ada@example.com", admin=True)
    into_a_second(world, 0.1)
    first = world.principal("ada@example.com")
    world.sessions.revoke_all(principal=first, user_id="")
    world.auth.clock.advance(0.1)
    between = world.principal("ada@example.com")
    assert not revoked(world, between)
    world.auth.clock.advance(0.1)
    if second == "change_password":
        world.auth.service.change_password(
            principal=between, current_password=PASSWORD, new_password="a brand new password"
        )
    elif second == "disable":
        world.users.set_disabled(principal=admin, user_id=user_id, disabled=True)
    elif second == "demote":
        world.demote(admin, user_id)
    else:
        world.sessions.revoke_all(principal=admin, user_id=user_id)
    assert revoked(world, between)
    assert revoked(world, first)
    if second != "disable":  # and a login after both still works at once
        password = "a brand new password" if second == "change_password" else PASSWORD
        world.auth.clock.advance(0.1)
        assert not revoked(world, world.principal("ada@example.com", password))


def test_a_revoked_token_cannot_revoke_again(world: World) -> None:
    """Each revocation of a user within a second pushes the next one's moment a second
    further: a burst from one token (a stolen one) kept the user's new logins refused for
    48 s in an outside review. A token revoked in the database revokes nothing more."""
    world.register("ada@example.com")
    token = world.principal("ada@example.com")
    world.sessions.revoke_all(principal=token, user_id="")
    with pytest.raises(DomainError) as caught:
        world.sessions.revoke_all(principal=token, user_id="")
    assert reason(caught) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    with pytest.raises(DomainError) as caught:
        world.auth.service.change_password(
            principal=token, current_password=PASSWORD, new_password="a brand new password"
        )
    assert reason(caught) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    assert len(world.feed.since(None)[0]) == 1  # one revocation, not three
    world.auth.service.login(email="ada@example.com", password=PASSWORD)  # unchanged


def test_a_burst_of_revocations_pushes_the_moment_a_bounded_way_ahead(
    world: World, admin: Principal
) -> None:
    """Each revocation within a second goes past the latest (it must cover a token issued
    between them), but an administrator's burst no longer pushes without end (an outside
    review: 30 in a second kept the user's logins refused for 24 s)."""
    user_id = world.register("ada@example.com")
    into_a_second(world, 0.1)
    world.sessions.revoke_all(principal=admin, user_id=user_id)
    between = world.principal("ada@example.com")  # carries the next second
    for _ in range(30):
        world.sessions.revoke_all(principal=admin, user_id=user_id)
    assert revoked(world, between)
    second = int(world.auth.clock.now().timestamp())
    moments = [r.not_before.timestamp() for r in world.feed.since(None)[0]]
    assert max(moments) <= second + MAX_IAT_AHEAD_SECONDS + 1
    world.auth.clock.advance(MAX_IAT_AHEAD_SECONDS + 1)  # then logins work again
    assert not revoked(world, world.principal("ada@example.com"))


def test_a_revocation_reply_says_when_it_left_some_out(world: World) -> None:
    """Oldest first, at most `limit`, and `more` when the rest needs another reply."""
    subjects = []
    for n in range(3):
        subjects.append(world.register(f"user{n}@example.com"))
        user = world.principal(f"user{n}@example.com")
        world.auth.service.change_password(
            principal=user, current_password=PASSWORD, new_password="a brand new password"
        )
        world.auth.clock.advance(1)
    first, _, more = world.feed.since(None, limit=2)
    assert ([r.subject for r in first], more) == (subjects[:2], True)
    rest, _, more = world.feed.since(first[-1].create_time, limit=2)
    assert ([r.subject for r in rest], more) == (subjects[1:], False)


def test_an_admin_token_is_judged_by_the_database_at_once(world: World, admin: Principal) -> None:
    """Not only by what the token says: demoted or revoked since, refused before any poll."""
    second_id = world.register("second@example.com", admin=True)
    second = world.principal("second@example.com")
    assert world.users.list(principal=second, page_size=1, page_token="")[0]
    world.demote(admin, second_id)
    with pytest.raises(DomainError) as caught:  # its token still carries the admin role
        world.users.list(principal=second, page_size=1, page_token="")
    assert reason(caught) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    world.auth.clock.advance(2)
    fresh = world.principal("second@example.com")  # a new token, no longer an admin
    with pytest.raises(DomainError) as caught:
        world.users.list(principal=fresh, page_size=1, page_token="")
    assert reason(caught) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")


def test_a_control_character_in_the_email_prefix_is_a_bad_request(
    world: World, admin: Principal
) -> None:
    """PostgreSQL refuses NUL in text: it must never reach the query (it was INTERNAL)."""
    with pytest.raises(InvalidArgument) as caught:
        world.users.list(principal=admin, page_size=0, page_token="", email_prefix="a\x00b")
    assert caught.value.violations[0].field == "email_prefix"
