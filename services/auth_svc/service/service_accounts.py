"""Service accounts: their administration, and the token endpoint of machine callers.

Client secrets carry 256 random bits, are shown once and stored only as HMAC-SHA256
under a key from the environment (`AUTH_CLIENT_SECRET_KEY`). A fast keyed hash is the
right tool for high-entropy secrets: there is no dictionary to try, so argon2's cost
would buy nothing, and the key means a copy of the database alone cannot check a guess.
Every stored hash of the account is compared, in constant time.

The token endpoint (`TokenService.IssueToken`) implements two OAuth grants:

- `client_credentials` (RFC 6749 §4.4), the client authenticated by a secret or by a
  JWT assertion (RFC 7523 `private_key_jwt`): `iss` = `sub` = the client id, `aud` = our
  issuer, `exp` at most 5 minutes ahead, a `jti` used once (remembered in the database
  until the assertion expires, so a replay fails on every replica);
- token exchange (RFC 8693) for an account granted `delegate`: a user's access token in,
  a token acting as the user out (`sub` = the user, `act.sub` = the account), its scopes
  what was asked within what both hold, its life at most the user token's.

Every refusal of credentials is the same UNAUTHENTICATED INVALID_CLIENT, for an unknown
client too (which costs the same database read and hash). A client that keeps failing is
told to slow down: past a few failures, its failures are answered RESOURCE_EXHAUSTED
CLIENT_THROTTLED with a RetryInfo of seconds. Right credentials are always accepted: the
throttle never turns away a client for failures someone else made with its id.

Audit without a database write per token: each issuance and refusal is an audit log line
(the `agentplatform.audit` logger: account, grant, scopes, subject, jti) and a metric;
the account's `last_used_time` is written at most once a minute per replica. Changes to
accounts (created, deleted, secrets and keys added or removed) are audit rows.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from services.auth_svc.domain import (
    AuditEvent,
    AuditKind,
    ClientKey,
    ClientSecret,
    ServiceAccount,
)
from services.auth_svc.service.admin import (
    actor_of,
    decode_cursor,
    encode_cursor,
    page_size_of,
    parse_uuid,
    require_admin,
    revoke_tokens,
)
from services.auth_svc.service.ports import (
    AuthUnitOfWork,
    ClientThrottle,
    KeyExists,
    TokenIssuer,
)
from shared.config.clock import Clock
from shared.config.text import line_problem
from shared.rpc.errors import (
    AlreadyExists,
    DomainError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
)
from shared.security.jwk import algorithm_for, thumbprint
from shared.security.scopes import DELEGATE, KNOWN_SCOPES, parse_scope, user_scopes
from shared.security.tokens import Principal

__all__ = [
    "CLIENT_CREDENTIALS",
    "JWT_BEARER",
    "TOKEN_EXCHANGE",
    "TOKEN_TYPE_ACCESS_TOKEN",
    "IssuedAccessToken",
    "SecretHasher",
    "ServiceAccountAdmin",
    "TokenEndpoint",
    "TokenRequest",
]

CLIENT_CREDENTIALS = "client_credentials"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"

MAX_ASSERTION_LIFETIME_SECONDS = 300
MAX_SECRETS = 5
MAX_KEYS = 5
MAX_DISPLAY_NAME = 128
MAX_CREDENTIAL = 8192  # an assertion is a few hundred bytes; a secret 43 characters
LAST_USED_EVERY = timedelta(minutes=1)
LEEWAY_SECONDS = 30
_ACCOUNTS = "service accounts"  # what a page token of the account list is bound to
_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JTI = re.compile(r"[\x21-\x7e]{1,256}")

_audit_log = logging.getLogger("agentplatform.audit")


class SecretHasher:
    """Client secrets: made here, stored as HMAC-SHA256 under the configured key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def new(self) -> tuple[str, str]:
        """A fresh secret (256 random bits) and its stored form."""
        value = secrets.token_urlsafe(32)
        return value, self.digest(value)

    def digest(self, value: str) -> str:
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()

    def matches(self, value: str, stored: Sequence[str]) -> bool:
        """True if the secret is one of the stored ones (every one compared, in constant
        time)."""
        presented = self.digest(value)
        found = False
        for digest in stored:
            found |= hmac.compare_digest(presented, digest)
        return found


# -- administration -----------------------------------------------------------------------


def _not_found(what: str = "service account") -> NotFound:
    return NotFound(f"no such {what}", reason="SERVICE_ACCOUNT_NOT_FOUND")


