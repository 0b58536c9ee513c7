"""Child processes that serve beside a service's own process (agent_svc's watch workers).

`Children` runs `count` copies of a command, each with the service's environment plus
what the caller adds, and keeps them running:

- a child that exits while the service runs is logged (its exit code or signal) and
  started again a second later; one that keeps exiting within a minute of its start
  waits twice as long each time, up to a minute (a child that cannot start does not spin
  a core), and a start that fails (fork refused, the interpreter gone) is retried the
  same way: the supervising thread never ends before `terminate()`;
- `stop()` sends each child SIGTERM, waits for them to drain (the caller's grace), then
  kills what is left; `kill()` kills them at once (a forced stop);
- the children are in a session of their own, so a Ctrl-C at a terminal reaches the
  service alone, which stops them itself; and a child ends when the service's process
  dies without stopping it (`kill -9`): `stop_with_parent()`, called by the child as it
  starts, asks Linux for SIGTERM when its parent goes (the parent-death signal).

One thread starts every child and waits for them: Linux sends the parent-death signal
when the *thread* that started a child ends, so that thread lives as long as they do.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["PARENT_PID_VARIABLE", "Children", "stop_with_parent"]

_log = logging.getLogger(__name__)

PARENT_PID_VARIABLE = "AGENTPLATFORM_PARENT_PID"
"""Set in every child's environment: the pid of the process that supervises it."""

_PR_SET_PDEATHSIG = 1  # prctl(2)
RESTART_SECONDS = 1.0
MAX_RESTART_SECONDS = 60.0
STABLE_SECONDS = 60.0
"""A child that ran this long before it exited is restarted after RESTART_SECONDS again."""


def restart_delay(quick_exits: int) -> float:
    """How long to wait before a start, when `quick_exits` exits (or failed starts) in a
    row within STABLE_SECONDS of their starts came before this one."""
    return min(MAX_RESTART_SECONDS, RESTART_SECONDS * float(2 ** min(quick_exits, 10)))


def stop_with_parent() -> None:
    """In a child of `Children`: SIGTERM to this process when the parent dies (Linux; a
    no-op elsewhere), and at once if it is already gone (re-parented before this ran)."""
    expected = os.environ.get(PARENT_PID_VARIABLE)
    if expected is None:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Child:
    """One child's place: its process while it runs; when to start it again otherwise."""

    process: subprocess.Popen[bytes] | None = None
    due: float = 0.0
    started: float = 0.0
    quick_exits: int = 0
    """Exits (or failed starts) in a row within STABLE_SECONDS of their starts."""


class Children:
    """`count` copies of `command`, kept running until `stop()` (module docstring)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        count: int,
        env: Mapping[str, str],
    ) -> None:
        self._name = name
        self._command = list(command)
        self._env = {**os.environ, **env, PARENT_PID_VARIABLE: str(os.getpid())}
        self._children = [_Child() for _ in range(count)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._terminated_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}s", daemon=True)

    @property
    def pids(self) -> list[int]:
        """The running children's pids."""
        return [p.pid for p in self._running()]

    def start(self) -> None:
        """Starts every child (returns once each has been started, not once it serves)."""
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        while not self._stopping.is_set():
            for index, child in enumerate(self._children):
                if self._stopping.is_set():
                    break
                try:
                    self._tend(index, child)
                except Exception:  # never let the thread end: its end SIGTERMs the children
                    _log.exception("%s %d: supervising it failed", self._name, index)
            self._started.set()  # after the first pass: each child started, or its failure
            self._stopping.wait(0.1)
        self._started.set()

    def _tend(self, index: int, child: _Child) -> None:
        """Starts the child if it is due, or notes its exit and when to start it again."""
        now = time.monotonic()
        process = child.process
        if process is None:
            if now >= child.due:
                self._spawn(index, child, now)
            return
        code = process.poll()
        if code is None:
            return
        ran = now - child.started
        quick = ran < STABLE_SECONDS
        delay = restart_delay(child.quick_exits if quick else 0)
        child.quick_exits = child.quick_exits + 1 if quick else 0
        child.due = now + delay
        with self._lock:
            child.process = None
        _log.error(
            "%s %d (pid %d) %s after %.0fs: starting it again in %.0fs",
            self._name,
            index,
            process.pid,
            _ended(code),
            ran,
            delay,
        )

    def _spawn(self, index: int, child: _Child, now: float) -> None:
        try:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                self._command, env=self._env, start_new_session=True
            )
        except OSError as exc:
            child.due = now + restart_delay(child.quick_exits)
            child.quick_exits += 1
            _log.error(
                "%s %d could not be started (%s): trying again in %.0fs",
                self._name,
                index,
                exc,
                child.due - now,
            )
            return
        with self._lock:
            child.process = process
        child.started = now
        _log.info("%s %d started (pid %d)", self._name, index, process.pid)

    def terminate(self) -> None:
        """No more restarts; SIGTERM to each child (they drain meanwhile; `stop` waits)."""
        if self._terminated_at is None:
            self._terminated_at = time.monotonic()
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        for process in self._running():
            process.send_signal(signal.SIGTERM)

    def stop(self, grace: float) -> None:
        """SIGTERM to each child (if `terminate` has not); those still running `grace`
        seconds after the SIGTERM are killed."""
        self.terminate()
        assert self._terminated_at is not None
        deadline = self._terminated_at + grace
        for process in self._running():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log.warning("%s (pid %d) still running: killed", self._name, process.pid)
                process.send_signal(signal.SIGKILL)
                process.wait()

    def kill(self) -> None:
        """Kills every child now (a forced stop)."""
        self._stopping.set()
        for process in self._running():
            process.send_signal(signal.SIGKILL)

    def _running(self) -> list[subprocess.Popen[bytes]]:
        with self._lock:
            processes = [c.process for c in self._children]
        return [p for p in processes if p is not None and p.poll() is None]


def _ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
