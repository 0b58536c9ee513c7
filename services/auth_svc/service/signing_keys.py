"""The signing keys' lifecycle: next → active → retired → removed, or revoked.

- A rotation creates the next key, published at once and signing from `activate_time` =
  now + the publish-ahead delay (longer than verifiers take to refetch the JWKS), so no
  verifier meets a token whose key it has not seen. The key it replaces retires then and
  stays published until every token it signed has expired (`remove_time` = the new key's
  activation + the token lifetime + a margin), then leaves the JWKS.
- A revocation is the emergency: the key leaves the JWKS now, its id goes out with the
  token revocations (agent_svc polls them), so verifiers refuse its tokens within their
  poll, remembered ones included. Revoking the active key makes a new key active at once
  (verifiers fetch it on first sight of its kid).
- The first start imports the key given in the environment (AUTH_SIGNING_KEY, and the
  public keys of AUTH_VERIFY_KEYS as retired ones), or else generates one: a deployment
  that signed with an environment key goes on with the same kid, so nothing in flight
  fails to verify.
- Rotation is automatic every AUTH_KEY_ROTATION_DAYS (the worker's
  `auth.signing_keys.maintain`, which also sets removal times, wipes removed keys' private
  parts and re-seals keys under the current key-encryption key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from services.auth_svc.domain import AuditEvent, AuditKind, SigningKeyRecord
from services.auth_svc.service.admin import actor_of, require_admin
from services.auth_svc.service.ports import AuthUnitOfWork, KeyFactory
from shared.config.clock import Clock
from shared.rpc.errors import InvalidArgument, NotFound
from shared.security.tokens import Principal

__all__ = ["REMOVAL_MARGIN", "SigningKeyAdmin"]

_log = logging.getLogger(__name__)
# Past a token's lifetime: the verifiers' leeway (30 s) and a JWKS refresh (5 min).
REMOVAL_MARGIN = timedelta(minutes=6)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _not_found() -> NotFound:
    return NotFound("no such signing key", reason="SIGNING_KEY_NOT_FOUND")


class SigningKeyAdmin:
    def __init__(
        self,
        *,
        uow: Callable[[], AuthUnitOfWork],
        keys: KeyFactory,
        reload: Callable[[], None],
        clock: Clock,
        publish_ahead_seconds: float,
        token_lifetime_seconds: int,
        rotation_days: float,
    ) -> None:
        self._uow = uow
        self._keys = keys
        self._reload = reload
        self._clock = clock
        self._ahead = timedelta(seconds=publish_ahead_seconds)
        self._lifetime = timedelta(seconds=token_lifetime_seconds)
        self._rotation = timedelta(days=rotation_days) if rotation_days > 0 else None

    # -- reading -----------------------------------------------------------------------------

    @staticmethod
    def signer_of(records: Sequence[SigningKeyRecord], now: datetime) -> str | None:
        """The kid that signs at `now`: the newest published key activated by then (the ring
        also needs its private part; a key whose part does not decrypt is logged there)."""
        live = [r for r in records if r.published(now) and r.activate_time <= now]
        return max(live, key=lambda r: (r.activate_time, r.kid)).kid if live else None

    def list_keys(self, *, principal: Principal) -> tuple[list[SigningKeyRecord], str | None]:
        require_admin(principal, self._uow, self._clock)
        with self._uow() as uow:
            records = uow.signing_keys.all()
        now = self._clock.now()
        newest_first = sorted(records, key=lambda r: (r.activate_time, r.kid), reverse=True)
        return newest_first, self.signer_of(records, now)

    def revoked_kids(self) -> list[str]:
        """Keys revoked lately (their tokens may still be live): verifiers refuse them."""
        now = self._clock.now()
        with self._uow() as uow:
            records = uow.signing_keys.all()
        return [
            r.kid
            for r in records
            if r.revoke_time is not None and r.revoke_time + self._lifetime + REMOVAL_MARGIN > now
        ]

    # -- the first start -----------------------------------------------------------------------

    def ensure(self, *, signing_pem: str | None, verify_pems: Sequence[str] = ()) -> str:
        """Makes sure a key signs: imports the environment's key (once) or generates one."""
        with self._uow() as uow:
            uow.signing_keys.lock()
            records = uow.signing_keys.all()
            now = self._clock.now()
            if records:
                if self.signer_of(records, now) is not None:
                    return "the stored keys (the environment's key is imported on first start only)"
                # Stored keys, none of which can sign now: a new one signs at once.
                fresh = self._keys.create(now=now, activate_time=now)
                uow.signing_keys.add(fresh)
                self._settle_removals(uow, [*records, fresh])
                uow.audit.record(
                    AuditEvent(
                        kind=AuditKind.SIGNING_KEY_CREATED,
                        time=now,
                        detail={"kid": fresh.kid, "source": "no key could sign"},
                    )
                )
                uow.commit()
                self._reload()
                return f"no stored key could sign: generated {fresh.kid}"
            private = signing_pem.encode() if signing_pem is not None else None
            first = self._keys.create(now=now, activate_time=now, private_pem=private)
            olds: dict[str, SigningKeyRecord] = {}
            for pem in verify_pems:  # keys that signed before: verify until their tokens end
                old = self._keys.public_only(pem, now=now, activate_time=_EPOCH)
                if old.kid != first.kid:  # the signing key's own half, or a repeat: once
                    olds.setdefault(old.kid, old)
            for old in olds.values():
                uow.signing_keys.add(old)
            uow.signing_keys.add(first)
            self._settle_removals(uow, [*olds.values(), first])
            uow.audit.record(
                AuditEvent(
                    kind=AuditKind.SIGNING_KEY_CREATED,
                    time=now,
                    detail={"kid": first.kid, "source": "environment" if private else "generated"},
                )
            )
            uow.commit()
        self._reload()
        return f"{'imported' if private else 'generated'} signing key {first.kid}"

    # -- administrators ------------------------------------------------------------------------

    def rotate(self, *, principal: Principal | None) -> SigningKeyRecord:
        """The next key (a new one, or the one already pending)."""
        if principal is not None:
            require_admin(principal, self._uow, self._clock)
        with self._uow() as uow:
            uow.signing_keys.lock()
            records = uow.signing_keys.all()
            now = self._clock.now()
            pending = [r for r in records if r.published(now) and r.activate_time > now]
            if pending:
                return max(pending, key=lambda r: r.activate_time)
            activate = now + self._ahead
            fresh = self._keys.create(now=now, activate_time=activate)
            uow.signing_keys.add(fresh)
            self._settle_removals(uow, [*records, fresh])
            self._audit(uow, AuditKind.SIGNING_KEY_CREATED, principal, fresh.kid, "rotation")
            uow.commit()
        self._reload()
        return fresh

    def revoke(self, *, principal: Principal, kid: str) -> tuple[SigningKeyRecord, str | None]:
        require_admin(principal, self._uow, self._clock)
        if not kid or len(kid) > 64:
            raise InvalidArgument.field("kid", "required, at most 64 characters")
        with self._uow() as uow:
            uow.signing_keys.lock()
            records = uow.signing_keys.all()
            now = self._clock.now()
            target = next((r for r in records if r.kid == kid), None)
            if target is None or not target.published(now):
                raise _not_found()
            was_signer = self.signer_of(records, now) == kid
            revoked = replace(target, revoke_time=now, private_blob=b"", kek_id="")
            uow.signing_keys.save(revoked)
            self._audit(uow, AuditKind.SIGNING_KEY_REVOKED, principal, kid, "revoked")
            remaining = [revoked if r.kid == kid else r for r in records]
            if was_signer:
                # Emergency: a new key signs now (verifiers fetch it on first sight of its kid).
                fresh = self._keys.create(now=now, activate_time=now)
                uow.signing_keys.add(fresh)
                remaining.append(fresh)
                self._audit(uow, AuditKind.SIGNING_KEY_CREATED, principal, fresh.kid, "revocation")
            # A revoked pending key gives the active one back its place (no removal).
            self._settle_removals(uow, remaining)
            uow.commit()
        self._reload()
        return revoked, self.signer_of(remaining, now)

    # -- the worker ------------------------------------------------------------------------------

    def maintain(self) -> dict[str, int]:
        """Rotates when due, wipes removed keys' private parts, re-seals under the current KEK."""
        counts = {"rotated": 0, "wiped": 0, "resealed": 0}
        now = self._clock.now()
        with self._uow() as uow:
            records = uow.signing_keys.all()
        signer = self.signer_of(records, now)
        current = next((r for r in records if r.kid == signer), None)
        pending = any(r.published(now) and r.activate_time > now for r in records)
        if current is None:
            # Nothing can sign (every key removed or revoked): a new key, at once.
            self.ensure(signing_pem=None)
            counts["rotated"] = 1
        elif (
            self._rotation is not None
            and current is not None
            and not pending
            and current.activate_time + self._rotation <= now
        ):
            self.rotate(principal=None)
            counts["rotated"] = 1
        counts["unreadable"] = 0
        with self._uow() as uow:
            uow.signing_keys.lock()
            self._settle_removals(uow, uow.signing_keys.all())  # repairs what came before
            for record in uow.signing_keys.all():
                if record.remove_time is not None and record.remove_time <= now:
                    if record.private_blob:
                        uow.signing_keys.save(replace(record, private_blob=b"", kek_id=""))
                        counts["wiped"] += 1
                    continue
                try:
                    resealed = self._keys.rewrap(record)
                except ValueError as exc:  # one damaged key must not stop the others
                    _log.error("signing key %s cannot be re-sealed: %s", record.kid, exc)
                    counts["unreadable"] += 1
                    continue
                if resealed is not None:
                    uow.signing_keys.save(resealed)
                    counts["resealed"] += 1
            uow.commit()
        if any(counts.values()):
            self._reload()
        return counts

    # -- helpers ---------------------------------------------------------------------------------

    def _settle_removals(self, uow: AuthUnitOfWork, records: Sequence[SigningKeyRecord]) -> None:
        """Every live key leaves the JWKS once the key after it has signed for a token
        lifetime (and a margin); the newest key — the one that signs, or will — never has
        a removal time. Recomputed from all the keys after every change, so a revoked
        pending key cannot leave the active one scheduled for removal with no successor."""
        live = sorted(
            (r for r in records if r.revoke_time is None),
            key=lambda r: (r.activate_time, r.kid),
        )
        for record, successor in zip(live, [*live[1:], None], strict=True):
            wanted = (
                successor.activate_time + self._lifetime + REMOVAL_MARGIN
                if successor is not None
                else None
            )
            if record.remove_time != wanted and not (
                record.remove_time is not None and record.remove_time <= self._clock.now()
            ):
                uow.signing_keys.save(replace(record, remove_time=wanted))

    def _audit(
        self,
        uow: AuthUnitOfWork,
        kind: AuditKind,
        principal: Principal | None,
        kid: str,
        why: str,
    ) -> None:
        actor, via = actor_of(principal) if principal is not None else ("system:worker", None)
        uow.audit.record(
            AuditEvent(
                kind=kind,
                time=self._clock.now(),
                detail={"kid": kid, "why": why},
                actor=actor,
                actor_via=via,
            )
        )
