"""Access-token verification (RFC 9068 JWTs signed with EdDSA or ES256).

Strict by construction: the algorithm comes from the key, never from the token; `typ`
must be `at+jwt`; `iss`, `aud`, `exp`, `iat`, `sub` and `jti` are required; a small leeway
absorbs clock skew. Verified tokens are remembered (bounded, until they expire) so a
client that reuses its token pays for the signature check once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from shared.config.clock import Clock
from shared.rpc.errors import Unauthenticated
from shared.security.jwk import VerificationKey

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "KeyProvider",
    "Principal",
    "StaticKeyProvider",
    "TokenVerifier",
]

ACCESS_TOKEN_TYPE = "at+jwt"
ALLOWED_ALGORITHMS = frozenset({"EdDSA", "ES256"})
ADMIN_ROLE = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller, handed explicitly to the service layer."""

    user_id: str
    roles: frozenset[str]
    expires_at: float = 0.0

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


class KeyProvider(Protocol):
    def key(self, kid: str) -> VerificationKey | None:
        """The key with this id, or None if there is none (after any refetch allowed)."""
        ...


class StaticKeyProvider:
    """A fixed set of keys (the auth service verifies with its own)."""

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self._keys = {k.kid: k for k in keys}

    def key(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)


def _fail(detail: str) -> Unauthenticated:
    return Unauthenticated(f"invalid access token: {detail}", reason="INVALID_TOKEN")


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
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._clock = clock
        self._leeway = leeway_seconds
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._on_result = on_result or (lambda _result: None)

    def verify(self, token: str) -> Principal:
        now = self._clock.now().timestamp()
        with self._lock:
            cached = self._cache.get(token)
            if cached is not None and cached.expires_at + self._leeway > now:
                self._cache.move_to_end(token)
                self._on_result("cached")
                return cached
        try:
            principal = self._verify_signature_and_claims(token, now)
        except Unauthenticated:
            self._on_result("rejected")
            raise
        self._on_result("verified")
        with self._lock:
            self._cache[token] = principal
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

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
        return Principal(
            user_id=str(claims["sub"]),
            roles=frozenset(roles),
            expires_at=float(claims["exp"]),
        )

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        """`exp` passed, `nbf` or `iat` in the future (each with the leeway) → rejected."""
        times = [claims["exp"], claims["iat"], claims.get("nbf", claims["iat"])]
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            raise _fail("bad time claims")
        expires, issued, not_before = times
        if expires <= now - self._leeway:
            raise _fail("expired")
        if issued > now + self._leeway:
            raise _fail("issued in the future")
        if not_before > now + self._leeway:
            raise _fail("not yet valid")
