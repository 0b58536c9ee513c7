"""Prometheus metrics: go-grpc-prometheus names for every call, plus domain metrics.

Each app owns a `Metrics` object with its own registry (no process globals), served on
its own HTTP port at /metrics.

What happens on every call is counted without a lock: each thread keeps its own tallies
(plain integers only that thread writes), and a scrape adds them up. prometheus_client's
Counter and Histogram take a lock per update; five of them per call were a measurable
part of a cache hit's cost. The exposition is the same: counters, and histograms with
cumulative buckets, `_sum` and `_count`.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["FastCounter", "MethodStats", "Metrics", "RpcMetrics"]

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# go-grpc-prometheus' default buckets, with finer ones below 5 ms where our calls live.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_CODES = tuple(grpc.StatusCode)
_CODE_INDEX = {code: index for index, code in enumerate(_CODES)}


def go_code_name(code: grpc.StatusCode) -> str:
    """The status code as Go's codes.Code.String() spells it (go-grpc-prometheus labels)."""
    if code == grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code == grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


class MethodStats:
    """A method's slot in the per-thread tallies, and its labels."""

    __slots__ = ("index", "labels", "streaming")

    def __init__(self, index: int, labels: tuple[str, str, str], streaming: bool) -> None:
        self.index = index
        self.labels = labels
        self.streaming = streaming


class _Tally:
    """One method's counts on one thread."""

    __slots__ = ("buckets", "handled", "received", "seconds", "sent", "started")

    def __init__(self) -> None:
        self.started = 0
        self.handled = [0] * len(_CODES)
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0
        self.received = 0
        self.sent = 0


class _ThreadTallies(threading.local):
    tallies: list[_Tally]

    def __init__(self, owner: RpcMetrics) -> None:
        self.tallies = []
        owner._adopt(self.tallies)


