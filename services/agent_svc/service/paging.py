"""Keyset page tokens and page sizes for ListAgents (AIP-158).

A page token is `base64url(payload ‖ HMAC-SHA256(secret, binding ‖ payload))`, where the
payload is compact JSON with the last row's sort key and id, and the binding names the
query it belongs to: the caller, the rows it may see, the normalized filter and the
order. Changing any of them, or one bit of the token, fails the MAC → INVALID_ARGUMENT on
`page_token`. The secret is shared by every replica (AGENT_PAGE_TOKEN_SECRET), so a token
issued by one is accepted by all.

The next page continues strictly after the cursor in (sort column, id) order, so rows
inserted while a caller pages never shift the rows that existed when paging began.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.agent_svc.service.filtering import SortField
from shared.rpc.errors import InvalidArgument

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Cursor", "PageTokens", "page_size_of"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1_000
_MAC_SIZE = 32
_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def page_size_of(requested: int) -> int:
    """0 → the default, above the maximum → the maximum, negative → INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: the last row's sort key and its id (the tie-breaker)."""

    value: datetime | str
    id: uuid.UUID


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _bad_token() -> InvalidArgument:
    return InvalidArgument.field(
        "page_token",
        "invalid, or issued for another filter, order_by or caller",
    )


class PageTokens:
    """Issues and reads tamper-evident page tokens bound to one query."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the page token secret must have at least 16 bytes")
        self._secret = secret

    def _mac(self, binding: str, payload: bytes) -> bytes:
        bound = hashlib.sha256(binding.encode()).digest()
        return hmac.new(self._secret, bound + payload, hashlib.sha256).digest()

    def issue(self, cursor: Cursor, *, binding: str) -> str:
        key: int | str = (
            _micros(cursor.value) if isinstance(cursor.value, datetime) else cursor.value
        )
        payload = json.dumps(
            {"v": _VERSION, "k": key, "i": cursor.id.hex},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        token = payload + self._mac(binding, payload)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode()

    def read(self, token: str, *, binding: str, field: SortField) -> Cursor:
        """The cursor in a token issued for this binding; INVALID_ARGUMENT otherwise."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise _bad_token() from None
        payload, mac = raw[:-_MAC_SIZE], raw[-_MAC_SIZE:]
        if len(raw) <= _MAC_SIZE or not hmac.compare_digest(mac, self._mac(binding, payload)):
            raise _bad_token()
        try:
            data = json.loads(payload)
            key, row_id = data["k"], uuid.UUID(hex=data["i"])
        except (ValueError, KeyError, TypeError):
            raise _bad_token() from None
        if data.get("v") != _VERSION:
            raise _bad_token()
        if field is SortField.NAME and isinstance(key, str):
            return Cursor(key, row_id)
        if field is not SortField.NAME and isinstance(key, int) and not isinstance(key, bool):
            return Cursor(_EPOCH + timedelta(microseconds=key), row_id)
        raise _bad_token()
