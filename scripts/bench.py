"""Benchmark: real servers, concurrent clients in separate processes, QPS and latency.

    python scripts/bench.py                 # PostgreSQL + Redis on 127.0.0.1 (default)
    python scripts/bench.py --duration 5    # shorter phases
    python scripts/bench.py --phases get_l1,get_l2   # only the cache ratios

Starts auth_svc and agent_svc (each pinned to one core, as in DESIGN.md's measurements)
on fresh PostgreSQL databases, seeds 100,000 agents, and drives each phase with closed-loop
clients from separate processes on the other core:

    empty        /agentplatform.bench.v1.Bench/Empty through the same interceptors
    get_l1       GetAgent, in-process cache hit
    get_l2       GetAgent, Redis hit (L1 disabled)
    get_db       GetAgent, database read (no cache)
    list         ListAgents, page of 50 out of 100,000 (then p99 at half its saturation rate)
    create       CreateAgent
    login        Login (argon2id)
    issue        IssueToken, client credentials with a secret (beside auth's empty handler)
    watch        GetAgent L1 with and without 1,000 open WatchAgents streams (idle), then
                 CreateAgent at 100/s fanned out to all 1,000: commit-to-delivery latency
                 (streams on AGENT_WATCH_PORT; --watch-on-main-port: on the sync server)

It prints QPS, p50/p95/p99 and server CPU per call, and the ratios to the empty handler.
Not a test: it does not run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python" / "src")]

from agentplatform.agent.v1 import agent_pb2  # noqa: E402
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402
from agentplatform.client import WATCH_CHANNEL_OPTIONS  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402

EMPTY = "/agentplatform.bench.v1.Bench/Empty"
GET = "/agentplatform.agent.v1.AgentService/GetAgent"
LIST = "/agentplatform.agent.v1.AgentService/ListAgents"
CREATE = "/agentplatform.agent.v1.AgentService/CreateAgent"
LOGIN = "/agentplatform.auth.v1.AuthService/Login"
PHASES = (
    "get_l1",
    "list",
    "create",
    "get_l2",
    "get_db",
    "login",
    "issue",
    "flood",
    "health",
    "watch",
)
WATCH = "/agentplatform.agent.v1.AgentService/WatchAgents"
ISSUE = "/agentplatform.auth.v1.TokenService/IssueToken"
REFRESH = "/agentplatform.auth.v1.AuthService/RefreshToken"
JWKS = "/agentplatform.auth.v1.AuthService/GetJwks"
HEALTH = "/grpc.health.v1.Health/Check"


# -- load generation (runs in client processes) -------------------------------------------


@dataclass(frozen=True)
class Load:
    target: str
    method: str
    requests: Sequence[bytes]
    metadata: tuple[tuple[str, str], ...]
    concurrency: int
    duration: float
    warmup: float
    rate: float = 0.0  # > 0: open loop at this many calls/s (per process)
    deadline: float = 30.0  # per call


def _client(load: Load) -> tuple[int, int, list[float], dict[str, int]]:  # noqa: PLR0915
    """Runs one process's share: returns (ok calls, errors, latencies in seconds of the ok
    calls, measured calls by status code)."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {(os.cpu_count() or 2) - 1})
    channel = grpc.insecure_channel(load.target, options=[("grpc.so_reuseport", 0)])
    call = channel.unary_unary(load.method)
    requests = itertools.cycle(load.requests)
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"ok": 0, "err": 0}
    codes: dict[str, int] = {}
    start = time.perf_counter()
    measure_from = start + load.warmup
    end = measure_from + load.duration
    done = threading.Event()
    issued_all = threading.Event()  # open loop: the last call is sent (it may end before `end`)
    outstanding = [0]

    def issue() -> None:
        with lock:
            request = next(requests)
            outstanding[0] += 1
        sent = time.perf_counter()
        future = call.future(request, metadata=load.metadata, timeout=load.deadline)
        future.add_done_callback(lambda f: finished(f, sent))

    def finished(future: grpc.Future, sent: float) -> None:
        now = time.perf_counter()
        code = future.code()
        ok = code == grpc.StatusCode.OK
        with lock:
            outstanding[0] -= 1
            if measure_from <= sent <= end:
                codes[code.name] = codes.get(code.name, 0) + 1
                if ok:
                    counts["ok"] += 1
                    latencies.append(now - sent)
                else:
                    counts["err"] += 1
            if outstanding[0] == 0 and (now > end or issued_all.is_set()):
                done.set()
        if load.rate == 0 and now <= end:
            issue()

    if load.rate > 0:
        interval = 1.0 / load.rate
        next_at = time.perf_counter()
        while next_at < end:
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            issue()
            next_at += interval
        with lock:
            issued_all.set()
            if outstanding[0] == 0:
                done.set()
        # The last calls' answers; was 35 s whenever the last one ended before `end` (the
        # watch phase then printed the server's CPU share a third of the truth).
        done.wait(35)
    else:
        for _ in range(load.concurrency):
            issue()
        done.wait(load.warmup + load.duration + 35)
    channel.close()
    return counts["ok"], counts["err"], latencies, codes


@dataclass
class Result:
    name: str
    qps: float
    errors: int
    p50: float
    p95: float
    p99: float
    cpu_us_per_call: float
    slowest: float = float("nan")
    codes: dict[str, int] = field(default_factory=dict)

    def row(self) -> str:
        return (
            f"{self.name:<30}{self.qps:>10,.0f}{self.p50 * 1e3:>9.2f}{self.p95 * 1e3:>9.2f}"
            f"{self.p99 * 1e3:>9.2f}{self.cpu_us_per_call:>11.0f}{self.errors:>8}"
        )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(pid: int) -> float:
    """A server's CPU with its running children's (agent_svc's watch workers)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    total = _cpu_seconds(pid)
    for child in children:
        try:
            total += _cpu_seconds(child)
        except FileNotFoundError:
            continue
    return total


@dataclass
class Sample:
    """One measured run of a load: what the clients saw and the server's CPU meanwhile."""

    ok: int
    errors: int
    latencies: list[float]
    codes: dict[str, int]
    cpu_seconds: float
    duration: float
    window: float  # warm-up + measured time: the span the CPU figure covers

    @property
    def qps(self) -> float:
        return self.ok / self.duration


