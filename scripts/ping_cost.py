"""What finding dead or demoted pooled connections costs per call: the pool's ways of
proving a connection before a call gets it, on a real PostgreSQL.

    python scripts/ping_cost.py                  # the shared local server, 3 rounds
    DATABASE_URL=postgresql://u@h/db ROUNDS=5 CALLS=3000 python scripts/ping_cost.py

Each call is a one-statement read as a cache miss makes it (an autocommit session of
`single_statement_sessions`: one round trip), through an engine of `make_engine` with:

- error-driven:   no ping; a call that meets a dead or demoted server fails (UNAVAILABLE)
                  and the whole pool is dropped (what every mode below also does);
- idle ping:      the services' default: a connection idle over IDLE_PING_SECONDS is
                  pinged at checkout (back-to-back calls never are; `idle ping, each`
                  is its cost when it does ping: every checkout);
- pre-ping:       SQLAlchemy's pool_pre_ping: every checkout.

All engines use a `target_session_attrs=read-write` URL, so the checkout's read-only
check (the server's reported status: no round trip) is in every figure. Printed: wall and
client CPU time per call, median of the rounds (modes interleaved, so a neighbour's load
spreads over all of them).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

from sqlalchemy import Engine, event, text

from shared.data import db

URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
CALLS = int(os.environ.get("CALLS", "2000"))
QUERY = text("SELECT relname FROM pg_class WHERE oid = 1259")


def _url() -> str:
    return URL + ("&" if "?" in URL else "?") + "target_session_attrs=read-write"


def error_driven() -> Engine:
    engine = db.make_engine(_url(), pool_size=1)
    event.remove(engine.pool, "checkout", db._ping_if_idle)
    return engine


def idle_ping() -> Engine:
    return db.make_engine(_url(), pool_size=1)


def idle_ping_each() -> Engine:
    engine = db.make_engine(_url(), pool_size=1)
    event.remove(engine.pool, "checkout", db._ping_if_idle)

    def ping_always(dbapi_connection: object, record: object, proxy: object) -> None:
        record.info.pop(db._CHECKED_IN, None)  # type: ignore[attr-defined]
        db._ping_if_idle(dbapi_connection, record, proxy)

    event.listen(engine.pool, "checkout", ping_always)
    return engine


def pre_ping() -> Engine:
    engine = error_driven()
    engine.pool._pre_ping = True
    return engine


MODES: dict[str, Callable[[], Engine]] = {
    "error-driven": error_driven,
    "idle ping (default)": idle_ping,
    "idle ping, each": idle_ping_each,
    "pre-ping": pre_ping,
}


def run(engine: Engine) -> tuple[float, float]:
    """(wall µs, client CPU µs) per call."""
    sessions = db.single_statement_sessions(engine)
    for _ in range(50):  # connect, warm the statement
        with sessions() as session:
            session.execute(QUERY).scalar()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(CALLS):
        with sessions() as session:
            session.execute(QUERY).scalar()
    return (
        (time.perf_counter() - wall) / CALLS * 1e6,
        (time.process_time() - cpu) / CALLS * 1e6,
    )


def main() -> None:
    engines = {name: make() for name, make in MODES.items()}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in MODES}
    try:
        for _ in range(ROUNDS):
            for name, engine in engines.items():
                results[name].append(run(engine))
    finally:
        for engine in engines.values():
            engine.dispose()
    base = statistics.median(w for w, _ in results["error-driven"])
    print(f"{CALLS} one-statement reads x {ROUNDS} rounds, medians; {URL.split('@')[-1]}")
    print(f"{'mode':<22}{'wall µs/call':>14}{'CPU µs/call':>13}{'vs error-driven':>17}")
    for name, figures in results.items():
        wall = statistics.median(w for w, _ in figures)
        cpu = statistics.median(c for _, c in figures)
        print(f"{name:<22}{wall:>14.0f}{cpu:>13.0f}{wall - base:>+16.0f}µs")

    # The read-only check alone: two parameter lookups on the libpq connection.
    engine = db.make_engine(_url(), pool_size=1)
    try:
        with engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            started = time.perf_counter()
            for _ in range(100_000):
                db._read_only(raw)
            check = (time.perf_counter() - started) / 100_000 * 1e6
    finally:
        engine.dispose()
    print(f"the checkout's read-only check alone: {check:.2f} µs")


if __name__ == "__main__":
    main()
