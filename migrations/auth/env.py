"""Alembic environment of auth_svc (its own version table and tables only)."""

from services.auth_svc.repository.models import AuthBase
from shared.data.migrations import run_env

run_env(AuthBase.metadata, version_table="alembic_version_auth")
