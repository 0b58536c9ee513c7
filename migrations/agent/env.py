"""Alembic environment of agent_svc (its own version table and tables only)."""

from services.agent_svc.repository.models import AgentBase
from shared.data.migrations import run_env

run_env(AgentBase.metadata, version_table="alembic_version_agent")
