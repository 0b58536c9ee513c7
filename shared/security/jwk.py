"""Public keys as JSON Web Keys (RFC 7517) and their RFC 7638 thumbprints."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

__all__ = ["PublicKey", "VerificationKey", "algorithm_for", "from_jwk", "thumbprint", "to_jwk"]

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

# The members that make up each key type's RFC 7638 thumbprint, in lexicographic order.
_REQUIRED_MEMBERS = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y")}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key with its id and the one algorithm it may verify."""

    kid: str
    algorithm: str
    key: PublicKey


def algorithm_for(key: PublicKey) -> str:
    """The JWS algorithm a key signs with: EdDSA for Ed25519, ES256 for P-256."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError("only Ed25519 and P-256 keys are supported")


def to_jwk(key: PublicKey) -> dict[str, str]:
    """The public JWK of a key, without kid/alg/use."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        jwk: dict[str, str] = OKPAlgorithm.to_jwk(key, as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    return {k: jwk[k] for k in _REQUIRED_MEMBERS[jwk["kty"]]}


def thumbprint(key: PublicKey) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url without padding: a stable key id."""
    canonical = json.dumps(to_jwk(key), separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def from_jwk(jwk: dict[str, Any]) -> VerificationKey:
    """A verification key from a published JWK; rejects anything but EdDSA/ES256 signing keys."""
    kty = jwk.get("kty")
    if kty not in _REQUIRED_MEMBERS:
        raise ValueError(f"unsupported key type {kty!r}")
    if jwk.get("use") not in (None, "", "sig"):
        raise ValueError("key is not for signatures")
    members = {k: jwk[k] for k in _REQUIRED_MEMBERS[kty] if jwk.get(k)}
    if len(members) != len(_REQUIRED_MEMBERS[kty]):
        raise ValueError("key is missing members")
    key: PublicKey
    if kty == "OKP":
        loaded = OKPAlgorithm.from_jwk(members)
        if not isinstance(loaded, ed25519.Ed25519PublicKey):
            raise ValueError("only Ed25519 public keys are accepted")
        key = loaded
    else:
        loaded_ec = ECAlgorithm.from_jwk(members)
        if not isinstance(loaded_ec, ec.EllipticCurvePublicKey):
            raise ValueError("only public EC keys are accepted")
        key = loaded_ec
    algorithm = algorithm_for(key)
    if jwk.get("alg") and jwk["alg"] != algorithm:
        raise ValueError(f"key alg {jwk['alg']!r} does not match its type")
    return VerificationKey(kid=str(jwk.get("kid") or thumbprint(key)), algorithm=algorithm, key=key)
