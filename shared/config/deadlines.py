"""The call being served, as code far below the RPC layer sees it: how long it may still
take, and a way to be told when it is over before the work is (cancelled by the caller,
its deadline passed, or the server ending it at shutdown).

The request path (shared.rpc.request_path) makes each call current for the duration of
its handler. grpcio runs every call in a contextvars context of its own, so the current
call never leaks into another one; code that runs outside a call (start-up, background
threads, tests) sees none, and no limit.

The data layer uses it so that a call never waits for a database connection or a
statement longer than its caller still waits for the answer, and so that a call that is
over releases its connection at once (shared.data.db).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol

__all__ = ["CallScope", "current_call", "remaining"]


class CallScope(Protocol):
    def remaining(self) -> float | None:
        """Seconds until the caller's deadline (0 once passed), or None without one."""
        ...

    def on_end(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run `hook` (once, on some other thread) if the call ends before the work does:
        cancelled, past its deadline, or ended by the server's shutdown. Returns a function
        that unregisters it (call it when the work is done). If the call is over already,
        the hook runs at once."""
        ...


current_call: ContextVar[CallScope | None] = ContextVar("current_call", default=None)


def remaining() -> float | None:
    """Seconds left for the current call, or None (no call, or no deadline)."""
    scope = current_call.get()
    return None if scope is None else scope.remaining()
