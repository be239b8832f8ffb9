"""Alembic's entry point for the registry: runs on the connection Database.open passes."""

from services.registry.schema import metadata
from services.store.migrations import run_migrations

run_migrations(metadata)
