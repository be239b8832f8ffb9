"""One service's database: URL forms, engine set-up, migrations, and serialized writes.

SQLite (the embedded default) and PostgreSQL run the same code. On SQLite the
connection is set up so that an acknowledged write survives kill -9 and a power cut
(WAL, synchronous=FULL) and so that a writer in another process waits for the lock
instead of failing (BEGIN IMMEDIATE, busy_timeout). Writers in this process queue on
an asyncio.Lock first, so they hold no pooled connection while they wait; writers in
other processes on PostgreSQL are serialized by the service itself (the registry
locks its revision row first in every write).
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from sqlalchemy import Connection, event, exc, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from services.store.migrations import upgrade

SQLITE = "sqlite+aiosqlite"
POSTGRESQL = "postgresql+asyncpg"
_ACCEPTED_FORMS = (
    "leave it empty for SQLite under the data directory, or give "
    "sqlite:///path/to/file.db or postgresql://user:password@host:5432/database"
)
# How long a SQLite writer waits for another process's write transaction to end.
_BUSY_TIMEOUT_MS = 30_000
# How long to wait for PostgreSQL to accept a connection before saying it cannot.
_CONNECT_TIMEOUT_S = 10
# Execution option our SQLite "begin" hook reads: how to BEGIN this transaction.
_SQLITE_BEGIN = "tensorgate_sqlite_begin"


def masked(url: str) -> str:
    """`url` with its password replaced by ***, fit for messages and logs."""
    return re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url)


def database_url(url: str, data_dir: Path, name: str) -> str:
    """A service's database setting as a SQLAlchemy async URL.

    Empty means SQLite at `<data_dir>/<name>.db` (the directory is created);
    postgresql:// (or postgres://) and sqlite:/// URLs get their async driver.
    """
    if not url:
        data_dir.mkdir(parents=True, exist_ok=True)
        return f"{SQLITE}:///{(data_dir / f'{name}.db').resolve()}"
    return _async_url(url)


def _async_url(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if separator:
        if scheme in ("postgresql", "postgres", POSTGRESQL) and rest:
            return f"{POSTGRESQL}://{rest}"
        # sqlite:// alone would be an in-memory database, gone with its connection.
        if scheme in ("sqlite", SQLITE) and rest.startswith("/") and len(rest) > 1:
            return f"{SQLITE}://{rest}"
    raise ValueError(f"database URL {masked(url)!r} is not supported: {_ACCEPTED_FORMS}")


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # The sqlite3 driver would BEGIN on its own, and only before DML; with this off,
    # `_sqlite_begin` starts every transaction, so reads are consistent too.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        # Readers never block the writer, and a commit is one append to the log.
        "journal_mode=WAL",
        # Sync the log on every commit: an acknowledged write survives a power cut.
        "synchronous=FULL",
        "foreign_keys=ON",
        f"busy_timeout={_BUSY_TIMEOUT_MS}",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # IMMEDIATE takes the write lock at BEGIN, where busy_timeout makes a second
    # process wait; a DEFERRED transaction that later tries to write fails instead.
    mode = connection.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def _engine(url: str) -> AsyncEngine:
    try:
        if url.startswith(SQLITE):
            engine = create_async_engine(url)
            event.listen(engine.sync_engine, "connect", _sqlite_connect)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
            return engine
        return create_async_engine(
            url,
            # A pooled connection may have outlived a database restart.
            pool_pre_ping=True,
            connect_args={"timeout": _CONNECT_TIMEOUT_S},
        )
    except (exc.ArgumentError, ValueError) as error:
        raise ValueError(f"database URL {masked(url)!r} is malformed: {error}") from None


def _reason(error: Exception) -> str:
    cause = error.orig if isinstance(error, exc.DBAPIError) else error
    return str(cause) or type(cause).__name__


class Database:
    """A service's database, migrated to its head; reads and serialized writes."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        self._engine = engine
        self._write_lock = asyncio.Lock()
        self.url = masked(url)
        self.is_sqlite = engine.dialect.name == "sqlite"

    @classmethod
    async def open(cls, url: str, *, migrations: Path, version_table: str) -> Database:
        """Connects to `url` and runs the service's `migrations` up to head.

        ValueError for a URL of the wrong form, RuntimeError (password masked) when the
        database cannot be reached.
        """
        async_url = _async_url(url)
        database = cls(_engine(async_url), async_url)
        try:
            await database._check_reachable()
            await database._migrate(migrations, version_table)
        except BaseException:
            await database.close()
            raise
        return database

    async def _check_reachable(self) -> None:
        try:
            async with self._engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except (OSError, exc.DBAPIError) as error:
            raise RuntimeError(
                f"cannot reach the database at {self.url}: {_reason(error)}"
            ) from error

    async def _migrate(self, migrations: Path, version_table: str) -> None:
        async with self._transaction(write=True) as connection:
            if not self.is_sqlite:
                # Replicas that start together would otherwise race to create the same
                # tables; the lock ends with the transaction.
                key = zlib.crc32(version_table.encode())
                await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            try:
                await connection.run_sync(
                    upgrade, migrations=migrations, version_table=version_table
                )
            except CommandError as error:
                # Typically a schema revision this build does not know: a newer release
                # migrated the database, and this older one must not touch it.
                raise RuntimeError(f"cannot migrate the database at {self.url}: {error}") from None

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as connection:
            if self.is_sqlite:
                await connection.execution_options(
                    **{_SQLITE_BEGIN: "IMMEDIATE" if write else "DEFERRED"}
                )
            elif not write:
                # One snapshot for every query of a read (PostgreSQL's default, READ
                # COMMITTED, takes a new one per statement).
                await connection.execution_options(isolation_level="REPEATABLE READ")
            async with connection.begin():
                yield connection

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction, committed when the block ends, rolled back if it raises.

        Serialized with this process's other writers, and on SQLite with every process's;
        on PostgreSQL a service serializes across processes by locking a row first.
        """
        async with self._write_lock, self._transaction(write=True) as connection:
            yield connection

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """One transaction for reads: every query in it sees the same snapshot."""
        async with self._transaction(write=False) as connection:
            yield connection

    async def close(self) -> None:
        await self._engine.dispose()
