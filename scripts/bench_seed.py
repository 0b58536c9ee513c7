"""Bulk-load agents straight into agent_svc's table, for the benchmark (scripts/bench.py).

Rows are what AgentService.create would store (revision 1, distinct names, create times a
millisecond apart so every list order has work to do), inserted in large batches, and the
owner's agent count, which creates and deletes keep from then on.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert

from services.agent_svc.repository.models import AgentRow, OwnerCountRow
from shared.data.db import make_engine

__all__ = ["seed"]

_BATCH = 5_000
_MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")
_TEAMS = ("search", "support", "sales", "research")


def _row(owner_id: uuid.UUID, index: int, start: datetime) -> dict[str, Any]:
    when = start + timedelta(milliseconds=index)
    return {
        "id": uuid.uuid4(),
        "owner_id": owner_id,
        "name": f"bench-agent-{index:07d}",
        "description": "a benchmark agent",
        "model": _MODELS[index % len(_MODELS)],
        "instructions": "You are a helpful agent. " * 8,
        "tools": [
            {
                "name": "lookup",
                "description": "Looks a record up",
                "parameters": {
                    "type": "object",
                    "properties": {"id": {"type": "string"}},
                    "required": ["id"],
                },
            }
        ],
        "metadata": {"team": _TEAMS[index % len(_TEAMS)]},
        "temperature": 0.2,
        "top_p": None,
        "revision": 1,
        "create_time": when,
        "update_time": when,
    }


def seed(database_url: str, owner_id: uuid.UUID, count: int) -> list[str]:
    """Inserts `count` agents owned by `owner_id`; returns their ids in creation order."""
    engine = make_engine(database_url, pool_size=1)
    start = datetime.now(UTC) - timedelta(milliseconds=count)
    ids: list[str] = []
    try:
        statement = insert(AgentRow.__table__)  # type: ignore[arg-type]
        for first in range(0, count, _BATCH):
            rows = [_row(owner_id, i, start) for i in range(first, min(first + _BATCH, count))]
            with engine.begin() as connection:
                connection.execute(statement, rows)
            ids += [str(row["id"]) for row in rows]
        with engine.begin() as connection:
            connection.execute(
                insert(OwnerCountRow.__table__),  # type: ignore[arg-type]
                [{"owner_id": owner_id, "agents": count}],
            )
        # Fresh statistics, as autovacuum would gather after a bulk load: without them the
        # planner expects a few rows per owner and sorts all of them instead of using the
        # (owner_id, create_time, id) index. VACUUM too, now rather than by autovacuum in
        # the middle of a measurement.
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "VACUUM ANALYZE agent_agents"
            )
    finally:
        engine.dispose()
    return ids
