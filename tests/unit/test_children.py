"""shared.rpc.children: the processes a service keeps beside its own (watch workers).

Each test runs small real child processes (the interpreter sleeping, or exiting) and
waits on their state, never on a fixed delay."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.rpc.children import (
    MAX_RESTART_SECONDS,
    PARENT_PID_VARIABLE,
    Children,
    restart_delay,
)

TIMEOUT = 30.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def children() -> Iterator[list[Children]]:
    made: list[Children] = []
    yield made
    for group in made:
        group.kill()


def start(made: list[Children], command: list[str], count: int = 2) -> Children:
    group = Children("test child", command, count, {"EXTRA": "1"})
    made.append(group)
    group.start()
    wait_for(lambda: len(group.pids) == count, "the children did not start")
    return group


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_that_dies_is_started_again_and_logged(
    children: list[Children], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "shared.rpc.children")
    group = start(children, SLEEPER)
    first, second = group.pids
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(group.pids) == 2 and first not in group.pids, "no restart")
    assert second in group.pids  # the other one was left alone
    assert "was killed by SIGKILL after" in caplog.text
    assert "starting it again in 1s" in caplog.text  # it had run: no back-off yet


def armed(on_sigterm: str, ready: Path) -> list[str]:
    """A child that handles SIGTERM with `on_sigterm`, then notes it is ready."""
    return [
        sys.executable,
        "-c",
        "import os, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, {on_sigterm})\n"
        f"open(os.path.join({str(ready)!r}, str(os.getpid())), 'w').close()\n"
        "time.sleep(600)",
    ]


def exit_codes(group: Children) -> list[int | None]:
    return [c.process.returncode for c in group._children if c.process is not None]


def test_stop_drains_each_child_with_sigterm_and_restarts_none(
    children: list[Children], tmp_path: Path
) -> None:
    # Children that exit 0 on SIGTERM: a drain, not a kill.
    group = start(children, armed("lambda *_: sys.exit(0)", tmp_path))
    wait_for(lambda: len(list(tmp_path.iterdir())) == 2, "the children never got ready")
    group.stop(grace=TIMEOUT)
    assert exit_codes(group) == [0, 0]
    assert group.pids == []


def test_stop_kills_a_child_that_outlives_the_grace(
    children: list[Children], tmp_path: Path
) -> None:
    group = start(children, armed("signal.SIG_IGN", tmp_path), count=1)
    wait_for(lambda: len(list(tmp_path.iterdir())) == 1, "the child never got ready")
    group.stop(grace=0.5)
    assert exit_codes(group) == [-signal.SIGKILL]


def test_children_get_the_environment_and_a_session_of_their_own(
    children: list[Children], tmp_path: Path
) -> None:
    out = tmp_path / "env"
    group = start(
        children,
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            f"open({str(out)!r}, 'w').write("
            f"f\"{{os.environ['EXTRA']}} {{os.environ['{PARENT_PID_VARIABLE}']}} \"\n"
            'f"{os.getsid(0) == os.getpid()}")\n'
            "time.sleep(600)",
        ],
        count=1,
    )
    wait_for(lambda: out.exists() and out.read_text().count(" ") == 2, "no output")
    assert out.read_text() == f"1 {os.getpid()} True"
    group.kill()
    wait_for(lambda: group.pids == [], "kill left a child")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_a_child_ends_when_its_parent_dies_without_stopping_it(tmp_path: Path) -> None:
    """A parent process running Children is killed outright: its child, which called
    stop_with_parent() as it started, gets SIGTERM and exits."""
    pid_file = tmp_path / "child"
    child = (
        "from shared.rpc.children import stop_with_parent; import os, time\n"
        "stop_with_parent()\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(600)"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom shared.rpc.children import Children\n"
            f"Children('c', [sys.executable, '-c', {child!r}], 1, {{}}).start()\n"
            "time.sleep(600)",
        ]
    )
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", "no child")
        pid = int(pid_file.read_text())
        assert running(pid)
        parent.kill()
        parent.wait(TIMEOUT)
        wait_for(lambda: not running(pid), "the child outlived its parent")
    finally:
        parent.kill()


def test_a_child_that_keeps_failing_is_started_less_and_less_often() -> None:
    """A worker that cannot start (a secret file gone) cost two thirds of a core at one
    start a second (an outside review): each quick exit doubles the wait, up to a minute."""
    assert [restart_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert restart_delay(1_000) == MAX_RESTART_SECONDS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_a_start_that_fails_is_retried_and_takes_no_other_child_down(
    children: list[Children], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The interpreter gone from disk when a child must be started again: the start fails.
    The supervising thread died of it, and its end sent every other child the parent-death
    signal (an outside review); it logs, retries later, and the others run on."""
    caplog.set_level(logging.ERROR, "shared.rpc.children")
    python = tmp_path / "python"
    python.symlink_to(sys.executable)
    group = start(
        children,
        [
            str(python),
            "-c",
            "from shared.rpc.children import stop_with_parent\n"
            "stop_with_parent()\nimport time\ntime.sleep(600)",
        ],
    )
    victim, survivor = group.pids
    python.unlink()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "could not be started" in caplog.text, "the failed start went unlogged")
    assert group.pids == [survivor]
    assert running(survivor)
    assert group._thread.is_alive()
