"""Signals and restarts of real service processes.

- SIGTERM: health (the process, "", and the named service) answers NOT_SERVING while calls
  still succeed for `*_SHUTDOWN_DELAY_SECONDS`; then in-flight calls finish and the process
  exits 0.
- Signal storms: SIGINT+SIGTERM, SIGTERM+SIGTERM and SIGINT+SIGTERM+SIGTERM back to back
  (what Ctrl-C on scripts/run produces: the terminal's SIGINT to the process group, then
  the launcher's SIGTERM, twice), `SIGNAL_ROUNDS` rounds each, sent as soon as the process
  is serving and at moments spread over its start-up: it always exits within grace +
  delay + a margin. A process that does not is dumped (`py-spy dump`, else /proc) and
  killed; the dump is in the failure message.
- A second SIGINT during the drain stops the process at once, long before its grace period
  (calls are held in flight by freezing the database they wait for).
- A rolling restart of two agent_svc replicas under continuous load from one client channel
  (round_robin over both, retrying UNAVAILABLE by the gRPC retry policy the client package
  publishes): zero failed calls.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import statistics
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.faults.load import Load, summarize
from tests.faults.servers import PostgresCluster
from tests.faults.services import (
    AGENT_SERVICE,
    AUTH_SERVICE,
    CALL_TIMEOUT,
    NOT_SERVING,
    PASSWORD,
    SERVING,
    AuthService,
    Caller,
    Fleet,
    agent_env,
    auth_env,
    create_agent,
    describe,
    health_status,
    register_and_login,
    wait_exit,
)
from tests.helpers import ServiceProcess, free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

SHUTDOWN_DELAY = 1.0
GRACE = 5.0
EXIT_MARGIN = 15.0  # a busy 2-core machine; a hang is a hang whatever the margin
SIGNAL_ROUNDS = int(os.environ.get("FAULTS_SIGNAL_ROUNDS", "15"))
STORM_PARALLEL = 3  # rounds run side by side: the rounds are independent processes
SERVICES = {"auth_svc": AUTH_SERVICE, "agent_svc": AGENT_SERVICE}
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
CANCELLED = grpc.StatusCode.CANCELLED


def shutdown_env(**settings: str) -> dict[str, str]:
    return {"SHUTDOWN_DELAY_SECONDS": str(SHUTDOWN_DELAY), "GRACE_SECONDS": str(GRACE), **settings}


def start_service(
    fleet: Fleet,
    name: str,
    data_dir: Path,
    auth_address: str,
    settings: dict[str, str],
    *,
    database_url: str = "",
) -> ServiceProcess:
    """auth_svc or agent_svc on SQLite (or `database_url`); `settings` without prefix."""
    port = free_port()
    if name == "auth_svc":
        env = auth_env(port, data_dir, database_url, **settings)
    else:
        env = agent_env(port, data_dir, auth_address, database_url, **settings)
    return fleet.start(name, env, port)


# -- SIGTERM: NOT_SERVING, still serving, drain, exit 0 --------------------------------------


class HealthWatch:
    """Polls Check("") and Check(<service>) on one channel, recording (time, service, answer)."""

    def __init__(self, address: str, service: str) -> None:
        self.seen: list[tuple[float, str, Any]] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._services = ("", service)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for service in self._services:
                try:
                    answer: Any = self._stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=1
                    ).status
                except grpc.RpcError as error:
                    answer = error.code()
                self.seen.append((time.monotonic(), service, answer))
            self._stop.wait(0.02)

    def first(self, service: str, answer: Any, after: float) -> float | None:
        return next(
            (t for t, s, a in self.seen if s == service and a == answer and t >= after), None
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._channel.close()


def _load_on(name: str, process: ServiceProcess, caller: Caller, load: Load) -> grpc.Channel:
    """Four workers calling the service under test (on their own channel)."""
    channel = grpc.insecure_channel(process.address)
    if name == "auth_svc":
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        login = auth_pb2.LoginRequest(email=caller.email, password=PASSWORD)
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("Login", lambda: auth.Login(login, timeout=CALL_TIMEOUT)),
            ("GetJwks", lambda: auth.GetJwks(auth_pb2.GetJwksRequest(), timeout=CALL_TIMEOUT)),
            (
                "GetCurrentUser",
                lambda: auth.GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=caller.metadata, timeout=CALL_TIMEOUT
                ),
            ),
        ]
    else:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        agent_id = create_agent(agents, caller, "signals").id
        steps = [
            (
                "GetAgent",
                lambda: agents.GetAgent(
                    agent_pb2.GetAgentRequest(id=agent_id),
                    metadata=caller.metadata,
                    timeout=CALL_TIMEOUT,
                ),
            ),
            (
                "ListAgents",
                lambda: agents.ListAgents(
                    agent_pb2.ListAgentsRequest(page_size=100),
                    metadata=caller.metadata,
                    timeout=CALL_TIMEOUT,
                ),
            ),
            (
                "UpdateAgent",
                lambda: agents.UpdateAgent(
                    describe(agent_id, "updated"), metadata=caller.metadata, timeout=CALL_TIMEOUT
                ),
            ),
        ]
    for i in range(4):
        method, invoke = steps[i % len(steps)]
        load.steady(f"{method}-{i}", method, process.name, invoke, pause=0.005)
    return channel


@pytest.mark.parametrize("name", list(SERVICES))
def test_sigterm_answers_not_serving_while_serving_for_the_delay_then_drains_and_exits_0(
    name: str,
    module_auth: AuthService,
    fleet: Fleet,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    process = start_service(fleet, name, tmp_path / "data", module_auth.address, shutdown_env())
    process.wait_serving(SERVICES[name], timeout=60)
    if name == "auth_svc":  # the account must live in the auth_svc under test
        with grpc.insecure_channel(process.address) as channel:
            caller = register_and_login(auth_pb2_grpc.AuthServiceStub(channel))
    else:
        caller = module_auth.new_caller()
    watch = HealthWatch(process.address, SERVICES[name])
    with Load() as load:
        channel = _load_on(name, process, caller, load)
        try:
            load.wait_for(lambda calls: sum(c.ok for c in calls) >= 20, timeout=60, what="the load")
            signalled = time.monotonic()
            process.process.send_signal(signal.SIGTERM)
            exit_code = wait_exit(process, SHUTDOWN_DELAY + GRACE + EXIT_MARGIN)
            exited = time.monotonic()
        finally:
            load.stop()
            watch.close()
            channel.close()
    calls = load.calls
    record_property("calls", summarize(calls))
    record_property("exit_after_s", round(exited - signalled, 2))

    assert exit_code == 0, f"{name} exit code {exit_code}:\n{process.log()[-3000:]}"
    for service in ("", SERVICES[name]):
        first_not_serving = watch.first(service, NOT_SERVING, signalled)
        assert first_not_serving is not None, (
            f"health {service!r} never answered NOT_SERVING after SIGTERM: "
            f"{[a for t, s, a in watch.seen if s == service and t >= signalled][:20]}"
        )
        served_again = watch.first(service, SERVING, first_not_serving)
        assert served_again is None, f"health {service!r} went back to SERVING"
    not_serving = max(
        t for t in (watch.first(s, NOT_SERVING, signalled) for s in ("", SERVICES[name])) if t
    )
    served_while_not_serving = [c for c in calls if c.ok and c.started >= not_serving]
    assert served_while_not_serving, "no call succeeded once health said NOT_SERVING: " + summarize(
        c for c in calls if c.started >= signalled
    )
    last_ok = max(c.started for c in calls if c.ok)
    assert last_ok - signalled >= SHUTDOWN_DELAY / 2, (
        f"calls stopped succeeding {last_ok - signalled:.2f}s after SIGTERM "
        f"(shutdown delay {SHUTDOWN_DELAY}s)"
    )
    early_failures = [c for c in calls if not c.ok and c.started < signalled + SHUTDOWN_DELAY / 2]
    assert not early_failures, "calls started before or just after SIGTERM failed: " + "; ".join(
        str(c) for c in early_failures[:5]
    )
    # A call sent after the server stopped taking calls (the end of the delay) races with
    # the stop inside gRPC's core, which may cancel it before our code sees it: a client
    # that watches health (the published service config) sends none. Every call sent
    # before then ends OK or UNAVAILABLE, whatever it was doing.
    stop = signalled + SHUTDOWN_DELAY
    other = [
        c
        for c in calls
        if not c.ok and c.code != UNAVAILABLE and not (c.code == CANCELLED and c.started >= stop)
    ]
    assert not other, (
        f"calls ended otherwise than OK or UNAVAILABLE (SIGTERM at {signalled:.3f}, NOT_SERVING"
        f" seen at {not_serving:.3f}, last OK call started at {last_ok:.3f}, exit at"
        f" {exited:.3f}): " + "; ".join(str(c) for c in other[:5])
    )


# -- signal storms --------------------------------------------------------------------------

STORMS = {
    "INT+TERM": (signal.SIGINT, signal.SIGTERM),
    "TERM+TERM": (signal.SIGTERM, signal.SIGTERM),
    "INT+TERM+TERM": (signal.SIGINT, signal.SIGTERM, signal.SIGTERM),
}


@dataclass
class Round:
    when: str  # "serving" or "starting+<delay>s"
    exit_code: int | None
    seconds: float  # from the first signal to the exit
    startup: float  # from the start to the first signal
    dump: str = ""


def _storm_round(
    *,
    fleet: Fleet,
    name: str,
    data_dir: Path,
    auth_address: str,
    signals: tuple[signal.Signals, ...],
    start_delay: float | None,
) -> Round:
    """One process: started, signalled (when serving, or `start_delay` s after its start),
    waited for."""
    spawned = time.monotonic()
    process = start_service(fleet, name, data_dir, auth_address, shutdown_env())
    if start_delay is None:
        process.wait_serving("", timeout=120)
        when = "serving"
    else:
        time.sleep(start_delay)  # the point of the round: a moment inside the start-up
        when = f"starting+{start_delay:.2f}s"
    sent = time.monotonic()
    for each in signals:
        process.process.send_signal(each)
    limit = GRACE + SHUTDOWN_DELAY + EXIT_MARGIN
    code = wait_exit(process, limit)
    seconds = time.monotonic() - sent
    dump = ""
    if code is None:
        dump = process.log_path.with_suffix(".threads.txt").read_text()
    return Round(when, code, seconds, sent - spawned, dump)


@pytest.mark.parametrize("storm", list(STORMS))
@pytest.mark.parametrize("name", list(SERVICES))
def test_back_to_back_signals_always_end_the_process_in_time(
    *,
    name: str,
    storm: str,
    module_auth: AuthService,
    fleet: Fleet,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    signals = STORMS[storm]
    counter = itertools.count()

    def run(start_delay: float | None) -> Round:
        data_dir = tmp_path / f"round-{next(counter)}"
        return _storm_round(
            fleet=fleet,
            name=name,
            data_dir=data_dir,
            auth_address=module_auth.address,
            signals=signals,
            start_delay=start_delay,
        )

    with ThreadPoolExecutor(STORM_PARALLEL) as pool:
        serving = list(pool.map(run, [None] * SIGNAL_ROUNDS))
    # Spread the other rounds' signals over the start-up as the serving rounds measured it.
    typical = statistics.median(r.startup for r in serving) if serving else 2.0
    delays = [typical * (i + 0.5) / SIGNAL_ROUNDS for i in range(SIGNAL_ROUNDS)]
    random.shuffle(delays)
    with ThreadPoolExecutor(STORM_PARALLEL) as pool:
        starting = list(pool.map(run, delays))
    rounds = serving + starting
    record_property("rounds", [(r.when, r.exit_code, round(r.seconds, 2)) for r in rounds])
    hung = [r for r in rounds if r.exit_code is None]
    assert not hung, (
        f"{len(hung)} of {len(rounds)} rounds of {storm} did not end {name} within "
        f"{GRACE + SHUTDOWN_DELAY + EXIT_MARGIN:.0f}s: {[r.when for r in hung]}\n"
        f"threads of the first one:\n{hung[0].dump}"
    )


# -- a second SIGINT during the drain ---------------------------------------------------------


def _in_flight(metrics_port: int) -> int:
    """Calls started and not yet handled, from the Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()

    def total(metric: str) -> float:
        return sum(
            float(value)
            for value in re.findall(rf"^{metric}{{[^}}]*}} ([0-9.e+]+)$", text, re.MULTILINE)
        )

    return int(total("grpc_server_started_total") - total("grpc_server_handled_total"))