def measure(server_pid: int, load: Load, processes: int, pool: Any) -> Sample:
    cpu_before = _cpu_seconds(server_pid)
    # Each process gets its own slice of the requests (distinct names for CreateAgent).
    shares = [
        replace(load, requests=load.requests[i::processes] or load.requests)
        for i in range(processes)
    ]
    outcomes = pool.map(_client, shares)
    cpu_after = _cpu_seconds(server_pid)
    return Sample(
        ok=sum(o[0] for o in outcomes),
        errors=sum(o[1] for o in outcomes),
        latencies=[lat for o in outcomes for lat in o[2]],
        codes={
            name: sum(o[3].get(name, 0) for o in outcomes)
            for name in {name for o in outcomes for name in o[3]}
        },
        cpu_seconds=cpu_after - cpu_before,
        duration=load.duration,
        window=load.warmup + load.duration,
    )


def summarize(name: str, samples: Sequence[Sample]) -> Result:
    ok = sum(s.ok for s in samples)
    latencies = [lat for s in samples for lat in s.latencies]
    # CPU also covers warm-up and drain: scale by calls made in that whole window, roughly.
    calls_in_windows = sum(s.ok * s.window / s.duration for s in samples) or 1
    return Result(
        name=name,
        qps=ok / sum(s.duration for s in samples),
        errors=sum(s.errors for s in samples),
        p50=_percentile(latencies, 0.50),
        p95=_percentile(latencies, 0.95),
        p99=_percentile(latencies, 0.99),
        slowest=max(latencies, default=float("nan")),
        codes={
            name: sum(s.codes.get(name, 0) for s in samples)
            for name in {name for s in samples for name in s.codes}
        },
        cpu_us_per_call=sum(s.cpu_seconds for s in samples) / calls_in_windows * 1e6,
    )


def run_load(name: str, server_pid: int, load: Load, processes: int, pool: Any) -> Result:
    return summarize(name, [measure(server_pid, load, processes, pool)])


# -- WatchAgents streams (in watcher processes) -------------------------------------------


def _watchers(  # noqa: PLR0915, PLR0917 - a Process target's arguments
    target: str,
    metadata: tuple[tuple[str, str], ...],
    count: int,
    ready: Any,
    stop: Any,
    results: Any,
) -> None:
    """Holds `count` WatchAgents streams (grpc.aio: one event loop, one thread, for all of
    them, over CHANNELS_PER_PROCESS channels); puts "ready" once each has its first
    message, and at `stop` what every stream received: every change on every stream is
    timed, from its change_time (stamped just before its commit, on this machine's clock)
    to its arrival here. Cheap enough to keep up: the messages are taken as bytes, and a
    message's bytes are parsed once per process (the server sends the same serialized
    message to every stream of a round), each stream then only looks its changes up; the
    latencies go into a histogram (HISTOGRAM_STEP buckets), not a list."""
    import asyncio

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {(os.cpu_count() or 2) - 1})

    async def main() -> None:
        histogram: dict[int, int] = {}  # latency bucket -> deliveries
        # agent id -> [deliveries, last arrival, change_time]
        per_change: dict[str, list[float]] = {}
        parsed: dict[bytes, tuple[tuple[str, float], ...]] = {}
        counters = {"messages": 0, "parses": 0, "opened": 0, "ended": 0}
        parse = agent_pb2.WatchAgentsResponse.FromString

        def changes_of(data: bytes) -> tuple[tuple[str, float], ...]:
            known = parsed.get(data)
            if known is None:
                counters["parses"] += 1
                if len(parsed) > 1_000:
                    parsed.clear()
                known = parsed[data] = tuple(
                    (change.agent_id, change.change_time.ToNanoseconds() / 1e9)
                    for change in parse(data).changes
                )
            return known

        channels = [
            grpc.aio.insecure_channel(
                target,
                # As the typed client's watch channel (connect(watch=True)): a small stream
                # window, so a holder that falls behind gets bigger messages, not a queue.
                options=[
                    ("grpc.so_reuseport", 0),
                    ("grpc.use_local_subchannel_pool", 1),
                    *WATCH_CHANNEL_OPTIONS,
                ],
            )
            for _ in range(CHANNELS_PER_PROCESS)
        ]
        calls = [channel.unary_stream(WATCH, request_serializer=_serialize) for channel in channels]

        async def one(n: int) -> None:
            stream = calls[n % len(calls)](agent_pb2.WatchAgentsRequest(), metadata=metadata)
            first = True
            try:
                async for data in stream:
                    now = time.time()
                    if first:
                        first = False
                        counters["opened"] += 1
                        if counters["opened"] == count:
                            ready.set()
                        continue
                    counters["messages"] += 1
                    for agent_id, change_time in changes_of(data):
                        bucket = int((now - change_time) / HISTOGRAM_STEP)
                        histogram[bucket] = histogram.get(bucket, 0) + 1
                        seen = per_change.get(agent_id)
                        if seen is None:
                            per_change[agent_id] = [1, now, change_time]
                        else:
                            seen[0] += 1
                            seen[1] = max(seen[1], now)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError:
                counters["ended"] += 1  # ended by the server before `stop`: reported

        tasks = [asyncio.create_task(one(n)) for n in range(count)]
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        results.put((histogram, per_change, counters))

    asyncio.run(main())