def _scope_violations(scopes: Collection[str], field: str) -> list[FieldViolation]:
    if not scopes:
        return [FieldViolation(field, "at least one scope is required")]
    unknown = sorted(s for s in scopes if s not in KNOWN_SCOPES)
    if unknown:
        names = ", ".join(sorted(KNOWN_SCOPES))
        shown = ", ".join(repr(s[:64]) for s in unknown[:5])
        return [FieldViolation(field, f"unknown scope {shown}; known: {names}")]
    return []


def _public_key(pem: str) -> tuple[ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey, str]:
    """The key of a PEM and its JWS algorithm; ValueError if it is not one we take."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeError) as exc:
        raise ValueError("not a PEM public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("must be an Ed25519 or P-256 public key")
    return key, algorithm_for(key)


class ServiceAccountAdmin:
    """Creating, reading, listing and deleting service accounts, and their credentials:
    for administrators acting for themselves (not through a delegated token)."""

    def __init__(
        self,
        *,
        uow: Callable[[], AuthUnitOfWork],
        secrets: SecretHasher,
        clock: Clock,
        token_lifetime_seconds: int = 900,
    ) -> None:
        self._uow = uow
        self._secrets = secrets
        self._clock = clock
        self._lifetime = token_lifetime_seconds

    def create(
        self, *, principal: Principal, display_name: str, scopes: Collection[str]
    ) -> tuple[ServiceAccount, str]:
        """A new account and its first client secret (the value, shown only now)."""
        require_admin(principal, self._uow, self._clock)
        display_name = display_name.strip()
        problems = _scope_violations(scopes, "service_account.scopes")
        name_problem = (
            "required"
            if not display_name
            else f"must be at most {MAX_DISPLAY_NAME} characters"
            if len(display_name) > MAX_DISPLAY_NAME
            else line_problem(display_name)
        )
        if name_problem:
            problems.insert(0, FieldViolation("service_account.display_name", name_problem))
        if problems:
            raise InvalidArgument(problems)
        now = self._clock.now()
        value, digest = self._secrets.new()
        account = ServiceAccount(
            id=uuid.uuid4(),
            display_name=display_name,
            scopes=tuple(sorted(set(scopes))),
            create_time=now,
            secrets=(ClientSecret(uuid.uuid4(), digest, now),),
        )
        with self._uow() as uow:
            uow.service_accounts.add(account)
            self._audit(uow, AuditKind.SERVICE_ACCOUNT_CREATED, principal, account.id)
            uow.commit()
        return account, value

    def get(self, *, principal: Principal, account_id: str) -> ServiceAccount:
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(account_id, "id")
        with self._uow() as uow:
            account = uow.service_accounts.get(ident)
        if account is None:
            raise _not_found()
        return account

    def list(
        self, *, principal: Principal, page_size: int, page_token: str
    ) -> tuple[list[ServiceAccount], str]:
        """A page of accounts, oldest first, and the token of the next page ("" at the end)."""
        require_admin(principal, self._uow, self._clock)
        size = page_size_of(page_size)
        after = decode_cursor(page_token, _ACCOUNTS) if page_token else None
        with self._uow() as uow:
            accounts = uow.service_accounts.page(after=after, limit=size + 1)
        if len(accounts) > size:
            last = accounts[size - 1]
            return accounts[:size], encode_cursor(last.create_time, last.id, _ACCOUNTS)
        return accounts, ""

    def delete(self, *, principal: Principal, account_id: str) -> None:
        """Deletes the account: no token is issued to it from then on, and the tokens it
        holds (its own, and those acting for users) are revoked."""
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(account_id, "id")
        with self._uow() as uow:
            if not uow.service_accounts.delete(ident):
                raise _not_found()
            # Every token it may hold, also one issued while this commits (a client
            # authenticated just before the delete): no token is ever issued to it again.
            revoke_tokens(
                uow,
                str(ident),
                self._clock.now(),
                token_lifetime_seconds=self._lifetime,
                forever=True,
            )
            self._audit(uow, AuditKind.SERVICE_ACCOUNT_DELETED, principal, ident)
            uow.commit()

    def add_secret(self, *, principal: Principal, account_id: str) -> tuple[ClientSecret, str]:
        """A new client secret (at most MAX_SECRETS at once): rotate by adding one, moving
        callers to it, then removing the old one."""
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(account_id, "service_account_id")
        value, digest = self._secrets.new()
        secret = ClientSecret(uuid.uuid4(), digest, self._clock.now())
        with self._uow() as uow:
            account = uow.service_accounts.get(ident)
            if account is None:
                raise _not_found()
            if len(account.secrets) >= MAX_SECRETS:
                raise _quota(ident, f"at most {MAX_SECRETS} client secrets; remove one first")
            uow.service_accounts.add_secret(ident, secret)
            self._audit(
                uow, AuditKind.CLIENT_SECRET_ADDED, principal, ident, secret_id=str(secret.id)
            )
            uow.commit()
        return secret, value

    def remove_secret(self, *, principal: Principal, account_id: str, secret_id: str) -> None:
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(account_id, "service_account_id")
        secret = parse_uuid(secret_id, "secret_id")
        with self._uow() as uow:
            if not uow.service_accounts.remove_secret(ident, secret):
                raise _not_found("client secret of this service account")
            self._audit(
                uow, AuditKind.CLIENT_SECRET_REMOVED, principal, ident, secret_id=str(secret)
            )
            uow.commit()

    def add_key(self, *, principal: Principal, account_id: str, public_key_pem: str) -> ClientKey:
        """Registers a public key for the account's JWT assertions (its kid: the RFC 7638
        thumbprint)."""
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(account_id, "service_account_id")
        if not public_key_pem.strip():
            raise InvalidArgument.field("public_key_pem", "required")
        if len(public_key_pem) > MAX_CREDENTIAL:
            raise InvalidArgument.field("public_key_pem", "too long for a public key")
        try:
            key, alg = _public_key(public_key_pem)
        except ValueError as exc:
            raise InvalidArgument.field("public_key_pem", str(exc)) from None
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        client_key = ClientKey(thumbprint(key), alg, pem, self._clock.now())
        with self._uow() as uow:
            account = uow.service_accounts.get(ident)
            if account is None:
                raise _not_found()
            if any(k.kid == client_key.kid for k in account.keys):
                raise _key_exists()
            if len(account.keys) >= MAX_KEYS:
                raise _quota(ident, f"at most {MAX_KEYS} keys; remove one first")
            try:
                uow.service_accounts.add_key(ident, client_key)
            except KeyExists:
                raise _key_exists() from None
            self._audit(uow, AuditKind.CLIENT_KEY_ADDED, principal, ident, kid=client_key.kid)
            uow.commit()
        return client_key

    def remove_key(self, *, principal: Principal, account_id: str, kid: str) -> None:
        require_admin(principal, self._uow, self._clock)
        ident = parse_uuid(account_id, "service_account_id")
        if not kid:
            raise InvalidArgument.field("kid", "required")
        if not _KID.fullmatch(kid):  # a thumbprint is base64url: anything else is no key
            raise _not_found("key of this service account")
        with self._uow() as uow:
            if not uow.service_accounts.remove_key(ident, kid):
                raise _not_found("key of this service account")
            self._audit(uow, AuditKind.CLIENT_KEY_REMOVED, principal, ident, kid=kid)
            uow.commit()

    def _audit(
        self,
        uow: AuthUnitOfWork,
        kind: AuditKind,
        principal: Principal,
        account_id: uuid.UUID,
        **detail: str,
    ) -> None:
        actor, via = actor_of(principal)
        detail = {"service_account_id": str(account_id), **detail}
        uow.audit.record(
            AuditEvent(kind=kind, time=self._clock.now(), detail=detail, actor=actor, actor_via=via)
        )
        _audit_log.info(
            "audit %s",
            kind.value,
            extra={"audit": {"event": kind.value, "actor": actor, **detail}},
        )


def _quota(account_id: uuid.UUID, description: str) -> ResourceExhausted:
    return ResourceExhausted(
        description,
        quota_violations=(QuotaViolation(f"serviceAccounts/{account_id}", description),),
    )


def _key_exists() -> AlreadyExists:
    return AlreadyExists("the account already has this key", reason="ALREADY_EXISTS")


# -- the token endpoint ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """IssueToken's fields (see the proto)."""

    grant_type: str
    client_id: str = ""
    client_secret: str = ""
    client_assertion_type: str = ""
    client_assertion: str = ""
    scope: str = ""
    subject_token: str = ""
    subject_token_type: str = ""


