"""Private Redis and PostgreSQL servers that a fault test may kill, freeze and restart.

The shared servers on 6379/5432 belong to every engineer on the machine and must never be
stopped, so the fault suite starts its own:

- `RedisServer`: one `redis-server` (a data node or a sentinel) on a given port, configured
  by a file; `kill()` is kill -9, `freeze()`/`thaw()` are SIGSTOP/SIGCONT. The HA topologies
  (tests/ha/redis_topologies.py) are made of these.
- `PrivateRedis`: a `RedisServer` on a free port with its own folder; `start()` brings it
  back on the same port, empty or from the dump that `save()` wrote.
- `PostgresCluster`: a cluster made once with `initdb` (trust auth on 127.0.0.1, its socket
  in its own folder), driven with `pg_ctl`: `stop("fast" | "immediate")`, `start()`, and
  `freeze()`/`thaw()` of the postmaster and every backend. `standby()` makes a streaming
  standby of it with `pg_basebackup -R` (a cluster of its own: port, folder, log),
  `require_synchronous_standby()` makes every commit wait for that standby, `promote()`
  makes a standby the primary. PostgreSQL refuses to run as
  root, so under root every command runs as the `postgres` system user, in a folder
  outside pytest's (which is private to root) and owned by that user.

- `PostgresStandby` (`cluster.make_standby()`): a streaming replica of a cluster, made with
  `pg_basebackup -R`, on its own port; `pause_replay()`/`resume_replay()` make it lag on
  purpose, `wait_replayed()` waits until it has replayed everything the primary wrote.

All clean up after themselves: `close()` thaws, kills and waits, and is safe to call twice
or after a failed start.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers import free_port

__all__ = [
    "PostgresCluster",
    "PostgresStandby",
    "PrivateRedis",
    "RedisServer",
    "find_postgres_bindir",
]

START_TIMEOUT = 60.0  # a 2-core machine shared with other test runs


class RedisServer:
    """One `redis-server` on `port`, configured by a file in `folder`: a data node, or a
    sentinel when a `sentinel …` line is given. The file starts with the defaults of every
    test server (loopback only, no snapshot, no append-only file, a log file); `lines` come
    after them, and a line repeating a directive overrides the default. `client_options`
    are the redis-py options its clients need (TLS files, an ACL user)."""

    def __init__(
        self,
        folder: Path,
        port: int,
        lines: Sequence[str] = (),
        *,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.conf = self.dir / "redis.conf"
        self.log_path = self.dir / "redis.log"
        self.sentinel = any(line.startswith("sentinel ") for line in lines)
        self._client_options = dict(client_options or {})
        defaults = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            f"logfile {self.log_path}",
            "protected-mode no",
            'save ""',
            "appendonly no",
        ]
        self.conf.write_text("\n".join([*defaults, *lines]) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    def launch(self) -> None:
        """Starts the process without waiting for it (several can then start at once)."""
        if self.running:
            raise RuntimeError(f"redis-server on {self.port} is already running")
        command = [_which("redis-server"), str(self.conf)]
        if self.sentinel:
            command.append("--sentinel")
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start(self) -> None:
        """Starts the process and waits until it answers PING."""
        self.launch()
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log()[-3000:]}")
            client = self.client(timeout=0.5)
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
            finally:
                client.close()
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # callers poll or expect the failure at once
            **self._client_options,
        )

    def kill(self) -> None:
        """kill -9, the way a crashed or OOM-killed Redis goes."""
        if self.process is None:
            return
        self.thaw()
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait(START_TIMEOUT)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self._frozen and self.running:
            os.kill(self.pid, signal.SIGCONT)
        self._frozen = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        self.kill()


class PrivateRedis(RedisServer):
    """A data node on a free port whose `url` stays the same across restarts; it writes a
    snapshot only when told (`save()`), and can come back from it."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, free_port(), ["dbfilename dump.rdb"])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dump = self.dir / "dump.rdb"

    def start(self, *, from_dump: bool = False) -> None:
        """Starts on `port`: empty, or with the data of the last `save()` (`from_dump`)."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        if not from_dump:
            self.dump.unlink(missing_ok=True)
        elif not self.dump.exists():
            raise RuntimeError("no dump to restart from: call save() first")
        super().start()

    def save(self) -> None:
        """SAVE: the dump file holds what Redis holds now."""
        client = self.client()
        try:
            client.save()
        finally:
            client.close()

    def keys_loaded_at_start(self) -> int:
        """How many keys the running server read from its dump when it started."""
        found = re.findall(r"Done loading RDB, keys loaded: (\d+)", self.log())
        return int(found[-1]) if found else 0

    def restart(self, *, from_dump: bool = False) -> None:
        self.kill()
        self.start(from_dump=from_dump)


def _which(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise FileNotFoundError(program)
    return path


def find_postgres_bindir() -> Path | None:
    """The folder of `initdb`/`pg_ctl`: `pg_config --bindir`, else the newest
    /usr/lib/postgresql/*/bin, else the PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=30
        )
        if done.returncode == 0 and done.stdout.strip():
            candidates.append(Path(done.stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path))

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    ]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


class PostgresCluster:
    """A PostgreSQL cluster of the fault suite, on a free port of 127.0.0.1."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self._user = _postgres_system_user()
        # Not under pytest's tmp folder: that one is private to root, and the server may
        # have to run as the postgres user. Unix sockets also want a short path.
        self.root = Path(tempfile.mkdtemp(prefix="agentplatform-faults-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.socket_dir.mkdir()
        if self._user is not None:
            user = pwd.getpwnam(self._user)
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._frozen: list[int] = []

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, args: Sequence[str], timeout: float = 120.0) -> str:
        command = [str(self.bindir / program), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n{self.log()[-4000:]}"
            )
        return done.stdout

    def init(self) -> None:
        """initdb (trust auth), with settings for a disposable test server."""
        self._run(
            "initdb",
            ["-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# agentplatform fault suite\n"
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 80\n"
                "shared_buffers = 32MB\n"
                # Crash safety against a killed server needs the WAL, not fsync: the data
                # survives every stop mode these tests use (the OS never crashes here).
                "fsync = off\n"
                "full_page_writes = off\n"
                "log_min_messages = warning\n"
            )

    def start(self, *, read_only: bool = False) -> None:
        """`pg_ctl start`; `read_only`: every session read-only by default (what a primary
        demoted by its failover manager looks like to a client: up, refusing writes)."""
        options = ["-o", "-c default_transaction_read_only=on"] if read_only else []
        self._run(
            "pg_ctl",
            ["-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60", *options, "start"],
        )

    def standby(self) -> PostgresStandby:
        """A streaming standby of this (running) cluster, not started: `pg_basebackup -R`
        copies the data and writes `primary_conninfo`; the copy gets its own port and
        socket folder (the last setting of postgresql.conf wins)."""
        copy = PostgresStandby(self)
        try:
            copy.init()
        except BaseException:
            copy.close()
            raise
        return copy

    def require_synchronous_standby(self, timeout: float = START_TIMEOUT) -> None:
        """Every commit waits until a standby has flushed it (synchronous_commit=on, any
        standby): an acknowledged write survives the primary. Waits until the standby is
        connected and synchronous. Set after `standby()`, so the standby's copy (the
        primary after a promotion, with no standby of its own) does not wait forever."""
        self.execute(
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "ALTER SYSTEM SET synchronous_commit = 'on'",
            "SELECT pg_reload_conf()",
        )
        deadline = time.monotonic() + timeout
        while self.query("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no synchronous standby:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def demote_in_place(self) -> None:
        """Every session read-only from now on (a reload, no restart: open connections stay
        open), the way a switchover fences the old primary before promoting the standby."""
        self.execute(
            "ALTER SYSTEM SET default_transaction_read_only = on", "SELECT pg_reload_conf()"
        )

    def promote(self) -> None:
        """`pg_ctl promote -w`: returns when the standby accepts writes."""
        self._run("pg_ctl", ["-D", str(self.data), "-w", "-t", "60", "promote"])

    def in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()"))

    def execute(self, *statements: str, database: str = "postgres") -> None:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=10) as connection:
            for statement in statements:
                connection.execute(statement)

    def rows(
        self, statement: str, params: Sequence[Any] = (), *, database: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=10) as connection:
            return connection.execute(statement, params).fetchall()

    def query(
        self, statement: str, params: Sequence[Any] = (), *, database: str = "postgres"
    ) -> Any:
        """The first column of the first row."""
        rows = self.rows(statement, params, database=database)
        return rows[0][0] if rows else None

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast|immediate` (immediate: no checkpoint, crash recovery next)."""
        self.thaw()
        self._run("pg_ctl", ["-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def ensure_running(self) -> None:
        """Thawed and started, whatever an earlier (maybe failed) test left."""
        self.thaw()
        if not self.running:
            self.start()

    def accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.admin_url, connect_timeout=1) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def wait_accepting(self, timeout: float = START_TIMEOUT) -> float:
        """Polls with a real connection; returns the monotonic time of the first success."""
        deadline = time.monotonic() + timeout
        while not self.accepts_connections():
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL does not accept connections:\n{self.log()}")
            time.sleep(0.02)
        return time.monotonic()

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"faults_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def make_standby(self) -> PostgresStandby:
        """A streaming replica of this (running) cluster, started and accepting reads."""
        standby = self.standby()
        try:
            standby.start()
            standby.wait_accepting()
        except BaseException:
            standby.close()
            raise
        return standby

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every backend: connections open, nothing answers."""
        pid = self.postmaster_pid()
        if pid is None:
            raise RuntimeError("PostgreSQL is not running")
        pids = [pid, *_children(pid)]
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGSTOP)
        self._frozen = pids

    def thaw(self) -> None:
        pids, self._frozen = self._frozen, []
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stops the server (immediate) and removes its files."""
        self.thaw()
        if self.running:
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pid = self.postmaster_pid()
                if pid is not None:
                    for each in (pid, *_children(pid)):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(each, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresStandby(PostgresCluster):
    """A hot standby of `primary` (pg_basebackup -R: streaming, read-only queries)."""

    def __init__(self, primary: PostgresCluster) -> None:
        super().__init__(primary.bindir)
        self.primary = primary

    def init(self) -> None:
        self._run(
            "pg_basebackup",
            [
                *("-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres"),
                *("-D", str(self.data), "-R", "-X", "stream", "-c", "fast", "--no-sync"),
            ],
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# agentplatform standby\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "hot_standby = on\n"
            )

    def pause_replay(self) -> None:
        """Received WAL is no longer applied: reads see the data as it was (lag)."""
        self._sql("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self._sql("SELECT pg_wal_replay_resume()")

    def wait_replayed(self, timeout: float = START_TIMEOUT) -> None:
        """Until the standby has replayed everything the primary has written so far."""
        with psycopg.connect(self.primary.admin_url, autocommit=True) as primary:
            target = primary.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert target is not None
        deadline = time.monotonic() + timeout
        while True:
            with psycopg.connect(self.admin_url, autocommit=True) as standby:
                row = standby.execute(
                    "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s) >= 0", (target[0],)
                ).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not replay up to {target[0]}")
            time.sleep(0.02)

    def _sql(self, statement: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as connection:
            connection.execute(statement)


def _postgres_system_user() -> str | None:
    """Under root, the user to run the server as (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError("running as root and there is no postgres system user") from exc
    return "postgres"


def _children(pid: int) -> list[int]:
    """Direct children of a process (the backends of a postmaster), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
