"""Signing keys kept in auth_svc's database: their encryption, and the ring that signs.

Private parts are encrypted with AES-256-GCM under a key-encryption key (KEK) from the
environment (`AUTH_KEY_ENCRYPTION_KEYS`: `id:base64key,…`, 32 random bytes each). The first
KEK encrypts; every KEK listed decrypts, so the KEK rotates by putting a new one first
(the worker re-encrypts every key under it: `auth.signing_keys.maintain`), then dropping
the old one. The key id is the GCM associated data: a blob moved to another key's row does
not decrypt.

`DatabaseKeyRing` reloads the keys every few seconds (and at once after a change made
here): every replica signs with the same key at the same moment, because the signer is a
function of the time (the newest key whose activation time has come), not of a message
between replicas. It is a `TokenIssuer` (signing and the JWKS) and a `KeyProvider` (the
service's own verifier), whose generation changes when a key leaves the published set.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.auth_svc.domain import SigningKeyRecord, User
from shared.config.clock import Clock
from shared.rpc.errors import Unavailable
from shared.security.jwk import VerificationKey, algorithm_for, thumbprint, to_jwk
from shared.security.scopes import user_scopes
from shared.security.tokens import ACCESS_TOKEN_TYPE

__all__ = [
    "DatabaseKeyRing",
    "KeyEncryption",
    "KeyFactory",
    "NewKey",
    "generate_key",
    "key_from_pem",
    "parse_keks",
]

_log = logging.getLogger(__name__)
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
KEK_BYTES = 32
_NONCE = 12


def parse_keks(text: str) -> dict[str, bytes]:
    """`id:base64,id:base64` → {id: key}, in order (the first encrypts); ValueError if bad."""
    keks: dict[str, bytes] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        ident, sep, encoded = item.partition(":")
        if not sep or not ident.strip() or len(ident.strip()) > 64:
            raise ValueError("each entry is id:base64key (id up to 64 characters)")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {ident.strip()!r} is not base64") from None
        if len(key) != KEK_BYTES:
            raise ValueError(
                f"key {ident.strip()!r} must be {KEK_BYTES} bytes (openssl rand -base64 32)"
            )
        if ident.strip() in keks:
            raise ValueError(f"key id {ident.strip()!r} appears twice")
        keks[ident.strip()] = key
    if not keks:
        raise ValueError("no key given")
    return keks


class KeyEncryption:
    """AES-GCM under the KEKs: the first encrypts, all decrypt."""

    def __init__(self, keks: Mapping[str, bytes]) -> None:
        if not keks:
            raise ValueError("at least one key-encryption key")
        self._keks = {ident: AESGCM(key) for ident, key in keks.items()}
        self.current = next(iter(keks))

    def encrypt(self, plaintext: bytes, *, kid: str) -> tuple[str, bytes]:
        nonce = os.urandom(_NONCE)
        sealed = self._keks[self.current].encrypt(nonce, plaintext, kid.encode())
        return self.current, nonce + sealed

    def decrypt(self, kek_id: str, blob: bytes, *, kid: str) -> bytes:
        """The plaintext; ValueError if the KEK is unknown or the blob does not verify."""
        aead = self._keks.get(kek_id)
        if aead is None:
            raise ValueError(f"key-encryption key {kek_id!r} is not configured")
        try:
            return aead.decrypt(blob[:_NONCE], blob[_NONCE:], kid.encode())
        except InvalidTag:
            raise ValueError(
                f"the private part of {kid} does not decrypt under {kek_id!r}"
            ) from None

    def knows(self, kek_id: str) -> bool:
        return kek_id in self._keks


@dataclass(frozen=True, slots=True)
class NewKey:
    kid: str
    alg: str
    public_pem: str
    private_pem: bytes


def key_from_pem(private_pem: bytes | str) -> NewKey:
    pem = private_pem.encode() if isinstance(private_pem, str) else private_pem
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("the signing key must be Ed25519 or EC P-256")
    public = key.public_key()
    return NewKey(
        kid=thumbprint(public),
        alg=algorithm_for(public),
        public_pem=public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        private_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def generate_key() -> NewKey:
    """A fresh Ed25519 signing key."""
    return key_from_pem(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class NoSigningKey(Unavailable):
    """This replica has no key it may sign with now (UNAVAILABLE: retry elsewhere)."""


@dataclass(frozen=True)
class _Loaded:
    record: SigningKeyRecord
    private: PrivateKey | None  # None: not decryptable here (logged), verify-only
    verification: VerificationKey


class DatabaseKeyRing:
    """Signs with the key the database says is active now; publishes every live key."""

    RELOAD_SECONDS = 5.0

    def __init__(
        self,
        load: Callable[[], Sequence[SigningKeyRecord]],
        encryption: KeyEncryption,
        *,
        prepare: Callable[[], object] | None = None,
        issuer: str,
        audience: str,
        access_token_ttl_seconds: int,
        clock: Clock,
    ) -> None:
        self._load = load
        self._prepare = prepare
        self._encryption = encryption
        self._issuer = issuer
        self._audience = audience
        self._ttl = access_token_ttl_seconds
        self._clock = clock
        self._keys: list[_Loaded] = []  # by activation time
        self._by_kid: dict[str, _Loaded] = {}
        self._generation = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded_ok = False

    # -- loading ---------------------------------------------------------------------------

    def reload(self) -> None:
        """Reads the keys again (after a change, and every RELOAD_SECONDS)."""
        records = list(self._load())
        previous = self._by_kid
        loaded: list[_Loaded] = []
        for record in records:
            known = previous.get(record.kid)
            if known is not None and (known.private is not None or not record.private_blob):
                # Opened before: the private key is the same whatever KEK seals it now (the
                # worker re-seals under a new KEK while replicas still have only the old).
                private = known.private if record.private_blob and not record.revoke_time else None
                loaded.append(_Loaded(record, private, known.verification))
                continue
            try:
                loaded.append(self._open(record))
            except ValueError as exc:  # a damaged row: the other keys still serve
                _log.error("%s; left out", exc)
        with self._lock:
            now = self._clock.now()
            live = {k.record.kid for k in loaded if k.record.published(now)}
            gone = {kid for kid, k in previous.items() if k.record.published(now)} - live
            self._keys = sorted(loaded, key=lambda k: (k.record.activate_time, k.record.kid))
            self._by_kid = {k.record.kid: k for k in self._keys}
            if gone:
                self._generation += 1
                _log.warning("signing keys no longer published: %s", sorted(gone))
            self._loaded_ok = True

    def _open(self, record: SigningKeyRecord) -> _Loaded:
        try:
            public = serialization.load_pem_public_key(record.public_pem.encode())
        except ValueError:
            public = None
        if not isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"signing key {record.kid}: its public key is not a usable PEM")
        verification = VerificationKey(record.kid, record.alg, public)
        private: PrivateKey | None = None
        if record.revoke_time is None and record.private_blob:
            try:
                pem = self._encryption.decrypt(record.kek_id, record.private_blob, kid=record.kid)
                loaded = serialization.load_pem_private_key(pem, password=None)
                assert isinstance(loaded, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
                private = loaded
            except ValueError as exc:
                _log.error("signing key %s cannot sign here: %s", record.kid, exc)
        return _Loaded(record, private, verification)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="signing-keys", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.RELOAD_SECONDS):
            try:
                if not self._loaded_ok and self._prepare is not None:
                    self._prepare()  # the first start met a database outage: try again
                self.reload()
            except Exception as exc:  # the database is down: keep signing with what we have
                _log.warning("signing keys: reload failed, keeping the loaded ones: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)

    # -- what is current -------------------------------------------------------------------

    def signer(self, now: datetime | None = None) -> _Loaded:
        """The newest live key whose activation time has come — every replica's signer.
        If this replica cannot open it (a KEK it lacks), it does not sign with an older
        key instead (whose tokens could outlive that key's place in the JWKS): it cannot
        sign (UNAVAILABLE, not ready) until it can."""
        moment = now or self._clock.now()
        for loaded in reversed(self._keys):
            record = loaded.record
            if record.published(moment) and record.activate_time <= moment:
                if loaded.private is None:
                    break
                return loaded
        raise NoSigningKey(
            "no signing key can sign here; retry (another replica may)",
            retry_after_seconds=1.0,
            reason="KEYS_UNAVAILABLE",
        )

    def can_sign(self) -> bool:
        """Whether this replica has a key that signs now (its readiness)."""
        return self._loaded_ok and self.signer_kid() is not None

    def publishes(self, kids: Collection[str]) -> bool:
        """Whether any of these kids is in this replica's published set."""
        now = self._clock.now()
        return any(
            (loaded := self._by_kid.get(kid)) is not None and loaded.record.published(now)
            for kid in kids
        )

    def signer_kid(self, now: datetime | None = None) -> str | None:
        try:
            return self.signer(now).record.kid
        except NoSigningKey:
            return None

    # -- TokenIssuer -----------------------------------------------------------------------

    @property
    def access_token_ttl_seconds(self) -> int:
        return self._ttl

    @property
    def issuer(self) -> str:
        return self._issuer

    def issue_access_token(self, user: User, *, issued_at: int | None = None) -> str:
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
        moment = self._clock.now()
        signer = self.signer(moment)
        assert signer.private is not None  # signer() picks only keys that can sign
        now = int(moment.timestamp())
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
            signer.private,
            algorithm=signer.record.alg,
            headers={"kid": signer.record.kid, "typ": ACCESS_TOKEN_TYPE},
        )

    def public_jwks(self) -> list[dict[str, str]]:
        now = self._clock.now()
        return [
            {**to_jwk(k.verification.key), "kid": k.record.kid, "alg": k.record.alg, "use": "sig"}
            for k in self._keys
            if k.record.published(now)
        ]

    # -- KeyProvider (the service's own verifier) -----------------------------------------

    def key(self, kid: str) -> VerificationKey | None:
        loaded = self._by_kid.get(kid)
        if loaded is None or not loaded.record.published(self._clock.now()):
            return None
        return loaded.verification

    @property
    def generation(self) -> int:
        return self._generation

    def available(self) -> bool:
        return self._loaded_ok

    @property
    def records(self) -> list[SigningKeyRecord]:
        return [k.record for k in self._keys]


