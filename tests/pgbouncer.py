"""A private PgBouncer in transaction mode, in front of a PostgreSQL server, for the tests
that prove the services work behind one (tests/integration/test_pgbouncer.py).

`PrivatePgBouncer(workdir, upstream_port=5432).start()` writes its own ini (pool_mode =
transaction, every database name forwarded to the upstream server, trust auth as the
upstream has it, a small server pool so that client transactions share and swap server
connections), listens on a free port of 127.0.0.1, and `close()` ends it. PgBouncer
refuses to run as root: under root it drops to the `postgres` system user (`-u`), so its
folder is outside pytest's (private to root) and owned by that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.helpers import free_port

__all__ = ["PrivatePgBouncer", "find_pgbouncer"]

START_TIMEOUT = 30.0


def find_pgbouncer() -> str | None:
    """The pgbouncer binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin"):
        candidate = Path(folder) / "pgbouncer"
        if candidate.exists():
            return str(candidate)
    return None


class PrivatePgBouncer:
    """PgBouncer of this test only, in transaction mode; `url(db)` goes through it."""

    def __init__(
        self,
        binary: str,
        *,
        upstream_host: str = "127.0.0.1",
        upstream_port: int = 5432,
        pool_size: int = 2,
    ) -> None:
        self.binary = binary
        self.port = free_port()
        self.upstream = (upstream_host, upstream_port)
        self.pool_size = pool_size
        self.root = Path(tempfile.mkdtemp(prefix="agentplatform-pgbouncer-"))
        self.ini = self.root / "pgbouncer.ini"
        self.log_path = self.root / "pgbouncer.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._user = "postgres" if os.geteuid() == 0 else None

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        host, port = self.upstream
        (self.root / "users.txt").write_text('"postgres" ""\n')
        self.ini.write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 200\n"
            f"logfile = {self.log_path}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
            "admin_users = postgres\n"
        )
        if self._user is not None:
            user = pwd.getpwnam(self._user)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        command = [self.binary, *(["-u", self._user] if self._user else []), str(self.ini)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"pgbouncer exited: {stderr}\n{self.log()}")
            try:
                with psycopg.connect(
                    self.url("pgbouncer"), autocommit=True, connect_timeout=2
                ) as admin:
                    admin.execute("SHOW VERSION")
                return
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def server_connections(self, database: str) -> int:
        """Server connections PgBouncer holds to `database` (SHOW SERVERS)."""
        with (
            psycopg.connect(self.url("pgbouncer"), autocommit=True, connect_timeout=5) as admin,
            admin.cursor() as cursor,
        ):
            rows = cursor.execute("SHOW SERVERS").fetchall()
            index = [column.name for column in cursor.description or []].index("database")
        return sum(1 for row in rows if row[index] == database)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait(10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self.root, ignore_errors=True)
