"""A watch worker's listener (bootstrap._ListenWhenReady): it serves the watch port once
the worker can verify tokens, and a watch server that cannot be made ends the worker
(the server starts it again with its back-off) instead of leaving one that serves
nothing."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from services.agent_svc import bootstrap

TIMEOUT = 10.0


def test_a_watch_server_that_cannot_be_made_ends_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ready = threading.Event()
    failed = threading.Event()

    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("cannot bind 127.0.0.1:50053: Address already in use")

    monkeypatch.setattr(bootstrap, "_watch_server", refused)
    app = SimpleNamespace(ready=ready.is_set)
    listener = bootstrap._ListenWhenReady(
        app,  # type: ignore[arg-type]
        running=None,  # type: ignore[arg-type]
        servicer=None,  # type: ignore[arg-type]
        path=None,  # type: ignore[arg-type]
        on_failure=failed.set,
    )
    listener.start()
    assert not failed.wait(0.1)  # not before it can verify tokens
    ready.set()
    assert failed.wait(TIMEOUT)
