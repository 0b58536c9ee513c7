"""Input rules for accounts: email, password, display name."""

from __future__ import annotations

import re

from shared.config.text import has_control_characters
from shared.rpc.errors import FieldViolation

__all__ = [
    "MAX_DISPLAY_NAME",
    "MAX_PASSWORD",
    "email_violation",
    "normalize_email",
    "password_violation",
]

MAX_EMAIL = 254
MAX_PASSWORD = 128
MAX_DISPLAY_NAME = 128
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


def normalize_email(email: str) -> str:
    """Trimmed and lower-cased as a whole."""
    return email.strip().lower()


def email_violation(email: str, field: str = "email") -> FieldViolation | None:
    if not email:
        return FieldViolation(field, "required")
    if len(email) > MAX_EMAIL or not _EMAIL.match(email) or has_control_characters(email):
        return FieldViolation(field, "not a valid email address")
    return None


def password_violation(
    password: str, min_length: int, field: str = "password"
) -> FieldViolation | None:
    if len(password) < min_length:
        return FieldViolation(field, f"must be at least {min_length} characters")
    if len(password) > MAX_PASSWORD:
        return FieldViolation(field, f"must be at most {MAX_PASSWORD} characters")
    return None
