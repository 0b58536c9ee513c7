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
again.

An MGET reads all its keys at one point in time (Redis runs it as one command), so keys
that belong together (a value and its invalidation stamp) stay consistent when they are
passed in one `mget` call. A failure is every waiter's failure; nothing is retried here.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["CoalescedMget", "RedisConnection"]


class RedisConnection(Protocol):
    """What is used of a redis-py `Connection`."""

    def send_command(self, *args: Any) -> None: ...

    def read_response(self) -> Any: ...

    def disconnect(self) -> None: ...


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

    def __init__(self, connection: RedisConnection, *, max_keys: int = 512) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self._connection = connection
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._queue: deque[_Read] = deque()
        self._busy = False
        self.reads = 0
        """Calls to `mget` so far."""
        self.batches = 0
        """MGETs sent so far (reads per round trip = reads / batches)."""

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys` (None where missing), read in one MGET with whatever
        other reads are waiting; raises what the MGET raised."""
        read = _Read(keys)
        with self._lock:
            self.reads += 1
            self._queue.append(read)
            lead = not self._busy
            self._busy = True
        if not lead:
            read.ready.acquire()  # released with the reply, or to make this caller lead
            lead = read.lead
        if lead:
            self._send(read)
        if read.error is not None:
            raise read.error
        return read.reply

    def close(self) -> None:
        self._connection.disconnect()

    def _send(self, own: _Read) -> None:
        """Send the head of the queue as one MGET. The sender's own read is at the head:
        a caller leads only on an empty queue, or as the first waiter."""
        with self._lock:
            batch: list[_Read] = []
            size = 0
            while self._queue and (not batch or size + len(self._queue[0].keys) <= self._max_keys):
                read = self._queue.popleft()
                batch.append(read)
                size += len(read.keys)
        assert batch[0] is own, "a lead's read is at the head of the queue"
        try:
            flat = [key for read in batch for key in read.keys]
            try:
                self._connection.send_command("MGET", *flat)
                replies = self._connection.read_response()
            except BaseException:
                self._connection.disconnect()  # the reply may still be on its way
                raise
            if not isinstance(replies, list) or len(replies) != len(flat):
                raise ValueError(f"unexpected reply to an MGET of {len(flat)} keys")
            start = 0
            for read in batch:
                read.reply = replies[start : start + len(read.keys)]
                start += len(read.keys)
        except BaseException as exc:
            for read in batch:
                read.error = exc
        finally:
            with self._lock:
                self.batches += 1
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._busy = False
                else:
                    successor.lead = True
            for read in batch:
                if read is not own:
                    read.ready.release()
            if successor is not None:
                successor.ready.release()
