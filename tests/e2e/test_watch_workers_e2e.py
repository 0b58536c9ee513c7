"""Watch workers (AGENT_WATCH_WORKERS): processes of agent_svc that serve the watch port
beside the server's own (SO_REUSEPORT), so a fan-out uses more than one core.

A user relies on: every stream, whichever process the kernel gave its connection to,
gets every change of theirs once and in order; SIGTERM ends the streams of every process
with SHUTTING_DOWN (resume elsewhere) and takes the workers with the server; a worker that
dies is started again; a server killed outright leaves no worker behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc

from tests.e2e.test_agent_e2e import (
    TIMEOUT,
    Stack,
    agent_env,
    create,
    free_ports,
    json_log,
    reason_of,
    start,
    wait_agent_ready,
)
from tests.e2e.test_watch_e2e import Watch, pg_stack, summary

__all__ = ["pg_stack"]  # the module's stack (PostgreSQL and Redis), used by fixture name

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to see who serves a stream"
)

WORKERS = 2
SERVED = "WatchAgents served on port"  # each process's watch server, as it starts
STREAMS = 12  # on 3 processes: all on one by chance once in ~180,000 runs


def children_of(pid: int) -> list[int]:
    """The running children of `pid`, whichever of its threads started them."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return [child for child in found if not gone(child)]


def gone(pid: int) -> bool:
    """Not running (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_for(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def serving_pids(port: int, pids: list[int]) -> dict[int, int]:
    """pid -> how many established connections to `port` it holds (from /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # ESTABLISHED
                inodes.add(fields[9])
    held: dict[int, int] = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held[pid] = held.get(pid, 0) + 1
    return held


class Server:
    """agent_svc with watch workers, on the module's PostgreSQL and Redis stack."""

    def __init__(self, stack: Stack, tmp: Path, **extra: str) -> None:
        port, watch_port = free_ports(2)
        self.watch_port = watch_port
        settings = {
            "AGENT_WATCH_PORT": str(watch_port),
            "AGENT_WATCH_WORKERS": str(WORKERS),
            "AGENT_SHUTDOWN_DELAY_SECONDS": "0",
            "AGENT_GRACE_SECONDS": "30",  # streams must end long before it
            **extra,
        }
        env = agent_env(
            port,
            tmp / "agent-data",
            stack.auth.address,
            stack.agent_database_url,
            stack.redis_url,
            **settings,
        )
        self.process = start("agent_svc", env, port, tmp)
        wait_agent_ready(self.process, stack.redis_url)
        # Every process listens for commits and on the watch port (a worker once it can
        # verify tokens).
        wait_for(
            lambda: (
                self.process.log().count("watch signal subscribed") >= WORKERS + 1
                and self.process.log().count(SERVED) >= WORKERS + 1
            ),
            "the watch workers never listened",
        )
        self.channels: list[grpc.Channel] = []

    @property
    def pids(self) -> list[int]:
        return [self.process.process.pid, *children_of(self.process.process.pid)]

    def stub(self) -> agent_pb2_grpc.AgentServiceStub:
        """A stub on a connection of its own to the watch port (no shared subchannel)."""
        channel = grpc.insecure_channel(
            self.process.watch_address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.channels.append(channel)
        return agent_pb2_grpc.AgentServiceStub(channel)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.process.stop()


@pytest.fixture
def server(pg_stack: Stack, tmp_path: Path) -> Iterator[Server]:
    running = Server(pg_stack, tmp_path)
    try:
        yield running
    finally:
        running.close()


def open_streams(server: Server, stack: Stack) -> tuple[Any, list[Watch]]:
    me = stack.new_user()
    watches = [Watch(server.stub(), me) for _ in range(STREAMS)]
    for watch in watches:
        watch.opened()
    return me, watches


def test_streams_on_every_process_each_get_every_change_once_in_order(
    pg_stack: Stack, server: Server
) -> None:
    me, watches = open_streams(server, pg_stack)
    assert len(children_of(server.process.process.pid)) == WORKERS
    held = serving_pids(server.watch_port, server.pids)
    assert sum(held.values()) == STREAMS, held
    assert len(held) >= 2, f"every stream on one process: {held}"
    made = [create(pg_stack.agents, me, f"ww-{n}") for n in range(3)]
    for watch in watches:
        changes, _ = watch.changes(3)
        assert summary(changes) == [("KIND_CREATED", agent.name) for agent in made]
        assert [c.agent.id for c in changes] == [agent.id for agent in made]
        watch.call.cancel()


@pytest.mark.parametrize(
    ("delay", "grace"),
    [("0", "30"), ("2", "1.5")],
    ids=["no-delay", "delay-longer-than-grace"],
)
def test_sigterm_ends_every_processs_streams_to_resume_elsewhere_and_stops_the_workers(
    pg_stack: Stack, tmp_path: Path, delay: str, grace: str
) -> None:
    """The workers drain when the server does, after its NOT_SERVING delay, not after a
    delay of their own (an outside review: with a delay longer than the grace they were
    killed, and their streams ended without SHUTTING_DOWN)."""
    server = Server(
        pg_stack, tmp_path, AGENT_SHUTDOWN_DELAY_SECONDS=delay, AGENT_GRACE_SECONDS=grace
    )
    try:
        sigterm_ends_every_stream(pg_stack, server)
    finally:
        server.close()


def sigterm_ends_every_stream(pg_stack: Stack, server: Server) -> None:
    _, watches = open_streams(server, pg_stack)
    workers = children_of(server.process.process.pid)
    held = serving_pids(server.watch_port, server.pids)
    assert set(held) & set(workers), held  # some streams are on a worker
    os.kill(server.process.process.pid, signal.SIGTERM)
    for watch in watches:
        ended = watch.error()
        assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended
        assert reason_of(ended) == "SHUTTING_DOWN"
    assert server.process.process.wait(timeout=TIMEOUT) == 0
    assert all(gone(pid) for pid in workers), workers
    ends = [
        e
        for e in json_log(server.process)
        if e.get("logger") == "agentplatform.access"
        and str(e.get("method", "")).endswith("/WatchAgents")
    ]
    assert len(ends) == STREAMS, ends  # each process logged its streams
    assert {e.get("code") for e in ends} == {"UNAVAILABLE"}


def test_a_worker_that_dies_is_started_again_and_its_watchers_resume(
    pg_stack: Stack, server: Server
) -> None:
    me, watches = open_streams(server, pg_stack)
    held = serving_pids(server.watch_port, server.pids)
    workers = children_of(server.process.process.pid)
    victim = max(workers, key=lambda pid: held.get(pid, 0))
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            len(children_of(server.process.process.pid)) == WORKERS
            and victim not in children_of(server.process.process.pid)
        ),
        "the killed worker was not started again",
    )
    assert "was killed by SIGKILL after" in server.process.log()
    survivors, cut = [], 0
    made = create(pg_stack.agents, me, "after-the-kill")
    for watch in watches:
        message = watch.messages.get(timeout=TIMEOUT)
        if isinstance(message, grpc.RpcError):
            assert message.code() == grpc.StatusCode.UNAVAILABLE, message
            cut += 1
        else:
            survivors.append(message)
    assert cut == held.get(victim, 0)
    assert all(m.changes[0].agent.id == made.id for m in survivors)
    # The cut watchers resume (from their last token) on whichever process takes them:
    # the restarted worker included, once it listens again.
    wait_for(
        lambda: server.process.log().count(SERVED) >= WORKERS + 2,
        "the restarted worker never listened",
    )
    again = [Watch(server.stub(), me) for _ in range(STREAMS)]
    for watch in again:
        watch.opened()
    latest = create(pg_stack.agents, me, "after-the-restart")
    for watch in again:
        (change,), _ = watch.changes(1)
        assert change.agent.id == latest.id
        watch.call.cancel()


