"""The public keys on HTTP: `/.well-known/jwks.json` (RFC 7517 JWK Set) on the auth
service's HTTP port, for gateways and meshes that take a `jwksUri` (Envoy's jwt_authn
`remote_jwks`, Istio's RequestAuthentication). The same keys as `GetJwks`."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from shared.rpc.http import Document, Route

__all__ = ["JWKS_PATH", "jwks_route"]

JWKS_PATH = "/.well-known/jwks.json"
# The key set changes only with a deployment (a rotation adds a key before it signs), and a
# verifier refetches on an unknown `kid`: five minutes of caching is safe and saves fetches.
JWKS_MAX_AGE_SECONDS = 300


def jwks_route(jwks: Callable[[], list[dict[str, str]]]) -> Route:
    """The JWK Set document of the keys `jwks` returns."""

    def render(_headers: Mapping[str, str]) -> Document:
        body = json.dumps({"keys": jwks()}, separators=(",", ":")).encode()
        return Document(body, "application/json", max_age_seconds=JWKS_MAX_AGE_SECONDS)

    return render
