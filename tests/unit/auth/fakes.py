"""In-memory implementations of the auth ports (services/auth_svc/service/ports.py).

The fake unit of work keeps the repository semantics that the rules depend on: changes
are visible to other units of work only after `commit()`, and a unit of work left without
committing rolls back.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy.exc import OperationalError

from services.auth_svc.domain import (
    AuditEvent,
    ClientKey,
    ClientSecret,
    RefreshToken,
    Revocation,
    ServiceAccount,
    Session,
    SigningKeyRecord,
    User,
)
from services.auth_svc.infra.keys import KeyRing
from services.auth_svc.infra.limiter import InMemoryLoginLimiter
from services.auth_svc.service.auth_service import AuthPolicy, AuthService
from services.auth_svc.service.ports import EmailTaken, KeyExists
from shared.rpc.errors import ResourceExhausted
from tests.fakes import SnapshotDatabase, SnapshotUnitOfWork
from tests.helpers import FakeClock

ISSUER = "test-issuer"
AUDIENCE = "test-audience"


@dataclass
class Family:
    user_id: uuid.UUID
    create_time: datetime
    last_used_time: datetime
    revoked_time: datetime | None = None
    peer: str | None = None


@dataclass
class State:
    """What a database would hold."""

    users: dict[uuid.UUID, User] = field(default_factory=dict)
    families: dict[uuid.UUID, Family] = field(default_factory=dict)
    tokens: dict[str, RefreshToken] = field(default_factory=dict)  # by hash
    audit: list[AuditEvent] = field(default_factory=list)
    service_accounts: dict[uuid.UUID, ServiceAccount] = field(default_factory=dict)
    used_assertions: dict[str, datetime] = field(default_factory=dict)
    revocations: list[tuple[Revocation, datetime]] = field(default_factory=list)
    signing_keys: dict[str, SigningKeyRecord] = field(default_factory=dict)


class FakeServiceAccounts:
    def __init__(self, state: State) -> None:
        self._state = state

    def add(self, account: ServiceAccount) -> None:
        self._state.service_accounts[account.id] = account

    def get(self, account_id: uuid.UUID) -> ServiceAccount | None:
        return self._state.service_accounts.get(account_id)

    credentials = get

    def page(self, *, after: tuple[datetime, uuid.UUID] | None, limit: int) -> list[ServiceAccount]:
        ordered = sorted(self._state.service_accounts.values(), key=lambda a: (a.create_time, a.id))
        if after is not None:
            ordered = [a for a in ordered if (a.create_time, a.id) > after]
        return ordered[:limit]

    def delete(self, account_id: uuid.UUID) -> bool:
        return self._state.service_accounts.pop(account_id, None) is not None

    def _change(self, account_id: uuid.UUID, **changes: object) -> None:
        account = self._state.service_accounts[account_id]
        self._state.service_accounts[account_id] = replace(account, **changes)  # type: ignore[arg-type]

    def add_secret(self, account_id: uuid.UUID, secret: ClientSecret) -> None:
        self._change(
            account_id, secrets=(*self._state.service_accounts[account_id].secrets, secret)
        )

    def remove_secret(self, account_id: uuid.UUID, secret_id: uuid.UUID) -> bool:
        account = self._state.service_accounts.get(account_id)
        if account is None or all(s.id != secret_id for s in account.secrets):
            return False
        self._change(account_id, secrets=tuple(s for s in account.secrets if s.id != secret_id))
        return True

    def add_key(self, account_id: uuid.UUID, key: ClientKey) -> None:
        account = self._state.service_accounts[account_id]
        if any(k.kid == key.kid for k in account.keys):
            raise KeyExists(key.kid)
        self._change(account_id, keys=(*account.keys, key))

    def remove_key(self, account_id: uuid.UUID, kid: str) -> bool:
        account = self._state.service_accounts.get(account_id)
        if account is None or all(k.kid != kid for k in account.keys):
            return False
        self._change(account_id, keys=tuple(k for k in account.keys if k.kid != kid))
        return True

    def touch(self, account_id: uuid.UUID, when: datetime, *, not_since: datetime) -> None:
        account = self._state.service_accounts.get(account_id)
        if account is not None and (
            account.last_used_time is None or account.last_used_time < not_since
        ):
            self._change(account_id, last_used_time=when)

    def use_assertion(self, digest: str, expire_time: datetime) -> bool:
        if digest in self._state.used_assertions:
            return False
        self._state.used_assertions[digest] = expire_time
        return True

    def purge_assertions(self, before: datetime, *, limit: int = 1000) -> int:
        old = [d for d, t in self._state.used_assertions.items() if t < before][:limit]
        for digest in old:
            del self._state.used_assertions[digest]
        return len(old)


class FakeUsers:
    def __init__(self, state: State) -> None:
        self._state = state

    def add(self, user: User) -> None:
        if any(u.email == user.email for u in self._state.users.values()):
            raise EmailTaken(user.email)
        self._state.users[user.id] = user

    def get(self, user_id: uuid.UUID) -> User | None:
        return self._state.users.get(user_id)

    def get_by_email(self, email: str) -> User | None:
        return next((u for u in self._state.users.values() if u.email == email), None)

    def lock(self, user_id: uuid.UUID) -> User | None:
        return self._state.users.get(user_id)  # units of work never overlap in unit tests

    def replace_password_hash(
        self, user_id: uuid.UUID, *, expected: str, new: str, when: datetime
    ) -> bool:
        user = self._state.users.get(user_id)
        if user is None or user.password_hash != expected:
            return False
        self._state.users[user_id] = replace(user, password_hash=new, update_time=when)
        return True

    def page(
        self,
        *,
        email_prefix: str = "",
        role: str = "",
        disabled: bool | None = None,
        after: tuple[datetime, uuid.UUID] | None = None,
        limit: int,
    ) -> list[User]:
        users = sorted(self._state.users.values(), key=lambda u: (u.create_time, u.id))
        return [
            u
            for u in users
            if u.email.startswith(email_prefix)
            and (not role or role in u.roles)
            and (disabled is None or u.disabled == disabled)
            and (after is None or (u.create_time, u.id) > after)
        ][:limit]

    def save(self, user: User) -> None:
        stored = self._state.users[user.id]
        self._state.users[user.id] = replace(
            stored,
            display_name=user.display_name,
            roles=user.roles,
            disabled=user.disabled,
            update_time=user.update_time,
        )


class FakeRefreshTokens:
    def __init__(self, state: State) -> None:
        self._state = state

    def add_family(
        self, family_id: uuid.UUID, user_id: uuid.UUID, when: datetime, peer: str | None = None
    ) -> None:
        self._state.families[family_id] = Family(user_id, when, when, peer=peer)

    def _session(self, family_id: uuid.UUID, family: Family) -> Session:
        return Session(
            family_id, family.user_id, family.create_time, family.last_used_time, family.peer
        )

    def live_sessions(
        self, user_id: uuid.UUID, *, before: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[Session]:
        live = [
            self._session(i, f)
            for i, f in self._state.families.items()
            if f.user_id == user_id and f.revoked_time is None
        ]
        live.sort(key=lambda s: (s.create_time, s.id), reverse=True)
        return [s for s in live if before is None or (s.create_time, s.id) < before][:limit]

    def live_session(self, family_id: uuid.UUID) -> Session | None:
        family = self._state.families.get(family_id)
        if family is None or family.revoked_time is not None:
            return None
        return self._session(family_id, family)

    def add(self, token: RefreshToken) -> None:
        assert token.family_id in self._state.families
        self._state.tokens[token.token_hash] = token

    def family_of(self, token_hash: str) -> uuid.UUID | None:
        token = self._state.tokens.get(token_hash)
        return token.family_id if token else None

    def lock_live_family(self, family_id: uuid.UUID, when: datetime) -> bool:
        family = self._state.families.get(family_id)
        if family is None or family.revoked_time is not None:
            return False
        family.last_used_time = when
        return True

    def get_by_hash(self, token_hash: str) -> RefreshToken | None:
        return self._state.tokens.get(token_hash)

    def mark_rotated(self, token_id: uuid.UUID, when: datetime) -> None:
        for key, token in self._state.tokens.items():
            if token.id == token_id:
                self._state.tokens[key] = replace(token, rotated_time=when)

    def revoke_family(self, family_id: uuid.UUID, when: datetime) -> None:
        family = self._state.families[family_id]
        if family.revoked_time is None:
            family.revoked_time = when

    def revoke_user_families(self, user_id: uuid.UUID, when: datetime) -> int:
        count = 0
        for family in self._state.families.values():
            if family.user_id == user_id and family.revoked_time is None:
                family.revoked_time = when
                count += 1
        return count


class FakeSigningKeys:
    def __init__(self, state: State) -> None:
        self._state = state

    def lock(self) -> None:
        """Units of work never overlap in unit tests."""

    def all(self) -> list[SigningKeyRecord]:
        return sorted(self._state.signing_keys.values(), key=lambda k: (k.activate_time, k.kid))

    def add(self, key: SigningKeyRecord) -> None:
        assert key.kid not in self._state.signing_keys
        self._state.signing_keys[key.kid] = key

    def save(self, key: SigningKeyRecord) -> None:
        self._state.signing_keys[key.kid] = key


class FakeRevocations:
    def __init__(self, state: State) -> None:
        self._state = state

    def add(self, revocation: Revocation, *, expire_time: datetime) -> None:
        self._state.revocations.append((revocation, expire_time))

    def covers(self, subject: str, issued_at: float, now: datetime) -> bool:
        return any(
            r.subject == subject and r.not_before.timestamp() > issued_at and expires > now
            for r, expires in self._state.revocations
        )

    def latest(self, subject: str, now: datetime) -> datetime | None:
        moments = [
            r.not_before
            for r, expires in self._state.revocations
            if r.subject == subject and expires > now
        ]
        return max(moments, default=None)

    def since(self, when: datetime | None, *, now: datetime, limit: int) -> list[Revocation]:
        found = [
            r
            for r, expires in self._state.revocations
            if expires > now and (when is None or r.create_time >= when)
        ]
        return sorted(found, key=lambda r: r.create_time)[:limit]


class FakeAudit:
    def __init__(self, state: State) -> None:
        self._state = state

    def record(self, event: AuditEvent) -> None:
        self._state.audit.append(replace(event, id=event.id or uuid.uuid4()))

    def page(
        self,
        *,
        user_id: uuid.UUID | None = None,
        kind: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
        before: tuple[datetime, uuid.UUID] | None = None,
        limit: int,
    ) -> list[AuditEvent]:
        events = sorted(self._state.audit, key=lambda e: (e.time, e.id), reverse=True)
        return [
            e
            for e in events
            if (user_id is None or e.user_id == user_id)
            and (not kind or e.kind.value == kind)
            and (start is None or e.time >= start)
            and (end is None or e.time < end)
            and (before is None or (e.time, e.id) < before)
        ][:limit]


def database_down() -> OperationalError:
    """What SQLAlchemy raises when the database does not answer (the interceptor maps it
    to UNAVAILABLE, see shared.data.db.unavailable_database)."""
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


class FakeDatabase(SnapshotDatabase[State]):
    """The committed state, and units of work that each change a private copy of it.
    While `down`, every read and commit raises as an unreachable database does."""

    def __init__(self) -> None:
        super().__init__(State)
        self.down = False

    def unit_of_work(self) -> FakeUnitOfWork:
        return FakeUnitOfWork(self)


class FakeUnitOfWork(SnapshotUnitOfWork[State]):
    _database: FakeDatabase

    def _state_or_outage(self) -> State:
        if self._database.down:
            raise database_down()
        return self._state

    @property
    def users(self) -> FakeUsers:
        return FakeUsers(self._state_or_outage())

    @property
    def refresh_tokens(self) -> FakeRefreshTokens:
        return FakeRefreshTokens(self._state_or_outage())

    @property
    def audit(self) -> FakeAudit:
        return FakeAudit(self._state_or_outage())

    @property
    def service_accounts(self) -> FakeServiceAccounts:
        return FakeServiceAccounts(self._state_or_outage())

    @property
    def revocations(self) -> FakeRevocations:
        return FakeRevocations(self._state_or_outage())

    @property
    def signing_keys(self) -> FakeSigningKeys:
        return FakeSigningKeys(self._state_or_outage())

    def commit(self) -> None:
        self._state_or_outage()
        super().commit()


class FakeHasher:
    """Cheap and deterministic; counts its calls (the timing rules are about calls made).

    `busy` makes `reserve()` refuse (a full hashing queue); `failure`, when set, is raised
    by every hash and verification (a hash that waited too long); `after_verify`, when
    set, runs once after the next verification (to interleave another request between a
    password check and what follows it)."""

    def __init__(self) -> None:
        self.hashes = 0
        self.verifies = 0
        self.reserved = 0
        self.busy = False
        self.stale_hashes: set[str] = set()
        self.failure: Exception | None = None
        self.after_verify: Callable[[], object] | None = None

    @staticmethod
    def _digest(password: str) -> str:
        return "fake$" + hashlib.sha256(password.encode()).hexdigest()

    @contextmanager
    def reserve(self) -> Iterator[FakeHasher]:
        if self.busy:
            raise ResourceExhausted("busy", retry_after_seconds=1.0, reason="HASHING_BUSY")
        self.reserved += 1
        try:
            yield self
        finally:
            self.reserved -= 1

    def hash(self, password: str) -> str:
        assert self.reserved > 0, "hashed without a reservation"
        if self.failure is not None:
            raise self.failure
        self.hashes += 1
        return self._digest(password)

    def verify(self, password_hash: str, password: str) -> bool:
        assert self.reserved > 0, "verified without a reservation"
        if self.failure is not None:
            raise self.failure
        self.verifies += 1
        matches = password_hash == self._digest(password)
        hook, self.after_verify = self.after_verify, None
        if hook is not None:
            hook()
        return matches

    def needs_rehash(self, password_hash: str) -> bool:
        return password_hash in self.stale_hashes


def ed25519_pem() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def key_ring(clock: FakeClock, *, ttl: int = 900, verify_keys_pem: str | None = None) -> KeyRing:
    return KeyRing(
        signing_key_pem=ed25519_pem(),
        verify_keys_pem=verify_keys_pem,
        issuer=ISSUER,
        audience=AUDIENCE,
        access_token_ttl_seconds=ttl,
        clock=clock,
    )


@dataclass
class AuthWorld:
    """An AuthService on fakes, with the fakes at hand for assertions."""

    service: AuthService
    database: FakeDatabase
    hasher: FakeHasher
    limiter: InMemoryLoginLimiter
    keys: KeyRing
    clock: FakeClock

    @property
    def audit(self) -> list[AuditEvent]:
        return self.database.committed.audit


def build_world(
    *,
    password_min_length: int = 8,
    max_failures: int = 3,
    lockout_seconds: float = 60.0,
    grace_seconds: float = 5.0,
    refresh_ttl_seconds: int = 3600,
) -> AuthWorld:
    clock = FakeClock()
    database = FakeDatabase()
    hasher = FakeHasher()
    limiter = InMemoryLoginLimiter(
        max_failures=max_failures, lockout_seconds=lockout_seconds, monotonic=clock.monotonic
    )
    keys = key_ring(clock)
    service = AuthService(
        uow=database.unit_of_work,
        hasher=hasher,
        limiter=limiter,
        tokens=keys,
        clock=clock,
        policy=AuthPolicy(
            password_min_length=password_min_length,
            refresh_token_ttl_seconds=refresh_ttl_seconds,
            refresh_reuse_grace_seconds=grace_seconds,
        ),
    )
    return AuthWorld(service, database, hasher, limiter, keys, clock)


def store_admin(database: FakeDatabase, admin_id: uuid.UUID) -> None:
    """The administrator the tests act as, as the database knows them."""
    now = datetime.now(UTC)
    database.committed.users[admin_id] = User(
        admin_id, "root@example.com", "root", ("user", "admin"), False, "h", now, now
    )