def test_a_server_killed_outright_takes_its_workers_with_it(
    pg_stack: Stack, tmp_path: Path
) -> None:
    running = Server(pg_stack, tmp_path)
    try:
        workers = children_of(running.process.process.pid)
        assert len(workers) == WORKERS
        running.process.process.kill()
        running.process.process.wait(timeout=TIMEOUT)
        wait_for(lambda: all(gone(pid) for pid in workers), f"orphaned workers: {workers}")
    finally:
        running.close()


def test_a_watch_port_request_without_a_token_is_refused_by_a_worker_as_by_the_server(
    pg_stack: Stack, server: Server
) -> None:
    """Every process runs the same request path: no process serves a stream unchecked."""
    codes = set()
    for _ in range(STREAMS):
        try:
            next(iter(server.stub().WatchAgents(agent_pb2.WatchAgentsRequest(), timeout=TIMEOUT)))
        except grpc.RpcError as error:
            codes.add((error.code(), reason_of(error)))
    assert codes == {(grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")}, codes
    held = serving_pids(server.watch_port, server.pids)
    assert sum(held.values()) == STREAMS, held
    assert len(held) >= 2, held


def test_a_watch_port_another_process_holds_is_refused_even_with_reuse_port(
    pg_stack: Stack, tmp_path: Path
) -> None:
    """With workers every listener sets SO_REUSEPORT, and a bind beside another socket of
    the same user that set it too succeeds: two deployments on one host would share the
    connections. The server binds the port without it first and refuses to start."""
    import socket

    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    try:
        agent_port = free_ports(1)[0]
        env = agent_env(
            agent_port,
            tmp_path / "agent-data",
            pg_stack.auth.address,
            pg_stack.agent_database_url,
            pg_stack.redis_url,
            AGENT_WATCH_PORT=str(port),
            AGENT_WATCH_WORKERS=str(WORKERS),
        )
        process = start("agent_svc", env, agent_port, tmp_path)
        try:
            assert process.process.wait(timeout=TIMEOUT) != 0
            assert f"cannot bind 127.0.0.1:{port}" in process.log()
        finally:
            process.stop()
    finally:
        squatter.close()