class KeyFactory:
    """Makes key records (new, imported) with their private parts sealed, and re-seals
    records under the current KEK."""

    def __init__(self, encryption: KeyEncryption) -> None:
        self._encryption = encryption

    def create(
        self, *, now: datetime, activate_time: datetime, private_pem: bytes | None = None
    ) -> SigningKeyRecord:
        new = key_from_pem(private_pem) if private_pem is not None else generate_key()
        kek_id, blob = self._encryption.encrypt(new.private_pem, kid=new.kid)
        return SigningKeyRecord(
            kid=new.kid,
            alg=new.alg,
            public_pem=new.public_pem,
            private_blob=blob,
            kek_id=kek_id,
            create_time=now,
            activate_time=activate_time,
        )

    def public_only(
        self, public_pem: str, *, now: datetime, activate_time: datetime
    ) -> SigningKeyRecord:
        """A key that only verifies (a previous key's public half, from AUTH_VERIFY_KEYS)."""
        public = serialization.load_pem_public_key(public_pem.encode())
        if not isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise ValueError("verification keys must be Ed25519 or EC P-256")
        return SigningKeyRecord(
            kid=thumbprint(public),
            alg=algorithm_for(public),
            public_pem=public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
            private_blob=b"",
            kek_id="",
            create_time=now,
            activate_time=activate_time,
        )

    def rewrap(self, record: SigningKeyRecord) -> SigningKeyRecord | None:
        """The record sealed under the current KEK, or None if it already is (or holds no
        private part any more)."""
        if not record.private_blob or record.kek_id == self._encryption.current:
            return None
        plain = self._encryption.decrypt(record.kek_id, record.private_blob, kid=record.kid)
        kek_id, blob = self._encryption.encrypt(plain, kid=record.kid)
        return replace(record, kek_id=kek_id, private_blob=blob)
