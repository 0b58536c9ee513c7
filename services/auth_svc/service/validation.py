"""Input rules for accounts and tokens: what each field accepts.

Every rule runs before anything is counted, stored, logged or queried, so a hostile value
never reaches the limiter, the audit trail or the database (PostgreSQL refuses NUL in text
and values longer than a column: that would be INTERNAL, not the caller's error).

- email: at most 254 characters (RFC 5321's path limit, the column's size), no control
  characters (shared.config.text.line_problem). Register also wants the shape
  `local@domain.tld`; Login only the size and characters, which reveals nothing about
  accounts: a value that breaks them cannot belong to one.
- password: at most 128 characters and no NUL, on Register, Login and ChangePassword alike
  (a longer one cannot match a stored one); Register and the new password of
  ChangePassword also need the configured minimum length.
- display name: at most 128 characters, no control characters.
- refresh token: what `secrets.token_urlsafe(32)` makes (43 characters of the base64url
  alphabet); anything longer than 128 characters or with another character is not a token
  this service issued, and is refused without a query.
"""

from __future__ import annotations

import re

from shared.config.text import has_nul, line_problem
from shared.rpc.errors import FieldViolation

__all__ = [
    "MAX_DISPLAY_NAME",
    "MAX_EMAIL",
    "MAX_PASSWORD",
    "display_name_violation",
    "email_violation",
    "is_refresh_token_shaped",
    "login_email_violation",
    "normalize_email",
    "password_violation",
    "presented_password_violation",
]

MAX_EMAIL = 254
MAX_PASSWORD = 128
MAX_DISPLAY_NAME = 128
MAX_REFRESH_TOKEN = 128
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
_REFRESH_TOKEN = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_REFRESH_TOKEN}}}")


def normalize_email(email: str) -> str:
    """Trimmed and lower-cased as a whole."""
    return email.strip().lower()


def email_violation(email: str, field: str = "email") -> FieldViolation | None:
    """A new account's email."""
    if not email:
        return FieldViolation(field, "required")
    if len(email) > MAX_EMAIL or line_problem(email) or not _EMAIL.match(email):
        return FieldViolation(field, "not a valid email address")
    return None


def login_email_violation(email: str, field: str = "email") -> FieldViolation | None:
    """An email presented to log in: only what could never belong to an account."""
    if not email:
        return FieldViolation(field, "required")
    if len(email) > MAX_EMAIL:
        return FieldViolation(field, f"must be at most {MAX_EMAIL} characters")
    problem = line_problem(email)
    return FieldViolation(field, problem) if problem else None


def password_violation(
    password: str, min_length: int, field: str = "password"
) -> FieldViolation | None:
    """A password to be stored."""
    if len(password) < min_length:
        return FieldViolation(field, f"must be at least {min_length} characters")
    return presented_password_violation(password, field)


def presented_password_violation(password: str, field: str = "password") -> FieldViolation | None:
    """A password presented to be checked (the stored one obeys the same limits)."""
    if not password:
        return FieldViolation(field, "required")
    if len(password) > MAX_PASSWORD:
        return FieldViolation(field, f"must be at most {MAX_PASSWORD} characters")
    if has_nul(password):
        return FieldViolation(field, "must not contain NUL characters")
    return None


def display_name_violation(display_name: str) -> FieldViolation | None:
    if len(display_name) > MAX_DISPLAY_NAME:
        return FieldViolation("display_name", f"must be at most {MAX_DISPLAY_NAME} characters")
    problem = line_problem(display_name)
    return FieldViolation("display_name", problem) if problem else None


def is_refresh_token_shaped(token: str) -> bool:
    """True if the token could be one this service issued (see the module docstring)."""
    return _REFRESH_TOKEN.fullmatch(token) is not None
