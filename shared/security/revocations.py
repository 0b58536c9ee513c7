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
revocation seen twice changes nothing. An entry is forgotten once no token it covers can
be live (its `not_before` older than the longest token lifetime plus a margin).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from shared.config.clock import Clock, utc

__all__ = ["RevocationFetch", "RevocationPoller", "Revocations", "grpc_revocation_fetch"]

_log = logging.getLogger(__name__)

RevocationFetch = Callable[
    [datetime | None], tuple[list[tuple[str, datetime]], datetime, list[str]]
]
"""Revocations (subject, not_before) recorded since a moment (None: all in force), the
source's clock when it answered, and the signing keys revoked lately (their kids)."""

OVERLAP = timedelta(seconds=60)


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

    def fetch(
        since: datetime | None,
    ) -> tuple[list[tuple[str, datetime]], datetime, list[str]]:
        request = auth_pb2.GetRevocationsRequest()
        if since is not None:
            request.since_time.FromDatetime(since)
        reply: Any = stub.GetRevocations(request, timeout=timeout)
        entries = [(r.subject, utc(r.not_before.ToDatetime())) for r in reply.revocations]
        return entries, utc(reply.server_time.ToDatetime()), list(reply.revoked_kids)

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
        """One poll; False if the source could not be asked."""
        try:
            entries, server_time, revoked_kids = self._fetch(self._since)
        except Exception as exc:  # a source down: keep what is known, try again
            _log.warning("revocations: poll failed: %s", exc)
            self._on_poll("error")
            return False
        if revoked_kids and self._on_revoked_kids is not None:
            self._on_revoked_kids(revoked_kids)
        learned = self.revocations.add(entries)
        if learned:
            _log.info("revocations: %d learned (%d known)", learned, len(self.revocations))
        self._since = server_time - OVERLAP
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
