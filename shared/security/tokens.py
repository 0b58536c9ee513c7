"""Access-token verification (RFC 9068 JWTs signed with EdDSA or ES256).

Strict by construction: the algorithm comes from the key, never from the token; `typ`
must be `at+jwt`; `iss`, `aud`, `exp`, `iat`, `sub` and `jti` are required; a small leeway
absorbs clock skew. Verified tokens are remembered (bounded, until they expire) so a
client that reuses its token pays for the signature check once; a remembered token is
checked again as soon as a key leaves the trusted set (the key provider's `generation`).

Refusals: an expired token is UNAUTHENTICATED with reason TOKEN_EXPIRED (refresh it); a
revoked one (shared.security.revocations) TOKEN_REVOKED, remembered tokens included; any
other bad token INVALID_TOKEN (get a new one). A token naming a key that is not known
while the keys cannot be fetched (the auth service is down, or never answered since this
process started) is UNAVAILABLE with reason KEYS_UNAVAILABLE and RetryInfo: the condition
is temporary, and the same token may well verify a moment later.
"""

from __future__ import annotations

import itertools
import math
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from shared.config.clock import Clock
from shared.rpc.errors import Unauthenticated, Unavailable
from shared.security.jwk import VerificationKey
from shared.security.revocations import Revocations
from shared.security.scopes import ADMIN_ROLE, parse_scope, user_scopes

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "KeyProvider",
    "Principal",
    "StaticKeyProvider",
    "TokenVerifier",
]

ACCESS_TOKEN_TYPE = "at+jwt"
ALLOWED_ALGORITHMS = frozenset({"EdDSA", "ES256"})


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller, handed explicitly to the service layer.

    `user_id` is the token's `sub`: the user, or the service account acting for itself.
    A service acting for a user (a token from the token exchange) has the user's id there
    and its own in `actor`."""

    user_id: str
    roles: frozenset[str]
    expires_at: float = 0.0
    subject: uuid.UUID | None = None
    """`user_id` parsed, when it is a UUID (every account id is): parsed once per token,
    not on every call that needs it."""
    scopes: frozenset[str] | None = None
    """The token's `scope` claim; None for a token from before scopes existed."""
    client_id: str = ""
    """The OAuth client the token was issued to (a service account's id, or the issuer)."""
    actor: str = ""
    """`act.sub`: the service account acting for the user, if any (RFC 8693)."""
    issued_at: float = 0.0
    """`iat`: a revocation refuses the tokens issued before its moment."""

    @property
    def is_admin(self) -> bool:
        """An administrator's account (the role, whatever the token's scopes)."""
        return ADMIN_ROLE in self.roles

    @property
    def granted(self) -> frozenset[str]:
        """What the token may do (see shared.security.scopes)."""
        return self.scopes if self.scopes is not None else user_scopes(self.roles)

    @property
    def is_service_account(self) -> bool:
        """A service account acting for itself (client credentials: `sub` = `client_id`)."""
        return bool(self.client_id) and self.client_id == self.user_id


class KeyProvider(Protocol):
    def key(self, kid: str) -> VerificationKey | None:
        """The key with this id, or None if there is none (after any refetch allowed)."""
        ...

    @property
    def generation(self) -> int:
        """A number that changes whenever a key stops being trusted."""
        ...

    def available(self) -> bool:
        """False while the key set may be out of date because it cannot be fetched."""
        ...


class StaticKeyProvider:
    """A fixed set of keys (the auth service verifies with its own)."""

    generation = 0

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self._keys = {k.kid: k for k in keys}

    def key(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)

    def available(self) -> bool:
        return True


def _fail(detail: str) -> Unauthenticated:
    return Unauthenticated(f"invalid access token: {detail}", reason="INVALID_TOKEN")


def _uuid_or_none(text: str) -> uuid.UUID | None:
    if len(text) > 45:  # longer than any spelling uuid.UUID() accepts
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _keys_unavailable() -> Unavailable:
    return Unavailable(
        "the keys that verify access tokens cannot be fetched right now; retry",
        retry_after_seconds=1.0,
        reason="KEYS_UNAVAILABLE",
    )


class _Verified:
    """A verified token, remembered: its principal and the key generation it was checked in."""

    __slots__ = ("generation", "principal")

    def __init__(self, principal: Principal, generation: int) -> None:
        self.principal = principal
        self.generation = generation


