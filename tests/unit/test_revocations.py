"""Revoked tokens are refused by the verifier, remembered ones included, once learned."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from shared.rpc.errors import Unauthenticated
from shared.security.jwk import VerificationKey, algorithm_for, thumbprint
from shared.security.revocations import OVERLAP, RevocationPoller, RevocationReply, Revocations
from shared.security.tokens import StaticKeyProvider, TokenVerifier
from tests.helpers import FakeClock, free_port

ISSUER, AUDIENCE = "https://auth.test", "agentplatform-test"


class Issuer:
    def __init__(self, clock: FakeClock) -> None:
        self.private = ed25519.Ed25519PrivateKey.generate()
        self.kid = thumbprint(self.private.public_key())
        self.clock = clock

    def keys(self) -> StaticKeyProvider:
        public = self.private.public_key()
        return StaticKeyProvider([VerificationKey(self.kid, algorithm_for(public), public)])

    def token(self, subject: str, *, actor: str = "") -> str:
        now = int(self.clock.now().timestamp())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "iat": now,
            "exp": now + 900,
            "jti": uuid.uuid4().hex,
            "roles": ["user"],
        }
        if actor:
            claims["act"] = {"sub": actor}
        return jwt.encode(
            claims, self.private, algorithm="EdDSA", headers={"kid": self.kid, "typ": "at+jwt"}
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2031, 1, 1, tzinfo=UTC))


def test_a_remembered_token_is_refused_once_its_subject_is_revoked(clock: FakeClock) -> None:
    issuer = Issuer(clock)
    revocations = Revocations()
    results: list[str] = []
    verifier = TokenVerifier(
        issuer.keys(),
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=clock,
        revocations=revocations,
        on_result=results.append,
    )
    token = issuer.token("ada")
    other = issuer.token("bob")
    verifier.verify(token)
    verifier.verify(token)
    assert results == ["verified", "cached"]
    clock.advance(10)
    revocations.add([("ada", clock.now())])
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)  # remembered, and still refused
    assert caught.value.reason == "TOKEN_REVOKED"
    assert results[-1] == "revoked"
    assert verifier.verify(other).user_id == "bob"
    clock.advance(1)
    fresh = issuer.token("ada")  # issued after the moment: accepted
    assert verifier.verify(fresh).user_id == "ada"


def test_recheck_refuses_a_principal_verified_earlier_once_revoked_or_expired(
    clock: FakeClock,
) -> None:
    """What a WatchAgents stream asks of the principal its call began with."""
    issuer = Issuer(clock)
    revocations = Revocations()
    verifier = TokenVerifier(
        issuer.keys(), issuer=ISSUER, audience=AUDIENCE, clock=clock, revocations=revocations
    )
    ada, bob = verifier.verify(issuer.token("ada")), verifier.verify(issuer.token("bob"))
    verifier.recheck(ada)  # still good
    clock.advance(1)
    revocations.add([("ada", clock.now())])
    with pytest.raises(Unauthenticated) as revoked:
        verifier.recheck(ada)
    assert revoked.value.reason == "TOKEN_REVOKED"
    verifier.recheck(bob)
    clock.advance(900 + 30)  # past exp and the verifier's leeway
    with pytest.raises(Unauthenticated) as expired:
        verifier.recheck(bob)
    assert expired.value.reason == "TOKEN_EXPIRED"


def test_revoking_a_service_account_refuses_what_it_does_for_users(clock: FakeClock) -> None:
    issuer = Issuer(clock)
    revocations = Revocations()
    verifier = TokenVerifier(
        issuer.keys(), issuer=ISSUER, audience=AUDIENCE, clock=clock, revocations=revocations
    )
    delegated = issuer.token("ada", actor="svc")
    verifier.verify(delegated)
    clock.advance(1)
    revocations.add([("svc", clock.now())])
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(delegated)
    assert caught.value.reason == "TOKEN_REVOKED"


def test_the_later_moment_wins_and_old_entries_are_forgotten() -> None:
    revocations = Revocations()
    early = datetime(2031, 1, 1, tzinfo=UTC)
    assert revocations.add([("ada", early + timedelta(seconds=5)), ("ada", early)]) == 1
    assert revocations.covers("ada", "", early.timestamp() + 4)
    assert not revocations.covers("ada", "", early.timestamp() + 5)
    revocations.forget_before(early.timestamp() + 6)
    assert len(revocations) == 0


def test_the_poller_asks_since_its_last_answer_with_a_margin_and_survives_failures(
    clock: FakeClock,
) -> None:
    asked: list[datetime | None] = []
    answers: list[object] = [
        RevocationReply([("ada", clock.now())], clock.now(), []),
        ConnectionError("auth_svc is down"),
        RevocationReply([("bob", clock.now())], clock.now() + timedelta(seconds=2), ["kid-1"]),
    ]
    kids: list[list[str]] = []

    def fetch(since: datetime | None) -> RevocationReply:
        asked.append(since)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    polls: list[str] = []
    poller = RevocationPoller(
        fetch,
        Revocations(),
        interval_seconds=1,
        token_lifetime_seconds=900,
        clock=clock,
        on_poll=polls.append,
        on_revoked_kids=kids.append,
    )
    assert poller.poll()
    assert not poller.poll()  # kept what it knew
    assert poller.revocations.covers("ada", "", clock.now().timestamp() - 1)
    assert poller.poll()
    assert asked == [None, clock.now() - OVERLAP, clock.now() - OVERLAP]
    assert polls == ["ok", "error", "ok"]
    assert len(poller.revocations) == 2
    assert kids == [["kid-1"]]


def test_the_poller_runs_on_a_thread_until_stopped(clock: FakeClock) -> None:
    calls = threading.Semaphore(0)

    def fetch(since: datetime | None) -> RevocationReply:
        calls.release()
        return RevocationReply([], clock.now(), [])

    poller = RevocationPoller(
        fetch, Revocations(), interval_seconds=0.01, token_lifetime_seconds=900, clock=clock
    )
    poller.start()
    assert poller.wait_for_polls(3, timeout=30)
    poller.stop()


def test_a_poll_reads_on_while_replies_say_they_left_revocations_out(clock: FakeClock) -> None:
    """More revocations than one reply carries (a mass disable): the poll asks again from
    the last one's create time until it has them all, and only then moves on."""
    start = clock.now()
    recorded = [(f"user-{n}", start + timedelta(milliseconds=n)) for n in range(7)]
    asked: list[datetime | None] = []

    def fetch(since: datetime | None) -> RevocationReply:  # 3 per reply, oldest first
        asked.append(since)
        due = [r for r in recorded if since is None or r[1] >= since]
        return RevocationReply(
            due[:3], start + timedelta(seconds=5), [], due[2][1] if len(due) > 3 else None
        )

    poller = RevocationPoller(
        fetch, Revocations(), interval_seconds=1, token_lifetime_seconds=900, clock=clock
    )
    assert poller.poll()
    assert asked == [None, recorded[2][1], recorded[4][1]]
    for subject, moment in recorded:
        assert poller.revocations.covers(subject, "", moment.timestamp() - 1)
    assert poller.poll()
    assert asked[3] == start + timedelta(seconds=5) - OVERLAP  # caught up: from the clock


