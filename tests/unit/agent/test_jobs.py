"""The agent worker's wiring: what its jobs hold open is closed with it."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest
from sqlalchemy import create_engine

from services.agent_svc import jobs
from services.agent_svc.settings import load_agent_settings
from shared.config.clock import SystemClock
from shared.rpc.observability import Observability


def test_the_worker_closes_the_redis_client_it_publishes_purges_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = MagicMock(name="redis")
    monkeypatch.setattr(jobs, "make_redis", lambda _config: client)
    settings = load_agent_settings({"AGENT_REDIS_URL": "redis://127.0.0.1:1/0"}, role="worker")
    observability = Observability.from_settings(settings.common)
    engine = create_engine("sqlite://")
    try:
        worker = jobs.worker_for(settings, engine, observability, SystemClock())
        client.close.assert_not_called()
        worker.close()
        client.close.assert_called_once_with()
    finally:
        observability.close()
        engine.dispose()