class TokenVerifier:
    """Turns a bearer token into a Principal or raises Unauthenticated."""

    def __init__(
        self,
        keys: KeyProvider,
        *,
        issuer: str,
        audience: str,
        clock: Clock,
        leeway_seconds: float = 30.0,
        cache_size: int = 10_000,
        on_result: Callable[[str], None] | None = None,
        revocations: Revocations | None = None,
    ) -> None:
        self._keys = keys
        self._revocations = revocations
        self._issuer = issuer
        self._audience = audience
        self._clock = clock
        self._leeway = leeway_seconds
        # Insertion-ordered; read without a lock (one dict lookup), written under it.
        self._cache: dict[str, _Verified] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._on_result = on_result or (lambda _result: None)

    def verify(self, token: str) -> Principal:
        """The token's principal; Unauthenticated (TOKEN_EXPIRED, INVALID_TOKEN) or
        Unavailable (KEYS_UNAVAILABLE) if it cannot be accepted now."""
        now = self._clock.now().timestamp()
        cached = self._cache.get(token)
        if cached is not None:
            principal = cached.principal
            if (
                cached.generation == self._keys.generation
                and principal.expires_at + self._leeway > now
            ):
                self._check_revoked(principal)
                self._on_result("cached")
                return principal
            self._forget(token)
        generation = self._keys.generation
        try:
            principal = self._verify_signature_and_claims(token, now)
        except Unauthenticated:
            self._on_result("rejected")
            raise
        except Unavailable:
            self._on_result("unavailable")
            raise
        self._remember(token, _Verified(principal, generation))
        self._check_revoked(principal)
        self._on_result("verified")
        return principal

    def recheck(self, principal: Principal) -> None:
        """Whether a principal verified earlier would still be accepted now (its token not
        expired, nor revoked since): Unauthenticated TOKEN_EXPIRED or TOKEN_REVOKED if not.
        For what outlives its call's check, such as a WatchAgents stream."""
        if principal.expires_at and principal.expires_at + self._leeway <= (
            self._clock.now().timestamp()
        ):
            raise Unauthenticated("the access token has expired", reason="TOKEN_EXPIRED")
        self._check_revoked(principal)

    def _check_revoked(self, principal: Principal) -> None:
        revocations = self._revocations
        if revocations is not None and revocations.covers(
            principal.user_id, principal.actor, principal.issued_at
        ):
            self._on_result("revoked")
            raise Unauthenticated("the access token was revoked", reason="TOKEN_REVOKED")

    def _remember(self, token: str, verified: _Verified) -> None:
        with self._lock:
            cache = self._cache
            if len(cache) >= self._cache_size:
                # Oldest first (insertion order): drop a tenth at once, not one per insert.
                for stale in list(itertools.islice(cache, max(1, self._cache_size // 10))):
                    del cache[stale]
            cache[token] = verified

    def _forget(self, token: str) -> None:
        with self._lock:
            self._cache.pop(token, None)

    def _verify_signature_and_claims(self, token: str, now: float) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _fail("malformed") from exc
        if str(header.get("typ", "")).lower() not in (ACCESS_TOKEN_TYPE, "application/at+jwt"):
            raise _fail("wrong type")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALLOWED_ALGORITHMS:
            raise _fail("algorithm not allowed")
        if not isinstance(kid, str) or not kid:
            raise _fail("no key id")
        key = self._keys.key(kid)
        if key is None:
            if not self._keys.available():
                raise _keys_unavailable()
            raise _fail("unknown key")
        if key.algorithm != alg:
            raise _fail("algorithm does not match the key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp", "iat", "iss", "aud", "sub", "jti"],
                    # PyJWT reads the wall clock; the times are checked below against
                    # the injected clock, the same one the cache uses.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise _fail(type(exc).__name__) from exc
        self._check_times(claims, now)
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise _fail("bad roles")
        scope = claims.get("scope")
        if scope is not None and not isinstance(scope, str):
            raise _fail("bad scope")
        client_id = claims.get("client_id", "")
        if not isinstance(client_id, str):
            raise _fail("bad client_id")
        act = claims.get("act")
        actor = ""
        if act is not None:
            if not isinstance(act, dict) or not isinstance(act.get("sub"), str):
                raise _fail("bad act")
            if "act" in act:  # a chain of delegations: not something we issue
                raise _fail("nested act")
            actor = act["sub"]
        subject = str(claims["sub"])
        return Principal(
            subject=_uuid_or_none(subject),
            user_id=subject,
            roles=frozenset(roles),
            expires_at=float(claims["exp"]),
            scopes=parse_scope(scope) if scope is not None else None,
            client_id=client_id,
            actor=actor,
            issued_at=float(claims["iat"]),
        )

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        """`exp` passed, `nbf` or `iat` in the future (each with the leeway) → rejected."""
        times = [claims["exp"], claims["iat"], claims.get("nbf", claims["iat"])]
        if not all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
            for t in times
        ):
            raise _fail("bad time claims")
        expires, issued, not_before = times
        if expires <= now - self._leeway:
            raise Unauthenticated("the access token has expired", reason="TOKEN_EXPIRED")
        if issued > now + self._leeway:
            raise _fail("issued in the future")
        if not_before > now + self._leeway:
            raise _fail("not yet valid")