def _serialize(request: Any) -> bytes:
    return bytes(request.SerializeToString())


HolderReport = tuple[dict[int, int], dict[str, list[float]], dict[str, int]]
HOLDERS_DIR = ROOT / "scripts" / "watch_holders"


class _PythonHolders:
    """WATCHER_PROCESSES grpc.aio processes (`_watchers`), as the typed client would watch."""

    def __init__(self, ctx: Any, target: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stop = ctx.Event()
        self._results = ctx.Queue()
        self._readies = [ctx.Event() for _ in range(WATCHER_PROCESSES)]
        share = WATCHERS // WATCHER_PROCESSES
        self._processes = [
            ctx.Process(
                target=_watchers,
                args=(target, metadata, share, ready, self._stop, self._results),
                daemon=True,
            )
            for ready in self._readies
        ]
        for process in self._processes:
            process.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid]

    def wait_ready(self, timeout: float) -> bool:
        return all(ready.wait(timeout) for ready in self._readies)

    def reports(self) -> list[HolderReport]:
        self._stop.set()
        got = [self._results.get(timeout=120) for _ in self._processes]
        for process in self._processes:
            process.join(30)
        return got


class _NodeHolders:
    """One Node.js process (scripts/watch_holders/holder.js, @grpc/grpc-js) holding every
    stream, on the clients' core: ~20 µs of CPU a message where the Python holders take
    45 to 60, which on this 2-core machine left the fan-out waiting on its own clients."""

    def __init__(
        self, target: str, metadata: tuple[tuple[str, str], ...], *, pinned: bool = True
    ) -> None:
        import subprocess

        _install_node_holders()
        core = (os.cpu_count() or 2) - 1

        def pin() -> None:  # before exec: every thread of node inherits it
            if pinned and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
                os.sched_setaffinity(0, {core})

        channels = WATCHER_PROCESSES * CHANNELS_PER_PROCESS
        self._process = subprocess.Popen(
            ["node", "holder.js", target, str(WATCHERS), str(channels), json.dumps(metadata)],
            cwd=HOLDERS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pin,  # noqa: PLW1509 - the benchmark's main thread starts it
        )

    @property
    def pids(self) -> list[int]:
        return [self._process.pid]

    def wait_ready(self, timeout: float) -> bool:
        line: list[str] = []
        reader = threading.Thread(
            target=lambda: line.append(self._process.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        return bool(line) and line[0].strip() == "ready"

    def reports(self) -> list[HolderReport]:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write("stop\n")
        self._process.stdin.flush()
        report = json.loads(self._process.stdout.readline())
        self._process.wait(30)
        histogram = {int(bucket): int(n) for bucket, n in report["histogram"].items()}
        return [(histogram, report["per_change"], report["counters"])]


def _install_node_holders() -> None:
    """`npm ci` of the holders' locked dependencies, once (they are not part of the services)."""
    import shutil
    import subprocess

    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit(
            "the watch phase's stream holders run on Node.js (node and npm, 18 or newer): "
            "install them, or pass --holders python"
        )
    if not (HOLDERS_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HOLDERS_DIR,
            check=True,
        )


# -- environment: databases, servers, data --------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def postgres_database(admin_url: str, label: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"agentplatform_bench_{label}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def server(
    service: str, env: dict[str, str], port: int, cpu: int | None, extra: Sequence[str] = ()
) -> Iterator[int]:
    """Starts scripts/bench_server.py; yields its pid once its health says SERVING."""
    import subprocess

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    log = open(ROOT / ".data" / f"bench-{service}-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_server.py"),
            service,
            *(["--cpu", str(cpu)] if cpu is not None else []),
            *extra,
        ],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{service} did not start; see {log.name}")
                try:
                    kind = "agent" if service == "bare" else service
                    name = f"agentplatform.{kind}.v1.{kind.capitalize()}Service"
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        yield process.pid
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def common_env(prefix: str, port: int, database_url: str, redis_url: str | None) -> dict[str, str]:
    env = {
        f"{prefix}_PORT": str(port),
        f"{prefix}_METRICS_PORT": "0",
        **({"AGENT_WATCH_PORT": "0"} if prefix == "AGENT" else {}),
        f"{prefix}_DATABASE_URL": database_url,
        f"{prefix}_LOG_LEVEL": "WARNING",
        f"{prefix}_DATA_DIR": str(ROOT / ".data"),
        f"{prefix}_PROFILE": "dev",
    }
    if redis_url:
        env[f"{prefix}_REDIS_URL"] = redis_url
    return env


def bench_service_account(auth_env: dict[str, str], auth_target: str) -> tuple[str, str]:
    """An administrator (made with the operator's CLI) creates a service account: its id
    and client secret."""
    import subprocess

    email, password = "bench-admin@example.com", "bench-admin-password"
    subprocess.run(
        [sys.executable, "-m", "services.auth_svc.cli", "--email", email],
        env={**os.environ, **auth_env, "AUTH_ADMIN_PASSWORD": password},
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    with grpc.insecure_channel(auth_target) as channel:
        login = auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(email=email, password=password)
        )
        created = auth_pb2_grpc.ServiceAccountServiceStub(channel).CreateServiceAccount(
            auth_pb2.CreateServiceAccountRequest(
                service_account=auth_pb2.ServiceAccount(
                    display_name="bench", scopes=["agents.read", "agents.write"]
                )
            ),
            metadata=(("authorization", f"Bearer {login.access_token}"),),
        )
    return created.service_account.id, created.client_secret


