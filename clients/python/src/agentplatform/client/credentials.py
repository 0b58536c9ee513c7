"""Token sources: where a client's `authorization: Bearer …` comes from.

    static_token(token)                          a token you already have
    client_secret(auth, client_id, secret)       client_credentials with a client secret
    private_key_jwt(auth, client_id, audience=…, private_key_pem=…)
                                                 client_credentials with an RFC 7523
                                                 assertion (needs agentplatform-client[jwt],
                                                 or pass `assertion=` a callable)
    delegated(auth, client, subject_token)       RFC 8693 token exchange: act for a user

`auth` is a channel to auth_svc (`connect(auth_target)`, no credentials: IssueToken is
public) or a TokenClient. Every source but the static one is a CachedTokenSource: it keeps
the token until shortly before it expires, then one caller fetches a new one while the
others go on with the current one (single flight); once it has expired, callers wait for
the fetch. It is safe to share between threads. `invalidate(token)` drops a token the server
refused (the channel does it on UNAUTHENTICATED TOKEN_EXPIRED / INVALID_TOKEN and retries
the call once with a fresh token).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agentplatform.auth.v1 import auth_pb2

if TYPE_CHECKING:
    from agentplatform.client.tokens import TokenClient

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "CLIENT_ASSERTION_TYPE",
    "CLIENT_CREDENTIALS",
    "TOKEN_EXCHANGE",
    "AccessToken",
    "CachedTokenSource",
    "ClientAuth",
    "ClientSecret",
    "PrivateKeyJwt",
    "StaticToken",
    "TokenSource",
    "client_secret",
    "delegated",
    "private_key_jwt",
    "static_token",
]

CLIENT_CREDENTIALS = "client_credentials"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# RFC 7523 assertions the auth service accepts live at most 5 minutes.
MAX_ASSERTION_LIFETIME = 300.0


@runtime_checkable
class TokenSource(Protocol):
    """Gives the access token to send; forgets one the server refused."""

    def token(self) -> str: ...

    def invalidate(self, token: str) -> None: ...


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An access token and when it expires, on the source's clock (time.monotonic)."""

    value: str
    expires_at: float
    scope: str = ""