def test_a_poll_that_fails_half_way_asks_from_the_same_moment_next_time(
    clock: FakeClock,
) -> None:
    start = clock.now()
    replies: list[RevocationReply | Exception] = [
        RevocationReply([("ada", start)], start, [], start + timedelta(seconds=1)),
        ConnectionError("auth_svc went away"),
    ]
    asked: list[datetime | None] = []

    def fetch(since: datetime | None) -> RevocationReply:
        asked.append(since)
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    poller = RevocationPoller(
        fetch, Revocations(), interval_seconds=1, token_lifetime_seconds=900, clock=clock
    )
    assert not poller.poll()
    assert poller.revocations.covers("ada", "", start.timestamp() - 1)  # kept
    replies.append(RevocationReply([], start, []))
    assert poller.poll()
    assert asked == [None, start + timedelta(seconds=1), None]


def test_a_failed_poll_is_logged_on_one_line_with_its_status(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """auth_svc not up yet (scripts/run starts both): the warning names the status and its
    message, not the RpcError's own multi-line text with gRPC's debug string."""
    channel = grpc.insecure_channel(f"127.0.0.1:{free_port()}")  # nothing listens there

    def fetch(_since: datetime | None) -> RevocationReply:
        channel.unary_unary("/agentplatform.auth.v1.AuthService/GetRevocations")(b"", timeout=10)
        raise AssertionError("a call to a closed port succeeded")

    poller = RevocationPoller(
        fetch, Revocations(), interval_seconds=1, token_lifetime_seconds=900, clock=clock
    )
    try:
        with caplog.at_level(logging.WARNING, logger="shared.security.revocations"):
            assert not poller.poll()
    finally:
        channel.close()
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("revocations: poll failed: UNAVAILABLE: "), message
    assert "\n" not in message, message
    assert "debug_error_string" not in message, message
