"""SQLAlchemy implementations of the auth repositories and unit of work."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import (
    Connection,
    String,
    bindparam,
    cast,
    delete,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.auth_svc.domain import (
    AuditEvent,
    AuditKind,
    ClientKey,
    ClientSecret,
    RefreshToken,
    Revocation,
    ServiceAccount,
    SigningKeyRecord,
    User,
)
from services.auth_svc.domain import (
    Session as LoginSession,
)
from services.auth_svc.repository.models import (
    AuditRow,
    RefreshFamilyRow,
    RefreshTokenRow,
    RevocationRow,
    ServiceAccountKeyRow,
    ServiceAccountRow,
    ServiceAccountSecretRow,
    SigningKeyRow,
    UsedAssertionRow,
    UserRow,
)
from services.auth_svc.service.ports import EmailTaken, KeyExists
from shared.config.clock import utc
from shared.data.db import SqlUnitOfWork
from shared.rpc.request_path import call_origin

__all__ = [
    "SqlAuditLog",
    "SqlAuthUnitOfWork",
    "SqlRefreshTokenRepository",
    "SqlServiceAccountRepository",
    "SqlUserRepository",
]


def _user(row: UserRow) -> User:
    return User(
        id=row.id,
        email=row.email,
        display_name=row.display_name,
        roles=tuple(row.roles),
        disabled=row.disabled,
        password_hash=row.password_hash,
        create_time=utc(row.create_time),
        update_time=utc(row.update_time),
    )


class SqlUserRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, user: User) -> None:
        row = UserRow(
            id=user.id,
            email=user.email,
            display_name=user.display_name,
            password_hash=user.password_hash,
            roles=list(user.roles),
            disabled=user.disabled,
            create_time=user.create_time,
            update_time=user.update_time,
        )
        # Added inside the savepoint: begin_nested() flushes what is pending *before* the
        # SAVEPOINT, so a row added earlier would fail (and doom) the whole transaction.
        try:
            with self._session.begin_nested():
                self._session.add(row)
                self._session.flush()
        except IntegrityError:
            raise EmailTaken(user.email) from None

    def get(self, user_id: uuid.UUID) -> User | None:
        row = self._session.get(UserRow, user_id)
        return _user(row) if row else None

    def get_by_email(self, email: str) -> User | None:
        row = self._session.scalars(select(UserRow).where(UserRow.email == email)).one_or_none()
        return _user(row) if row else None

    def lock(self, user_id: uuid.UUID) -> User | None:
        # FOR UPDATE on PostgreSQL; SQLite ignores it (BEGIN IMMEDIATE already holds the
        # database's one write lock for the whole transaction).
        row = self._session.scalars(
            select(UserRow)
            .where(UserRow.id == user_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one_or_none()
        return _user(row) if row else None

    def replace_password_hash(
        self, user_id: uuid.UUID, *, expected: str, new: str, when: datetime
    ) -> bool:
        result = self._session.execute(
            update(UserRow)
            .where(UserRow.id == user_id, UserRow.password_hash == expected)
            .values(password_hash=new, update_time=when)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def page(
        self,
        *,
        email_prefix: str = "",
        role: str = "",
        disabled: bool | None = None,
        after: tuple[datetime, uuid.UUID] | None = None,
        limit: int,
    ) -> list[User]:
        query = select(UserRow)
        if email_prefix:
            escaped = email_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(UserRow.email.like(escaped + "%", escape="\\"))
        if role:
            # roles is a JSON list of known names: its text holds `"<role>"` exactly then.
            query = query.where(cast(UserRow.roles, String).like(f'%"{role}"%'))
        if disabled is not None:
            query = query.where(UserRow.disabled.is_(disabled))
        if after is not None:
            query = query.where(tuple_(UserRow.create_time, UserRow.id) > tuple_(*after))
        rows = self._session.scalars(
            query.order_by(UserRow.create_time, UserRow.id).limit(limit)
        ).all()
        return [_user(row) for row in rows]

    def save(self, user: User) -> None:
        """Stores the user's display name, roles, disabled flag and update time."""
        self._session.execute(
            update(UserRow)
            .where(UserRow.id == user.id)
            .values(
                display_name=user.display_name,
                roles=list(user.roles),
                disabled=user.disabled,
                update_time=user.update_time,
            )
            .execution_options(synchronize_session=False)
        )


class SqlRefreshTokenRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add_family(
        self, family_id: uuid.UUID, user_id: uuid.UUID, when: datetime, peer: str | None = None
    ) -> None:
        self._session.add(
            RefreshFamilyRow(
                id=family_id,
                user_id=user_id,
                create_time=when,
                last_used_time=when,
                peer=_bounded(peer or call_origin()[0]),
            )
        )
        self._session.flush()

    def live_sessions(
        self, user_id: uuid.UUID, *, before: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[LoginSession]:
        query = select(RefreshFamilyRow).where(
            RefreshFamilyRow.user_id == user_id, RefreshFamilyRow.revoked_time.is_(None)
        )
        if before is not None:
            query = query.where(
                tuple_(RefreshFamilyRow.create_time, RefreshFamilyRow.id) < tuple_(*before)
            )
        rows = self._session.scalars(
            query.order_by(RefreshFamilyRow.create_time.desc(), RefreshFamilyRow.id.desc()).limit(
                limit
            )
        ).all()
        return [_session_of(row) for row in rows]

    def live_session(self, family_id: uuid.UUID) -> LoginSession | None:
        row = self._session.get(RefreshFamilyRow, family_id)
        return _session_of(row) if row is not None and row.revoked_time is None else None

    def add(self, token: RefreshToken) -> None:
        self._session.add(
            RefreshTokenRow(
                id=token.id,
                family_id=token.family_id,
                user_id=token.user_id,
                token_hash=token.token_hash,
                create_time=token.create_time,
                expire_time=token.expire_time,
                rotated_time=token.rotated_time,
            )
        )
        self._session.flush()

    def family_of(self, token_hash: str) -> uuid.UUID | None:
        return self._session.scalars(
            select(RefreshTokenRow.family_id).where(RefreshTokenRow.token_hash == token_hash)
        ).one_or_none()

    def lock_live_family(self, family_id: uuid.UUID, when: datetime) -> bool:
        # An UPDATE takes the row lock on PostgreSQL (and the write lock on SQLite) for
        # the rest of the transaction, so rotations and revocations of one family serialize.
        result = self._session.execute(
            update(RefreshFamilyRow)
            .where(RefreshFamilyRow.id == family_id, RefreshFamilyRow.revoked_time.is_(None))
            .values(last_used_time=when)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def get_by_hash(self, token_hash: str) -> RefreshToken | None:
        row = self._session.scalars(
            select(RefreshTokenRow)
            .where(RefreshTokenRow.token_hash == token_hash)
            .execution_options(populate_existing=True)
        ).one_or_none()
        if row is None:
            return None
        return RefreshToken(
            id=row.id,
            family_id=row.family_id,
            user_id=row.user_id,
            token_hash=row.token_hash,
            create_time=utc(row.create_time),
            expire_time=utc(row.expire_time),
            rotated_time=utc(row.rotated_time) if row.rotated_time else None,
        )

    def mark_rotated(self, token_id: uuid.UUID, when: datetime) -> None:
        self._session.execute(
            update(RefreshTokenRow)
            .where(RefreshTokenRow.id == token_id)
            .values(rotated_time=when)
            .execution_options(synchronize_session=False)
        )

    def revoke_family(self, family_id: uuid.UUID, when: datetime) -> None:
        self._session.execute(
            update(RefreshFamilyRow)
            .where(RefreshFamilyRow.id == family_id, RefreshFamilyRow.revoked_time.is_(None))
            .values(revoked_time=when)
            .execution_options(synchronize_session=False)
        )

    def revoke_user_families(self, user_id: uuid.UUID, when: datetime) -> int:
        result = self._session.execute(
            update(RefreshFamilyRow)
            .where(RefreshFamilyRow.user_id == user_id, RefreshFamilyRow.revoked_time.is_(None))
            .values(revoked_time=when)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def _bounded(text: str | None) -> str | None:
    return text[:128] if text else None


def _session_of(row: RefreshFamilyRow) -> LoginSession:
    return LoginSession(
        id=row.id,
        user_id=row.user_id,
        create_time=utc(row.create_time),
        last_use_time=utc(row.last_used_time),
        client_peer=row.peer,
    )


def _event(row: AuditRow) -> AuditEvent:
    return AuditEvent(
        kind=AuditKind(row.kind),
        time=utc(row.time),
        user_id=row.user_id,
        email=row.email,
        detail=dict(row.detail or {}),
        actor=row.actor,
        actor_via=row.actor_via,
        peer=row.peer,
        request_id=row.request_id,
        id=row.id,
    )


class SqlAuditLog:
    def __init__(self, session: Session) -> None:
        self._session = session

    def record(self, event: AuditEvent) -> None:
        origin_peer, origin_request = call_origin()
        self._session.add(
            AuditRow(
                id=event.id or uuid.uuid4(),
                time=event.time,
                kind=event.kind.value,
                user_id=event.user_id,
                email=event.email,
                detail=dict(event.detail),
                actor=event.actor,
                actor_via=event.actor_via,
                peer=_bounded(event.peer or origin_peer),
                request_id=_bounded(event.request_id or origin_request),
            )
        )

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
        """Events newest first, strictly before the cursor (time, id)."""
        query = select(AuditRow)
        if user_id is not None:
            query = query.where(AuditRow.user_id == user_id)
        if kind:
            query = query.where(AuditRow.kind == kind)
        if start is not None:
            query = query.where(AuditRow.time >= start)
        if end is not None:
            query = query.where(AuditRow.time < end)
        if before is not None:
            query = query.where(tuple_(AuditRow.time, AuditRow.id) < tuple_(*before))
        rows = self._session.scalars(
            query.order_by(AuditRow.time.desc(), AuditRow.id.desc()).limit(limit)
        ).all()
        return [_event(row) for row in rows]


class SqlRevocationRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, revocation: Revocation, *, expire_time: datetime) -> None:
        self._session.add(
            RevocationRow(
                id=uuid.uuid4(),
                subject=revocation.subject,
                not_before=revocation.not_before,
                create_time=revocation.create_time,
                expire_time=expire_time,
            )
        )

    def covers(self, subject: str, issued_at: float, now: datetime) -> bool:
        if not subject:
            return False
        issued = datetime.fromtimestamp(issued_at, UTC)
        return (
            self._session.scalars(
                select(RevocationRow.id)
                .where(
                    RevocationRow.subject == subject,
                    RevocationRow.not_before > issued,
                    RevocationRow.expire_time > now,
                )
                .limit(1)
            ).first()
            is not None
        )

    def latest(self, subject: str, now: datetime) -> datetime | None:
        moment = self._session.scalar(
            select(func.max(RevocationRow.not_before)).where(
                RevocationRow.subject == subject, RevocationRow.expire_time > now
            )
        )
        return utc(moment) if moment is not None else None

    def since(self, when: datetime | None, *, now: datetime, limit: int) -> list[Revocation]:
        query = select(RevocationRow).where(RevocationRow.expire_time > now)
        if when is not None:
            query = query.where(RevocationRow.create_time >= when)
        rows = self._session.scalars(
            query.order_by(RevocationRow.create_time, RevocationRow.id).limit(limit)
        )
        return [Revocation(row.subject, utc(row.not_before), utc(row.create_time)) for row in rows]


_ACCOUNT = ServiceAccountRow.__table__
_SECRET = ServiceAccountSecretRow.__table__
_KEY = ServiceAccountKeyRow.__table__
# Built once: constructing the statement costs more than running it.
_CREDENTIALS = (
    select(
        _ACCOUNT.c.display_name,
        _ACCOUNT.c.scopes,
        _ACCOUNT.c.create_time,
        _ACCOUNT.c.last_used_time,
        _SECRET.c.id,
        _SECRET.c.secret_hash,
        _SECRET.c.create_time,
        _KEY.c.kid,
        _KEY.c.alg,
        _KEY.c.public_key_pem,
        _KEY.c.create_time,
    )
    .select_from(
        _ACCOUNT.outerjoin(_SECRET, _SECRET.c.account_id == _ACCOUNT.c.id).outerjoin(
            _KEY, _KEY.c.account_id == _ACCOUNT.c.id
        )
    )
    .where(_ACCOUNT.c.id == bindparam("account_id"))
)


class SqlServiceAccountRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, account: ServiceAccount) -> None:
        self._session.add(
            ServiceAccountRow(
                id=account.id,
                display_name=account.display_name,
                scopes=list(account.scopes),
                create_time=account.create_time,
                last_used_time=account.last_used_time,
            )
        )
        self._session.flush()
        for secret in account.secrets:
            self.add_secret(account.id, secret)

    def get(self, account_id: uuid.UUID) -> ServiceAccount | None:
        row = self._session.get(ServiceAccountRow, account_id)
        if row is None:
            return None
        return self._accounts([row])[0]

    def credentials(self, account_id: uuid.UUID) -> ServiceAccount | None:
        """`get` in one prepared statement on a connection of its own, outside this unit of
        work's transaction (the token endpoint's read; in autocommit it is one round trip):
        the account joined with its secrets and keys (at most 5 x 5 rows)."""
        bind = self._session.get_bind()
        if isinstance(bind, Connection):
            rows = bind.execute(_CREDENTIALS, {"account_id": account_id}).all()
        else:
            with bind.connect() as connection:
                rows = connection.execute(_CREDENTIALS, {"account_id": account_id}).all()
        if not rows:
            return None
        secrets: dict[uuid.UUID, ClientSecret] = {}
        keys: dict[str, ClientKey] = {}
        for row in rows:
            if row[4] is not None:
                secrets.setdefault(row[4], ClientSecret(row[4], row[5], utc(row[6])))
            if row[7] is not None:
                keys.setdefault(row[7], ClientKey(row[7], row[8], row[9], utc(row[10])))
        first = rows[0]
        return ServiceAccount(
            id=account_id,
            display_name=first[0],
            scopes=tuple(first[1]),
            create_time=utc(first[2]),
            last_used_time=utc(first[3]) if first[3] else None,
            secrets=tuple(sorted(secrets.values(), key=lambda s: (s.create_time, s.id))),
            keys=tuple(sorted(keys.values(), key=lambda k: (k.create_time, k.kid))),
        )

    def page(self, *, after: tuple[datetime, uuid.UUID] | None, limit: int) -> list[ServiceAccount]:
        query = select(ServiceAccountRow)
        if after is not None:
            query = query.where(
                tuple_(ServiceAccountRow.create_time, ServiceAccountRow.id) > tuple_(*after)
            )
        rows = self._session.scalars(
            query.order_by(ServiceAccountRow.create_time, ServiceAccountRow.id).limit(limit)
        ).all()
        return self._accounts(list(rows))

    def _accounts(self, rows: list[ServiceAccountRow]) -> list[ServiceAccount]:
        """The accounts of these rows with their secrets and keys (two more queries)."""
        ids = [row.id for row in rows]
        secrets: dict[uuid.UUID, list[ClientSecret]] = {i: [] for i in ids}
        keys: dict[uuid.UUID, list[ClientKey]] = {i: [] for i in ids}
        if ids:
            for secret in self._session.scalars(
                select(ServiceAccountSecretRow)
                .where(ServiceAccountSecretRow.account_id.in_(ids))
                .order_by(ServiceAccountSecretRow.create_time, ServiceAccountSecretRow.id)
            ):
                secrets[secret.account_id].append(
                    ClientSecret(secret.id, secret.secret_hash, utc(secret.create_time))
                )
            for key in self._session.scalars(
                select(ServiceAccountKeyRow)
                .where(ServiceAccountKeyRow.account_id.in_(ids))
                .order_by(ServiceAccountKeyRow.create_time, ServiceAccountKeyRow.kid)
            ):
                keys[key.account_id].append(
                    ClientKey(key.kid, key.alg, key.public_key_pem, utc(key.create_time))
                )
        return [
            ServiceAccount(
                id=row.id,
                display_name=row.display_name,
                scopes=tuple(row.scopes),
                create_time=utc(row.create_time),
                last_used_time=utc(row.last_used_time) if row.last_used_time else None,
                secrets=tuple(secrets[row.id]),
                keys=tuple(keys[row.id]),
            )
            for row in rows
        ]

    def delete(self, account_id: uuid.UUID) -> bool:
        # Children first: SQLite enforces no foreign keys unless asked, so no cascade there.
        for table in (ServiceAccountSecretRow, ServiceAccountKeyRow):
            self._session.execute(delete(table).where(table.account_id == account_id))
        result = self._session.execute(
            delete(ServiceAccountRow).where(ServiceAccountRow.id == account_id)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def add_secret(self, account_id: uuid.UUID, secret: ClientSecret) -> None:
        self._session.add(
            ServiceAccountSecretRow(
                id=secret.id,
                account_id=account_id,
                secret_hash=secret.secret_hash,
                create_time=secret.create_time,
            )
        )
        self._session.flush()

    def remove_secret(self, account_id: uuid.UUID, secret_id: uuid.UUID) -> bool:
        result = self._session.execute(
            delete(ServiceAccountSecretRow).where(
                ServiceAccountSecretRow.account_id == account_id,
                ServiceAccountSecretRow.id == secret_id,
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def add_key(self, account_id: uuid.UUID, key: ClientKey) -> None:
        row = ServiceAccountKeyRow(
            account_id=account_id,
            kid=key.kid,
            alg=key.alg,
            public_key_pem=key.public_key_pem,
            create_time=key.create_time,
        )
        try:
            with self._session.begin_nested():
                self._session.add(row)
                self._session.flush()
        except IntegrityError:
            raise KeyExists(key.kid) from None

    def remove_key(self, account_id: uuid.UUID, kid: str) -> bool:
        result = self._session.execute(
            delete(ServiceAccountKeyRow).where(
                ServiceAccountKeyRow.account_id == account_id, ServiceAccountKeyRow.kid == kid
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def touch(self, account_id: uuid.UUID, when: datetime, *, not_since: datetime) -> None:
        self._session.execute(
            update(ServiceAccountRow)
            .where(
                ServiceAccountRow.id == account_id,
                or_(
                    ServiceAccountRow.last_used_time.is_(None),
                    ServiceAccountRow.last_used_time < not_since,
                ),
            )
            .values(last_used_time=when)
            .execution_options(synchronize_session=False)
        )

    def use_assertion(self, digest: str, expire_time: datetime) -> bool:
        try:
            with self._session.begin_nested():
                self._session.add(UsedAssertionRow(digest=digest, expire_time=expire_time))
                self._session.flush()
        except IntegrityError:
            return False
        return True

    def purge_assertions(self, before: datetime, *, limit: int = 1000) -> int:
        digests = select(UsedAssertionRow.digest).where(UsedAssertionRow.expire_time < before)
        result = self._session.execute(
            delete(UsedAssertionRow).where(
                UsedAssertionRow.digest.in_(digests.limit(limit).scalar_subquery())
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def _key(row: SigningKeyRow) -> SigningKeyRecord:
    return SigningKeyRecord(
        kid=row.kid,
        alg=row.alg,
        public_pem=row.public_pem,
        private_blob=bytes(row.private_blob),
        kek_id=row.kek_id,
        create_time=utc(row.create_time),
        activate_time=utc(row.activate_time),
        remove_time=utc(row.remove_time) if row.remove_time else None,
        revoke_time=utc(row.revoke_time) if row.revoke_time else None,
    )


class SqlSigningKeyRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def lock(self) -> None:
        """Serializes changes to the key ring for this transaction (first start of several
        replicas at once, rotations): a transaction-scoped advisory lock on PostgreSQL;
        SQLite's BEGIN IMMEDIATE already holds the database's write lock."""
        if self._session.get_bind().dialect.name == "postgresql":
            self._session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _RING_LOCK})

    def all(self) -> list[SigningKeyRecord]:
        rows = self._session.scalars(
            select(SigningKeyRow).order_by(SigningKeyRow.activate_time, SigningKeyRow.kid)
        ).all()
        return [_key(row) for row in rows]

    def add(self, key: SigningKeyRecord) -> None:
        self._session.add(
            SigningKeyRow(
                kid=key.kid,
                alg=key.alg,
                public_pem=key.public_pem,
                private_blob=key.private_blob,
                kek_id=key.kek_id,
                create_time=key.create_time,
                activate_time=key.activate_time,
                remove_time=key.remove_time,
                revoke_time=key.revoke_time,
            )
        )
        self._session.flush()

    def save(self, key: SigningKeyRecord) -> None:
        """Stores a key's times and (re-wrapped) private part."""
        self._session.execute(
            update(SigningKeyRow)
            .where(SigningKeyRow.kid == key.kid)
            .values(
                private_blob=key.private_blob,
                kek_id=key.kek_id,
                activate_time=key.activate_time,
                remove_time=key.remove_time,
                revoke_time=key.revoke_time,
            )
            .execution_options(synchronize_session=False)
        )


_RING_LOCK = 0x61757468_6B657973  # "authkeys"


class SqlAuthUnitOfWork(SqlUnitOfWork):
    users: SqlUserRepository
    refresh_tokens: SqlRefreshTokenRepository
    audit: SqlAuditLog
    service_accounts: SqlServiceAccountRepository
    revocations: SqlRevocationRepository
    signing_keys: SqlSigningKeyRepository

    def _open_repositories(self, session: Session) -> None:
        self.users = SqlUserRepository(session)
        self.refresh_tokens = SqlRefreshTokenRepository(session)
        self.audit = SqlAuditLog(session)
        self.service_accounts = SqlServiceAccountRepository(session)
        self.revocations = SqlRevocationRepository(session)
        self.signing_keys = SqlSigningKeyRepository(session)