def seed_agents(database_url: str, owner_id: str, count: int) -> list[str]:
    """Bulk-inserts `count` agents for one owner straight into agent_svc's tables."""
    from scripts.bench_seed import seed
    from shared.data import migrations

    migrations.upgrade("agent", database_url)
    return seed(database_url, uuid.UUID(owner_id), count)


# -- the phases ---------------------------------------------------------------------------------


def main() -> int:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight per process")
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument(
        "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--phases",
        type=lambda text: [p for p in text.split(",") if p],
        default=list(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)}",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="GetAgent and the empty handler alternate in this many slices each",
    )
    parser.add_argument(
        "--watch-on-main-port",
        action="store_true",
        help="watch phase: streams on the main port (the sync server) instead of "
        "AGENT_WATCH_PORT (the grpc.aio server)",
    )
    parser.add_argument(
        "--holders",
        choices=("node", "python"),
        default="node",
        help="watch phase: who holds the 1,000 streams: one Node.js process (@grpc/grpc-js, "
        "scripts/watch_holders; installed with npm on first use) or 4 Python grpc.aio "
        "processes (the typed client's stack, twice the CPU a message)",
    )
    parser.add_argument(
        "--watch-env",
        action="append",
        default=[],
        help="watch phase: AGENT_X=value for its server (repeatable)",
    )
    parser.add_argument(
        "--watch-workers",
        type=int,
        default=0,
        help="watch phase: AGENT_WATCH_WORKERS for its server; the server, its workers and "
        "the stream holders then share every core (no pinning)",
    )
    args = parser.parse_args()
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    (ROOT / ".data").mkdir(exist_ok=True)
    import redis

    redis.Redis.from_url(args.redis).flushdb()
    ctx = multiprocessing.get_context("spawn")
    results: list[Result] = []
    with ExitStack() as stack, ctx.Pool(args.processes) as pool:
        auth_db = stack.enter_context(postgres_database(args.postgres, "auth"))
        agent_db = stack.enter_context(postgres_database(args.postgres, "agent"))
        auth_port = _free_port()
        auth_env = common_env("AUTH", auth_port, auth_db, args.redis)
        auth_env["AUTH_LOGIN_MAX_FAILURES"] = "1000000"
        # Every call comes from 127.0.0.1: lift the per-address limits, so that the flood
        # phase measures what sheds load when the address is not the limit (the hashing
        # room); a rotated refresh token stays usable, so one token serves the probe.
        auth_env["AUTH_RATE_LIMITS"] = ",".join(
            f"{m}=100000/100000"
            for m in ("Register", "Login", "RefreshToken", "Logout", "GetJwks", "IssueToken")
        )
        auth_env["AUTH_REFRESH_REUSE_GRACE_SECONDS"] = str(10**9)
        auth_env["AUTH_HEALTH_PORT"] = str(_free_port())
        auth_pid = stack.enter_context(server("auth", auth_env, auth_port, cpu=0))
        auth_target = f"127.0.0.1:{auth_port}"
        with grpc.insecure_channel(auth_target) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            email, password = "bench@example.com", "bench-password-1"
            stub.Register(auth_pb2.RegisterRequest(email=email, password=password))
            login = stub.Login(auth_pb2.LoginRequest(email=email, password=password))
        token = login.access_token
        metadata = (("authorization", f"Bearer {token}"),)

        def phase(
            name: str,
            target: str,
            pid: int,
            method: str,
            requests: Sequence[bytes],
            *,
            concurrency: int | None = None,
            rate: float = 0.0,
            duration: float | None = None,
            deadline: float = 30.0,
        ) -> Result:
            load = Load(
                target,
                method,
                list(requests),
                metadata,
                concurrency or args.concurrency,
                duration or args.duration,
                args.warmup,
                rate,
                deadline,
            )
            result = run_load(name, pid, load, args.processes, pool)
            print(result.row(), flush=True)
            if result.errors:
                print(f"{'':<30}  failed calls by code: {result.codes}", flush=True)
            results.append(result)
            return result

        print(f"seeding {args.agents:,} agents …", flush=True)
        started = time.perf_counter()
        ids = seed_agents(agent_db, login.user.id, args.agents)
        print(f"seeded in {time.perf_counter() - started:.1f}s", flush=True)
        header = (
            f"{'phase':<30}{'QPS':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
            f"{'CPU µs/call':>11}{'errors':>8}"
        )
        print(header)
        hot = [agent_pb2.GetAgentRequest(id=i).SerializeToString() for i in ids[:1000]]

        previous = stack.enter_context(ExitStack())
        agent_health_ports: dict[str, int] = {}

        def agent_server(extra: dict[str, str], redis_url: str | None) -> tuple[str, int]:
            port = _free_port()
            env = common_env("AGENT", port, agent_db, redis_url)
            env.update(
                {
                    "AGENT_AUTH_TARGET": auth_target,
                    "AGENT_MIGRATE_ON_START": "false",
                    # The seeded owner has 100,000 agents, past the default quota.
                    "AGENT_MAX_AGENTS_PER_OWNER": "0",
                    **extra,
                }
            )
            env["AGENT_HEALTH_PORT"] = str(health_port := _free_port())
            agent_health_ports[f"127.0.0.1:{port}"] = health_port
            # One agent server at a time on the measured core: stop the previous one.
            previous.close()
            # With watch workers, the server and its workers run on every core (the
            # workers are the server's children: pinned, they would share its core).
            workers = env.get("AGENT_WATCH_WORKERS", "0") != "0"
            pid = previous.enter_context(server("agent", env, port, cpu=None if workers else 0))
            return f"127.0.0.1:{port}", pid

        def prewarm(target: str) -> None:
            """One pass over the hot set, so the cache phases measure hits only."""
            with grpc.insecure_channel(target) as channel:
                get = channel.unary_unary(GET)
                for request in hot:
                    get(request, metadata=metadata, timeout=10)

        @dataclass(frozen=True)
        class Contender:
            label: str
            target: str
            pid: int
            method: str
            requests: Sequence[bytes]

        def compare(contenders: Sequence[Contender]) -> list[tuple[Result, list[float]]]:
            """The contenders in alternating slices (a, b, c, a, b, c, …), so that drift in
            the machine's speed hits each alike; returns each one's result and its QPS in
            every round."""
            samples: list[list[Sample]] = [[] for _ in contenders]
            for _ in range(args.rounds):
                for index, contender in enumerate(contenders):
                    load = Load(
                        contender.target,
                        contender.method,
                        list(contender.requests),
                        metadata,
                        args.concurrency,
                        args.duration / args.rounds,
                        min(args.warmup, 1.0),
                    )
                    samples[index].append(measure(contender.pid, load, args.processes, pool))
            outcome = []
            for contender, taken in zip(contenders, samples, strict=True):
                result = summarize(contender.label, taken)
                print(result.row(), flush=True)
                results.append(result)
                outcome.append((result, [s.qps for s in taken]))
            return outcome

        def ratio(
            of: tuple[Result, list[float]], to: tuple[Result, list[float]]
        ) -> tuple[float, list[float]]:
            return of[0].qps / to[0].qps, [a / b for a, b in zip(of[1], to[1], strict=True)]

        selected = set(args.phases)
        flood_summary: tuple[float, float, dict[str, Result], dict[str, Result]] | None = None
        watch_summary = ""
        ratios: dict[str, tuple[float, list[float]]] = {}
        list_half: Result | None = None
        target, pid = agent_server({}, args.redis)
        prewarm(target)
        if "get_l1" in selected:
            with grpc.insecure_channel(target) as channel:
                prebuilt = channel.unary_unary(GET)(hot[0], metadata=metadata, timeout=10)
            bare_port = _free_port()
            bare_pid = stack.enter_context(
                server(
                    "bare",
                    {},
                    bare_port,
                    0,
                    ["--port", str(bare_port), "--response", prebuilt.hex()],
                )
            )
            bare, empty, l1 = compare(
                [
                    Contender("bare floor GetAgent", f"127.0.0.1:{bare_port}", bare_pid, GET, hot),
                    Contender("empty handler (L1)", target, pid, EMPTY, [b""]),
                    Contender("GetAgent L1 hit", target, pid, GET, hot),
                ]
            )
            ratios["L1 vs bare floor"] = ratio(l1, bare)
            ratios["L1 vs empty"] = ratio(l1, empty)
        if "list" in selected:
            list_request = agent_pb2.ListAgentsRequest(page_size=50).SerializeToString()
            list_sat = phase("ListAgents (saturated)", target, pid, LIST, [list_request])
            half = list_sat.qps / 2 / args.processes
            list_half = phase("ListAgents @ 50% sat.", target, pid, LIST, [list_request], rate=half)
        if "create" in selected:
            creates = [
                agent_pb2.CreateAgentRequest(
                    agent=agent_pb2.Agent(
                        name=f"bench-create-{n}",
                        model="gpt-4o",
                        instructions="You are a benchmark.",
                    )
                ).SerializeToString()
                for n in range(200_000)
            ]
            phase("CreateAgent", target, pid, CREATE, creates)
        if "get_l2" in selected:
            target, pid = agent_server({"AGENT_L1_MAX_ENTRIES": "0"}, args.redis)
            prewarm(target)
            empty, l2 = compare(
                [
                    Contender("empty handler (L2)", target, pid, EMPTY, [b""]),
                    Contender("GetAgent L2 hit", target, pid, GET, hot),
                ]
            )
            ratios["L2 vs empty"] = ratio(l2, empty)

        if "get_db" in selected:
            target, pid = agent_server({"AGENT_L1_MAX_ENTRIES": "0"}, None)
            phase(
                "GetAgent DB read",
                target,
                pid,
                GET,
                [agent_pb2.GetAgentRequest(id=i).SerializeToString() for i in ids[:20_000]],
            )

        login_request = auth_pb2.LoginRequest(email=email, password=password).SerializeToString()
        login_capacity: float | None = None
        if "login" in selected or "flood" in selected:
            # In flight: 2 per client process, within the hashing room (threads + queue), so
            # that this measures the hashing capacity, not a storm of refusals.
            login_capacity = phase(
                "Login (argon2id)", auth_target, auth_pid, LOGIN, [login_request], concurrency=2
            ).qps

        if "issue" in selected:
            account_id, secret = bench_service_account(auth_env, auth_target)
            issue_request = auth_pb2.IssueTokenRequest(
                grant_type="client_credentials", client_id=account_id, client_secret=secret
            ).SerializeToString()
            empty, issued = compare(
                [
                    Contender("empty handler (auth)", auth_target, auth_pid, EMPTY, [b""]),
                    Contender(
                        "IssueToken (client secret)", auth_target, auth_pid, ISSUE, [issue_request]
                    ),
                ]
            )
            ratios["issue vs empty"] = ratio(issued, empty)

        if "flood" in selected:
            assert login_capacity is not None
            flood_rate = max(10 * login_capacity, 100.0)
            probes = [
                (REFRESH, auth_pb2.RefreshTokenRequest(refresh_token=login.refresh_token), 40.0),
                (JWKS, auth_pb2.GetJwksRequest(), 200.0),
            ]

            def probe(label: str) -> dict[str, Result]:
                measured = {}
                for method, request, rate in probes:
                    name = method.rsplit("/", 1)[1]
                    measured[name] = phase(
                        f"{name} {label}",
                        auth_target,
                        auth_pid,
                        method,
                        [request.SerializeToString()],
                        rate=rate / args.processes,
                        deadline=2.0,
                    )
                return measured

            alone = probe("alone")
            flood_load = Load(
                auth_target,
                LOGIN,
                [login_request],
                (),
                0,
                2 * (args.duration + args.warmup) + 5,
                0.0,
                rate=flood_rate,
                deadline=2.0,
            )
            flooder = ctx.Process(target=_client, args=(flood_load,), daemon=True)
            flooder.start()
            time.sleep(args.warmup)  # the flood is at its rate before the probes start
            flooded = probe(f"+ {flood_rate:,.0f} Login/s")
            flooder.join(2 * (args.duration + args.warmup) + 40)
            flood_summary = (login_capacity, flood_rate, alone, flooded)

        if "health" in selected:
            target, pid = agent_server({}, args.redis)
            health_port = agent_health_ports[target]
            heavy = agent_pb2.ListAgentsRequest(page_size=500).SerializeToString()
            storm = Load(
                target,
                LIST,
                [heavy],
                metadata,
                500,
                args.duration + args.warmup + 5,
                0.0,
                deadline=60.0,
            )
            storms = [ctx.Process(target=_client, args=(storm,), daemon=True) for _ in range(2)]
            for process in storms:
                process.start()
            time.sleep(args.warmup + 1)  # 1,000 calls in flight before the checks start
            check = health_pb2.HealthCheckRequest(service="").SerializeToString()
            for label, address in (
                ("health, gRPC port", target),
                ("health, health port", f"127.0.0.1:{health_port}"),
            ):
                phase(
                    label,
                    address,
                    pid,
                    HEALTH,
                    [check],
                    rate=5.0,
                    deadline=10.0,
                    duration=min(args.duration, 5.0),
                )
            for process in storms:
                process.join(args.duration + args.warmup + 70)

        if "watch" in selected:
            watch_summary = _watch_phase(
                args,
                ctx,
                agent_server,
                prewarm,
                compare,
                metadata,
                ratios,
                hot,
                agent_db,
                login.user.id,
            )

    print()
    if watch_summary:
        print(watch_summary)
    for key, label, floor in (
        ("L1 vs bare floor", "GetAgent L1 (in-process) hit QPS vs the bare floor's", 0.80),
        ("L1 vs empty", "GetAgent L1 (in-process) hit QPS vs our empty handler's", 0.80),
        ("L2 vs empty", "GetAgent L2 (Redis) hit QPS vs our empty handler's", 0.60),
        ("issue vs empty", "IssueToken (client credentials) QPS vs auth's empty handler's", 0.25),
        ("L1 with watchers", "GetAgent L1 QPS with 1,000 idle watchers vs without", 0.90),
    ):
        if key in ratios:
            value, rounds = ratios[key]
            verdict = "met" if value >= floor else "MISSED"
            spread = ", ".join(f"{r:.0%}" for r in rounds)
            print(f"{label} ≥ {floor:.0%}: {value:.0%} ({verdict}; by round: {spread})")
    if list_half is not None:
        verdict = "met" if list_half.p99 < 0.020 else "MISSED"
        print(
            f"ListAgents p99 at half saturation < 20 ms: {list_half.p99 * 1e3:.2f} ms ({verdict})"
        )
    if flood_summary is not None:
        capacity, rate, alone, flooded = flood_summary
        print(
            f"Login flood: {rate:,.0f} calls/s = 10 x the hashing capacity measured above "
            f"({capacity:,.0f}/s); during it:"
        )
        for name in alone:
            growth = flooded[name].p99 / alone[name].p99
            deadline_failures = flooded[name].codes.get("DEADLINE_EXCEEDED", 0)
            verdict = "met" if growth <= 2 and deadline_failures == 0 else "MISSED"
            print(
                f"  {name} p99 {alone[name].p99 * 1e3:.2f} ms alone, "
                f"{flooded[name].p99 * 1e3:.2f} ms flooded ({growth:.2f}x; target <= 2x), "
                f"{deadline_failures} deadline failures of "
                f"{sum(flooded[name].codes.values())} ({verdict})"
            )
    for result in results:
        if result.name.startswith("health"):
            probed = result.name.endswith("health port")  # what the kubelet probes
            verdict = "met" if result.slowest < 2.0 and result.errors == 0 else "MISSED"
            print(
                f"{result.name} during 1,000 heavy ListAgents: p99 {result.p99 * 1e3:.1f} ms, "
                f"slowest {result.slowest * 1e3:.1f} ms, {result.errors} failed "
                + (
                    f"(probe timeout 2 s: {verdict})"
                    if probed
                    else "(not probed: shares the port's limit of concurrent calls)"
                )
            )
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


