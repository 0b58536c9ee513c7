"""Concurrent Redis reads coalesced into one MGET on one connection (group commit, for reads).

Each `mget(keys)` joins a queue. If no batch is on the wire, the caller sends the whole
queue as one `MGET` and hands every waiter its share of the reply; otherwise it waits, and
the next batch (everything that queued while the previous one was on the wire) is sent by
the first waiter when that batch comes back. So:

- alone, a caller sends its own MGET at once: no added latency, no extra thread;
- under load, N concurrent readers pay one round trip (one send, one receive, one reply
  to parse) instead of N, and the waiting threads block on a lock instead of a socket.

Only the sender of the current batch touches the connection, so it is a single dedicated
connection (made from the client's pool settings: timeouts, TLS, credentials, database)
driven with `send_command` / `read_response`, without the pool's checkout, retry and
instrumentation on every read. After an error it is disconnected; the next send connects
again. A connection Redis dropped (restart, failover, `CLIENT KILL`) is found out on use
and retried once at once, on a new connection (MGET is a read: repeating it is safe).

The connection is made with its own `connect()` (for a Sentinel-managed one: at the
master the sentinels name now). Each new connection (the first, and every reconnect
however it happens) is handed to `on_connect` before it serves a read: the cache checks
there which Redis it talks to (see cache.py, "Redis restarted"). redis-py reconnects on
its own in places (a health check before a command); its connect callback counts
connections, and a reply read on a connection that was replaced while the MGET was on
it is thrown away and read again.

An MGET reads all its keys at one point in time (Redis runs it as one command), so keys
that belong together (a value and its invalidation stamp) stay consistent when they are
passed in one `mget` call. Otherwise a failure is every waiter's failure: the sender
raises it, each waiter a `redis.ConnectionError` of its own that names it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis

__all__ = ["CoalescedMget", "RedisConnection"]


class RedisConnection(Protocol):
    """What is used of a redis-py `Connection`."""

    def connect(self) -> None: ...

    def send_command(self, *args: Any) -> None: ...

    def read_response(self) -> Any: ...

    def disconnect(self) -> None: ...

    def register_connect_callback(self, callback: Any) -> None: ...


class _Read:
    """One caller's keys; `ready` is held until its reply (or the lead) is handed over."""

    __slots__ = ("error", "keys", "lead", "ready", "reply")

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = keys
        self.reply: list[bytes | None] = []
        self.error: BaseException | None = None
        self.lead = False
        self.ready = threading.Lock()
        self.ready.acquire()


