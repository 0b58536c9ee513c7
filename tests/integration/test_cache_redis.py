"""TwoLevelCache against a real Redis: two instances play two replicas sharing one Redis."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import pytest
import redis

from services.agent_svc.infra.cache import TwoLevelCache
from shared.data.redis_client import make_redis
from tests.helpers import free_port


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    version: int


class ItemCodec:
    def encode(self, value: Item) -> bytes:
        return json.dumps(asdict(value)).encode()

    def decode(self, data: bytes) -> Item:
        return Item(**json.loads(data))


class Recorder:
    """on_event hook: counts events, remembers when each pub/sub message was applied."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.message_times: list[float] = []
        self.message = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, level: str, outcome: str) -> None:
        with self._lock:
            self.counts[(level, outcome)] += 1
            if (level, outcome) == ("pubsub", "message"):
                self.message_times.append(time.perf_counter())
                self.message.set()


CacheFactory = Callable[..., tuple[TwoLevelCache[Item], Recorder]]
WAIT = 30.0  # the deadline of every wait for a condition: generous, only a failure waits it out


@pytest.fixture
def make_cache(unique: str) -> Iterator[CacheFactory]:
    made: list[TwoLevelCache[Item]] = []

    def make(
        client: redis.Redis, *, start: bool = True, **kwargs: object
    ) -> tuple[TwoLevelCache[Item], Recorder]:
        recorder = Recorder()
        options: dict[str, object] = {
            "l1_max_entries": 1000,
            "l1_ttl_seconds": 30.0,
            "l2_ttl_seconds": 60.0,
            "namespace": f"test-{unique}",
            "breaker_seconds": 0.2,
            "listener_poll_seconds": 0.05,
            "listener_max_backoff_seconds": 0.2,
            # L1 serves for three pings after the listener last heard from Redis: with
            # pings 5 s apart a loaded machine cannot turn the L1 hits counted here into
            # misses (a closed connection still ends it at once).
            "listener_ping_seconds": 5.0,
            # After a Redis error a cache reads from the database this long (not the
            # default breaker + 3 pings, 15 s with these pings).
            "doubt_seconds": 0.5,
        }
        options.update(kwargs)
        cache: TwoLevelCache[Item] = TwoLevelCache(
            redis=client,
            codec=ItemCodec(),
            on_event=recorder,
            **options,  # type: ignore[arg-type]
        )
        made.append(cache)
        if start:
            cache.start()
        return cache, recorder

    yield make
    for cache in made:
        cache.close()


class SteppedClock:
    """`time.monotonic` plus the jumps a test makes (a breaker period passes at once)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class FrozenClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_for(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


class Database:
    """The rows behind load(): a dict, with a count of reads."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, Item] = {}
        self.reads = 0

    def loader(self, key: uuid.UUID) -> Callable[[], Item | None]:
        def load() -> Item | None:
            self.reads += 1
            return self.rows.get(key)

        return load

    def write(self, key: uuid.UUID, version: int) -> Item:
        self.rows[key] = Item(str(key), version)
        return self.rows[key]


def version_of(value: Item | None) -> int:
    assert value is not None
    return value.version


def test_l2_fill_and_hit_across_two_instances(
    redis_url: str, unique: str, make_cache: CacheFactory
) -> None:
    a, a_events = make_cache(make_redis(redis_url))
    b, b_events = make_cache(make_redis(redis_url))
    # (Subscribing clears L1, so an entry filled before it would be dropped.)
    assert a.wait_subscribed(WAIT)
    assert b.wait_subscribed(WAIT)
    db = Database()
    key = uuid.uuid4()
    db.write(key, 1)

    assert version_of(a.get(key, db.loader(key))) == 1
    assert db.reads == 1
    raw = redis.Redis.from_url(redis_url)
    assert raw.get(f"test-{unique}:{key}") is not None
    assert 0 < raw.pttl(f"test-{unique}:{key}") <= 60_000
    assert a_events.counts[("l2", "miss")] == 1
    assert a_events.counts[("l2", "fill")] == 1

    assert version_of(b.get(key, db.loader(key))) == 1  # from L2
    assert db.reads == 1
    assert b_events.counts[("l2", "hit")] == 1
    assert version_of(b.get(key, db.loader(key))) == 1  # from L1
    assert b_events.counts[("l1", "hit")] == 1
    assert db.reads == 1

    missing = uuid.uuid4()
    assert a.get(missing, db.loader(missing)) is None
    assert raw.get(f"test-{unique}:{missing}") is None  # absent rows are not cached
    raw.close()


