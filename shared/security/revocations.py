"""Token revocations on the verifying side: which subjects' tokens issued before a moment
are refused, learned by polling the auth service (`AuthService.GetRevocations`).

The auth service records a revocation when a user is disabled, loses a role, is logged
out everywhere or changes their password, and when a service account is deleted. A
verifier polls every `interval` seconds and checks every token against what it learned —
remembered (already verified) tokens too — so a revoked token stops working here within
one poll interval and one call's time while the auth service answers. While it does not
(it is down), nothing new is learned: what was learned is kept, and tokens expire on
their own within their lifetime (15 minutes).

Each poll asks for the revocations recorded since the previous reply's server time minus
a margin (a revocation committed late, by a slow transaction, is still seen); a
revocation seen twice changes nothing. A reply carries at most 10,000 (oldest first) and
says when it left some out: the poll then asks again from the last one's create_time, up
to MAX_REPLIES_PER_POLL replies, before it moves on to the server time. An entry is
forgotten once no token it covers can be live (its `not_before` older than the longest
token lifetime plus a margin).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from shared.config.clock import Clock, utc
from shared.security.jwks import describe_failure

__all__ = [
    "RevocationFetch",
    "RevocationPoller",
    "RevocationReply",
    "Revocations",
    "grpc_revocation_fetch",
]

_log = logging.getLogger(__name__)


class RevocationReply(NamedTuple):
    entries: list[tuple[str, datetime]]
    """Revocations (subject, not_before) recorded since the moment asked, oldest first."""
    server_time: datetime
    """The source's clock when it answered."""
    revoked_kids: list[str]
    """Signing keys revoked lately (their kids)."""
    resume: datetime | None = None
    """Set when the reply left revocations out: ask again from this moment (the create
    time of the last one it carries)."""


RevocationFetch = Callable[[datetime | None], RevocationReply]
"""The revocations recorded since a moment (None: all in force)."""

OVERLAP = timedelta(seconds=60)
# Replies one poll reads when each says it left some out (10,000 revocations each).
MAX_REPLIES_PER_POLL = 100


class Revocations:
    """subject → the moment before which its tokens are refused (epoch seconds)."""

    def __init__(self) -> None:
        self._not_before: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, entries: Iterable[tuple[str, datetime]]) -> int:
        """Learns entries (the later moment wins); how many changed something."""
        changed = 0
        with self._lock:
            updated = dict(self._not_before)
            for subject, moment in entries:
                stamp = moment.timestamp()
                if updated.get(subject, float("-inf")) < stamp:
                    updated[subject] = stamp
                    changed += 1
            self._not_before = updated  # replaced whole: readers never see it half-built
        return changed

    def forget_before(self, cutoff: float) -> None:
        with self._lock:
            self._not_before = {s: t for s, t in self._not_before.items() if t >= cutoff}

    def covers(self, subject: str, actor: str, issued_at: float) -> bool:
        """Whether a token of `subject` (acting through `actor`) issued at `issued_at` is
        revoked. One dict lookup (two for a delegated token) on the hot path."""
        table = self._not_before
        if not table:
            return False
        moment = table.get(subject)
        if moment is not None and issued_at < moment:
            return True
        if actor:
            moment = table.get(actor)
            return moment is not None and issued_at < moment
        return False

    def __len__(self) -> int:
        return len(self._not_before)


def grpc_revocation_fetch(channel: grpc.Channel, timeout: float = 2.0) -> RevocationFetch:
    """A fetch calling `AuthService.GetRevocations` (public: no credentials)."""
    stub = auth_pb2_grpc.AuthServiceStub(channel)

    def fetch(since: datetime | None) -> RevocationReply:
        request = auth_pb2.GetRevocationsRequest()
        if since is not None:
            request.since_time.FromDatetime(since)
        reply: Any = stub.GetRevocations(request, timeout=timeout)
        entries = [(r.subject, utc(r.not_before.ToDatetime())) for r in reply.revocations]
        resume = (
            utc(reply.revocations[-1].create_time.ToDatetime())
            if reply.truncated and reply.revocations
            else None
        )
        return RevocationReply(
            entries, utc(reply.server_time.ToDatetime()), list(reply.revoked_kids), resume
        )

    return fetch


class RevocationPoller:
    """Polls `fetch` every `interval_seconds` on a thread into `revocations`."""

    def __init__(
        self,
        fetch: RevocationFetch,
        revocations: Revocations,
        *,
        interval_seconds: float,
        token_lifetime_seconds: float,
        clock: Clock,
        on_poll: Callable[[str], None] | None = None,
        on_revoked_kids: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._on_revoked_kids = on_revoked_kids
        self.revocations = revocations
        self._interval = interval_seconds
        self._keep = token_lifetime_seconds + OVERLAP.total_seconds()
        self._clock = clock
        self._on_poll = on_poll or (lambda _result: None)
        self._since: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._polls = 0
        self._polled = threading.Condition()

    def poll(self) -> bool:
        """One poll (every reply it takes to catch up); False if the source could not be
        asked. A failure after some replies keeps what they taught, and the next poll
        asks from the same moment again."""
        since = self._since
        learned = 0
        caught_up = False
        for _reply in range(MAX_REPLIES_PER_POLL):
            try:
                reply = self._fetch(since)
            except Exception as exc:  # a source down: keep what is known, try again
                _log.warning("revocations: poll failed: %s", describe_failure(exc))
                self._on_poll("error")
                return False
            if reply.revoked_kids and self._on_revoked_kids is not None:
                self._on_revoked_kids(reply.revoked_kids)
            learned += self.revocations.add(reply.entries)
            if reply.resume is None:
                caught_up = True
                break
            if since is not None and reply.resume <= since:  # cannot move on from here
                _log.warning("revocations: over a reply's worth recorded at %s", since)
                caught_up = True
                break
            since = reply.resume
        if learned:
            _log.info("revocations: %d learned (%d known)", learned, len(self.revocations))
        if caught_up:
            self._since = reply.server_time - OVERLAP
        else:  # the next poll goes on from here
            _log.warning("revocations: more after %d replies", MAX_REPLIES_PER_POLL)
            self._since = since
        self.revocations.forget_before(self._clock.now().timestamp() - self._keep)
        self._on_poll("ok")
        with self._polled:
            self._polls += 1
            self._polled.notify_all()
        return True

    def wait_for_polls(self, count: int, timeout: float) -> bool:
        with self._polled:
            return self._polled.wait_for(lambda: self._polls >= count, timeout)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="revocations", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
