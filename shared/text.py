"""Text rules common to both services."""

from __future__ import annotations

import unicodedata

__all__ = ["has_control_characters"]

# Zero-width (non-)joiners are format characters that emoji sequences need; every other
# control or format character (C0/C1 controls, bidi overrides, …) is refused in names.
_ALLOWED_FORMAT = frozenset({"\u200c", "\u200d"})


def has_control_characters(text: str) -> bool:
    """True if the text holds a control, format (except ZWJ/ZWNJ) or surrogate character."""
    return any(
        unicodedata.category(ch) in ("Cc", "Cf", "Cs") and ch not in _ALLOWED_FORMAT for ch in text
    )