def test_concurrent_l2_reads_share_round_trips_and_each_gets_its_own_value(
    redis_url: str, make_cache: CacheFactory
) -> None:
    writer, _ = make_cache(make_redis(redis_url))
    reader, events = make_cache(make_redis(redis_url), l1_max_entries=0)  # every read hits L2
    # (A subscription that lands during a load marks it stale: no L2 fill. Wait for both.)
    assert writer.wait_subscribed(WAIT)
    assert reader.wait_subscribed(WAIT)
    db = Database()
    keys = [uuid.uuid4() for _ in range(200)]
    for number, key in enumerate(keys):
        db.write(key, number)
        writer.get(key, db.loader(key))  # fills L2
    reads_before = db.reads
    wrong: list[tuple[uuid.UUID, int]] = []

    def read_all(offset: int) -> None:
        for turn in range(len(keys)):
            key = keys[(offset + turn) % len(keys)]
            value = reader.get(key, db.loader(key))
            if version_of(value) != keys.index(key):
                wrong.append((key, version_of(value)))

    threads = [threading.Thread(target=read_all, args=(n * 7,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert wrong == []
    assert db.reads == reads_before  # all from L2
    # Each read led its own flight (one L2 read) or joined one for the same key.
    hits, joined = events.counts[("l2", "hit")], events.counts[("flight", "joined")]
    assert hits + joined == 16 * len(keys)
    coalesced = reader._reads
    assert coalesced is not None
    assert coalesced.reads == hits
    assert coalesced.batches < coalesced.reads  # some reads shared a round trip


def test_invalidate_on_one_instance_drops_the_other_instances_l1(
    redis_url: str, unique: str, make_cache: CacheFactory
) -> None:
    a, _ = make_cache(make_redis(redis_url))
    b, b_events = make_cache(make_redis(redis_url))
    assert a.wait_subscribed(WAIT)
    assert b.wait_subscribed(WAIT)
    db = Database()
    key = uuid.uuid4()
    db.write(key, 1)
    b.get(key, db.loader(key))
    assert b.in_l1(key)

    db.write(key, 2)
    a.invalidate(key)
    assert version_of(a.get(key, db.loader(key))) == 2  # the writer's replica: at once
    assert wait_for(lambda: not b.in_l1(key))
    assert version_of(b.get(key, db.loader(key))) == 2
    assert b_events.counts[("pubsub", "message")] >= 1


def test_invalidation_delay_between_instances(
    redis_url: str, make_cache: CacheFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """From the start of invalidate() on A to the L1 entry being gone on B: measured and
    printed (the README quotes it); the test asserts only that every one arrives."""
    a, _ = make_cache(make_redis(redis_url))
    b, b_events = make_cache(make_redis(redis_url))
    assert a.wait_subscribed(WAIT)
    assert b.wait_subscribed(WAIT)
    db = Database()
    key = uuid.uuid4()
    delays: list[float] = []
    calls: list[float] = []
    for version in range(50):
        db.write(key, version)
        assert version_of(b.get(key, db.loader(key))) == version
        assert b.in_l1(key)
        b_events.message.clear()
        started = time.perf_counter()
        a.invalidate(key)
        calls.append(time.perf_counter() - started)
        assert b_events.message.wait(WAIT), "invalidation never received"
        delays.append(b_events.message_times[-1] - started)
        assert not b.in_l1(key)
    delays.sort()
    p50 = statistics.median(delays) * 1000
    p95 = delays[int(len(delays) * 0.95) - 1] * 1000
    worst = delays[-1] * 1000
    with capsys.disabled():
        print(
            f"\ninvalidation delay A.invalidate() → B's L1 dropped over {len(delays)} runs: "
            f"p50 {p50:.2f} ms, p95 {p95:.2f} ms, max {worst:.2f} ms "
            f"(invalidate() call itself: p50 {statistics.median(calls) * 1000:.2f} ms)"
        )


def test_a_stale_fill_is_refused_in_l2(
    redis_url: str, unique: str, make_cache: CacheFactory
) -> None:
    # The reader's listener is not running: it plays a replica whose broadcast is late, so
    # only the L2 compare-and-set stands between its stale fill and Redis.
    reader, reader_events = make_cache(make_redis(redis_url), start=False)
    writer, _ = make_cache(make_redis(redis_url))
    other, _ = make_cache(make_redis(redis_url))
    db = Database()
    key = uuid.uuid4()
    db.write(key, 1)

    def read_old_row_while_a_write_commits() -> Item | None:
        old = db.rows[key]  # the reader's SELECT sees version 1...
        db.write(key, 2)  # ...a writer on another replica commits version 2...
        writer.invalidate(key)  # ...and invalidates, before the reader fills L2
        return old

    assert version_of(reader.get(key, read_old_row_while_a_write_commits)) == 1
    assert reader_events.counts[("l2", "stale_fill")] == 1
    assert reader_events.counts[("l2", "fill")] == 0
    raw = redis.Redis.from_url(redis_url)
    assert raw.get(f"test-{unique}:{key}") is None  # L2 not poisoned with version 1
    assert raw.pttl(f"test-{unique}:{key}:inv") > 0
    # A replica that reads after the write goes through the empty L2 to version 2, and its
    # fill (its snapshot of the stamp is the writer's) is accepted.
    assert version_of(other.get(key, db.loader(key))) == 2
    assert raw.get(f"test-{unique}:{key}") is not None
    # The late replica holds version 1 in L1 until its broadcast (or its L1 TTL) arrives;
    # (re)subscribing clears its L1, after which it reads version 2 from L2.
    assert reader.in_l1(key)
    reader.start()
    assert reader.wait_subscribed(WAIT)
    assert not reader.in_l1(key)
    assert version_of(reader.get(key, db.loader(key))) == 2
    assert reader_events.counts[("l2", "hit")] == 1
    raw.close()


def test_redis_unreachable_degrades_to_load_without_raising(
    make_cache: CacheFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.agent_svc.infra.cache")
    clock = FrozenClock()
    cache, events = make_cache(
        make_redis("redis://127.0.0.1:1/0"),  # connection refused
        start=False,  # no listener: only the calls below touch Redis
        clock=clock,
        breaker_seconds=1.0,
    )
    db = Database()
    key = uuid.uuid4()
    db.write(key, 1)

    def read_write_read(rounds: int) -> None:
        for _ in range(rounds):
            assert version_of(cache.get(key, db.loader(key))) == db.rows[key].version
            db.write(key, db.rows[key].version + 1)
            cache.invalidate(key)  # never raises
            # The writer sees its write at once.
            assert version_of(cache.get(key, db.loader(key))) == db.rows[key].version

    # Within one breaker period reads try Redis once, however many there are: a dead Redis
    # costs reads one connection attempt per period, not one per call. Writes try it once
    # each (an invalidation held back is a window for other replicas to serve the old
    # version) and keep it pending.
    rounds = 100
    read_write_read(rounds)
    assert events.counts[("l2", "error")] == 1 + rounds  # the first read, every write
    assert events.counts[("l2", "bypass")] == 2 * rounds - 1  # every other read
    assert cache.pending_invalidations == 1
    clock.now += 1.0  # the period ends: the next read tries Redis again, once
    read_write_read(rounds)
    assert events.counts[("l2", "error")] == 2 * (1 + rounds)
    assert events.counts[("l2", "bypass")] >= 2 * (2 * rounds - 1)
    assert cache.pending_invalidations == 1
    warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # rate-limited


class TcpProxy:
    """A TCP forwarder to Redis that can be cut (connections dropped, port closed) and
    restored on the same port, to play a network failure between one replica and Redis."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            sockets, self._sockets = self._sockets, []
        for sock in [*sockets, *([server] if server else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=1)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_a_writer_cut_off_from_redis_defers_invalidations_and_sends_them_on_reconnect(
    redis_url: str, make_cache: CacheFactory
) -> None:
    parts = urlsplit(redis_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379)).start()
    try:
        clock = SteppedClock()
        writer, writer_events = make_cache(
            make_redis(f"redis://127.0.0.1:{proxy.port}{parts.path}"), clock=clock
        )
        reader, _ = make_cache(make_redis(redis_url))
        assert writer.wait_subscribed(WAIT)
        assert reader.wait_subscribed(WAIT)
        db = Database()
        key = uuid.uuid4()
        db.write(key, 1)
        assert version_of(reader.get(key, db.loader(key))) == 1
        assert version_of(writer.get(key, db.loader(key))) == 1

        proxy.cut()
        db.write(key, 2)
        writer.invalidate(key)  # Redis unreachable: no exception, remembered
        assert writer.pending_invalidations == 1
        # The replica that served the write never returns the old version...
        assert version_of(writer.get(key, db.loader(key))) == 2
        clock.advance(1.0)  # past the breaker: L2 is still skipped while the key is pending
        writer.invalidate(key)
        assert version_of(writer.get(key, db.loader(key))) == 2
        # ...while another replica still may (the documented limit), until the writer is back.
        assert version_of(reader.get(key, db.loader(key))) == 1

        proxy.start()
        assert wait_for(lambda: writer.pending_invalidations == 0)
        assert wait_for(lambda: not reader.in_l1(key))
        assert version_of(reader.get(key, db.loader(key))) == 2
        assert writer_events.counts[("pubsub", "subscribed")] >= 2  # the listener came back
        assert version_of(writer.get(key, db.loader(key))) == 2
        # The writer's L2 reads work again too, once its doubt after the cut is over
        # (their connection was cut as well: the first read on it may fail, open the
        # breaker and start the doubt once more).
        hits = writer_events.counts[("l2", "hit")]

        def writer_reads_l2() -> bool:
            other = uuid.uuid4()
            db.write(other, 7)
            assert version_of(reader.get(other, db.loader(other))) == 7  # fills L2
            assert version_of(writer.get(other, db.loader(other))) == 7
            return writer_events.counts[("l2", "hit")] > hits

        assert wait_for(writer_reads_l2)
    finally:
        proxy.cut()


def test_the_listener_resubscribes_after_its_connection_is_killed_and_clears_l1(
    redis_url: str, unique: str, make_cache: CacheFactory
) -> None:
    name = f"cache-test-{unique}"
    client = redis.Redis.from_url(
        redis_url, client_name=name, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    a, _ = make_cache(make_redis(redis_url))
    b, b_events = make_cache(client)
    assert a.wait_subscribed(WAIT)
    assert b.wait_subscribed(WAIT)
    db = Database()
    key = uuid.uuid4()
    db.write(key, 1)
    b.get(key, db.loader(key))
    assert b.in_l1(key)

    admin = redis.Redis.from_url(redis_url)
    killed = 0
    for connection in admin.client_list(_type="pubsub"):
        if connection.get("name") == name:
            admin.client_kill_filter(_id=connection["id"])
            killed += 1
    assert killed == 1
    # Messages may have been lost while it was gone: on resubscribing, B forgets its L1.
    assert wait_for(lambda: b_events.counts[("pubsub", "subscribed")] >= 2)
    assert not b.in_l1(key)
    assert b_events.counts[("pubsub", "error")] >= 1

    # And invalidations reach it again (once its doubt after losing the listener is
    # over, L1 is filled again).
    assert wait_for(lambda: b.get(key, db.loader(key)) is not None and b.in_l1(key))
    db.write(key, 2)
    a.invalidate(key)
    assert wait_for(lambda: not b.in_l1(key))
    assert version_of(b.get(key, db.loader(key))) == 2
    admin.close()


def test_a_silently_dead_listener_connection_is_noticed(
    redis_url: str, make_cache: CacheFactory
) -> None:
    """No RST, no data: only the listener's own pings can tell the link is gone."""
    parts = urlsplit(redis_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379)).start()
    frozen = threading.Event()
    original_pump = TcpProxy._pump

    def freezable_pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not frozen.is_set():
                    sink.sendall(data)
        except OSError:
            pass

    proxy._pump = freezable_pump  # type: ignore[method-assign]
    try:
        client = make_redis(f"redis://127.0.0.1:{proxy.port}{parts.path}")
        cache, events = make_cache(client, listener_ping_seconds=0.1)
        assert cache.wait_subscribed(WAIT)
        frozen.set()  # the link swallows everything from now on
        assert wait_for(lambda: events.counts[("pubsub", "error")] >= 1)
        frozen.clear()
        assert wait_for(lambda: events.counts[("pubsub", "subscribed")] >= 2)
    finally:
        proxy._pump = original_pump  # type: ignore[method-assign]
        proxy.cut()
