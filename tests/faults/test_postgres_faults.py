"""PostgreSQL stopped for seconds, and restarted at once, under mixed load on both services.

auth_svc and agent_svc run on the private cluster (pools of 4, no Redis) under the mixed
load of tests/faults/pg_stack.py. Then the database goes away. What a
caller may see, and what must hold afterwards:

- every failed call is UNAVAILABLE with RetryInfo: never INTERNAL, UNKNOWN, or
  DEADLINE_EXCEEDED for a call with a 5 s deadline;
- each service answers a database call successfully within 2 s of the database accepting
  connections again (measured from the first successful connect of the test itself);
- every create and update that was acknowledged is there afterwards with its content;
- no account is locked by the outage: the obedient login succeeds right after, and a
  fresh login with the right password succeeds (RESOURCE_EXHAUSTED / LOGIN_LOCKED would be
  the defect of counting attempts that never reached the password check).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from tests.faults.load import Load, summarize
from tests.faults.pg_stack import (
    DB_METHODS,
    PgStack,
    lost_writes,
    ok_after,
    open_pg_stack,
    start_load,
    stored_agents,
    wrong,
)
from tests.faults.servers import PostgresCluster
from tests.faults.services import (
    AUTH_SERVICE,
    PASSWORD,
    Fleet,
    auth_env,
    register_and_login,
)
from tests.helpers import free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.postgres]

OUTAGE_SECONDS = 3.0
RECOVERY_LIMIT = 2.0  # seconds from "PostgreSQL accepts connections" to a successful call


@pytest.fixture
def pg_stack(pg: PostgresCluster, fleet: Fleet, tmp_path: Path) -> Iterator[PgStack]:
    with open_pg_stack(fleet, tmp_path, pg.create_database(), pg.create_database()) as stack:
        yield stack


def stop_for_seconds(pg: PostgresCluster, load: Load) -> None:
    pg.stop("fast")
    load.keep_going(OUTAGE_SECONDS)
    pg.start()


def restart_immediately(pg: PostgresCluster, load: Load) -> None:
    pg.stop("immediate")
    pg.start()


OUTAGES: dict[str, Callable[[PostgresCluster, Load], None]] = {
    "stop-fast-3s": stop_for_seconds,
    "restart-immediate": restart_immediately,
}


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_database_outage_costs_only_retryable_calls_and_no_acknowledged_write(
    pg: PostgresCluster,
    pg_stack: PgStack,
    outage: str,
    record_property: Callable[[str, object], None],
) -> None:
    all_methods = set().union(*DB_METHODS.values()) | {"GetAgent"}
    with start_load(pg_stack) as load:
        load.wait_for(
            lambda calls: all(
                sum(1 for c in calls if c.ok and c.method == m) >= 3 for m in all_methods
            ),
            timeout=60,
            what="every kind of call to succeed before the outage",
        )
        down = time.monotonic()
        OUTAGES[outage](pg, load)
        up = pg.wait_accepting()
        load.wait_for(
            lambda calls: (
                all(ok_after(calls, {m}, up) for m in all_methods) or any(wrong(c) for c in calls)
            ),  # reported below
            timeout=60,
            what="every kind of call to succeed after the outage",
        )
        load.stop()
    calls = load.calls
    during = [c for c in calls if down <= c.started <= up]
    record_property("calls", summarize(calls))
    record_property("calls_during_outage", summarize(during))
    assert during, "no call was made during the outage"

    failed_otherwise = [c for c in calls if wrong(c)]
    assert not failed_otherwise, (
        f"{len(failed_otherwise)} calls failed otherwise than UNAVAILABLE + RetryInfo"
        f" ({summarize(failed_otherwise)}); first: "
        + "; ".join(str(c) for c in failed_otherwise[:5])
    )

    for service, methods in DB_METHODS.items():
        first = min(c.ended for c in ok_after(calls, methods, up))
        record_property(f"{service}_first_success_after_db_up_s", round(first - up, 3))
        assert first - up <= RECOVERY_LIMIT, (
            f"{service}: first successful database call {first - up:.2f}s after PostgreSQL"
            f" accepted connections again; calls in between: "
            + summarize(c for c in calls if up <= c.started <= first)
        )

    lost = lost_writes(pg_stack, calls, stored_agents(pg_stack))
    assert not lost, f"{len(lost)} acknowledged writes are missing: {lost}"

    # No account locked by the outage.
    locked = [c for c in calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert not locked, f"the outage locked an account: {locked[:3]}"
    assert ok_after(calls, {"Login"}, up), "the obedient login never succeeded after the outage"
    fresh = pg_stack.auth.Login(
        auth_pb2.LoginRequest(email=pg_stack.login_user.email, password=PASSWORD), timeout=30
    )
    assert fresh.access_token


def test_a_frozen_database_holds_no_thread_past_its_call(
    pg: PostgresCluster, fleet: Fleet, tmp_path: Path
) -> None:
    """PostgreSQL frozen (SIGSTOP: connections open, nothing answers, cancels neither):
    calls past their deadline must give their worker threads back, so calls that need no
    database (GetJwks, which every verifier depends on) are still answered while it is
    frozen. Before: the threads waited for the server to come back, and GetJwks with them."""
    auth = fleet.start(
        "auth_svc",
        auth_env(free_port(), tmp_path / "auth", pg.create_database(), MAX_WORKERS="4"),
    )
    auth.wait_serving(AUTH_SERVICE, timeout=60)
    with grpc.insecure_channel(auth.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        caller = register_and_login(stub)

        def current_users(timeout: float) -> list[Any]:
            return [
                stub.GetCurrentUser.future(
                    auth_pb2.GetCurrentUserRequest(), metadata=caller.metadata, timeout=timeout
                )
                for _ in range(8)
            ]

        # Every worker thread has its pooled connection (used just now: no idle ping), so
        # the calls below block in statements on the frozen server, not in connecting.
        assert all(f.result() for f in current_users(30.0))
        pg.freeze()
        try:
            # Twice as many database-bound calls as worker threads, 1 s deadline each.
            futures = current_users(1.0)
            codes = {f.exception().code() for f in futures if f.exception() is not None}
            assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
            assert codes, "a call succeeded against a frozen database"
            started = time.monotonic()
            reply = stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=20.0)
            waited = time.monotonic() - started
            assert reply.keys
            assert pg.postmaster_pid() is not None  # still frozen: answered without it
        finally:
            pg.thaw()
    print(f"\nGetJwks answered {waited:.1f}s after the stuck calls' deadlines, PostgreSQL frozen")