class StaticToken:
    """A token you already have (a user's, a test's); never refreshed."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty token")
        self._token = token

    def token(self) -> str:
        return self._token

    def invalidate(self, token: str) -> None:
        """Nothing to do: a static token cannot be replaced."""


def static_token(token: str) -> StaticToken:
    return StaticToken(token)


class CachedTokenSource:
    """Caches the token `fetch` returns and fetches a new one before it expires.

    A token is refreshed `refresh_before` seconds before it expires (at most half its
    lifetime before). One caller fetches at a time (single flight); meanwhile the others use
    the current token while it is valid, and wait for the fetch once it is not. A failed
    refresh leaves the current token in use until it expires (the next call tries again);
    with no valid token the error is raised to the caller."""

    def __init__(
        self,
        fetch: Callable[[], AccessToken],
        *,
        refresh_before: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_before = refresh_before
        self._clock = clock
        self._condition = threading.Condition()
        self._current: AccessToken | None = None
        self._refresh_at = 0.0
        self._fetching = False

    def token(self) -> str:
        with self._condition:
            while True:
                now = self._clock()
                current = self._current
                valid = current is not None and now < current.expires_at
                if current is not None and valid and now < self._refresh_at:
                    return current.value
                if not self._fetching:
                    self._fetching = True
                    break
                if current is not None and valid:
                    return current.value  # another caller is refreshing it
                self._condition.wait()
        return self._refresh(current if valid else None)

    def _refresh(self, current: AccessToken | None) -> str:
        started = self._clock()
        try:
            fresh = self._fetch()
        except BaseException:
            with self._condition:
                self._fetching = False
                self._condition.notify_all()
            if current is not None and self._clock() < current.expires_at:
                return current.value
            raise
        lifetime = max(0.0, fresh.expires_at - started)
        with self._condition:
            self._current = fresh
            self._refresh_at = fresh.expires_at - min(self._refresh_before, lifetime / 2)
            self._fetching = False
            self._condition.notify_all()
        return fresh.value

    def invalidate(self, token: str) -> None:
        """Forgets `token` if it is the cached one (the server refused it)."""
        with self._condition:
            if self._current is not None and self._current.value == token:
                self._current = None

    @property
    def current(self) -> AccessToken | None:
        """The cached token, if any (for inspection)."""
        return self._current


# -- client authentication ---------------------------------------------------------------


class ClientAuth(Protocol):
    """How a service account proves who it is in an IssueTokenRequest."""

    @property
    def client_id(self) -> str: ...

    def authenticate(self, request: auth_pb2.IssueTokenRequest) -> None:
        """Fills the request's client fields (called for every request: fresh assertions)."""
        ...


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """A client id and one of its secrets (client_secret_post)."""

    client_id: str
    client_secret: str

    def authenticate(self, request: auth_pb2.IssueTokenRequest) -> None:
        request.client_id = self.client_id
        request.client_secret = self.client_secret

    def __repr__(self) -> str:
        return f"ClientSecret(client_id={self.client_id!r}, client_secret=<hidden>)"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class PrivateKeyJwt:
    """private_key_jwt (RFC 7523): each token request carries a new assertion with
    `iss` = `sub` = the client id, `aud` = the auth service's issuer, `iat`, `exp` at most
    5 minutes ahead and a unique `jti`, signed by a key registered on the account.

    Give either `private_key_pem` (Ed25519 → EdDSA, P-256 → ES256; needs the `cryptography`
    package: `pip install agentplatform-client[jwt]`; `kid` defaults to the key's RFC 7638
    thumbprint) or `assertion`, a callable that returns a signed assertion (an HSM, a KMS,
    a library of your choice)."""

    def __init__(
        self,
        client_id: str,
        *,
        audience: str = "",
        private_key_pem: bytes | str | None = None,
        kid: str | None = None,
        assertion: Callable[[], str] | None = None,
        lifetime: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (private_key_pem is None) == (assertion is None):
            raise ValueError("give exactly one of private_key_pem and assertion")
        if private_key_pem is not None and not audience:
            raise ValueError("audience (the auth service's issuer) is required to sign")
        if not 0 < lifetime <= MAX_ASSERTION_LIFETIME:
            raise ValueError(f"lifetime must be in (0, {MAX_ASSERTION_LIFETIME:g}] seconds")
        self._client_id = client_id
        self._audience = audience
        self._lifetime = lifetime
        self._clock = clock
        self._assertion = assertion
        self._signer: _Signer | None = None
        if private_key_pem is not None:
            self._signer = _Signer.load(private_key_pem, kid)

    @property
    def client_id(self) -> str:
        return self._client_id

    def assertion(self) -> str:
        """A new signed assertion."""
        if self._assertion is not None:
            return self._assertion()
        assert self._signer is not None
        now = int(self._clock())
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": self._audience,
            "iat": now,
            "exp": now + int(self._lifetime),
            "jti": secrets.token_urlsafe(24),
        }
        return self._signer.sign(claims)

    def authenticate(self, request: auth_pb2.IssueTokenRequest) -> None:
        request.client_id = self._client_id
        request.client_assertion_type = CLIENT_ASSERTION_TYPE
        request.client_assertion = self.assertion()

    def __repr__(self) -> str:
        return f"PrivateKeyJwt(client_id={self._client_id!r}, audience={self._audience!r})"