WATCHERS = 1_000
WATCHER_PROCESSES = 4
CHANNELS_PER_PROCESS = 2
HISTOGRAM_STEP = 0.0005  # seconds: the latency histogram's resolution
DRAIN_SECONDS = 5.0  # after the last commit, before the watchers stop and count
CHANGES_PER_SECOND = 100.0


def _watch_phase(  # noqa: PLR0915, PLR0917
    args: Any,
    ctx: Any,
    agent_server: Any,
    prewarm: Any,
    compare: Any,
    metadata: tuple[tuple[str, str], ...],
    ratios: dict[str, tuple[float, list[float]]],
    hot: list[bytes],
    agent_db: str,
    owner_id: str,
) -> str:
    """GetAgent L1 without, with, and again without 1,000 idle streams; then 100 changes
    a second committed beside it (see below) with all 1,000 watching (every stream gets
    every change: one owner), and a GetAgent probe on the server meanwhile."""
    watch_port = _free_port()
    extra = dict(item.split("=", 1) for item in args.watch_env)
    workers = args.watch_workers
    if workers:
        extra["AGENT_WATCH_WORKERS"] = str(workers)
    target, pid = agent_server(
        {
            "AGENT_WATCH_MAX_STREAMS": str(WATCHERS + 100),
            "AGENT_WATCH_PORT": str(watch_port),
            **extra,
        },
        args.redis,
    )
    # The streams: on the WatchAgents port (grpc.aio) unless asked for the main one.
    watch_target = target if args.watch_on_main_port else f"127.0.0.1:{watch_port}"
    prewarm(target)
    contender = _contender(target, pid, hot)
    before = compare([contender("GetAgent L1, no watchers")])[0]
    holders: _PythonHolders | _NodeHolders = (
        _NodeHolders(watch_target, metadata, pinned=not workers)
        if args.holders == "node"
        else _PythonHolders(ctx, watch_target, metadata)
    )
    if not holders.wait_ready(120):
        raise RuntimeError("the watchers did not all open their streams")
    during = compare([contender(f"GetAgent L1, {WATCHERS:,} watchers")])[0]
    # The changes are committed by a small writer process (on the clients' core): rows
    # appended to the change log as a replica's CreateAgent appends them, each followed by
    # the Redis wake-up, as in production with several replicas. (A second agent_svc doing
    # the creates on that core fell behind the 100/s, starved by the watchers' clients.)
    # Meanwhile, GetAgent on the fanning-out server at a light open-loop rate: what the
    # fan-out does to a unary call's latency.
    probe_load = Load(target, GET, hot, metadata, 0, args.duration, args.warmup, rate=200.0)
    probed = ctx.Queue()
    prober = ctx.Process(target=_probe, args=(probe_load, probed), daemon=True)
    prober.start()
    written = ctx.Queue()
    seconds = args.duration + args.warmup
    writer_ready, go = ctx.Event(), ctx.Event()
    writer = ctx.Process(
        target=_change_writer,
        args=(agent_db, args.redis, owner_id, CHANGES_PER_SECOND, seconds, writer_ready, go),
        kwargs={"out": written},
        daemon=True,
    )
    writer.start()
    # The writer's (and the prober's) start-up, imports and connections, is not measured:
    # on the holders' core it delayed the first deliveries by up to a second.
    if not writer_ready.wait(60):
        raise RuntimeError("the change writer did not start")
    cpu_before, wall_before = _tree_cpu_seconds(pid), time.monotonic()
    clients_before = sum(_cpu_seconds(holder) for holder in holders.pids)
    go.set()
    made, lag, committed_at, writer_seconds = written.get(timeout=seconds + 60)
    print(
        f"{f'changes committed @{CHANGES_PER_SECOND:.0f}/s':<30}{made / seconds:>10,.0f}"
        f"{'':>27}{'':>11}{'':>8}   (writer behind its schedule by up to {lag * 1e3:.0f} ms; "
        f"its CPU {writer_seconds / seconds:.0%} of the holders' core)",
        flush=True,
    )
    ok, errors, probe_latencies, _codes = probed.get(timeout=120)
    print(
        f"{'GetAgent @200/s during fan-out':<30}{ok / args.duration:>10,.0f}"
        f"{_percentile(probe_latencies, 0.5) * 1e3:>9.2f}"
        f"{_percentile(probe_latencies, 0.95) * 1e3:>9.2f}"
        f"{_percentile(probe_latencies, 0.99) * 1e3:>9.2f}{'':>11}{errors:>8}",
        flush=True,
    )
    time.sleep(DRAIN_SECONDS)  # the last changes reach the streams
    # CPU over the whole fan-out, the drain included (its messages are counted too).
    fan_out_seconds = _tree_cpu_seconds(pid) - cpu_before
    fan_out_cpu = fan_out_seconds / (time.monotonic() - wall_before)
    # The stream holders share the other core with the writer and the probe: when they use
    # most of it, delivery waits on the clients too (the figure is not the server's alone).
    clients_seconds = sum(_cpu_seconds(holder) for holder in holders.pids) - clients_before
    clients_cpu = clients_seconds / (time.monotonic() - wall_before)
    # Joined only now: a child's exit took up to half a minute in some runs, which the CPU
    # shares above counted as idle fan-out time (they came out a third of the truth).
    writer.join(30)
    prober.join(30)
    histogram: dict[int, int] = {}
    per_change: dict[str, list[float]] = {}  # agent id -> [deliveries, last arrival, time]
    counters: dict[str, int] = {}
    for got, changes, counted in holders.reports():
        for bucket, count in got.items():
            histogram[bucket] = histogram.get(bucket, 0) + count
        for agent_id, (deliveries, last, change_time) in changes.items():
            seen = per_change.setdefault(agent_id, [0, last, change_time])
            seen[0] += deliveries
            seen[1] = max(seen[1], last)
        for name, value in counted.items():
            counters[name] = counters.get(name, 0) + value
    after = compare([contender("GetAgent L1, watchers closed")])[0]
    baseline = (before[0].qps + after[0].qps) / 2
    ratios["L1 with watchers"] = (during[0].qps / baseline, [q / baseline for q in during[1]])
    opened, messages = counters["opened"], counters["messages"]
    expected = len(committed_at) * opened
    delivered = sum(int(per_change[i][0]) for i in committed_at if i in per_change)
    missing = sum(max(0, opened - int(per_change.get(i, [0])[0])) for i in committed_at)
    foreign = sum(int(seen[0]) for i, seen in per_change.items() if i not in committed_at)
    # Per change, when its last watcher had it: from its change_time, and from the
    # writer's return from the commit (the commit's own time left out).
    last_from_stamp = [per_change[i][1] - per_change[i][2] for i in committed_at if i in per_change]
    last_from_commit = [per_change[i][1] - at for i, at in committed_at.items() if i in per_change]
    # The same over time (a change every 1/2 s of commits): steady, or a backlog growing.
    step = max(1, int(CHANGES_PER_SECOND / 2))
    timeline = " ".join(f"{x * 1e3:.0f}" for x in last_from_commit[::step])
    p50, p99, worst = (_histogram_percentile(histogram, q) for q in (0.5, 0.99, 1.0))
    verdict = "met" if p99 < 0.100 and not missing else "MISSED"
    return (
        f"WatchAgents ({'main port' if args.watch_on_main_port else 'watch port, grpc.aio'}): "
        f"{opened:,} streams ({counters['ended']} ended early); {messages:,} messages in all, "
        f"{delivered / max(1, messages):.1f} changes per message; the fanning-out server"
        f"{f' and its {workers} watch workers (every core, with the holders)' if workers else ''}"
        f" used {fan_out_cpu:.0%} of a core meanwhile "
        f"({fan_out_seconds / max(1, messages) * 1e6:.0f} µs per message, the whole "
        f"{'processes' if workers else 'process'}); "
        f"the stream holders {clients_cpu:.0%} of {'a' if workers else 'their'} core "
        f"({clients_seconds / max(1, messages) * 1e6:.0f} µs per message; "
        f"{counters['parses']:,} distinct messages parsed) — near 100 % they "
        f"did not keep up and the latencies are theirs too; "
        f"{len(committed_at):,} changes committed x {opened:,} streams = {expected:,} "
        f"deliveries expected, {delivered:,} timed, {missing:,} missing "
        f"{DRAIN_SECONDS:.0f} s after the last commit ({foreign:,} of other changes); "
        f"commit-to-delivery over every delivery: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"max {worst * 1e3:.1f} ms (target p99 < 100 ms: {verdict}); per change, to its last "
        f"watcher: p50 {_percentile(last_from_stamp, 0.5) * 1e3:.1f} ms, "
        f"p99 {_percentile(last_from_stamp, 0.99) * 1e3:.1f} ms "
        f"(from the commit's return: p50 {_percentile(last_from_commit, 0.5) * 1e3:.1f} ms, "
        f"p99 {_percentile(last_from_commit, 0.99) * 1e3:.1f} ms); over the run, every "
        f"1/2 s of commits: {timeline} ms"
    )


