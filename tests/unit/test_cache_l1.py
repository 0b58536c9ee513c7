"""TwoLevelCache without Redis: the L1 layer, single flight and stale-fill protection."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict, dataclass

import pytest

from services.agent_svc.infra.cache import TwoLevelCache


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    name: str
    version: int


class ItemCodec:
    """Counts its work: a cache that encoded or decoded on a hit would show here."""

    def __init__(self) -> None:
        self.encoded = 0
        self.decoded = 0

    def encode(self, value: Item) -> bytes:
        self.encoded += 1
        return json.dumps(asdict(value)).encode()

    def decode(self, data: bytes) -> Item:
        self.decoded += 1
        return Item(**json.loads(data))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Loader:
    """load() for one key: returns `self.value`, counts calls."""

    def __init__(self, value: Item | None) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> Item | None:
        self.calls += 1
        return self.value


def make_cache(
    clock: Callable[[], float] = time.monotonic,
    events: Counter[tuple[str, str]] | None = None,
    codec: ItemCodec | None = None,
    **kwargs: object,
) -> TwoLevelCache[Item]:
    options: dict[str, object] = {"l1_max_entries": 100, "l1_ttl_seconds": 30.0}
    options.update(kwargs)
    return TwoLevelCache(
        redis=None,
        codec=codec or ItemCodec(),
        l2_ttl_seconds=300.0,
        clock=clock,
        on_event=None
        if events is None
        else (lambda level, outcome: events.update([(level, outcome)])),
        **options,  # type: ignore[arg-type]
    )


def version_of(value: Item | None) -> int:
    assert value is not None
    return value.version


def item(version: int = 1, key: uuid.UUID | None = None) -> Item:
    return Item(id=str(key or uuid.uuid4()), name=f"agent v{version}", version=version)


def test_miss_loads_then_hit_serves_the_same_object() -> None:
    events: Counter[tuple[str, str]] = Counter()
    cache = make_cache(events=events)
    key = uuid.uuid4()
    load = Loader(item())
    first = cache.get(key, load)
    assert first == load.value
    second = cache.get(key, load)
    assert second is first  # no decoding, no copy
    assert load.calls == 1
    assert events == {("l1", "miss"): 1, ("load", "db"): 1, ("l1", "hit"): 1}
    assert cache.in_l1(key)
    assert len(cache) == 1


def test_absent_records_are_not_cached() -> None:
    cache = make_cache()
    key = uuid.uuid4()
    load = Loader(None)
    assert cache.get(key, load) is None
    assert cache.get(key, load) is None
    assert load.calls == 2
    load.value = item(key=key)  # a create becomes visible at once
    assert cache.get(key, load) == load.value


def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    cache = make_cache(clock, l1_ttl_seconds=5.0)
    key = uuid.uuid4()
    load = Loader(item(1))
    cache.get(key, load)
    clock.now += 4.9
    cache.get(key, load)
    assert load.calls == 1
    load.value = item(2)
    clock.now += 0.2
    assert not cache.in_l1(key)
    assert cache.get(key, load) == load.value
    assert load.calls == 2


def test_l1_is_a_bounded_lru() -> None:
    cache = make_cache(l1_max_entries=3)
    keys = [uuid.uuid4() for _ in range(4)]
    loads = [Loader(item(i)) for i in range(4)]
    for key, load in zip(keys[:3], loads[:3], strict=True):
        cache.get(key, load)
    cache.get(keys[0], loads[0])  # keys[0] becomes the most recently used
    cache.get(keys[3], loads[3])  # evicts keys[1], the least recently used
    assert len(cache) == 3
    assert [cache.in_l1(k) for k in keys] == [True, False, True, True]
    cache.get(keys[1], loads[1])
    assert loads[1].calls == 2
    assert loads[0].calls == 1


def test_invalidate_drops_the_entry() -> None:
    cache = make_cache()
    key = uuid.uuid4()
    load = Loader(item(1))
    cache.get(key, load)
    load.value = item(2)
    cache.invalidate(key)
    assert not cache.in_l1(key)
    assert cache.get(key, load) == load.value
    cache.invalidate(uuid.uuid4())  # unknown keys are fine


def test_concurrent_misses_for_one_key_load_once() -> None:
    events: Counter[tuple[str, str]] = Counter()
    cache = make_cache(events=events)
    key = uuid.uuid4()
    threads = 16
    release = threading.Event()
    calls = 0

    def slow_load() -> Item:
        nonlocal calls
        calls += 1
        release.wait(30)
        return item(1, key)

    with futures.ThreadPoolExecutor(threads) as pool:
        results = [pool.submit(cache.get, key, slow_load) for _ in range(threads)]
        deadline = time.monotonic() + 30
        while events[("flight", "joined")] < threads - 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert events[("flight", "joined")] == threads - 1
        release.set()
        values = [f.result(timeout=30) for f in results]
    assert calls == 1
    assert all(v is values[0] for v in values)
    assert cache.get(key, slow_load) is values[0]


def test_a_failing_load_reaches_every_waiter_and_the_next_get_retries() -> None:
    events: Counter[tuple[str, str]] = Counter()
    cache = make_cache(events=events)
    key = uuid.uuid4()
    threads = 8
    release = threading.Event()

    def failing_load() -> Item:
        release.wait(30)
        raise RuntimeError("database down")

    with futures.ThreadPoolExecutor(threads) as pool:
        results = [pool.submit(cache.get, key, failing_load) for _ in range(threads)]
        deadline = time.monotonic() + 30
        while events[("flight", "joined")] < threads - 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        release.set()
        for result in results:
            with pytest.raises(RuntimeError, match="database down"):
                result.result(timeout=30)
    load = Loader(item(1, key))
    assert cache.get(key, load) == load.value  # no leftover flight, no deadlock
    assert load.calls == 1


def test_a_fill_that_raced_with_an_invalidation_is_not_stored() -> None:
    """Reader loads the old row; writer commits and invalidates; the reader's fill is dropped."""
    cache = make_cache()
    key = uuid.uuid4()
    database = {"row": item(1, key)}

    def load_then_writer_commits() -> Item:
        old = database["row"]  # the reader's SELECT sees version 1...
        database["row"] = item(2, key)  # ...then a writer commits version 2
        cache.invalidate(key)  # ...and invalidates, before the reader fills
        return old

    assert version_of(cache.get(key, load_then_writer_commits)) == 1  # overlapped the write
    assert not cache.in_l1(key)  # but not stored
    assert version_of(cache.get(key, lambda: database["row"])) == 2


