"""What the auth race tests share: a gate that holds one transaction at a chosen point,
and a way to see that another one now waits for a row lock (PostgreSQL)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine, text

DEADLINE = 30.0


@dataclass
class Gate:
    """Holds the next transaction that passes `hold()` while armed, until `proceed`."""

    armed: bool = False
    reached: threading.Event = field(default_factory=threading.Event)
    proceed: threading.Event = field(default_factory=threading.Event)

    def hold(self) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            assert self.proceed.wait(DEADLINE)


def waiting_for_a_lock(engine: Engine) -> bool:
    """True while some session of this PostgreSQL database waits for a row lock."""
    with engine.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    return bool(waiting)