def _histogram_percentile(histogram: dict[int, int], q: float) -> float:
    """The upper edge of the HISTOGRAM_STEP bucket holding the q-quantile."""
    total = sum(histogram.values())
    if not total:
        return float("nan")
    rank, seen = min(total, max(1, int(q * total) + 1)), 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return (bucket + 1) * HISTOGRAM_STEP
    return (max(histogram) + 1) * HISTOGRAM_STEP


def _change_writer(  # noqa: PLR0917 - a Process target's arguments
    database_url: str,
    redis_url: str,
    owner_id: str,
    rate: float,
    seconds: float,
    ready: Any,
    go: Any,
    *,
    out: Any,
) -> None:
    """Commits `rate` changes a second for `seconds` into agent_svc's change log, each
    followed by the Redis wake-up, once `go` is set (`ready`: connected); puts (how many, how
    far behind schedule at worst, when each commit returned, its CPU seconds meanwhile).
    Each commit is the two statements SqlChangeLogRepository.append runs (the log's
    advisory lock, the row), sent with psycopg directly, at a higher priority than the
    stream holders beside it. Through the unit of work a commit cost ~4 ms of CPU (~40 % of
    the holders' core at 100/s): behind the holders the writer fell seconds short of its
    rate (runs before this measured fewer changes a second than they said), ahead of them
    it starved them."""
    from datetime import UTC, datetime

    import psycopg
    import redis

    from services.agent_svc.domain import Agent
    from services.agent_svc.infra.changefeed import CHANNEL
    from services.agent_svc.repository.sql import CHANGE_LOG_LOCK, _encode_response

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {(os.cpu_count() or 2) - 1})
    # Ahead of the stream holders on that core, so the changes come at `rate`.
    with contextlib.suppress(OSError):
        os.nice(-10)
    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    client = redis.Redis.from_url(redis_url)
    owner = uuid.UUID(owner_id)
    count, worst = 0, 0.0
    committed: dict[str, float] = {}  # agent id -> when its commit returned
    with psycopg.connect(conninfo) as connection:
        client.ping()
        ready.set()
        go.wait()
        cpu = time.process_time()
        start = time.perf_counter()
        while (due := start + count / rate) < start + seconds:
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            worst = max(worst, -pause)
            now = datetime.now(UTC)
            agent = Agent(
                id=uuid.uuid4(),
                owner_id=owner,
                name=f"bench-watch-{count}",
                description="",
                model="gpt-4o",
                instructions="You are a benchmark.",
                tools=(),
                metadata={},
                temperature=None,
                top_p=None,
                create_time=now,
                update_time=now,
            )
            with connection.transaction():
                connection.execute(
                    "SELECT pg_advisory_xact_lock(%s)", (CHANGE_LOG_LOCK,), prepare=True
                )
                connection.execute(
                    "INSERT INTO agent_changes (kind, agent_id, owner_id, agent, previous,"
                    " change_time) VALUES ('created', %s, %s, %s, NULL, %s)",
                    (agent.id, agent.owner_id, _encode_response(agent), datetime.now(UTC)),
                    prepare=True,
                )
            committed[str(agent.id)] = time.time()
            client.publish(CHANNEL, b"1")
            count += 1
    out.put((count, worst, committed, time.process_time() - cpu))


def _probe(load: Load, out: Any) -> None:
    out.put(_client(load))


def _contender(target: str, pid: int, hot: list[bytes]) -> Any:
    def make(label: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(label=label, target=target, pid=pid, method=GET, requests=hot)

    return make


if __name__ == "__main__":
    sys.exit(main())