@pytest.mark.postgres
@pytest.mark.parametrize("name", list(SERVICES))
def test_a_second_sigint_during_the_drain_stops_the_process_at_once(
    *,
    name: str,
    pg: PostgresCluster,
    module_auth: AuthService,
    fleet: Fleet,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    grace = 60.0
    metrics_port = free_port()
    process = start_service(
        fleet,
        name,
        tmp_path / "data",
        module_auth.address,
        shutdown_env(GRACE_SECONDS=str(grace), METRICS_PORT=str(metrics_port)),
        database_url=pg.create_database(),
    )
    process.wait_serving(SERVICES[name], timeout=60)
    channel = grpc.insecure_channel(process.address)
    held: list[threading.Thread] = []
    try:
        if name == "auth_svc":
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            caller = register_and_login(auth)

            def database_call() -> None:
                auth.GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=caller.metadata, timeout=grace
                )
        else:
            caller = module_auth.new_caller()
            agents = agent_pb2_grpc.AgentServiceStub(channel)
            create_agent(agents, caller, "held")

            def database_call() -> None:
                agents.ListAgents(
                    agent_pb2.ListAgentsRequest(), metadata=caller.metadata, timeout=grace
                )

        def hold() -> None:
            # How a call cut by a forced stop ends is not this test's question.
            with contextlib.suppress(grpc.RpcError):
                database_call()

        baseline = _in_flight(metrics_port)
        pg.freeze()
        for _ in range(4):
            thread = threading.Thread(target=hold, daemon=True)
            thread.start()
            held.append(thread)
        _wait_until(lambda: _in_flight(metrics_port) - baseline >= 4, 30, "calls in flight")

        process.process.send_signal(signal.SIGINT)
        # Draining: the process is alive but no longer takes new calls.
        _wait_until(
            lambda: (
                process.process.poll() is None
                and isinstance(health_status(process.address, "", timeout=1), grpc.StatusCode)
            ),
            SHUTDOWN_DELAY + 30,
            "the drain to start (new calls refused)",
        )
        second = time.monotonic()
        process.process.send_signal(signal.SIGINT)
        exit_code = wait_exit(process, EXIT_MARGIN)
        stopped_after = time.monotonic() - second
    finally:
        pg.thaw()
        channel.close()
        for thread in held:
            thread.join(grace + 10)
    record_property("stopped_after_second_sigint_s", round(stopped_after, 2))
    assert exit_code is not None, (
        f"{name} still ran {EXIT_MARGIN:.0f}s after the second SIGINT (grace {grace:.0f}s);"
        f" its threads:\n{process.log_path.with_suffix('.threads.txt').read_text()}"
    )


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- rolling restart behind a retrying round_robin channel ----------------------------------