class _Signer:
    """Compact JWS (RFC 7515) with EdDSA (Ed25519) or ES256 (P-256), via `cryptography`."""

    def __init__(self, key: Any, alg: str, kid: str) -> None:
        self._key, self.alg, self.kid = key, alg, kid

    @classmethod
    def load(cls, pem: bytes | str, kid: str | None) -> _Signer:
        try:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ec, ed25519
        except ImportError as missing:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "signing a client assertion needs the cryptography package: "
                "pip install 'agentplatform-client[jwt]' (or pass assertion=)"
            ) from missing
        data = pem.encode() if isinstance(pem, str) else pem
        key = serialization.load_pem_private_key(data, password=None)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            jwk = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
            alg = "EdDSA"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            numbers = key.public_key().public_numbers()
            jwk = {
                "crv": "P-256",
                "kty": "EC",
                "x": _b64url(numbers.x.to_bytes(32, "big")),
                "y": _b64url(numbers.y.to_bytes(32, "big")),
            }
            alg = "ES256"
        else:
            raise ValueError("the key must be Ed25519 (EdDSA) or P-256 (ES256)")
        if kid is None:
            import hashlib

            kid = _b64url(hashlib.sha256(_json(jwk)).digest())  # RFC 7638 thumbprint
        return cls(key, alg, kid)

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": self.alg, "kid": self.kid, "typ": "JWT"}
        signing_input = f"{_b64url(_json(header))}.{_b64url(_json(claims))}".encode("ascii")
        if self.alg == "EdDSA":
            signature = self._key.sign(signing_input)
        else:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

            r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input.decode('ascii')}.{_b64url(signature)}"


# -- the grants -----------------------------------------------------------------------------


def _token_client(auth: Any) -> TokenClient:
    from agentplatform.client.tokens import TokenClient

    return auth if isinstance(auth, TokenClient) else TokenClient(auth)


def client_secret(
    auth: Any,
    client_id: str,
    secret: str,
    *,
    scope: str = "",
    refresh_before: float = 60.0,
) -> CachedTokenSource:
    """Tokens for a service account, by client_credentials with a client secret.
    `auth`: a channel to auth_svc or a TokenClient."""
    return _client_credentials(auth, ClientSecret(client_id, secret), scope, refresh_before)


def private_key_jwt(
    auth: Any,
    client_id: str,
    *,
    audience: str = "",
    private_key_pem: bytes | str | None = None,
    kid: str | None = None,
    assertion: Callable[[], str] | None = None,
    scope: str = "",
    refresh_before: float = 60.0,
) -> CachedTokenSource:
    """Tokens for a service account, by client_credentials with a signed assertion (see
    PrivateKeyJwt). `audience` is the auth service's issuer (AUTH_ISSUER)."""
    client = PrivateKeyJwt(
        client_id,
        audience=audience,
        private_key_pem=private_key_pem,
        kid=kid,
        assertion=assertion,
    )
    return _client_credentials(auth, client, scope, refresh_before)


def _client_credentials(
    auth: Any, client: ClientAuth, scope: str, refresh_before: float
) -> CachedTokenSource:
    tokens = _token_client(auth)

    def fetch() -> AccessToken:
        return tokens.issue(CLIENT_CREDENTIALS, client, scope=scope)

    return CachedTokenSource(fetch, refresh_before=refresh_before)


def delegated(
    auth: Any,
    client: ClientAuth,
    subject_token: str | Callable[[], str],
    *,
    scope: str = "",
    refresh_before: float = 60.0,
) -> CachedTokenSource:
    """Tokens that act for a user (RFC 8693 token exchange): the service account `client`
    (with the `delegate` scope) exchanges the user's access token `subject_token` (or a
    callable giving the user's current one) for a token whose subject is the user. Its
    lifetime is at most the user token's."""
    tokens = _token_client(auth)

    def fetch() -> AccessToken:
        subject = subject_token() if callable(subject_token) else subject_token
        return tokens.issue(TOKEN_EXCHANGE, client, scope=scope, subject_token=subject)

    return CachedTokenSource(fetch, refresh_before=refresh_before)
