"""Start auth_svc and agent_svc as two processes on the dev profile, each running its
background jobs in process; stop both on Ctrl-C.

Environment variables already set (AUTH_*, AGENT_*) are passed through, so the same
command runs against PostgreSQL and Redis when those URLs are given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    env = {
        "AUTH_DATA_DIR": str(ROOT / ".data"),
        "AGENT_DATA_DIR": str(ROOT / ".data"),
        # The background jobs (purges) on a thread of each server: no worker to run.
        "AUTH_WORKER_IN_PROCESS": "true",
        "AGENT_WORKER_IN_PROCESS": "true",
        **os.environ,
    }
    env.setdefault("AGENT_AUTH_TARGET", f"127.0.0.1:{env.get('AUTH_PORT', '50051')}")
    children = [
        subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env, cwd=ROOT)
        for name in ("auth_svc", "agent_svc")
    ]
    print(
        f"auth_svc on 127.0.0.1:{env.get('AUTH_PORT', '50051')}, "
        f"agent_svc on 127.0.0.1:{env.get('AGENT_PORT', '50052')} "
        f"(WatchAgents also on :{env.get('AGENT_WATCH_PORT', '50053')}); Ctrl-C stops both",
        flush=True,
    )

    def stop(_signum: int = 0, _frame: object = None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        stop()
        codes = [child.wait() for child in children]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
