"""The signing key ring: one private key that signs, any number of public keys that still
verify (for rotation), and access-token issuing (RFC 9068)."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Collection, Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from services.auth_svc.domain import User
from shared.config.clock import Clock
from shared.security.jwk import PublicKey, VerificationKey, algorithm_for, thumbprint, to_jwk
from shared.security.scopes import user_scopes
from shared.security.tokens import ACCESS_TOKEN_TYPE

__all__ = ["PEM_BLOCK", "KeyRing", "key_material_problems"]

_log = logging.getLogger(__name__)
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", re.DOTALL)


def _load_private(pem: str) -> PrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("the signing key must be Ed25519 or EC P-256")
    algorithm_for(key.public_key())  # rejects other curves
    return key


def _load_publics(pem: str) -> list[PublicKey]:
    keys: list[PublicKey] = []
    for block in PEM_BLOCK.findall(pem):
        key = serialization.load_pem_public_key(block.encode())
        if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise ValueError("verification keys must be Ed25519 or EC P-256")
        keys.append(key)
    return keys


def key_material_problems(signing_key_pem: str | None, verify_keys_pem: str | None) -> list[str]:
    """What is wrong with configured key material, as configuration problems."""
    problems: list[str] = []
    if signing_key_pem is not None:
        try:
            _load_private(signing_key_pem)
        except (ValueError, TypeError) as exc:
            problems.append(f"AUTH_SIGNING_KEY is not a usable PEM private key: {_first_line(exc)}")
    if verify_keys_pem is not None:
        try:
            if not _load_publics(verify_keys_pem):
                problems.append("AUTH_VERIFY_KEYS holds no PEM public key")
        except (ValueError, TypeError) as exc:
            problems.append(f"AUTH_VERIFY_KEYS: not PEM public keys: {_first_line(exc)}")
    return problems


def _first_line(exc: Exception) -> str:
    # cryptography's messages can be long; key bytes are never part of them.
    return str(exc).split(". ")[0].splitlines()[0][:120] if str(exc) else type(exc).__name__


class KeyRing:
    """An in-memory ring: signs with one key given as PEM; publishes it and the verify keys.
    The service signs with the database's keys (infra/keystore.py); this one serves where
    no database is wanted (the unit tests' fakes)."""

    def __init__(
        self,
        *,
        signing_key_pem: str,
        verify_keys_pem: str | None,
        issuer: str,
        audience: str,
        access_token_ttl_seconds: int,
        clock: Clock,
    ) -> None:
        self._private = _load_private(signing_key_pem)
        public = self._private.public_key()
        self._kid = thumbprint(public)
        self._algorithm = algorithm_for(public)
        publics = [public, *_load_publics(verify_keys_pem or "")]
        self.verification_keys = [
            VerificationKey(kid=thumbprint(k), algorithm=algorithm_for(k), key=k) for k in publics
        ]
        self._issuer = issuer
        self._audience = audience
        self._ttl = access_token_ttl_seconds
        self._clock = clock

    @property
    def access_token_ttl_seconds(self) -> int:
        return self._ttl

    @property
    def issuer(self) -> str:
        return self._issuer

    def issue_access_token(self, user: User, *, issued_at: int | None = None) -> str:
        """A user's token: their roles, and the scopes a user of those roles holds."""
        return self._sign(
            subject=str(user.id),
            client_id=self._issuer,
            scopes=user_scopes(user.roles),
            lifetime_seconds=self._ttl,
            roles=user.roles,
            issued_at=issued_at,
        )

    def issue_token(
        self,
        *,
        subject: str,
        client_id: str,
        scopes: Collection[str],
        lifetime_seconds: int,
        roles: Sequence[str] = (),
        actor: str | None = None,
        issued_at: int | None = None,
    ) -> str:
        return self._sign(
            subject=subject,
            client_id=client_id,
            scopes=scopes,
            lifetime_seconds=lifetime_seconds,
            roles=roles,
            actor=actor,
            issued_at=issued_at,
        )

    def _sign(
        self,
        *,
        subject: str,
        client_id: str,
        scopes: Collection[str],
        lifetime_seconds: int,
        roles: Sequence[str],
        actor: str | None = None,
        issued_at: int | None = None,
    ) -> str:
        now = int(self._clock.now().timestamp())
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "iat": issued_at if issued_at is not None else now,
            "nbf": now,
            "exp": now + lifetime_seconds,
            "jti": uuid.uuid4().hex,
            "client_id": client_id,
            "roles": list(roles),
            "scope": " ".join(sorted(scopes)),
        }
        if actor is not None:
            claims["act"] = {"sub": actor}
        return jwt.encode(
            claims,
            self._private,
            algorithm=self._algorithm,
            headers={"kid": self._kid, "typ": ACCESS_TOKEN_TYPE},
        )

    def public_jwks(self) -> list[dict[str, str]]:
        seen: dict[str, dict[str, str]] = {}
        for key in self.verification_keys:
            seen.setdefault(
                key.kid, {**to_jwk(key.key), "kid": key.kid, "alg": key.algorithm, "use": "sig"}
            )
        return list(seen.values())
