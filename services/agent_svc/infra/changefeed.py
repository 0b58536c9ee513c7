"""Cross-replica wake-up of the watch hubs (services.agent_svc.service.watch) over Redis
pub/sub: a commit that logged a change publishes on `agent:changes`; every replica's
listener wakes its hub, which reads the log. A message carries nothing (the log is the
truth): a lost one (Redis down, a listener reconnecting) only delays events until the hub's
next poll (AGENT_WATCH_POLL_SECONDS). Without Redis (the embedded default) the signal is
in-process only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["CHANNEL", "RedisChangeSignal"]

_log = logging.getLogger(__name__)
CHANNEL = "agent:changes"


class RedisChangeSignal:
    """ChangeSignal: wakes the local hub at once and the other replicas' through Redis."""

    def __init__(
        self, redis: Any, wake: Callable[[], None], *, channel: str = CHANNEL, poll: float = 1.0
    ) -> None:
        self._redis = redis
        self._wake = wake
        self._channel = channel
        self._poll = poll
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    def changed(self) -> None:
        self._wake()
        self._redis.publish(self._channel, b"1")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="watch-signal", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _listen(self) -> None:
        failures = 0
        while not self._stop.is_set():
            pubsub: Any = None
            try:
                pubsub = self._redis.pubsub()
                pubsub.subscribe(self._channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=self._poll)
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":
                        self.subscribed.set()
                        failures = 0
                        _log.info("watch signal subscribed to %s", self._channel)
                    # Any message: wake (a reconnect may have missed some; the read is cheap).
                    self._wake()
            except Exception:
                self.subscribed.clear()
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    _log.warning("watch signal: Redis pub/sub failed; polling", exc_info=True)
                self._stop.wait(min(5.0, 0.2 * failures))
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a broken connection
                        pubsub.close()
