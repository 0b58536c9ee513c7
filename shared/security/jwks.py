"""Verification keys fetched from the auth service's JWKS, cached, refetched with care.

`JwksKeyProvider` implements `shared.security.tokens.KeyProvider` for services that verify tokens
issued elsewhere. Its rules (DESIGN.md, "Tokens"):

- The keys are cached; a lookup of a known `kid` is a lock-free dict read.
- An unknown `kid` triggers a refetch, at most once per `cooldown_seconds` (counted from the
  last fetch attempt of any kind, background or on demand). The refetch is single-flight:
  concurrent lookups of unknown kids wait for the one fetch in progress and then look again.
- A failed fetch (transport error, or a response without a single usable key) keeps the
  previous keys, logs a warning and never raises to the caller.
- A successful fetch replaces the whole key set: keys that vanish stop verifying. JWKs that
  `shared.security.jwk.from_jwk` rejects (wrong type, curve, use, missing members) are skipped.
- `start_background_refresh()` runs a daemon thread that fetches at once, retries with
  exponential backoff until the first success, then refreshes every
  `refresh_interval_seconds` (retrying with backoff while a refresh fails). A service can
  therefore start, and report healthy, while the auth service is down, and it verifies
  tokens as soon as the keys can be fetched (at the next retry, or on the first token with a
  kid once the cooldown has passed, whichever is first).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from shared.config.clock import Clock
from shared.security.jwk import VerificationKey, from_jwk

__all__ = ["AUTH_CHANNEL_OPTIONS", "JwksKeyProvider", "describe_failure", "grpc_jwks_fetcher"]

_log = logging.getLogger(__name__)

JwksFetcher = Callable[[], list[dict[str, str]]]

# Options for the channel to the auth service. gRPC's default reconnect backoff grows to
# 120 s while the peer is down, and fail-fast calls fail at once during the backoff: capped
# at 5 s, keys arrive within seconds of the auth service coming up.
AUTH_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5000),
)

# The members of agentplatform.auth.v1.Jwk, RFC 7517/7518/8037 names.
_JWK_MEMBERS = ("kid", "kty", "alg", "use", "crv", "x", "y", "n", "e")
# After a key was revoked: for this long, an unknown kid is refetched at most every
# EAGER_COOLDOWN seconds (instead of the configured cooldown).
EAGER_AFTER_REVOCATION = 15.0
EAGER_COOLDOWN = 1.0


def grpc_jwks_fetcher(channel: grpc.Channel, timeout: float = 2.0) -> JwksFetcher:
    """A fetcher that calls `AuthService.GetJwks` on the channel (no credentials needed).

    Each JWK comes back as a dict with only its non-empty members; errors propagate (the
    provider turns them into "keep the old keys")."""
    stub = auth_pb2_grpc.AuthServiceStub(channel)

    def fetch() -> list[dict[str, str]]:
        reply: Any = stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=timeout)
        keys: list[dict[str, str]] = []
        for jwk in reply.keys:
            keys.append(
                {name: str(value) for name in _JWK_MEMBERS if (value := getattr(jwk, name))}
            )
        return keys

    return fetch


class JwksKeyProvider:
    """A `KeyProvider` backed by a JWKS fetcher (see the module docstring for the rules)."""

    def __init__(
        self,
        fetch: JwksFetcher,
        *,
        cooldown_seconds: float,
        clock: Clock,
        refresh_interval_seconds: float = 300.0,
        on_fetch: Callable[[str], None] | None = None,
        initial_backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 10.0,
    ) -> None:
        if cooldown_seconds < 0 or refresh_interval_seconds <= 0:
            raise ValueError("cooldown must be >= 0 and the refresh interval > 0")
        if not 0 < initial_backoff_seconds <= max_backoff_seconds:
            raise ValueError("backoff must satisfy 0 < initial <= max")
        self._fetch = fetch
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._refresh_interval = refresh_interval_seconds
        self._on_fetch = on_fetch
        self._initial_backoff = initial_backoff_seconds
        self._max_backoff = max_backoff_seconds
        # Replaced as a whole, never mutated: readers need no lock.
        self._keys: dict[str, VerificationKey] = {}
        self._fetch_lock = threading.Lock()
        self._last_attempt: float | None = None
        self._ever_succeeded = False
        self._last_fetch_ok = False
        self._generation = 0
        self._revoked: set[str] = set()
        self._eager_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- KeyProvider ---------------------------------------------------------------------

    def key(self, kid: str) -> VerificationKey | None:
        found = self._keys.get(kid)
        if found is not None:
            return found
        with self._fetch_lock:
            # Another thread may have fetched while this one waited for the lock.
            found = self._keys.get(kid)
            if found is not None:
                return found
            last = self._last_attempt
            now = self._clock.monotonic()
            cooldown = EAGER_COOLDOWN if now < self._eager_until else self._cooldown
            if last is not None and now - last < min(cooldown, self._cooldown):
                return None
            self._refresh_locked(reason=f"unknown kid {kid[:64]!r}")
            return self._keys.get(kid)

    # -- state ---------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Changes whenever a key leaves the trusted set."""
        return self._generation

    def available(self) -> bool:
        """Whether the keys are current: fetched, and the latest fetch succeeded."""
        return self._ever_succeeded and self._last_fetch_ok

    @property
    def has_keys(self) -> bool:
        """Whether any key has been fetched (for logs and metrics: health must not wait for it)."""
        return bool(self._keys)

    def kids(self) -> frozenset[str]:
        """The ids of the keys currently trusted."""
        return frozenset(self._keys)

    def revoke(self, kids: list[str]) -> None:
        """Keys revoked at the source: dropped now (their tokens refused, remembered ones
        included) and never taken back from a fetch (a replica of the source may still
        publish one for a moment)."""
        new = set(kids) - self._revoked
        if not new:
            return
        with self._fetch_lock:
            self._revoked |= new
            dropped = new & self._keys.keys()
            if dropped:
                self._keys = {k: v for k, v in self._keys.items() if k not in self._revoked}
                self._generation += 1
                _log.warning("signing keys revoked, their tokens refused: %s", sorted(dropped))
                # The key that replaces a revoked one is fetched now, not at first sight of
                # its kid (which the refetch cooldown may delay); and for a little while an
                # unknown kid is fetched without the cooldown (another replica of the
                # source may publish the replacement a few seconds later).
                self._refresh_locked(reason="a signing key was revoked")
                self._eager_until = self._clock.monotonic() + EAGER_AFTER_REVOCATION

    def refresh(self) -> bool:
        """Fetch now (regardless of the cooldown); True if the key set was replaced."""
        with self._fetch_lock:
            return self._refresh_locked(reason="explicit refresh")

    # -- background refresh --------------------------------------------------------------

    def start_background_refresh(self) -> None:
        """Start the daemon refresher (idempotent); returns at once, without waiting."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="jwks-refresh", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background refresher (the cached keys stay usable)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _run(self) -> None:
        backoff = self._initial_backoff
        while not self._stop.is_set():
            with self._fetch_lock:
                ok = self._refresh_locked(reason="background refresh")
            if ok:
                backoff = self._initial_backoff
                wait = self._refresh_interval
            else:
                wait = min(backoff, self._refresh_interval)
                backoff = min(backoff * 2, self._max_backoff)
            self._stop.wait(wait)

    # -- fetching ------------------------------------------------------------------------

    def _refresh_locked(self, *, reason: str) -> bool:
        """Fetch and replace the keys; the caller holds `_fetch_lock`. Never raises."""
        self._last_attempt = self._clock.monotonic()
        try:
            jwks = self._fetch()
        except Exception as exc:
            self._failed(f"{reason}: fetching the JWKS failed: {describe_failure(exc)}")
            return False
        keys: dict[str, VerificationKey] = {}
        for jwk in jwks:
            try:
                key = from_jwk(jwk)
            except Exception as exc:
                _log.warning("skipping an unusable JWK (kid %r): %s", jwk.get("kid"), exc)
                continue
            if key.kid not in self._revoked:
                keys.setdefault(key.kid, key)
        if not keys:
            # An auth service always publishes its signing key: an empty (or entirely
            # unusable) set is a fault, not a revocation of every key.
            self._failed(f"{reason}: the JWKS held no usable key ({len(jwks)} entries)")
            return False
        if keys.keys() != self._keys.keys() or not self._ever_succeeded:
            _log.info("JWKS fetched (%s): key ids %s", reason, sorted(keys))
        removed = self._keys.keys() - keys.keys()
        self._keys = keys
        if removed:
            # After the new set is in place: a token re-verified now sees the new keys.
            self._generation += 1
            _log.warning("keys no longer published, their tokens refused: %s", sorted(removed))
        self._ever_succeeded = True
        self._last_fetch_ok = True
        if self._on_fetch is not None:
            self._on_fetch("ok")
        return True

    def _failed(self, message: str) -> None:
        self._last_fetch_ok = False
        if self._keys:
            _log.warning("%s; keeping the %d keys fetched before", message, len(self._keys))
        else:
            _log.warning("%s; no keys yet, tokens cannot be verified", message)
        if self._on_fetch is not None:
            self._on_fetch("error")


def describe_failure(exc: Exception) -> str:
    """A failed call to auth_svc on one line: the status and its message (an RpcError's own
    text spans lines and carries gRPC's debug string), or the exception's type and text."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else None
        return f"{getattr(code, 'name', code)}: {details}"
    return f"{type(exc).__name__}: {exc}"
