"""A load driver that records every call, so a fault test can count what happened.

`Load` runs worker threads, each repeating one step (a call through a real stub, each with
its own deadline) until `stop()`. Every call becomes a `Call`: the method, which process
it went to, start and end (monotonic), the status code, the `ErrorInfo` reason, the
`RetryInfo` delay if the error carried one, and a payload the step extracted from the
reply (e.g. the version a read saw). `obedient()` is a client that does what RetryInfo
says: sleep the delay, send again; each attempt is its own `Call`.

`backwards_reads()` finds the pairs a monotonic-read guarantee forbids: two reads of one
key where the second started after the first ended and saw an older version.
"""

from __future__ import annotations

import bisect
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2

from tests.helpers import error_detail, rich_status

__all__ = ["Call", "Load", "backwards_reads", "outcome", "summarize"]

T = TypeVar("T")
OK = grpc.StatusCode.OK


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    target: str
    started: float
    ended: float
    code: grpc.StatusCode
    reason: str = ""
    retry_delay: float | None = None
    details: str = ""
    payload: Any = None

    @property
    def ok(self) -> bool:
        return bool(self.code == OK)

    @property
    def has_retry_info(self) -> bool:
        return self.retry_delay is not None

    def __str__(self) -> str:
        retry = f" retry={self.retry_delay:.2f}s" if self.retry_delay is not None else ""
        return (
            f"{self.method}@{self.target} {self.code.name} {self.reason}{retry} "
            f"[{self.started:.3f}..{self.ended:.3f}] {self.details[:120]!r}"
        )


def outcome(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, float | None, str]:
    """(code, ErrorInfo reason, RetryInfo delay or None, details) of a failed call."""
    status = rich_status(error.trailing_metadata())
    info = error_detail(status, error_details_pb2.ErrorInfo)
    retry = error_detail(status, error_details_pb2.RetryInfo)
    delay = retry.retry_delay.ToTimedelta().total_seconds() if retry is not None else None
    return error.code(), info.reason if info is not None else "", delay, error.details() or ""


class Load:
    """Worker threads calling real stubs; every call recorded."""

    def __init__(self) -> None:
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[str] = []

    # -- calls ------------------------------------------------------------------------

    def call(
        self,
        method: str,
        target: str,
        invoke: Callable[[], T],
        payload: Callable[[T], Any] | None = None,
    ) -> tuple[Call, Any]:
        """Runs one call and records it; returns the record and the reply (None on error)."""
        started = time.monotonic()
        try:
            reply = invoke()
        except grpc.RpcError as error:
            code, reason, delay, details = outcome(error)
            record = Call(method, target, started, time.monotonic(), code, reason, delay, details)
            self._add(record)
            return record, None
        record = Call(
            method,
            target,
            started,
            time.monotonic(),
            OK,
            payload=payload(reply) if payload is not None else None,
        )
        self._add(record)
        return record, reply

    def obedient(
        self,
        method: str,
        target: str,
        invoke: Callable[[], T],
        payload: Callable[[T], Any] | None = None,
    ) -> Any:
        """Calls until OK, sleeping each RetryInfo delay; gives up on an error without
        RetryInfo, or when the load stops."""
        while not self._stop.is_set():
            record, reply = self.call(method, target, invoke, payload)
            if record.ok:
                return reply
            if record.retry_delay is None:
                return None
            self._stop.wait(record.retry_delay)
        return None

    def _add(self, record: Call) -> None:
        with self._lock:
            self._calls.append(record)

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    # -- workers ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def pause(self, seconds: float) -> None:
        """Paces a worker (not a synchronization): returns early when the load stops."""
        self._stop.wait(seconds)

    def worker(self, name: str, step: Callable[[], None]) -> None:
        """Starts a thread repeating `step()` until `stop()`."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    step()
                except Exception:
                    self._errors.append(f"worker {name}:\n{traceback.format_exc()}")
                    return

        thread = threading.Thread(target=loop, name=f"load-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def steady(
        self, name: str, method: str, target: str, invoke: Callable[[], Any], pause: float
    ) -> None:
        """A worker repeating one kind of call (`invoke` builds and sends it), `pause`
        seconds apart."""

        def step() -> None:
            self.call(method, target, invoke)
            self.pause(pause)

        self.worker(name, step)

    def wait_for(self, condition: Callable[[list[Call]], bool], timeout: float, what: str) -> None:
        """Waits until `condition(calls)` holds (a generous deadline, then a failure)."""
        deadline = time.monotonic() + timeout
        while not condition(self.calls):
            self._raise_worker_errors()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{summarize(self.calls)}")
            time.sleep(0.02)

    def keep_going(self, seconds: float) -> None:
        """Lets the load run for a while (the outage window), surfacing worker errors."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._raise_worker_errors()
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        stuck = [t.name for t in self._threads if t.is_alive()]
        assert not stuck, f"load threads did not stop: {stuck}"
        self._raise_worker_errors()

    def _raise_worker_errors(self) -> None:
        if self._errors:
            raise AssertionError("a load worker failed:\n" + "\n".join(self._errors))

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def summarize(calls: Iterable[Call]) -> str:
    """Counts per method and outcome, e.g. `GetAgent OK 812, GetAgent UNAVAILABLE 3`."""
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for call in calls:
        counts[(call.method, call.code.name, call.reason)] += 1
    return ", ".join(
        f"{method} {code}{'/' + reason if reason else ''} {n}"
        for (method, code, reason), n in sorted(counts.items())
    )


def backwards_reads(
    reads: Iterable[Call], key: Callable[[Call], tuple[str, int]]
) -> list[tuple[Call, Call]]:
    """Pairs (earlier, later) of reads of one key where `later` started after `earlier`
    ended and saw a smaller version; `key(call)` gives (key, version) of an OK read."""
    by_key: dict[str, list[tuple[Call, int]]] = defaultdict(list)
    for read in reads:
        if read.ok:
            name, version = key(read)
            by_key[name].append((read, version))
    violations = []
    for observed in by_key.values():
        by_end = sorted(observed, key=lambda item: item[0].ended)
        ends = [read.ended for read, _ in by_end]
        # best[i]: the read with the highest version among by_end[:i + 1]
        best: list[tuple[Call, int]] = []
        for item in by_end:
            best.append(item if not best or item[1] > best[-1][1] else best[-1])
        for read, version in observed:
            finished_before = bisect.bisect_left(ends, read.started)
            if finished_before and best[finished_before - 1][1] > version:
                violations.append((best[finished_before - 1][0], read))
    return violations