@dataclass(frozen=True, slots=True)
class IssuedAccessToken:
    access_token: str
    expires_in: int
    scopes: tuple[str, ...]


class _Refused(Exception):
    """Credentials that do not authenticate (why: for the audit line, never the caller)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _invalid_client() -> Unauthenticated:
    return Unauthenticated("invalid client credentials", reason="INVALID_CLIENT")


def _invalid_grant(detail: str) -> Unauthenticated:
    return Unauthenticated(f"invalid subject_token: {detail}", reason="INVALID_GRANT")


def _invalid_scope(description: str) -> InvalidArgument:
    return InvalidArgument(FieldViolation("scope", description), reason="INVALID_SCOPE")


class TokenEndpoint:
    """Issues access tokens to service accounts (client credentials, token exchange)."""

    def __init__(
        self,
        *,
        uow: Callable[[], AuthUnitOfWork],
        secrets: SecretHasher,
        tokens: TokenIssuer,
        throttle: ClientThrottle,
        reads: Callable[[], AuthUnitOfWork] | None = None,
        verify_subject: Callable[[str], Principal],
        clock: Clock,
        lifetime_seconds: int,
        on_result: Callable[[str, str], None] | None = None,
    ) -> None:
        self._uow = uow
        self._reads = reads or uow  # units of work of one read-only statement
        self._secrets = secrets
        self._tokens = tokens
        self._throttle = throttle
        self._verify_subject = verify_subject
        self._clock = clock
        self._lifetime = lifetime_seconds
        self._on_result = on_result or (lambda _grant, _result: None)
        # Compared against when the client is unknown: both paths cost one hash.
        self._dummy = [secrets.digest(secrets.new()[0])]
        self._keys: dict[tuple[str, str], Any] = {}  # (kid, pem) → parsed public key
        self._touched: dict[uuid.UUID, datetime] = {}
        self._lock = threading.Lock()

    def issue(self, request: TokenRequest) -> IssuedAccessToken:
        grant = request.grant_type
        if grant not in (CLIENT_CREDENTIALS, TOKEN_EXCHANGE):
            if not grant:
                raise InvalidArgument.field("grant_type", "required")
            raise InvalidArgument(
                FieldViolation(
                    "grant_type", f"unsupported; use {CLIENT_CREDENTIALS} or {TOKEN_EXCHANGE}"
                ),
                reason="UNSUPPORTED_GRANT_TYPE",
            )
        asked = parse_scope(request.scope)
        if len(request.scope) > 1024 or asked - KNOWN_SCOPES:
            raise _invalid_scope(f"known scopes: {', '.join(sorted(KNOWN_SCOPES))}")
        client = self._claimed_client(request)
        try:
            account = self._authenticate(request, client)
        except _Refused as refused:
            # Only failures are counted, and only failures are slowed: right credentials
            # are never refused for someone else's (or an attacker's) wrong ones.
            wait = self._throttle.failed(client)
            _audit_line(
                AuditKind.TOKEN_REFUSED, grant=grant, client_id=client[:64], why=refused.why
            )
            self._refuse_if_throttled(grant, wait)
            self._on_result(grant, "refused")
            raise _invalid_client() from None
        try:
            if grant == CLIENT_CREDENTIALS:
                issued = self._client_credentials(account, asked)
            else:
                issued = self._exchange(account, asked, request)
        except DomainError as error:
            self._on_result(grant, "refused")
            _audit_line(
                AuditKind.TOKEN_REFUSED, grant=grant, client_id=str(account.id), why=error.reason
            )
            raise
        self._on_result(grant, "issued")
        self._touch(account.id)
        return issued

    def _refuse_if_throttled(self, grant: str, wait: float) -> None:
        if wait > 0:
            self._on_result(grant, "throttled")
            raise ResourceExhausted(
                "too many failed attempts for this client; fix its credentials, then retry",
                retry_after_seconds=wait,
                reason="CLIENT_THROTTLED",
            )

    # -- grants --------------------------------------------------------------------------

    def _client_credentials(
        self, account: ServiceAccount, asked: frozenset[str]
    ) -> IssuedAccessToken:
        granted = frozenset(account.scopes)
        if asked - granted:
            raise _invalid_scope(
                f"not granted to this account: {' '.join(sorted(asked - granted))}"
            )
        # `delegate` is a right to call the token exchange, which checks the account itself:
        # no token carries it.
        scopes = tuple(sorted((asked or granted) - {DELEGATE}))
        if not scopes:
            raise _invalid_scope("nothing to grant: delegate is not a token scope")
        token = self._tokens.issue_token(
            subject=str(account.id),
            client_id=str(account.id),
            scopes=scopes,
            lifetime_seconds=self._lifetime,
        )
        _audit_line(
            AuditKind.TOKEN_ISSUED,
            grant=CLIENT_CREDENTIALS,
            client_id=str(account.id),
            subject=str(account.id),
            scope=" ".join(scopes),
        )
        return IssuedAccessToken(token, self._lifetime, scopes)

    def _exchange(
        self, account: ServiceAccount, asked: frozenset[str], request: TokenRequest
    ) -> IssuedAccessToken:
        if DELEGATE not in account.scopes:
            raise PermissionDenied(
                "this service account may not act for users (it lacks the delegate scope)",
                reason="MISSING_SCOPE",
                metadata={"scope": DELEGATE},
            )
        if not request.subject_token:
            raise InvalidArgument.field("subject_token", "required for a token exchange")
        if request.subject_token_type != TOKEN_TYPE_ACCESS_TOKEN:
            raise InvalidArgument.field("subject_token_type", f"must be {TOKEN_TYPE_ACCESS_TOKEN}")
        try:
            user = self._verify_subject(request.subject_token)
        except Unauthenticated as exc:
            raise _invalid_grant(exc.message) from None
        if user.actor or user.is_service_account or user.client_id != self._tokens.issuer:
            raise _invalid_grant("not a user's token")
        if user.subject is None:
            raise _invalid_grant("not a user's token")
        now = self._clock.now()
        with self._uow() as uow:
            stored = uow.users.get(user.subject)
            # Checked in the database, not only by this replica's poll of the revocations.
            revoked = uow.revocations.covers(user.user_id, user.issued_at, now)
        if stored is None or stored.disabled:
            raise _invalid_grant("the user is not active")
        if revoked:
            raise _invalid_grant("the user's token was revoked")
        # What the user holds now (roles as stored), within what the token says.
        held = user.granted & user_scopes(stored.roles)
        both = (held & frozenset(account.scopes)) - {DELEGATE}
        scopes = tuple(sorted((asked & both) if asked else both))
        if not scopes:
            raise _invalid_scope("no scope is held by both the user and the account")
        # Whole seconds, as the token's exp is: the delegated exp is at most the user's.
        remaining = int(user.expires_at) - int(self._clock.now().timestamp())
        lifetime = min(self._lifetime, remaining)
        if lifetime <= 0:
            raise _invalid_grant("the user's token has expired")
        token = self._tokens.issue_token(
            subject=str(stored.id),
            client_id=str(account.id),
            scopes=scopes,
            lifetime_seconds=lifetime,
            roles=stored.roles,
            actor=str(account.id),
            # The user's token's issue time: a later revocation of the user (which covers
            # the tokens issued before it) covers this one too. It may be a second or a
            # few ahead (a user token issued in the second of a revocation); this
            # account's deletion covers every token it may hold whatever its `iat`.
            issued_at=int(user.issued_at),
        )
        _audit_line(
            AuditKind.TOKEN_ISSUED,
            grant=TOKEN_EXCHANGE,
            client_id=str(account.id),
            subject=str(stored.id),
            scope=" ".join(scopes),
        )
        return IssuedAccessToken(token, lifetime, scopes)

    # -- client authentication -------------------------------------------------------------

    @staticmethod
    def _claimed_client(request: TokenRequest) -> str:
        """Whom the request claims to be (the throttle's key), before anything is checked."""
        if request.client_id or not request.client_assertion:
            return request.client_id
        try:
            claims = jwt.decode(request.client_assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return ""
        subject = claims.get("sub") if isinstance(claims, dict) else None
        return subject if isinstance(subject, str) else ""

    def _authenticate(self, request: TokenRequest, client: str) -> ServiceAccount:
        if request.client_assertion or request.client_assertion_type:
            if request.client_assertion_type != JWT_BEARER:
                raise InvalidArgument.field("client_assertion_type", f"must be {JWT_BEARER}")
            if not request.client_assertion:
                raise InvalidArgument.field("client_assertion", "required")
            if request.client_secret:
                raise InvalidArgument.field(
                    "client_secret", "give a client secret or a client assertion, not both"
                )
            return self._by_assertion(client, request.client_assertion)
        if not request.client_id:
            raise InvalidArgument.field("client_id", "required with a client secret")
        if not request.client_secret:
            raise InvalidArgument.field("client_secret", "required (or a client_assertion instead)")
        return self._by_secret(client, request.client_secret)

    def _account(self, client: str) -> ServiceAccount | None:
        try:
            ident = uuid.UUID(client) if len(client) <= 45 else None
        except ValueError:
            ident = None
        if ident is None:
            return None
        with self._reads() as uow:
            return uow.service_accounts.credentials(ident)

    def _by_secret(self, client: str, secret: str) -> ServiceAccount:
        account = self._account(client)
        stored = [s.secret_hash for s in account.secrets] if account else self._dummy
        if len(secret) > MAX_CREDENTIAL:
            raise _Refused("secret too long")
        if not self._secrets.matches(secret, stored) or account is None:
            raise _Refused("unknown client" if account is None else "wrong secret")
        return account

    def _by_assertion(self, client: str, assertion: str) -> ServiceAccount:
        if len(assertion) > MAX_CREDENTIAL:
            raise _Refused("assertion too long")
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _Refused("malformed assertion") from None
        if claims.get("sub") != client or claims.get("iss") != client:
            raise _Refused("iss and sub must both be the client id")
        account = self._account(client)
        if account is None:
            raise _Refused("unknown client")
        kid, alg = header.get("kid"), header.get("alg")
        key = next((k for k in account.keys if k.kid == kid), None)
        if key is None or key.alg != alg:
            raise _Refused("unknown key")
        try:
            verified = jwt.decode(
                assertion,
                self._public_key(key),
                algorithms=[key.alg],
                audience=self._tokens.issuer,
                issuer=client,
                options={
                    "require": ["exp", "iss", "sub", "aud", "jti"],
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise _Refused(f"assertion: {type(exc).__name__}") from None
        expires = self._check_assertion_times(verified)
        jti = verified["jti"]
        if not isinstance(jti, str) or not _JTI.fullmatch(jti):
            raise _Refused("bad jti")
        digest = hashlib.sha256(f"{account.id}\0{jti}".encode()).hexdigest()
        now = self._clock.now()
        with self._uow() as uow:
            if not uow.service_accounts.use_assertion(
                digest, expires + timedelta(seconds=LEEWAY_SECONDS)
            ):
                raise _Refused("assertion replayed")
            if secrets.randbelow(100) == 0:  # now and then: the expired ones are useless
                uow.service_accounts.purge_assertions(now)
            uow.commit()
        return account

    def _check_assertion_times(self, claims: dict[str, Any]) -> datetime:
        now = self._clock.now().timestamp()
        stamps = [claims["exp"], claims.get("iat", now), claims.get("nbf", now)]
        if not all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
            for t in stamps
        ):
            raise _Refused("bad time claims")
        expires, issued, not_before = (float(t) for t in stamps)
        if expires <= now - LEEWAY_SECONDS:
            raise _Refused("assertion expired")
        if expires > now + MAX_ASSERTION_LIFETIME_SECONDS + LEEWAY_SECONDS:
            raise _Refused("assertion lives longer than 5 minutes")
        if issued > now + LEEWAY_SECONDS or not_before > now + LEEWAY_SECONDS:
            raise _Refused("assertion not yet valid")
        return datetime.fromtimestamp(expires, UTC)

    def _public_key(self, key: ClientKey) -> Any:
        cached = self._keys.get((key.kid, key.public_key_pem))
        if cached is None:
            cached, _alg = _public_key(key.public_key_pem)
            with self._lock:
                if len(self._keys) > 10_000:
                    self._keys.clear()
                self._keys[(key.kid, key.public_key_pem)] = cached
        return cached

    def _touch(self, account_id: uuid.UUID) -> None:
        """Records the account's last use, at most once a minute per replica."""
        now = self._clock.now()
        last = self._touched.get(account_id)
        if last is not None and now - last < LAST_USED_EVERY:
            return
        with self._lock:
            if len(self._touched) > 10_000:
                self._touched.clear()
            self._touched[account_id] = now
        try:
            with self._uow() as uow:
                uow.service_accounts.touch(account_id, now, not_since=now - LAST_USED_EVERY)
                uow.commit()
        except Exception:  # the token is issued: a missed last-use stamp is not worth a failure
            logging.getLogger(__name__).warning("could not record last use", exc_info=True)


def _audit_line(kind: AuditKind, **detail: str) -> None:
    _audit_log.info("audit %s", kind.value, extra={"audit": {"event": kind.value, **detail}})
