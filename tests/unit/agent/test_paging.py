"""Page sizes and page tokens: opaque, tamper-evident, bound to their query."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import pytest

from services.agent_svc.service.filtering import SortField
from services.agent_svc.service.paging import Cursor, PageTokens, page_size_of
from shared.rpc.errors import InvalidArgument

SECRET = b"0123456789abcdef0123456789abcdef"
ROW = uuid.UUID("00000000-0000-4000-8000-000000000001")


@pytest.mark.parametrize(("requested", "used"), [(0, 50), (1, 1), (1000, 1000), (1001, 1000)])
def test_page_size(requested: int, used: int) -> None:
    assert page_size_of(requested) == used


def test_negative_page_size_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_size_of(-1)
    assert caught.value.violations[0].field == "page_size"


def test_a_token_round_trips_its_cursor_exactly() -> None:
    tokens = PageTokens(SECRET)
    moment = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)
    token = tokens.issue(Cursor(moment, ROW), binding="b")
    assert tokens.read(token, binding="b", field=SortField.CREATE_TIME) == Cursor(moment, ROW)
    named = tokens.issue(Cursor('zoë "quoted"', ROW), binding="b")
    assert tokens.read(named, binding="b", field=SortField.NAME) == Cursor('zoë "quoted"', ROW)


def test_a_token_is_url_safe_text() -> None:
    token = PageTokens(SECRET).issue(Cursor("n", ROW), binding="b")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _rejected(token: str, *, binding: str = "b", secret: bytes = SECRET) -> None:
    with pytest.raises(InvalidArgument) as caught:
        PageTokens(secret).read(token, binding=binding, field=SortField.NAME)
    assert caught.value.violations[0].field == "page_token"


def test_another_binding_is_rejected() -> None:
    token = PageTokens(SECRET).issue(Cursor("n", ROW), binding="b")
    _rejected(token, binding="c")


def test_another_secret_is_rejected() -> None:
    token = PageTokens(SECRET).issue(Cursor("n", ROW), binding="b")
    _rejected(token, secret=b"another-secret-of-sufficient-len")


def test_every_flipped_byte_is_detected() -> None:
    token = PageTokens(SECRET).issue(Cursor("n", ROW), binding="b")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for index in range(len(raw)):
        forged = bytearray(raw)
        forged[index] ^= 0x01
        _rejected(base64.urlsafe_b64encode(bytes(forged)).rstrip(b"=").decode())


@pytest.mark.parametrize("token", ["x", "!!!!", "AAAA", "a" * 200, "ðŸ"])
def test_garbage_is_rejected(token: str) -> None:
    _rejected(token)


def test_a_time_cursor_is_not_read_as_a_name_cursor() -> None:
    tokens = PageTokens(SECRET)
    token = tokens.issue(Cursor(datetime(2026, 1, 1, tzinfo=UTC), ROW), binding="b")
    _rejected(token)


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        PageTokens(b"short")