class CoalescedMget:
    """`mget(keys)` shared by concurrent callers; at most `max_keys` keys per MGET."""

    def __init__(
        self,
        connection: RedisConnection,
        *,
        max_keys: int = 512,
        on_connect: Callable[[RedisConnection], None] | None = None,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self._connection = connection
        self._max_keys = max_keys
        self._on_connect = on_connect
        # Connections made so far (counted by redis-py's callback), and the number of the
        # one `on_connect` last approved: they differ until a new connection is checked.
        self._connects = 0
        self._checked = -1
        connection.register_connect_callback(self._connected)
        self._lock = threading.Lock()
        self._queue: deque[_Read] = deque()
        self._busy = False
        self._closed = False
        self.reads = 0
        """Calls to `mget` so far."""
        self.batches = 0
        """MGETs sent so far (reads per round trip = reads / batches)."""

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys` (None where missing), read in one MGET with whatever
        other reads are waiting. Raises what the MGET raised (a caller whose read rode
        on another caller's MGET gets a `redis.ConnectionError` naming it)."""
        read = _Read(keys)
        with self._lock:
            if self._closed:
                raise redis.ConnectionError("the coalesced reader is closed")
            self.reads += 1
            self._queue.append(read)
            lead = not self._busy
            self._busy = True
        if not lead:
            try:
                read.ready.acquire()  # released with the reply, or to make this caller lead
            except BaseException:  # e.g. KeyboardInterrupt while waiting
                self._abandon(read)
                raise
            lead = read.lead
        if lead:
            self._send(read)
        if read.error is not None:
            raise read.error
        return read.reply

    def close(self) -> None:
        """No more reads; the connection is closed now, or by the batch on the wire."""
        with self._lock:
            self._closed = True
            busy = self._busy
        if not busy:
            self._connection.disconnect()

    def _abandon(self, read: _Read) -> None:
        """A waiter gives up (interrupted): it leaves the queue, and if it had just been
        made the next sender, that role passes on, so no one is left waiting for it."""
        successor = None
        with self._lock:
            if read not in self._queue:
                return  # already in a batch: its sender releases it, harmlessly
            self._queue.remove(read)
            if not read.lead:
                return
            successor = self._next_lead()
        if successor is not None:
            successor.ready.release()

    def _next_lead(self) -> _Read | None:
        """Under the lock: make the first waiter the next sender, or mark the line idle."""
        successor = self._queue[0] if self._queue else None
        if successor is None:
            self._busy = False
        else:
            successor.lead = True
        return successor

    def _send(self, own: _Read) -> None:
        """Send the head of the queue as one MGET. The sender's own read is at the head:
        a caller leads only on an empty queue, or as the first waiter."""
        batch: list[_Read] = []
        try:
            with self._lock:
                size = 0
                while self._queue and (
                    not batch or size + len(self._queue[0].keys) <= self._max_keys
                ):
                    read = self._queue.popleft()
                    batch.append(read)
                    size += len(read.keys)
                closed = self._closed
            if not batch or batch[0] is not own:
                raise RuntimeError("a coalesced read was sent by a caller not at its head")
            if closed:
                raise redis.ConnectionError("the coalesced reader is closed")
            flat = [key for read in batch for key in read.keys]
            replies = self._round_trip(flat)
            start = 0
            for read in batch:
                read.reply = replies[start : start + len(read.keys)]
                start += len(read.keys)
        except BaseException as exc:
            own.error = exc
            for read in batch:
                if read is not own:
                    # Each waiter raises an exception of its own (never one object in many
                    # threads), and an interrupt of the sender is not the waiters' to raise.
                    shared = redis.ConnectionError(
                        f"the MGET this read shared failed: {type(exc).__name__}: {exc}"
                    )
                    shared.__cause__ = exc
                    read.error = shared
        finally:
            with self._lock:
                self.batches += 1
                successor = self._next_lead()
                idle_and_closed = successor is None and self._closed
            if idle_and_closed:
                self._connection.disconnect()
            for read in batch:
                if read is not own:
                    read.ready.release()
            if successor is not None:
                successor.ready.release()

    def _connected(self, _connection: Any) -> None:
        """redis-py's connect callback (the connection is made inside our own calls)."""
        self._connects += 1

    def _checked_connection(self) -> RedisConnection:
        """The connection, approved by `on_connect` since it was last (re)made. (A
        connection lost since is remade inside the MGET; the caller sees the count move.)"""
        connection = self._connection
        # Connected through `connect()`, which a Sentinel-managed connection needs to ask
        # the sentinels for the master (a command on a closed connection would reconnect
        # to the address it had, or to the default one); a no-op when connected.
        connection.connect()
        if self._checked != self._connects:
            if self._on_connect is not None:
                self._on_connect(connection)  # its first command connects, if need be
            self._checked = self._connects
        return connection

    def _round_trip(self, flat: list[str]) -> list[bytes | None]:
        """MGET on the reserved connection. A connection Redis dropped (restart, failover,
        CLIENT KILL) is found out on use: reconnect and try once more. After any failure
        the connection is closed, so a late reply can never be read as the next one's."""
        failures = 0
        for _ in range(3):  # a reconnect under the MGET earns it one more round
            try:
                connection = self._checked_connection()
                before = self._connects
                connection.send_command("MGET", *flat)
                replies = connection.read_response()
                if self._connects != before:
                    continue  # reconnected under the MGET: check the new one, read again
                if not isinstance(replies, list) or len(replies) != len(flat):
                    raise ValueError(f"unexpected reply to an MGET of {len(flat)} keys")
                return replies
            except redis.ConnectionError:
                self._connection.disconnect()
                failures += 1
                if failures == 2:
                    raise
            except BaseException:
                self._connection.disconnect()
                raise
        raise redis.ConnectionError("the reserved connection kept reconnecting")
