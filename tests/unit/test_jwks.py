"""JwksKeyProvider: caching, cooldown, single flight, failures, rotation, background refresh."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures

import grpc
import jwt
import pytest
from agentplatform.auth.v1 import auth_pb2
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shared.rpc.errors import Unauthenticated
from shared.security.jwk import to_jwk
from shared.security.jwks import AUTH_CHANNEL_OPTIONS, JwksKeyProvider, grpc_jwks_fetcher
from shared.security.tokens import TokenVerifier
from tests.helpers import FakeClock, free_port

ISSUER = "https://auth.test"
AUDIENCE = "agentplatform"
WAIT = 30.0  # the deadline of every wait for a condition: generous, only a failure waits it out


def new_key(kid: str) -> tuple[ed25519.Ed25519PrivateKey, dict[str, str]]:
    private = ed25519.Ed25519PrivateKey.generate()
    return private, {**to_jwk(private.public_key()), "kid": kid, "alg": "EdDSA", "use": "sig"}


class FakeFetcher:
    """Serves `self.jwks`; raises while `self.failures` > 0; counts calls. Between `hold()`
    and `release()` a fetch waits, so a test keeps one in progress for as long as it
    needs, without guessing how long that is."""

    def __init__(self, jwks: list[dict[str, str]]) -> None:
        self.jwks = jwks
        self.failures = 0
        self.calls = 0
        self.finished = 0
        self._released = threading.Event()
        self._released.set()
        self._lock = threading.Lock()

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def __call__(self) -> list[dict[str, str]]:
        with self._lock:
            self.calls += 1
            failing = self.failures > 0
            if failing:
                self.failures -= 1
        assert self._released.wait(WAIT), "the test never released the fetch"
        with self._lock:
            self.finished += 1
        if failing:
            raise ConnectionError("auth service down")
        return [dict(jwk) for jwk in self.jwks]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def provider_for(
    fetcher: Callable[[], list[dict[str, str]]], clock: FakeClock, **kwargs: object
) -> JwksKeyProvider:
    outcomes: list[str] = []
    provider = JwksKeyProvider(
        fetcher,
        cooldown_seconds=10.0,
        clock=clock,
        on_fetch=outcomes.append,
        **kwargs,  # type: ignore[arg-type]
    )
    provider.outcomes = outcomes  # type: ignore[attr-defined]
    return provider


def test_unknown_kid_fetches_once_then_known_kid_is_served_from_memory(clock: FakeClock) -> None:
    _, jwk = new_key("k1")
    fetcher = FakeFetcher([jwk])
    provider = provider_for(fetcher, clock)

    first = provider.key("k1")
    assert first is not None
    assert first.kid == "k1"
    assert first.algorithm == "EdDSA"
    assert fetcher.calls == 1
    for _ in range(5):
        assert provider.key("k1") is first
    assert fetcher.calls == 1
    assert provider.outcomes == ["ok"]  # type: ignore[attr-defined]


def test_unknown_kid_refetches_at_most_once_per_cooldown(clock: FakeClock) -> None:
    _, jwk = new_key("k1")
    fetcher = FakeFetcher([jwk])
    provider = provider_for(fetcher, clock)

    assert provider.key("nope") is None
    assert fetcher.calls == 1
    for _ in range(10):
        assert provider.key("nope") is None
        assert provider.key("other") is None
    assert fetcher.calls == 1  # inside the cooldown: no fetch
    clock.advance(9.9)
    assert provider.key("nope") is None
    assert fetcher.calls == 1
    clock.advance(0.2)
    assert provider.key("nope") is None
    assert fetcher.calls == 2
    assert provider.key("k1") is not None  # known kids never wait for the cooldown
    assert fetcher.calls == 2


def test_failed_fetch_keeps_previous_keys_and_never_raises(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    _, jwk = new_key("k1")
    fetcher = FakeFetcher([jwk])
    provider = provider_for(fetcher, clock)
    assert provider.refresh() is True

    fetcher.failures = 5
    clock.advance(11)
    assert provider.key("k2") is None  # refetch fails: no exception
    assert fetcher.calls == 2
    assert provider.key("k1") is not None
    assert provider.refresh() is False
    assert provider.kids() == {"k1"}
    assert provider.outcomes == ["ok", "error", "error"]  # type: ignore[attr-defined]
    assert "keeping the 1 keys" in caplog.text


def test_failure_before_any_success_leaves_no_keys(clock: FakeClock) -> None:
    fetcher = FakeFetcher([])
    fetcher.failures = 1
    provider = provider_for(fetcher, clock)
    assert provider.key("k1") is None
    assert provider.has_keys is False


def test_rotation_replaces_the_key_set(clock: FakeClock) -> None:
    _, old = new_key("old")
    _, new = new_key("new")
    fetcher = FakeFetcher([old])
    provider = provider_for(fetcher, clock)
    assert provider.key("old") is not None

    fetcher.jwks = [new]
    clock.advance(11)
    assert provider.key("new") is not None  # unknown kid → refetch → found
    assert provider.key("old") is None  # vanished from the JWKS: no longer trusted
    assert provider.kids() == {"new"}


def test_rotation_overlap_keeps_both_while_both_are_published(clock: FakeClock) -> None:
    _, old = new_key("old")
    _, new = new_key("new")
    fetcher = FakeFetcher([old])
    provider = provider_for(fetcher, clock)
    provider.refresh()
    fetcher.jwks = [new, old]
    clock.advance(11)
    assert provider.key("new") is not None
    assert provider.key("old") is not None


def test_unusable_jwks_are_skipped(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    _, good = new_key("good")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    _, other = new_key("x")
    bad = [
        {"kid": "rsa", "kty": "RSA", "n": "AQAB", "e": "AQAB", "alg": "RS256"},
        {**to_jwk(p384), "kid": "p384"},
        {"kid": "noX", "kty": "OKP", "crv": "Ed25519"},
        {**other, "kid": "enc", "use": "enc"},
        {**other, "kid": "wrongalg", "alg": "ES256"},
    ]
    provider = provider_for(FakeFetcher([*bad, good]), clock)
    assert provider.key("good") is not None
    assert provider.kids() == {"good"}
    assert caplog.text.count("skipping an unusable JWK") == len(bad)


def test_a_jwks_without_usable_keys_counts_as_a_failure(clock: FakeClock) -> None:
    _, good = new_key("good")
    fetcher = FakeFetcher([good])
    provider = provider_for(fetcher, clock)
    provider.refresh()
    fetcher.jwks = [{"kid": "rsa", "kty": "RSA", "n": "AQAB", "e": "AQAB"}]
    assert provider.refresh() is False
    fetcher.jwks = []
    assert provider.refresh() is False
    assert provider.kids() == {"good"}


def lookups_during_one_fetch(
    provider: JwksKeyProvider, fetcher: FakeFetcher, kid: str
) -> list[bool]:
    """16 concurrent `key(kid)` calls, the fetch held until all but the fetching one wait
    in `key` for it (blocked on the provider's lock: their innermost Python frame is
    `key`); whether each one found the key."""
    fetcher.hold()
    found: dict[int, bool] = {}
    threads = [
        threading.Thread(target=lambda n=n: found.update({n: provider.key(kid) is not None}))
        for n in range(16)
    ]
    for thread in threads:
        thread.start()

    def waiting_in_key() -> int:
        frames = sys._current_frames()
        return sum(
            1
            for t in threads
            if t.ident in frames and frames[t.ident].f_code is JwksKeyProvider.key.__code__
        )

    # A provider that let a second lookup fetch would never get here: the test then
    # releases the fetches, and the count of calls below tells.
    wait_for(lambda: fetcher.calls >= 1 and waiting_in_key() == len(threads) - 1)
    fetcher.release()
    for thread in threads:
        thread.join(WAIT)
    return [found[n] for n in range(len(threads))]


def test_concurrent_unknown_kid_lookups_cause_one_fetch(clock: FakeClock) -> None:
    _, jwk = new_key("k1")
    fetcher = FakeFetcher([jwk])
    provider = provider_for(fetcher, clock)
    assert all(lookups_during_one_fetch(provider, fetcher, "k1"))
    assert fetcher.calls == 1


def test_concurrent_lookups_of_a_missing_kid_cause_one_fetch(clock: FakeClock) -> None:
    _, jwk = new_key("k1")
    fetcher = FakeFetcher([jwk])
    provider = provider_for(fetcher, clock)
    assert not any(lookups_during_one_fetch(provider, fetcher, "missing"))
    assert fetcher.calls == 1


def wait_for(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def test_background_refresh_retries_until_keys_arrive_then_refreshes_periodically(
    clock: FakeClock,
) -> None:
    _, jwk = new_key("k1")
    fetcher = FakeFetcher([jwk])
    fetcher.failures = 3
    provider = provider_for(
        fetcher,
        clock,
        refresh_interval_seconds=0.1,
        initial_backoff_seconds=0.01,
        max_backoff_seconds=0.04,
    )
    before = set(threading.enumerate())
    provider.start_background_refresh()
    (refresher,) = set(threading.enumerate()) - before
    try:
        assert wait_for(lambda: provider.has_keys)
        # Three failures, then the success (then periodic refreshes, which may have begun).
        assert provider.outcomes[:4] == ["error", "error", "error", "ok"]  # type: ignore[attr-defined]
        assert provider.key("k1") is not None
        # The refresh interval is real time: the provider waits on it, no event exists.
        assert wait_for(lambda: fetcher.calls >= 5)  # periodic refresh
    finally:
        provider.close()
    assert not refresher.is_alive()  # stopped: nothing fetches any more


def test_background_refresh_does_not_block_start(clock: FakeClock) -> None:
    fetcher = FakeFetcher([])
    fetcher.hold()  # the first fetch does not end until start has returned
    provider = provider_for(fetcher, clock, initial_backoff_seconds=0.01)
    provider.start_background_refresh()
    try:
        assert fetcher.finished == 0
    finally:
        fetcher.release()
        provider.close()


# -- end to end with TokenVerifier ---------------------------------------------------------


def sign(private: ed25519.Ed25519PrivateKey, kid: str, clock: FakeClock, **extra: object) -> str:
    now = int(clock.now().timestamp())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "roles": ["user"],
        **extra,
    }
    return jwt.encode(claims, private, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt"})


def test_token_verifier_with_jwks_provider_verifies_and_follows_rotation(clock: FakeClock) -> None:
    private, jwk = new_key("k1")
    fetcher = FakeFetcher([jwk])
    provider = provider_for(fetcher, clock)
    verifier = TokenVerifier(provider, issuer=ISSUER, audience=AUDIENCE, clock=clock)

    principal = verifier.verify(sign(private, "k1", clock, roles=["user", "admin"]))
    assert principal.user_id == "user-1"
    assert principal.roles == {"user", "admin"}
    assert principal.is_admin

    # A token from a key the auth service has not published yet is rejected...
    private2, jwk2 = new_key("k2")
    token2 = sign(private2, "k2", clock)
    with pytest.raises(Unauthenticated):
        verifier.verify(token2)
    # ...and accepted once it is published and the cooldown has passed.
    fetcher.jwks = [jwk, jwk2]
    clock.advance(11)
    assert verifier.verify(token2).user_id == "user-1"

    # A token whose kid is known but signed by another key fails the signature check.
    forged = sign(ed25519.Ed25519PrivateKey.generate(), "k1", clock, jti="forged")
    with pytest.raises(Unauthenticated):
        verifier.verify(forged)


# -- over gRPC -----------------------------------------------------------------------------


def serve_auth(port: int, jwks: list[dict[str, str]]) -> grpc.Server:
    """A stand-in auth service with only GetJwks (the real one needs a database)."""

    def get_jwks(request: auth_pb2.GetJwksRequest, context: object) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.Jwk(**jwk) for jwk in jwks])

    handler = grpc.method_handlers_generic_handler(
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
        {
            "GetJwks": grpc.unary_unary_rpc_method_handler(
                get_jwks,
                request_deserializer=auth_pb2.GetJwksRequest.FromString,
                response_serializer=auth_pb2.GetJwksResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


@pytest.fixture
def auth_port() -> int:
    return free_port()


def test_grpc_fetcher_returns_only_non_empty_members(auth_port: int) -> None:
    _, jwk = new_key("k1")
    server = serve_auth(auth_port, [jwk])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{auth_port}") as channel:
            fetched = grpc_jwks_fetcher(channel, timeout=WAIT)()
    finally:
        server.stop(None)
    assert fetched == [jwk]
    assert set(fetched[0]) == {"kid", "kty", "alg", "use", "crv", "x"}


def test_provider_starts_while_auth_is_down_and_gets_keys_once_it_is_up(
    auth_port: int, clock: FakeClock
) -> None:
    private, jwk = new_key("k1")
    address = f"127.0.0.1:{auth_port}"
    with grpc.insecure_channel(address, options=AUTH_CHANNEL_OPTIONS) as channel:
        provider = provider_for(
            grpc_jwks_fetcher(channel, timeout=5.0),
            clock,
            initial_backoff_seconds=0.02,
            max_backoff_seconds=0.1,
        )
        provider.start_background_refresh()
        server = None
        try:
            assert wait_for(lambda: "error" in provider.outcomes)  # type: ignore[attr-defined]
            assert provider.key("k1") is None  # down: no key, no exception
            server = serve_auth(auth_port, [jwk])
            assert wait_for(lambda: provider.has_keys)
            verifier = TokenVerifier(provider, issuer=ISSUER, audience=AUDIENCE, clock=clock)
            assert verifier.verify(sign(private, "k1", clock)).user_id == "user-1"
        finally:
            provider.close()
            if server is not None:
                server.stop(None)


def test_a_revoked_key_is_dropped_at_once_never_taken_back_and_its_successor_fetched(
    clock: FakeClock,
) -> None:
    _, old = new_key("old")
    _, leaked = new_key("leaked")
    _, successor = new_key("successor")
    fetcher = FakeFetcher([old, leaked])
    provider = provider_for(fetcher, clock)
    assert provider.key("leaked") is not None  # fetched (and the cooldown starts now)
    generation = provider.generation
    # The source still publishes it for a moment (a replica not yet reloaded) and already
    # has the successor: the revocation drops it and fetches, whatever the cooldown.
    fetcher.jwks = [old, leaked, successor]
    provider.revoke(["leaked"])
    assert provider.generation == generation + 1  # remembered tokens are checked again
    assert provider.kids() == {"old", "successor"}
    clock.advance(11)
    provider.refresh()
    assert "leaked" not in provider.kids()  # never taken back from a fetch
    calls = fetcher.calls
    provider.revoke(["leaked"])  # known already: nothing to do
    assert fetcher.calls == calls


def test_after_a_revocation_an_unknown_kid_is_fetched_without_the_long_cooldown(
    clock: FakeClock,
) -> None:
    _, old = new_key("old")
    _, leaked = new_key("leaked")
    _, successor = new_key("successor")
    fetcher = FakeFetcher([old, leaked])
    provider = provider_for(fetcher, clock)  # cooldown 10 s
    assert provider.key("leaked") is not None
    provider.revoke(["leaked"])  # its fetch finds no successor yet (a replica lags)
    assert provider.key("successor") is None
    fetcher.jwks = [old, successor]
    clock.advance(1.5)  # well within the 10 s cooldown, past the eager one
    assert provider.key("successor") is not None
