"""A service's life after start-up: serving until told to stop, stopping cleanly, and the
resources its composition root built (released last first).

Signals. A signal handler here does nothing but exist: `signal.set_wakeup_fd` has the
interpreter write each signal's number to a pipe from its C-level handler, and the main
thread does nothing but wait on that pipe with `select()`. So no Python code ever runs
inside a signal handler (no lock can be re-entered: an earlier version set a
threading.Event in the handler and hung when a second signal arrived while the first
one's `set()` held the event's lock), the main thread never sleeps in an uninterruptible
lock wait, and any number of signals at any moment are simply read in turn.

Stopping (`serve`): the first SIGTERM or SIGINT starts the shutdown on a thread of its own
(RunningServer.shutdown: NOT_SERVING for `SHUTDOWN_DELAY_SECONDS`, drain for
`GRACE_SECONDS`, end the rest with UNAVAILABLE); further SIGTERMs change nothing; a second
SIGINT (a second Ctrl-C) stops at once. Ctrl-C on `scripts/run` sends SIGINT to the whole
process group and the launcher follows with SIGTERM: one Ctrl-C is one graceful stop.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from collections.abc import Callable
from types import FrameType

from shared.config.settings import CommonSettings
from shared.rpc.server import RunningServer

__all__ = ["EXIT_FORCED", "Closers", "ShutdownSignals", "serve"]

_log = logging.getLogger(__name__)

EXIT_FORCED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Closers:
    """Release functions in the order their resources were built; `close()` runs them last
    first (a cache before the Redis client it uses), logs a failure and goes on with the
    rest. Closing twice closes once."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def add(self, close: Callable[[], None]) -> None:
        with self._lock:
            self._closers.append(close)

    def close(self) -> None:
        with self._lock:
            closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                close()
            except Exception:
                _log.exception("error while releasing %r", close)


def _noted(_signum: int, _frame: FrameType | None) -> None:
    """The Python-level handler: the wakeup pipe carries the signal, nothing to do here."""


class ShutdownSignals:
    """SIGTERM and SIGINT delivered as numbers read from a pipe (see the module docstring).
    Only for the main thread (the only one signals are handled on)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous_fd = -1
        self._previous: dict[int, object] = {}

    def __enter__(self) -> ShutdownSignals:
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, _noted)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)

    def received(self, timeout: float | None) -> list[int]:
        """The stop signals received since the last call, waiting up to `timeout` seconds
        (None: until one arrives) when there are none yet."""
        while True:
            ready, _, _ = select.select([self._read], [], [], timeout)
            if not ready:
                return []
            try:
                data = os.read(self._read, 512)
            except BlockingIOError:
                data = b""
            signals = [number for number in data if number in STOP_SIGNALS]
            if signals or timeout is not None:
                return signals


def serve(running: RunningServer, settings: CommonSettings) -> int:
    """Runs until SIGTERM or SIGINT, then stops (see the module docstring); returns the
    exit code: 0 after a graceful stop, EXIT_FORCED after a second Ctrl-C."""
    with ShutdownSignals() as signals:
        running.start()
        _log.info(
            "%s listening on %s:%d (%s)%s",
            settings.service,
            settings.host,
            running.port,
            running.transport,
            f", health on port {running.health_port} (plaintext)" if running.health_port else "",
        )
        first = signals.received(None)[0]
        _log.info(
            "received %s: stopping (NOT_SERVING for %.1fs, then up to %.1fs to drain)",
            signal.Signals(first).name,
            settings.shutdown_delay_seconds,
            settings.grace_seconds,
        )
        stopper = threading.Thread(
            target=running.shutdown,
            kwargs={"delay": settings.shutdown_delay_seconds, "grace": settings.grace_seconds},
            name="shutdown",
            daemon=True,
        )
        stopper.start()
        interrupts = int(first == signal.SIGINT)
        while stopper.is_alive():
            for signum in signals.received(0.2):
                interrupts += signum == signal.SIGINT
                if interrupts >= 2 and not running.forced:
                    _log.warning("second interrupt: stopping now")
                    running.force()
        stopper.join()
    _log.info("%s stopped", settings.service)
    return EXIT_FORCED if running.forced else 0