class RpcMetrics(Collector):
    """grpc_server_started_total, grpc_server_handled_total{grpc_code},
    grpc_server_handling_seconds, grpc_server_msg_received_total, grpc_server_msg_sent_total."""

    def __init__(self) -> None:
        self._methods: list[MethodStats] = []
        self._by_name: dict[str, MethodStats] = {}
        self._threads: list[list[_Tally]] = []
        self._lock = threading.Lock()
        self._local = _ThreadTallies(self)

    def _adopt(self, tallies: list[_Tally]) -> None:
        with self._lock:
            self._threads.append(tallies)

    def method(self, full_method: str, kind: str = "unary") -> MethodStats:
        """The slot of a method (`/package.Service/Method`), made on first use."""
        with self._lock:
            stats = self._by_name.get(full_method)
            if stats is None:
                service, _, name = full_method.lstrip("/").rpartition("/")
                stats = MethodStats(len(self._methods), (kind, service, name), kind != "unary")
                self._methods.append(stats)
                self._by_name[full_method] = stats
            return stats

    def _tally(self, stats: MethodStats) -> _Tally:
        tallies = self._local.tallies
        index = stats.index
        while len(tallies) <= index:
            tallies.append(_Tally())
        return tallies[index]

    def started(self, stats: MethodStats) -> _Tally:
        """Counts a call started; returns the tally to hand to `handled` (same thread)."""
        tally = self._tally(stats)
        tally.started += 1
        if not stats.streaming:
            tally.received += 1
        return tally

    def handled(
        self,
        stats: MethodStats,
        code: grpc.StatusCode,
        seconds: float,
        tally: _Tally | None = None,
    ) -> None:
        if tally is None:
            tally = self._tally(stats)
        tally.handled[_CODE_INDEX[code]] += 1
        tally.buckets[bisect_left(BUCKETS, seconds)] += 1
        tally.seconds += seconds
        if not stats.streaming and code is grpc.StatusCode.OK:
            tally.sent += 1

    def message(self, stats: MethodStats, *, sent: bool) -> None:
        """One message of a stream received or sent."""
        tally = self._tally(stats)
        if sent:
            tally.sent += 1
        else:
            tally.received += 1

    def _totals(self) -> list[tuple[MethodStats, _Tally]]:
        with self._lock:
            methods = list(self._methods)
            threads = [list(tallies) for tallies in self._threads]
        totals = []
        for stats in methods:
            total = _Tally()
            for tallies in threads:
                if stats.index < len(tallies):
                    tally = tallies[stats.index]
                    total.started += tally.started
                    total.received += tally.received
                    total.sent += tally.sent
                    total.seconds += tally.seconds
                    total.handled = [
                        a + b for a, b in zip(total.handled, tally.handled, strict=True)
                    ]
                    total.buckets = [
                        a + b for a, b in zip(total.buckets, tally.buckets, strict=True)
                    ]
            totals.append((stats, total))
        return totals

    def collect(self) -> Iterator[Metric]:
        started = CounterMetricFamily(
            "grpc_server_started", "RPCs started on the server.", labels=_LABELS
        )
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            labels=(*_LABELS, "grpc_code"),
        )
        received = CounterMetricFamily(
            "grpc_server_msg_received", "Stream messages received.", labels=_LABELS
        )
        sent = CounterMetricFamily("grpc_server_msg_sent", "Stream messages sent.", labels=_LABELS)
        handling = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server.",
            labels=_LABELS,
        )
        for stats, total in self._totals():
            labels = list(stats.labels)
            started.add_metric(labels, total.started)
            received.add_metric(labels, total.received)
            sent.add_metric(labels, total.sent)
            for code, count in zip(_CODES, total.handled, strict=True):
                handled.add_metric([*labels, go_code_name(code)], count)
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), total.buckets, strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            handling.add_metric(labels, buckets, total.seconds)
        yield from (started, handled, received, sent, handling)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class FastCounter(Collector):
    """A labelled counter for events on the request path, without a lock per event (per-
    thread tallies, summed at scrape time). `inc(*labels)` counts one."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: Any
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._threads: list[dict[tuple[str, ...], int]] = []
        self._declared: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        registry.register(self)

    def inc(self, *labels: str) -> None:
        try:
            counts: dict[tuple[str, ...], int] = self._local.counts
        except AttributeError:
            counts = self._local.counts = {}
            with self._lock:
                self._threads.append(counts)
        counts[labels] = counts.get(labels, 0) + 1

    def declare(self, *labels: str) -> None:
        """Export this series at 0 before its first event (rate() needs a start)."""
        with self._lock:
            self._declared.add(labels)

    def value(self, *labels: str) -> int:
        with self._lock:
            threads = list(self._threads)
        return sum(counts.get(labels, 0) for counts in threads)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self._name.removesuffix("_total"), self._documentation, labels=self._labelnames
        )
        totals: dict[tuple[str, ...], int] = dict.fromkeys(self._declared, 0)
        with self._lock:
            threads = list(self._threads)
        for counts in threads:
            for labels, count in list(counts.items()):
                totals[labels] = totals.get(labels, 0) + count
        for labels, count in sorted(totals.items()):
            family.add_metric(list(labels), count)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    """Every metric a service exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc = RpcMetrics()
        r.register(self.rpc)
        self.logins = Counter(
            "agentplatform_logins_total", "Login attempts by result.", ("result",), registry=r
        )
        self.tokens_issued = Counter(
            "agentplatform_tokens_issued_total",
            "IssueToken calls by grant (client_credentials, token_exchange) and result "
            "(issued, refused, throttled).",
            ("grant", "result"),
            registry=r,
        )
        self.token_verifications = FastCounter(
            "agentplatform_token_verifications_total",
            "Access-token checks by result (verified, cached, rejected, revoked, unavailable).",
            ("result",),
            registry=r,
        )
        self.cache_events = FastCounter(
            "agentplatform_cache_events_total",
            "Agent cache events by level and outcome: l1 hit|miss, l2 hit|miss|error|bypass|"
            "fill|stale_fill|older, load db, flight joined, invalidate sent|deferred, "
            "pubsub message|subscribed|error.",
            ("level", "outcome"),
            registry=r,
        )
        self.rate_limited = FastCounter(
            "agentplatform_rate_limited_total",
            "Calls refused by the per-address rate limit of public methods, by method.",
            ("grpc_method",),
            registry=r,
        )
        self.redis_errors = Counter(
            "agentplatform_redis_errors_total",
            "Redis errors by component.",
            ("component",),
            registry=r,
        )
        self.jwks_fetches = Counter(
            "agentplatform_jwks_fetches_total", "JWKS fetches by result.", ("result",), registry=r
        )
        self.signing_key_ready = Gauge(
            "agentplatform_signing_key_ready",
            "Whether this auth-svc replica has a signing key it can use (1) or not (0).",
            registry=r,
        )
        self.revocation_polls = Counter(
            "agentplatform_revocation_polls_total",
            "Polls of the token revocations by result (ok, error).",
            ("result",),
            registry=r,
        )
        self.db_pool_in_use = Gauge(
            "agentplatform_db_pool_connections_in_use",
            "Database connections checked out of the pool.",
            registry=r,
        )
        self.dependency_up = Gauge(
            "agentplatform_dependency_up",
            "Whether a dependency answered its last check (1) or not (0): database.",
            ("dependency",),
            registry=r,
        )
        self.job_runs = Counter(
            "agentplatform_job_runs_total",
            "Background job passes by job and result (success, failure, skipped: another "
            "replica held the job's lock).",
            ("job", "result"),
            registry=r,
        )
        self.job_items = Counter(
            "agentplatform_job_items_total",
            "What background jobs did, by job and kind (e.g. deleted).",
            ("job", "kind"),
            registry=r,
        )
        self.job_last_success = Gauge(
            "agentplatform_job_last_success_timestamp_seconds",
            "When each background job last ended a pass successfully (Unix time).",
            ("job",),
            registry=r,
        )
        self._bound: dict[tuple[int, tuple[str, ...]], Any] = {}

    def watch_pool(self, checked_out: Callable[[], int]) -> None:
        """Reports the pool's checked-out connections at every scrape."""
        self.db_pool_in_use.set_function(lambda: float(checked_out()))

    # -- hooks: plain callables the service and infra layers are given (no prometheus there)

    def login_result(self, result: str) -> None:
        """`result`: success, failure or locked (AuthService's login observer)."""
        self._children(self.logins, result).inc()

    def job_result(
        self, job: str, result: str, counts: Mapping[str, int], finished_at: float
    ) -> None:
        """shared.data.jobs.Worker's `on_result`."""
        self._children(self.job_runs, job, result).inc()
        for kind, count in counts.items():
            self._children(self.job_items, job, kind).inc(count)
        if result == "success":
            self.job_last_success.labels(job).set(finished_at)

    def declare_jobs(self, jobs: Iterable[str]) -> None:
        """Exports every job's series at 0 before its first pass."""
        for job in jobs:
            for result in ("success", "failure", "skipped"):
                self._children(self.job_runs, job, result)

    def token_issued(self, grant: str, result: str) -> None:
        """TokenEndpoint's `on_result`; the grant by its short name."""
        short = "token_exchange" if grant.endswith("token-exchange") else grant
        self._children(self.tokens_issued, short, result).inc()

    def revocation_poll(self, result: str) -> None:
        """RevocationPoller's `on_poll`."""
        self._children(self.revocation_polls, result).inc()

    def token_verification(self, result: str) -> None:
        """`result`: verified, cached, rejected or unavailable (TokenVerifier's `on_result`)."""
        self.token_verifications.inc(result)

    def cache_event(self, level: str, outcome: str) -> None:
        """TwoLevelCache's `on_event`; an L2 or pub/sub error is also a Redis error."""
        self.cache_events.inc(level, outcome)
        if outcome == "error":
            self.redis_error("cache")

    def rate_limit_event(self, method: str, outcome: str) -> None:
        """RateLimiter's `on_event`: ("Login", "refused") or ("redis", "error")."""
        if outcome == "refused":
            self.rate_limited.inc(method)
        else:
            self.redis_error("rate_limiter")

    def redis_error(self, component: str) -> None:
        """A Redis call failed and was caught (the caller degraded instead of failing)."""
        self._children(self.redis_errors, component).inc()

    def jwks_fetch(self, result: str) -> None:
        """`result`: ok or error (JwksKeyProvider's `on_fetch`)."""
        self._children(self.jwks_fetches, result).inc()

    def dependency(self, name: str, up: bool) -> None:
        """The outcome of a dependency's latest check (the readiness watcher's)."""
        self._children(self.dependency_up, name).set(1.0 if up else 0.0)

    def declare(self, counter: Counter | FastCounter, *label_values: tuple[str, ...]) -> None:
        """Exports these series at 0 before their first event (rate() needs a start)."""
        for values in label_values:
            if isinstance(counter, FastCounter):
                counter.declare(*values)
            else:
                self._children(counter, *values)

    def _children(self, metric: Counter | Gauge, *values: str) -> Any:
        """The labelled child, bound once."""
        key = (id(metric), values)
        child = self._bound.get(key)
        if child is None:
            child = self._bound.setdefault(key, metric.labels(*values))
        return child
