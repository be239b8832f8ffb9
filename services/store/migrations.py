"""Alembic run from code: a service's migrations folder, upgraded on an open connection.

Each service keeps its own migrations folder and its own version table, so registry and
auth can share one PostgreSQL database without seeing each other's history. A service's
`env.py` is one call to `run_migrations`; there is no alembic.ini and no offline mode,
because the only way in is `Database.open`, which passes its connection along.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command, context
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData

_CONNECTION = "connection"
_VERSION_TABLE = "version_table"


def _config(migrations: Path) -> Config:
    config = Config()
    # Config values are interpolated ConfigParser strings: a literal % must be doubled.
    config.set_main_option("script_location", str(migrations).replace("%", "%%"))
    return config


def upgrade(connection: Connection, *, migrations: Path, version_table: str) -> None:
    """Migrates to head inside the caller's transaction (run by `AsyncConnection.run_sync`)."""
    config = _config(migrations)
    config.attributes[_CONNECTION] = connection
    config.attributes[_VERSION_TABLE] = version_table
    command.upgrade(config, "head")


def head(migrations: Path) -> str:
    """The newest revision in a migrations folder."""
    revision = ScriptDirectory.from_config(_config(migrations)).get_current_head()
    if revision is None:
        raise RuntimeError(f"{migrations} holds no migrations")
    return revision


def run_migrations(target_metadata: MetaData) -> None:
    """The body of a service's env.py: run the pending migrations on the given connection."""
    connection = context.config.attributes.get(_CONNECTION)
    if connection is None:
        raise RuntimeError("migrations run only through services.store.Database.open")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=context.config.attributes[_VERSION_TABLE],
    )
    with context.begin_transaction():
        context.run_migrations()
