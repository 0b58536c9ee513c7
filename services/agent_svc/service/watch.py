"""WatchAgents: committed agent changes streamed to the callers who may see them.

The change log (ports.ChangeLogRepository, table agent_changes) is written in the same
transaction as each change, so a committed change always has its row and a rolled-back one
never does; rows are numbered in commit order (see the SQL repository for how PostgreSQL
keeps that promise).

One `ChangeHub` per process reads new rows once and fans them out to every local stream:
a thread reads the log after each wake-up (this process's own commits, another replica's
through Redis pub/sub: `ChangeSignal`) and at the latest every `poll_seconds`, so a lost
notification only delays changes, never loses them. It keeps the latest `buffer_size`
changes in memory; a stream further behind (resumed from an older token) reads its
backlog from the database by itself, page by page, until it reaches the hub's window.

A stream (`WatchStream`) first sends an empty message (the stream is open; its token is
the start), then waits for the hub, takes everything past its position at once (a
busy or slow stream gets bigger batches, not more messages), keeps what its caller may see
and what its filter selects, and sends one message; with nothing to send for
`heartbeat_seconds` it sends an empty one (its token moves on all the same) so proxies keep
the connection.

Pacing (`Watchers.batch_seconds`): after a message of changes a stream rests that long
before its next, and sends everything that came meanwhile in one; a change after a quiet
spell goes at once. The hub reads often (`min_interval`, a fraction of it), so a change
waits only for its stream's own next turn: the streams' turns fall at their own moments
(each one's last send), not all at one read, and a fan-out is not a round of a thousand
messages made one after another after each read (the change at the end of such a round
waited for the read and for the whole round; docs/watch.md "Measured").

What a filtered stream gets (`deliver`): an agent it may see (its own; an admin: any) whose
change matches the filter; an update that makes the agent stop matching is sent too,
flagged `matches_filter=False`, so the watcher drops it (the log keeps the filterable fields
from before an update; when it does not know them, such an update is sent flagged, which
errs on the side of telling). Deletes, undeletes and purges are sent when the agent as
last known matches (so a watcher always hears of the removal of an agent it holds).

Resume tokens are opaque, versioned ("w1." + base64url of the position and the time it was
current): a position, not data, so a token from someone else shows nothing of theirs (the
stream filters per caller anyway). A token is honoured while its time is within the
retention window; the purge job deletes only rows older than the window plus a margin, so
a live token never points before a purged row: older ones are FAILED_PRECONDITION
RESUME_TOKEN_EXPIRED (list again, then watch from now).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import collections
import logging
import struct
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Hashable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.agent_svc.domain import Agent
from services.agent_svc.service.filtering import (
    AgentFilter,
    Condition,
    MetadataEquals,
    ModelEquals,
    NameEquals,
    NamePrefix,
    OwnerEquals,
    parse_filter,
)
from services.agent_svc.service.ports import AgentUnitOfWork, Change, ChangeKind, FilterFields
from services.agent_svc.service.sizing import agent_size, framed
from shared.config.clock import Clock
from shared.rpc.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from shared.security.tokens import Principal

__all__ = [
    "PURGE_MARGIN",
    "WATCH_MESSAGE_BUDGET",
    "ChangeHub",
    "Position",
    "WatchBatch",
    "WatchStream",
    "Watchers",
    "decode_token",
    "deliver",
    "encode_token",
    "matches",
]

_log = logging.getLogger(__name__)

# The purge job keeps rows this much longer than the retention window: a token's time is
# when its position was current, and a change committed just after may carry a slightly
# earlier time (set before its commit; replica clocks differ a little).
PURGE_MARGIN = timedelta(minutes=5)
# A resume token's time is a head's time on some replica: ahead of this one's clock by
# at most their skew. Further ahead, it was made up (and would never expire).
FUTURE_TOKEN_LEEWAY = timedelta(minutes=5)
_TOKEN_PREFIX = "w1."
_TOKEN = struct.Struct(">QQ")  # sequence number, microseconds since the epoch
_MAX_TOKEN = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A message carries at most this many bytes of changes (but always one): gRPC clients
# refuse messages over 4 MiB by default, and a stream behind many big agents (resumed from
# far back, or a watcher slower than the changes, whose small window makes the server
# batch) would otherwise get everything since its position in one. As ListAgents' budget.
WATCH_MESSAGE_BUDGET = 3 * 1024 * 1024
# An AgentChange's own fields around the agent: kind, agent_id, change_time, resume_token,
# matches_filter, alias, alias_revision_id and the framing (generous: the token is ~30
# bytes, the time ~13, an alias at most 63, a revision id at most 20).
_CHANGE_FIELDS_MAX = 256
# Each change's size, computed once (not per stream): bounded like the encoder's memo.
_SIZES: collections.OrderedDict[tuple[int, uuid.UUID], int] = collections.OrderedDict()
_SIZES_KEPT = 20_000  # as many as the encoder keeps encodings
_SIZES_LOCK = threading.Lock()


# -- resume tokens ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """Everything up to `seq` was considered; `as_of`: when that was the log's head (or,
    for a backlog read, the time of change `seq`)."""

    seq: int
    as_of: datetime


def encode_token(position: Position) -> str:
    micros = (position.as_of - _EPOCH) // timedelta(microseconds=1)
    raw = _TOKEN.pack(position.seq, max(0, micros))
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> Position:
    """The position of a token; INVALID_ARGUMENT on `resume_token` if it is not one."""
    if len(token) > _MAX_TOKEN or not token.startswith(_TOKEN_PREFIX):
        raise InvalidArgument.field("resume_token", "not a resume token of this service")
    body = token[len(_TOKEN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        seq, micros = _TOKEN.unpack(raw)
        as_of = _EPOCH + timedelta(microseconds=micros)
    except (binascii.Error, struct.error, ValueError, OverflowError):
        raise InvalidArgument.field("resume_token", "not a resume token of this service") from None
    return Position(seq, as_of)


# -- what a stream gets -----------------------------------------------------------------------


def _holds(condition: Condition, owner_id: uuid.UUID, fields: FilterFields) -> bool:
    match condition:
        case ModelEquals(model):
            return fields.model == model
        case NameEquals(name):
            return fields.name == name
        case NamePrefix(prefix):
            return fields.name.startswith(prefix)
        case MetadataEquals(key, value):
            return fields.metadata.get(key) == value
        case OwnerEquals(owner):
            return owner_id == owner
    raise AssertionError(f"unhandled condition {condition!r}")  # pragma: no cover


def matches(conditions: AgentFilter, owner_id: uuid.UUID, fields: FilterFields) -> bool:
    """Whether an agent with these fields is selected by the filter (the same meaning as
    ListAgents' SQL: exact, case-sensitive, a prefix for `name = "x*"`)."""
    return all(_holds(c, owner_id, fields) for c in conditions.conditions)


def _fields(agent: Agent) -> FilterFields:
    return FilterFields(agent.name, agent.model, agent.metadata)


def deliver(
    change: Change, *, viewer: uuid.UUID, is_admin: bool, conditions: AgentFilter
) -> bool | None:
    """None: the stream does not get the change; else whether the agent matches the
    filter after it (False only for an update that took it out of the filter's view)."""
    agent = change.agent
    if not is_admin and agent.owner_id != viewer:
        return None
    if not conditions.conditions:
        return True
    if matches(conditions, agent.owner_id, _fields(agent)):
        return True
    if change.kind is ChangeKind.UPDATED and (
        change.previous is None or matches(conditions, agent.owner_id, change.previous)
    ):
        return False
    return None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One message of a stream: changes (each with whether it still matches) and the
    position after them; no changes: a heartbeat."""

    changes: tuple[tuple[Change, bool], ...]
    position: Position


# -- the hub ----------------------------------------------------------------------------------


class _Waiter:
    """One stream as the hub sees it: due for a turn, holding one, or neither."""

    __slots__ = ("cancelled", "due", "event", "turn", "waiting")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.cancelled = False
        self.waiting = False
        """Its thread is idle, waiting to be woken (not sending, not making a message): only
        such a stream is given a turn, so a send stuck on a slow client never holds one."""
        self.due = False
        """In the queue for a turn."""
        self.turn = False
        """Holding one of the hub's turns: may read and send now."""


class ChangeHub:
    """Reads the change log once per process and wakes every local stream (see the module
    docstring). `changed()` is the local ChangeSignal; `start()` begins reading at the
    log's current head; `close()` ends every stream with UNAVAILABLE (shutdown)."""

    def __init__(
        self,
        *,
        read_uow: Callable[[], AgentUnitOfWork],
        clock: Clock,
        poll_seconds: float = 1.0,
        buffer_size: int = 10_000,
        page_size: int = 500,
        min_interval: float = 0.0,
        idle_interval: float | None = None,
        turns: int = 1,
    ) -> None:
        self._read_uow = read_uow
        self._clock = clock
        self._poll = poll_seconds
        self._min_interval = min_interval
        # With no stream on this process, at most this often (its head stays current for
        # the next stream to open; reading for no one as often as for streams would only
        # load the database).
        self._idle_interval = min_interval if idle_interval is None else idle_interval
        # Turns: how many streams read and send at once. After a read every stream that
        # waits (not one resting after its last look) is due,
        # but only `turns` of them are woken; each one that has sent hands its turn to the
        # next in line once it has its message ready (not once it is sent: a client slow
        # to read holds its own thread only). A thousand threads woken together would each
        # take the interpreter in turn, ahead of the unary calls; this way each wake-up
        # makes a message, and a stream whose turn comes late sends everything that came
        # meanwhile in one.
        self._free_turns = max(1, turns)
        self._due: collections.deque[_Waiter] = collections.deque()
        self._turns_lock = threading.Lock()
        self._buffer_size = buffer_size
        self.page_size = page_size
        self._lock = threading.Lock()
        self._seqs: list[int] = []
        self._changes: list[Change] = []
        self._floor = -1
        """Every change above this number and up to the head is in the buffer."""
        self._head: Position | None = None
        self._waiters: set[_Waiter] = set()
        # Streams served on event loops (the grpc.aio watch server): one wake-up per loop
        # and read, which sets each stream's asyncio.Event on that loop's thread.
        self._loops: dict[asyncio.AbstractEventLoop, set[asyncio.Event]] = {}
        self._shared: dict[tuple[int, Hashable], Any] = {}
        self._shared_head = -1
        # Event-loop streams resting (`rest`), woken early only by `close()`.
        self._resting: dict[asyncio.AbstractEventLoop, set[asyncio.Future[None]]] = {}
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watch-hub", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Ends every stream (UNAVAILABLE, resume elsewhere) and stops reading."""
        self._closed.set()
        self._wake.set()
        self._ring()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def changed(self) -> None:
        """New rows may be in the log: read now (ChangeSignal)."""
        self._wake.set()

    def wait_ready(self, timeout: float) -> bool:
        """Blocks until the hub knows the log's head (True) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while self._head is None and time.monotonic() < deadline:
            self._closed.wait(0.01)
        return self._head is not None

    # -- reading --------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._closed.is_set():
            try:
                self.read_new()
                failures = 0
            except Exception:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    _log.warning("watch hub: reading the change log failed", exc_info=True)
            interval = self._min_interval if self._has_streams() else self._idle_interval
            if interval > 0:  # at most one read (and round of wake-ups) per interval
                self._closed.wait(interval)
            self._wake.wait(self._poll if not failures else min(self._poll, 1.0))
            self._wake.clear()

    def _has_streams(self) -> bool:
        return bool(self._waiters) or any(self._loops.values())

    def read_new(self) -> int:
        """Reads the rows past the head into the buffer and wakes the streams; how many."""
        read = 0
        while not self._closed.is_set():
            as_of = self._clock.now()
            with self._read_uow() as uow:
                if self._head is None:
                    head = uow.changes.head()
                    with self._lock:
                        self._head = Position(head, as_of)
                        self._floor = head
                    continue
                rows = uow.changes.after(self._head.seq, limit=self.page_size)
            with self._lock:
                if rows:
                    self._seqs.extend(c.seq for c in rows)
                    self._changes.extend(rows)
                    excess = len(self._changes) - self._buffer_size
                    if excess > self._buffer_size // 4:  # trim in chunks, not per row
                        self._floor = self._seqs[excess - 1]
                        del self._seqs[:excess]
                        del self._changes[:excess]
                    self._head = Position(rows[-1].seq, as_of)
                else:
                    self._head = Position(self._head.seq, as_of)
            read += len(rows)
            if rows:
                self._all_due()
                self._wake_loops()
            if len(rows) < self.page_size:
                break
        return read

    def _ring(self) -> None:
        """Wakes every stream (shutdown), resting ones included."""
        for waiter in list(self._waiters):
            waiter.event.set()
        self._wake_loops()
        for loop, wakers in list(self._resting.items()):
            try:
                loop.call_soon_threadsafe(_resolve_all, wakers)
            except RuntimeError:  # the loop is closed: its streams are gone
                self._resting.pop(loop, None)

    def _wake_loops(self) -> None:
        """Wakes every stream served on an event loop: one call per loop, from this thread
        (no thread wakes per stream: the loop's thread sets their events in one go)."""
        for loop, events in list(self._loops.items()):
            if events:
                try:
                    loop.call_soon_threadsafe(_set_all, tuple(events))
                except RuntimeError:  # the loop is closed: its streams are gone
                    self._loops.pop(loop, None)

    def _all_due(self) -> None:
        """New changes: every stream not already in line or in a turn queues for one."""
        with self._turns_lock:
            for waiter in list(self._waiters):
                if waiter.waiting and not (waiter.due or waiter.turn or waiter.cancelled):
                    waiter.due = True
                    self._due.append(waiter)
            woken = self._dispatch()
        for waiter in woken:
            waiter.event.set()

    def _dispatch(self) -> list[_Waiter]:
        """Gives the free turns to the first streams in line (under the turns lock)."""
        woken = []
        while self._free_turns and self._due:
            waiter = self._due.popleft()
            waiter.due = False
            if waiter.cancelled or not waiter.waiting:  # it queues again when it is back
                continue
            waiter.turn = True
            self._free_turns -= 1
            woken.append(waiter)
        return woken

    def queue_for_turn(self, waiter: _Waiter) -> None:
        """Puts a stream in line (it is behind the head: just opened, or it sent)."""
        with self._turns_lock:
            if not (waiter.due or waiter.turn or waiter.cancelled):
                waiter.due = True
                self._due.append(waiter)
            woken = self._dispatch()
        for other in woken:
            other.event.set()

    def end_turn(self, waiter: _Waiter) -> None:
        """The stream has sent (or had nothing to send): its turn goes to the next."""
        with self._turns_lock:
            if not waiter.turn:
                return
            waiter.turn = False
            self._free_turns += 1
            woken = self._dispatch()
        for other in woken:
            other.event.set()

    def behind(self, seq: int) -> bool:
        head = self._head
        return head is not None and head.seq > seq

    # -- what streams use -----------------------------------------------------------------

    @property
    def head(self) -> Position | None:
        return self._head

    def since(self, seq: int) -> tuple[list[Change], Position] | None:
        """The buffered changes after `seq` and the head they reach; None when `seq` is
        before the buffer (read the backlog from the log)."""
        with self._lock:
            head = self._head
            if head is None or seq < self._floor:
                return None
            start = bisect.bisect_right(self._seqs, seq)
            return self._changes[start:], head

    def backlog(self, seq: int) -> list[Change]:
        """Up to a page of committed changes after `seq`, from the log itself."""
        with self._read_uow() as uow:
            return uow.changes.after(seq, limit=self.page_size)

    def log_head(self) -> int:
        with self._read_uow() as uow:
            return uow.changes.head()

    def add(self, waiter: _Waiter) -> None:
        self._waiters.add(waiter)

    def remove(self, waiter: _Waiter) -> None:
        self._waiters.discard(waiter)

    def shared(self, start: int, key: Hashable) -> Any:
        """What a stream of `key` at `start` sends for the current head, if a stream like
        it made it already (event-loop streams only: one thread uses it)."""
        head = self._head
        if head is None or head.seq != self._shared_head:
            return None
        return self._shared.get((start, key))

    def share(self, start: int, key: Hashable, made: Any, *, head: int) -> None:
        """Keeps what a stream of `key` at `start` made from the buffer up to `head`, if
        that is still the current head (a read in between: not kept, or a like stream
        would send the older message and rest): in a fan-out the streams of one caller
        (or of admins, with one filter) due at one read get the same message, made and
        encoded once instead of once per stream."""
        current = self._head
        if current is None or current.seq != head:
            return
        if head != self._shared_head:
            self._shared = {}
            self._shared_head = head
        self._shared[(start, key)] = made

    async def rest(self, seconds: float) -> None:
        """An event-loop stream's rest: `seconds` on the running loop, cut short when the
        hub closes (the hub's reads do not wake a resting stream: that is the rest)."""
        loop = asyncio.get_running_loop()
        waker: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(seconds, _resolve, waker)
        resting = self._resting.setdefault(loop, set())
        resting.add(waker)
        try:
            if not self._closed.is_set():
                await waker
        finally:
            handle.cancel()
            resting.discard(waker)

    def add_async(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """A stream on `loop` (its thread only), woken by setting `event`."""
        self._loops.setdefault(loop, set()).add(event)

    def remove_async(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._loops.get(loop, set()).discard(event)


def _set_all(events: tuple[asyncio.Event, ...]) -> None:
    for event in events:
        event.set()


def _resolve(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


def _resolve_all(wakers: set[asyncio.Future[None]]) -> None:
    for waker in list(wakers):
        _resolve(waker)


# -- streams ----------------------------------------------------------------------------------


class Watchers:
    """Opens streams on the hub, at most `max_streams` at a time on this process (one more
    is RESOURCE_EXHAUSTED TOO_MANY_WATCHERS: each stream holds a thread of its own)."""

    def __init__(
        self,
        hub: ChangeHub,
        *,
        clock: Clock,
        retention_seconds: float,
        heartbeat_seconds: float,
        max_streams: int,
        recheck: Callable[[Principal], None] | None = None,
        recheck_seconds: float = 2.0,
        batch_seconds: float = 0.0,
    ) -> None:
        self.hub = hub
        self.batch_seconds = batch_seconds
        self._clock = clock
        self.retention = timedelta(seconds=retention_seconds)
        self.heartbeat_seconds = heartbeat_seconds
        self.max_streams = max_streams
        # The caller's token is checked again (expired, revoked: Unauthenticated) before
        # every message and at least every `recheck_seconds`: a stream outlives the check
        # its call began with, so it ends as a new call would be refused.
        self.recheck = recheck
        self.recheck_seconds = recheck_seconds
        self._open = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._open

    def open(
        self,
        *,
        viewer: uuid.UUID,
        is_admin: bool,
        filter: str,  # the request field's name (AIP-160)
        resume_token: str,
        principal: Principal | None = None,
    ) -> WatchStream:
        """A stream for the caller (already authorized for agents.read) from the token's
        position (no token: the hub's head, i.e. now); `principal`: whose token the stream
        keeps checking (see `recheck`)."""
        conditions = parse_filter(filter, allow_owner=is_admin)
        start = decode_token(resume_token) if resume_token else None
        if start is not None and start.as_of > self._clock.now() + FUTURE_TOKEN_LEEWAY:
            # Not a token this service made (its time is a head's, never ahead of the
            # clocks by more than their skew): honoured, it would never expire.
            raise InvalidArgument.field(
                "resume_token", "not a token of this service: its time is in the future"
            )
        if start is not None and start.as_of < self._clock.now() - self.retention:
            raise FailedPrecondition(
                "the resume_token is older than the change log keeps "
                f"({self.retention.total_seconds():.0f}s): list the agents again, then "
                "watch without a token",
                reason="RESUME_TOKEN_EXPIRED",
            )
        if start is not None and self._ahead_of_log(start.seq):
            raise FailedPrecondition(
                "the resume_token is ahead of the change log (a token of another deployment, "
                "or one kept across a restore of the database): list the agents again, then "
                "watch without a token",
                reason="RESUME_TOKEN_EXPIRED",
            )
        if self.hub.closed:
            raise _shutting_down()
        with self._lock:
            if self._open >= self.max_streams:
                raise ResourceExhausted(
                    f"this server has {self.max_streams} WatchAgents streams open, its "
                    "limit; retry (another replica may have room)",
                    retry_after_seconds=1.0,
                    reason="TOO_MANY_WATCHERS",
                )
            self._open += 1
        try:
            if start is None:
                if not self.hub.wait_ready(5.0):
                    raise Unavailable(
                        "the change log cannot be read right now; retry",
                        retry_after_seconds=1.0,
                        reason="DATABASE_UNAVAILABLE",
                    )
                start = self.hub.head
                assert start is not None
            return WatchStream(
                self,
                start,
                viewer=viewer,
                is_admin=is_admin,
                conditions=conditions,
                principal=principal,
            )
        except BaseException:
            self._closed_one()
            raise

    def _ahead_of_log(self, seq: int) -> bool:
        """Whether `seq` is past every committed change: past the hub's head, and (a token
        from a replica whose hub read later) past the log's own. The log never purges its
        newest row, so its head never goes back."""
        head = self.hub.head
        if head is not None and seq <= head.seq:
            return False
        return seq > self.hub.log_head()

    def _closed_one(self) -> None:
        with self._lock:
            self._open -= 1


def _shutting_down() -> Unavailable:
    return Unavailable(
        "the server is shutting down: resume with the last resume_token (another replica answers)",
        retry_after_seconds=0.1,
        reason="SHUTTING_DOWN",
    )


class _IdleTimer:
    """Wakes an event-loop stream (sets its event) for its caller's recheck and its
    heartbeat: one timer, re-armed as it fires, not a timeout around every wait
    (asyncio.timeout costs ~5 µs a wait, a tenth of a fan-out message). It fires every
    recheck interval, or when the heartbeat is due if that is sooner (a timer on a fixed
    period sent heartbeats up to a period late: found by an outside review). A tick that
    comes while the stream sends is lost; the next one is at most an interval away."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        event: asyncio.Event,
        heartbeat: float,
        recheck: float,
    ) -> None:
        self._loop = loop
        self._event = event
        self._heartbeat = heartbeat
        self._recheck = max(0.001, recheck)
        self._last_sent = loop.time()
        self._handle = loop.call_at(self._next(self._last_sent), self._tick)

    def _next(self, now: float) -> float:
        due = self._last_sent + self._heartbeat
        if due <= now:  # due now: the stream sends it on this tick, the next is one later
            due = now + self._heartbeat
        return due if due < now + self._recheck else now + self._recheck

    def _tick(self) -> None:
        self._event.set()
        self._handle = self._loop.call_at(self._next(self._loop.time()), self._tick)

    def sent(self) -> None:
        """The stream sent a message: the heartbeat is due a heartbeat interval from now."""
        self._last_sent = self._loop.time()

    def heartbeat_due(self) -> bool:
        # A millisecond's tolerance: a timer may fire a hair before its time.
        return self._loop.time() - self._last_sent >= self._heartbeat - 0.001

    def cancel(self) -> None:
        self._handle.cancel()


class WatchStream:
    """One caller's stream: iterate for batches; `cancel()` (the call ended) stops it."""

    def __init__(
        self,
        watchers: Watchers,
        start: Position,
        *,
        viewer: uuid.UUID,
        is_admin: bool,
        conditions: AgentFilter,
        principal: Principal | None = None,
    ) -> None:
        self._watchers = watchers
        self._hub = watchers.hub
        self._principal = principal
        self.position = start
        self._viewer = viewer
        self._is_admin = is_admin
        self._conditions = conditions
        self._waiter = _Waiter()
        # Streams with the same key and position get the same message (see ChangeHub.share).
        self._share_key = (viewer, is_admin, conditions.canonical())
        self._released = False
        self._release_lock = threading.Lock()
        self._hub.add(self._waiter)

    def cancel(self) -> None:
        """The call is over (grpcio's callback): wakes the stream and frees its place and
        its turn at once (a stream blocked in a send is never resumed to run `finally`)."""
        self._waiter.cancelled = True
        self._waiter.event.set()
        self._release()

    def _release(self) -> None:
        with self._release_lock:
            if self._released:
                return
            self._released = True
        self._hub.remove(self._waiter)
        self._hub.end_turn(self._waiter)
        self._watchers._closed_one()

    def _check_caller(self) -> None:
        """Unauthenticated (TOKEN_EXPIRED, TOKEN_REVOKED) once the caller's token would be
        refused to a new call."""
        recheck = self._watchers.recheck
        if recheck is not None and self._principal is not None:
            recheck(self._principal)

    def _wait_bound(self, idle: float) -> float:
        """How long an idle stream may wait: until its heartbeat, and no longer than the
        recheck interval."""
        watchers = self._watchers
        return max(0.0, min(watchers.heartbeat_seconds - idle, watchers.recheck_seconds))

    def __iter__(self) -> Iterator[WatchBatch]:
        try:
            yield from self._batches()
        finally:
            self._release()

    async def batches(self) -> AsyncGenerator[WatchBatch, None]:
        """The stream on an event loop (the grpc.aio watch server): the same messages as
        iterating it, woken by the hub through the loop (`call_soon_threadsafe`), with no
        thread and no turn of its own: the loop makes one stream's message after another.
        Reading the backlog from the log (a resumed stream far behind) runs on a worker
        thread; the call's cancellation ends the iteration (and frees the place)."""
        hub = self._hub
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        hub.remove(self._waiter)  # not a thread's stream: the hub never gives it a turn
        hub.add_async(loop, event)
        watchers = self._watchers
        timer = _IdleTimer(loop, event, watchers.heartbeat_seconds, watchers.recheck_seconds)
        try:
            yield self._heartbeat()
            timer.sent()
            while True:
                if hub.closed:
                    raise _shutting_down()
                self._check_caller()
                if hub.behind(self.position.seq):
                    looked_at = loop.time()
                    shared = hub.shared(self.position.seq, self._share_key)
                    if shared is not None:  # a stream like this one made it for this head
                        batch, self.position, more = shared
                    elif (found := hub.since(self.position.seq)) is not None:
                        start = self.position.seq
                        batch, more = self._next_batch(found)
                        made = (batch, self.position, more)
                        hub.share(start, self._share_key, made, head=found[1].seq)
                    else:  # behind the buffer: the log, off the loop's thread
                        batch, more = await asyncio.to_thread(self._next_batch)
                    if batch is None and timer.heartbeat_due():  # others' changes only
                        batch = self._heartbeat()
                    if batch is not None:
                        timer.sent()
                        yield batch
                    # Paced (module docstring): one look per interval, sent or not; what
                    # comes meanwhile goes in the next message. A backlog goes at once.
                    rest = looked_at + watchers.batch_seconds - loop.time()
                    if rest > 0 and not more:
                        await hub.rest(rest)
                    continue
                # Clear, then look: the hub moves its head before it wakes the loop, so a
                # change is either seen now or sets the event after this.
                event.clear()
                if hub.behind(self.position.seq) or hub.closed:
                    continue
                if timer.heartbeat_due():
                    timer.sent()
                    yield self._heartbeat()
                    continue
                await event.wait()
        finally:
            timer.cancel()
            hub.remove_async(loop, event)
            self._release()

    def _batches(self) -> Iterator[WatchBatch]:
        hub = self._hub
        waiter = self._waiter
        heartbeat = self._watchers.heartbeat_seconds
        clock = time  # real waiting, whatever clock stamps the tokens
        # First an empty message: the stream is open, and its token is where it starts (a
        # client lists after it and misses nothing).
        yield self._heartbeat()
        last_sent = clock.monotonic()
        while not waiter.cancelled:
            if hub.closed:
                raise _shutting_down()
            self._check_caller()
            if waiter.turn:
                looked_at = clock.monotonic()
                batch, more = self._next_batch()
                if not more:
                    # Before the send: a client slow to read holds its own thread only.
                    hub.end_turn(waiter)
                if batch is None and clock.monotonic() - last_sent >= heartbeat:
                    batch = self._heartbeat()  # others' changes only, for a heartbeat's time
                if batch is not None:
                    last_sent = clock.monotonic()
                    yield batch
                if not more:  # paced: one look per interval, sent or not; a backlog at once
                    self._rest(looked_at + self._watchers.batch_seconds - clock.monotonic())
                continue
            # Idle from here: first say so, then look (the hub looks at `waiting` after it
            # moves its head, so one of the two sees the other).
            waiter.waiting = True
            if hub.behind(self.position.seq):
                hub.queue_for_turn(waiter)
                if waiter.turn:
                    waiter.waiting = False
                    continue
            idle = clock.monotonic() - last_sent
            if idle >= heartbeat:
                waiter.waiting = False
                last_sent = clock.monotonic()
                yield self._heartbeat()
                continue
            waiter.event.wait(self._wait_bound(idle))
            waiter.event.clear()
            waiter.waiting = False

    def _rest(self, seconds: float) -> None:
        """A thread stream's rest: cut short only by a cancel or a close (each sets its
        flag, then the event; no turn is given to a stream that is not waiting), so clear,
        then look at the flags, then wait."""
        waiter = self._waiter
        waiter.event.clear()
        if seconds > 0 and not (waiter.cancelled or self._hub.closed):
            waiter.event.wait(seconds)
            waiter.event.clear()

    def _heartbeat(self) -> WatchBatch:
        """An empty message (the first, or a heartbeat). A stream at the log's head takes
        the head's time (the hub's latest read): on a quiet log its token would otherwise
        keep the time of the last change it saw, and a watcher connected all along would
        be refused as expired (RESUME_TOKEN_EXPIRED) on its next reconnect once the
        retention had passed."""
        head = self._hub.head
        if head is not None and head.seq == self.position.seq and head.as_of > self.position.as_of:
            self.position = head
        return WatchBatch((), self.position)

    def _next_batch(
        self, found: tuple[list[Change], Position] | None = None
    ) -> tuple[WatchBatch | None, bool]:
        """What to send now (None: nothing for this caller) and whether more of the
        backlog is waiting to be read; `found`: the hub's buffer past the position, when
        the caller looked already."""
        if found is None:
            found = self._hub.since(self.position.seq)
        from_log = found is None
        if found is None:  # behind the buffer: the backlog, a page at a time
            rows = self._hub.backlog(self.position.seq)
            if not rows:
                # Nothing after it in the log: the hub lags behind the token (wait), or the
                # rows up to the hub's head are gone (a made-up token): nothing to skip.
                head = self._hub.head
                if head is not None and head.seq > self.position.seq:
                    self.position = head
                return None, False
            found = (rows, Position(rows[-1].seq, rows[-1].time))
        changes, reached = found
        picked, last = self._pick(changes)
        if last is not None:  # the message is full: the rest goes in the next one
            reached = Position(last.seq, last.time)
        if reached.seq >= self.position.seq:
            self.position = reached
        # More to send at once: the rest of a full message, or of a backlog (the log's
        # pages up to the buffer, then the buffer: a page read from the log that reaches
        # the buffer leaves the hub ahead, and the stream goes on without a rest).
        more = last is not None or (from_log and self._hub.behind(self.position.seq))
        return (WatchBatch(tuple(picked), self.position) if picked else None), more

    def _pick(self, changes: list[Change]) -> tuple[list[tuple[Change, bool]], Change | None]:
        """The caller's changes, as many as fit WATCH_MESSAGE_BUDGET (at least one), and
        when they did not all fit, the last change this message covers."""
        picked: list[tuple[Change, bool]] = []
        used = 0
        for index, change in enumerate(changes):
            matched = deliver(
                change, viewer=self._viewer, is_admin=self._is_admin, conditions=self._conditions
            )
            if matched is None:
                continue
            size = _wire_size(change)
            if picked and used + size > WATCH_MESSAGE_BUDGET:
                return picked, changes[index - 1]
            picked.append((change, matched))
            used += size
        return picked, None


def _wire_size(change: Change) -> int:
    """About the bytes of the change in a WatchAgentsResponse (never fewer); computed once
    per change (by its number in the log and its agent), not once per stream."""
    key = (change.seq, change.agent.id)
    size = _SIZES.get(key)
    if size is not None:
        return size
    if change.kind is ChangeKind.PURGED:  # only the id and the owner are sent
        size = _CHANGE_FIELDS_MAX + 2 * 38
    else:
        size = _CHANGE_FIELDS_MAX + framed(agent_size(change.agent))
    with _SIZES_LOCK:
        _SIZES[key] = size
        if len(_SIZES) > _SIZES_KEPT:
            _SIZES.popitem(last=False)
    return size
