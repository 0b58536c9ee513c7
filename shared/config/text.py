"""Text rules common to both services: what characters a field of each kind accepts.

Protobuf already guarantees that every string field is valid UTF-8 (an invalid byte
sequence fails to parse, and the request is INVALID_ARGUMENT). What it lets through and
the database or the logs must not get:

- NUL (U+0000): PostgreSQL refuses it in text and in JSON it has to query, so it is
  refused in every field, nested values of JSON-like structures included.
- Other control characters: refused in one-line fields (names, emails, keys, models),
  where they can only be a mistake or an attempt to forge log lines; tab, line feed and
  carriage return are allowed in free text (descriptions, instructions), which is
  meant to span lines.
- Format characters (bidi overrides, zero-width spaces) and surrogates: refused in
  one-line fields, which people compare by eye; zero-width (non-)joiners stay allowed,
  emoji sequences need them.

Each check returns a short description of the problem for a field violation, or None.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "has_control_characters",
    "has_nul",
    "line_problem",
    "text_problem",
]

_ALLOWED_FORMAT = frozenset({"\u200c", "\u200d"})
# C0 controls but tab, line feed and carriage return; DEL; C1 controls.
_FREE_TEXT_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def has_nul(text: str) -> bool:
    return "\x00" in text


def has_control_characters(text: str) -> bool:
    """True if the text holds a control, format (except ZWJ/ZWNJ) or surrogate character."""
    return any(
        unicodedata.category(ch) in ("Cc", "Cf", "Cs") and ch not in _ALLOWED_FORMAT for ch in text
    )


def line_problem(text: str) -> str | None:
    """What is wrong with one-line text (a name, an email, a key), or None."""
    if has_control_characters(text):
        return "must not contain control characters"
    return None


def text_problem(text: str) -> str | None:
    """What is wrong with free text (a description, instructions), or None."""
    if _FREE_TEXT_CONTROLS.search(text) is not None:
        return "must not contain control characters other than tab and line breaks"
    return None
