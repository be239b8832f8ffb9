"""Alembic's entry point for the auth service: runs on the connection Database.open passes."""

from services.auth.schema import metadata
from services.store.migrations import run_migrations

run_migrations(metadata)