def test_callers_after_an_invalidation_do_not_join_a_stale_load() -> None:
    cache = make_cache()
    key = uuid.uuid4()
    database = {"row": item(1, key)}
    loading = threading.Event()
    release = threading.Event()

    def slow_old_load() -> Item:
        old = database["row"]
        loading.set()
        release.wait(30)
        return old

    with futures.ThreadPoolExecutor(2) as pool:
        reader = pool.submit(cache.get, key, slow_old_load)
        assert loading.wait(30)
        database["row"] = item(2, key)
        cache.invalidate(key)
        # A read that starts after the write returned must see version 2, not join the
        # in-flight load of version 1.
        assert version_of(cache.get(key, lambda: database["row"])) == 2
        release.set()
        assert version_of(reader.result(timeout=30)) == 1
    assert version_of(cache.get(key, lambda: database["row"])) == 2  # the late fill was refused


def test_stale_fill_across_a_concurrent_reader_is_refused() -> None:
    """The same race, with the invalidation on another thread while load() runs."""
    cache = make_cache()
    key = uuid.uuid4()
    in_load = threading.Event()
    invalidated = threading.Event()

    def load() -> Item:
        in_load.set()
        invalidated.wait(30)
        return item(1, key)

    with futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(cache.get, key, load)
        assert in_load.wait(30)
        cache.invalidate(key)
        invalidated.set()
        reader.result(timeout=30)
    assert not cache.in_l1(key)


def test_an_l1_hit_does_no_work_but_the_lookup() -> None:
    """Hits hand back the stored object itself: no load, no decoding or encoding, no copy,
    nothing but the hit counted. (What a hit costs is scripts/bench.py's to measure.)"""
    events: Counter[tuple[str, str]] = Counter()
    codec = ItemCodec()
    cache = make_cache(events=events, codec=codec)
    key = uuid.uuid4()
    stored = cache.get(key, Loader(item()))
    load = Loader(None)
    rounds = 1000
    for _ in range(rounds):
        assert cache.get(key, load) is stored
    assert load.calls == 0
    assert (codec.encoded, codec.decoded) == (0, 0)
    assert events == {("l1", "miss"): 1, ("load", "db"): 1, ("l1", "hit"): rounds}


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        make_cache(l1_ttl_seconds=-1)
    with pytest.raises(ValueError, match="stamp"):
        make_cache(stamp_ttl_seconds=1.0)
