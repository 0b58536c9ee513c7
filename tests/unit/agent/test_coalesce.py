"""CoalescedMget with a scripted connection: who sends, what each caller gets back."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import redis

from services.agent_svc.infra.coalesce import CoalescedMget, _Read


class ScriptedConnection:
    """Answers MGET with each key's value in `store`; `hold` makes the next reply wait
    until `release()`, so callers can be lined up behind a batch on the wire."""

    def __init__(self, store: dict[str, bytes]) -> None:
        self.store = store
        self.commands: list[tuple[Any, ...]] = []
        self.disconnects = 0
        self.fail_next: Exception | None = None
        self.hold = False
        self.on_the_wire = threading.Event()
        self._release = threading.Event()
        self._pending: tuple[Any, ...] = ()

    def connect(self) -> None:
        """Connected already (a real one connects here when it is not)."""

    def send_command(self, *args: Any) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.commands.append(args)
        self._pending = args

    def read_response(self) -> Any:
        if self.hold:
            self.hold = False
            self.on_the_wire.set()
            self._release.wait(5)
        return [self.store.get(key) for key in self._pending[1:]]

    def release(self) -> None:
        self._release.set()

    def disconnect(self) -> None:
        self.disconnects += 1

    def register_connect_callback(self, callback: Any) -> None:
        """The scripted connection is always connected: no callbacks."""


def run(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["value"] = target()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    return thread, outcome


def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition not reached")


def first_batch_on_the_wire(
    reads: CoalescedMget, connection: ScriptedConnection, keys: tuple[str, ...] = ("a",)
) -> tuple[threading.Thread, dict[str, Any]]:
    """A caller whose MGET is sent and held unanswered until `connection.release()`."""
    connection.hold = True
    started = run(lambda: reads.mget(keys))
    assert connection.on_the_wire.wait(5)
    return started


STORE = {"a": b"1", "a:inv": b"s", "b": b"2", "c": b"3", "d": b"4"}


def test_a_lone_caller_sends_its_own_mget_at_once() -> None:
    connection = ScriptedConnection(STORE)
    reads = CoalescedMget(connection)

    assert reads.mget(("a", "a:inv")) == [b"1", b"s"]
    assert reads.mget(("x", "a")) == [None, b"1"]
    assert connection.commands == [("MGET", "a", "a:inv"), ("MGET", "x", "a")]
    assert (reads.reads, reads.batches) == (2, 2)


def test_callers_that_queue_behind_a_batch_share_the_next_mget() -> None:
    connection = ScriptedConnection(STORE)
    reads = CoalescedMget(connection)
    first, first_outcome = first_batch_on_the_wire(reads, connection, ("a", "a:inv"))

    waiting = [run(partial(reads.mget, (key, "missing"))) for key in ("b", "c", "d")]
    wait_until(lambda: reads.reads == 4)
    connection.release()
    for thread, _ in [(first, first_outcome), *waiting]:
        thread.join(5)

    assert first_outcome["value"] == [b"1", b"s"]
    for (_, outcome), value in zip(waiting, (b"2", b"3", b"4"), strict=True):
        assert outcome["value"] == [value, None]
    # The three that waited went out together, in one MGET.
    assert len(connection.commands) == 2
    second = connection.commands[1]
    assert second[0] == "MGET"
    assert len(second) == 7
    assert sorted(second[1::2]) == ["b", "c", "d"]
    assert (reads.reads, reads.batches) == (4, 2)


def test_a_batch_never_exceeds_max_keys() -> None:
    connection = ScriptedConnection(STORE)
    reads = CoalescedMget(connection, max_keys=4)
    first, _ = first_batch_on_the_wire(reads, connection)
    waiting = [run(partial(reads.mget, (key, key))) for key in ("b", "c", "d")]
    wait_until(lambda: reads.reads == 4)
    connection.release()
    for thread, _ in [(first, {}), *waiting]:
        thread.join(5)

    assert all(
        outcome["value"] == [STORE[k], STORE[k]]
        for (_, outcome), k in zip(waiting, "bcd", strict=True)
    )
    assert [len(command) - 1 for command in connection.commands] == [1, 4, 2]


def test_a_failed_mget_fails_its_whole_batch_disconnects_and_the_next_one_works() -> None:
    connection = ScriptedConnection(STORE)
    reads = CoalescedMget(connection)
    connection.fail_next = ConnectionError("Redis went away")

    with pytest.raises(ConnectionError, match="went away"):
        reads.mget(("a",))
    assert connection.disconnects == 1
    assert reads.mget(("a",)) == [b"1"]


def test_an_error_reaches_every_caller_of_the_batch() -> None:
    class Broken(ScriptedConnection):
        def read_response(self) -> Any:
            super().read_response()
            raise TimeoutError("Timeout reading from socket")

    connection = Broken(STORE)
    reads = CoalescedMget(connection)
    first, first_outcome = first_batch_on_the_wire(reads, connection)
    waiting = [run(partial(reads.mget, (key,))) for key in ("b", "c")]
    wait_until(lambda: reads.reads == 3)
    connection.release()
    for thread, _ in [(first, first_outcome), *waiting]:
        thread.join(5)

    # b and c went out together in the second MGET: its sender raises the error itself,
    # the other one a ConnectionError of its own that names it.
    assert isinstance(first_outcome["error"], TimeoutError)
    errors = [outcome["error"] for _, outcome in waiting]
    sender = [e for e in errors if isinstance(e, TimeoutError)]
    rider = [e for e in errors if isinstance(e, redis.ConnectionError)]
    assert len(sender) == 1
    assert len(rider) == 1
    assert "TimeoutError: Timeout reading from socket" in str(rider[0])
    assert rider[0].__cause__ is sender[0]
    assert connection.disconnects == 2  # once per batch that failed


def test_a_reply_of_the_wrong_shape_is_an_error_not_a_wrong_value() -> None:
    class Short(ScriptedConnection):
        def read_response(self) -> Any:
            return [b"only one"]

    reads = CoalescedMget(Short(STORE))
    with pytest.raises(ValueError, match="unexpected reply"):
        reads.mget(("a", "b"))


def test_a_connection_redis_dropped_is_retried_once_on_a_new_one() -> None:
    connection = ScriptedConnection(STORE)
    reads = CoalescedMget(connection)
    connection.fail_next = redis.ConnectionError("Connection closed by server.")

    assert reads.mget(("a",)) == [b"1"]
    assert connection.disconnects == 1
    assert connection.commands == [("MGET", "a")]


def test_a_redis_that_stays_away_fails_after_the_one_retry() -> None:
    class Refusing(ScriptedConnection):
        def send_command(self, *args: Any) -> None:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379.")

    connection = Refusing(STORE)
    with pytest.raises(redis.ConnectionError, match="111"):
        CoalescedMget(connection).mget(("a",))
    assert connection.disconnects == 2


def test_a_waiter_interrupted_while_waiting_leaves_no_one_stuck() -> None:
    connection = ScriptedConnection(STORE)
    reads = CoalescedMget(connection)
    first, first_outcome = first_batch_on_the_wire(reads, connection)

    class Interrupted(Exception):
        pass

    def interrupt(_signum: int, _frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            reads.mget(("b",))  # waits behind the first read, in the main thread
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    connection.release()
    first.join(5)

    assert first_outcome["value"] == [b"1"]
    later, later_outcome = run(lambda: reads.mget(("c",)))
    later.join(5)
    assert later_outcome["value"] == [b"3"]
    assert connection.commands == [("MGET", "a"), ("MGET", "c")]


def test_a_waiter_that_gives_up_after_being_made_sender_passes_the_role_on() -> None:
    reads = CoalescedMget(ScriptedConnection(STORE))
    quitter, next_in_line = _Read(("a",)), _Read(("b",))
    reads._busy = True
    reads._queue.extend([quitter, next_in_line])
    quitter.lead = True  # what a finished batch does to the first waiter

    reads._abandon(quitter)

    assert list(reads._queue) == [next_in_line]
    assert next_in_line.lead
    assert next_in_line.ready.acquire(timeout=1)  # woken to send
    reads._abandon(next_in_line)
    assert not reads._busy  # nobody left: the next caller sends at once


def test_close_refuses_new_reads_and_closes_the_connection_after_the_batch_on_the_wire() -> None:
    connection = ScriptedConnection(STORE)
    reads = CoalescedMget(connection)
    first, first_outcome = first_batch_on_the_wire(reads, connection)

    reads.close()
    assert connection.disconnects == 0  # not under the batch's feet
    with pytest.raises(redis.ConnectionError, match="closed"):
        reads.mget(("b",))
    connection.release()
    first.join(5)

    assert first_outcome["value"] == [b"1"]
    assert connection.disconnects == 1
    idle = CoalescedMget(ScriptedConnection(STORE))
    idle.close()
    with pytest.raises(redis.ConnectionError, match="closed"):
        idle.mget(("a",))