RETRYING_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    # Client-side health checking: a replica that says NOT_SERVING (its shutdown delay)
    # gets no new calls, so none races with its stop.
    "healthCheckConfig": {"serviceName": AGENT_SERVICE},
    "methodConfig": [
        {
            "name": [{"service": AGENT_SERVICE}],
            # Wait (within the deadline) for a ready replica rather than fail at once while
            # every one is briefly out: one draining, the other still reconnecting.
            "waitForReady": True,
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


@pytest.fixture
def replicas(
    pg: PostgresCluster, module_auth: AuthService, fleet: Fleet, tmp_path: Path
) -> list[tuple[ServiceProcess, dict[str, str]]]:
    database = pg.create_database()
    started = []
    for i in (1, 2):
        port = free_port()
        env = agent_env(port, tmp_path / f"r{i}", module_auth.address, database, **shutdown_env())
        started.append((fleet.start("agent_svc", env, port), env))
        # One after the other: both would migrate the new database at once.
        started[-1][0].wait_serving(AGENT_SERVICE, timeout=60)
    return started


@pytest.mark.postgres
def test_a_rolling_restart_behind_a_retrying_round_robin_channel_fails_no_call(
    replicas: list[tuple[ServiceProcess, dict[str, str]]],
    module_auth: AuthService,
    fleet: Fleet,
    record_property: Callable[[str, object], None],
) -> None:
    ports = [process.port for process, _ in replicas]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    caller = module_auth.new_caller()
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.service_config", json.dumps(RETRYING_SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            # A restarted replica is found again within a second, not gRPC's default backoff
            # of up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )
    agents = agent_pb2_grpc.AgentServiceStub(channel)
    seeded = [create_agent(agents, caller, f"rolling-{i}").id for i in range(4)]
    windows: list[tuple[float, float]] = []
    with Load() as load:
        meta = caller.metadata

        def create() -> Any:
            request = agent_pb2.CreateAgentRequest(
                agent=agent_pb2.Agent(name=f"rolling-new-{uuid.uuid4().hex[:8]}", model="o3"),
                request_id=str(uuid.uuid4()),  # retries by the channel create it once
            )
            return agents.CreateAgent(request, metadata=meta, timeout=CALL_TIMEOUT)

        for i in (1, 2):
            load.steady(
                f"get-{i}",
                "GetAgent",
                "channel",
                lambda: agents.GetAgent(
                    agent_pb2.GetAgentRequest(id=random.choice(seeded)),
                    metadata=meta,
                    timeout=CALL_TIMEOUT,
                ),
                pause=0.005,
            )
        load.steady(
            "list",
            "ListAgents",
            "channel",
            lambda: agents.ListAgents(
                agent_pb2.ListAgentsRequest(page_size=20), metadata=meta, timeout=CALL_TIMEOUT
            ),
            pause=0.005,
        )
        load.steady("create", "CreateAgent", "channel", create, pause=0.02)
        try:
            load.wait_for(lambda calls: sum(c.ok for c in calls) >= 50, 60, "the load")
            for process, env in replicas:
                began = time.monotonic()
                process.process.send_signal(signal.SIGTERM)
                exit_code = wait_exit(process, SHUTDOWN_DELAY + GRACE + EXIT_MARGIN)
                assert exit_code == 0, f"replica on {process.port} exited with {exit_code}"
                fleet.start("agent_svc", env, process.port).wait_serving(AGENT_SERVICE, 60)
                windows.append((began, time.monotonic()))
            restarted = time.monotonic()
            load.wait_for(
                lambda calls: sum(c.ok and c.started >= restarted for c in calls) >= 50,
                60,
                "calls after the restarts",
            )
        finally:
            load.stop()
            channel.close()
    calls = load.calls
    record_property("calls", summarize(calls))
    for began, ended in windows:
        during = [c for c in calls if began <= c.started <= ended]
        assert during, "no call was made while a replica restarted"
    failed = [c for c in calls if not c.ok]
    assert not failed, (
        f"{len(failed)} of {len(calls)} calls failed ({summarize(failed)}): "
        + "; ".join(str(c) for c in failed[:5])
    )
