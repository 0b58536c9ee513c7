"""OAuth scopes of access tokens, and what a token from before scopes existed may do.

    agents.read    read agents (one's own; every agent with agents.admin)
    agents.write   create, change and delete agents (the same)
    agents.admin   every agent, not only one's own
    delegate       a service account's right to exchange a user's token for one acting
                   as the user (auth_svc's token exchange); never passed on

A user's token carries agents.read and agents.write, and agents.admin for administrators;
a service account's token carries what the account was granted (or the part of it that
was asked for). A token issued before scopes existed has no `scope` claim: it may do what
a user's token of the same roles may do, so it keeps working as it did.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = [
    "AGENTS_ADMIN",
    "AGENTS_READ",
    "AGENTS_WRITE",
    "DELEGATE",
    "KNOWN_SCOPES",
    "parse_scope",
    "user_scopes",
]

AGENTS_READ = "agents.read"
AGENTS_WRITE = "agents.write"
AGENTS_ADMIN = "agents.admin"
DELEGATE = "delegate"
KNOWN_SCOPES = frozenset({AGENTS_READ, AGENTS_WRITE, AGENTS_ADMIN, DELEGATE})
ADMIN_ROLE = "admin"


_USER_SCOPES = frozenset({AGENTS_READ, AGENTS_WRITE})
_ADMIN_SCOPES = _USER_SCOPES | {AGENTS_ADMIN}


def user_scopes(roles: Collection[str]) -> frozenset[str]:
    """The scopes a user's token carries: read and write, and admin for administrators."""
    return _ADMIN_SCOPES if ADMIN_ROLE in roles else _USER_SCOPES


def parse_scope(text: str) -> frozenset[str]:
    """The scopes of an RFC 6749 `scope` value: space-separated."""
    return frozenset(text.split())
