"""The store layer (services/store): URL forms, clear errors, SQLite's durability
settings, writers that wait for each other, and migrations, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, select, text
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry.schema import metadata, registry_state
from services.registry.store import MIGRATIONS, VERSION_TABLE, RegistryStore
from services.store import Database, database_url, masked
from services.store.migrations import head

pytest_plugins = ("tests.databases",)


async def open_registry_database(url: str) -> Database:
    return await Database.open(url, migrations=MIGRATIONS, version_table=VERSION_TABLE)


def test_database_url_forms(tmp_path: Path) -> None:
    assert database_url("", tmp_path / "data", "registry") == (
        f"sqlite+aiosqlite:///{tmp_path / 'data' / 'registry.db'}"
    )
    assert (tmp_path / "data").is_dir()
    assert database_url("postgres://u:p@h/db", tmp_path, "x") == "postgresql+asyncpg://u:p@h/db"
    assert database_url("postgresql://h/db", tmp_path, "x") == "postgresql+asyncpg://h/db"
    assert database_url("sqlite:////a/b.db", tmp_path, "x") == "sqlite+aiosqlite:////a/b.db"
    for bad in ("mysql://u:secret@h/db", "sqlite://", "registry.db"):
        with pytest.raises(ValueError, match="postgresql://user:password@host") as caught:
            database_url(bad, tmp_path, "x")
        assert "secret" not in str(caught.value)
    assert masked("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"


async def test_unreachable_database_is_a_clear_error_without_the_password(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError, match="cannot reach the database") as caught:
        await open_registry_database("postgresql://u:secret@127.0.0.1:1/registry")
    assert "u:***@127.0.0.1:1" in str(caught.value)
    assert "secret" not in str(caught.value)
    with pytest.raises(RuntimeError, match="unable to open database file"):
        await open_registry_database(f"sqlite:///{tmp_path}/missing/registry.db")


async def test_sqlite_is_set_up_to_survive_a_crash(tmp_path: Path) -> None:
    database = await open_registry_database(f"sqlite:///{tmp_path}/registry.db")
    try:
        async with database.read() as connection:
            settings = [
                (await connection.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            ]
    finally:
        await database.close()
    assert settings == ["wal", 2, 1, 30_000]  # synchronous 2 is FULL


async def test_a_writer_waits_for_another_process_writer(database_url: str) -> None:
    first = await open_registry_database(database_url)
    second = await open_registry_database(database_url)
    bump = text("UPDATE registry_state SET revision = revision + 1 RETURNING revision")

    async def write_on(database: Database) -> int:
        async with database.write() as connection:
            # Locked first, as the registry does: on PostgreSQL this row lock is what
            # serializes (SQLite leaves FOR UPDATE out; its BEGIN IMMEDIATE waits).
            await connection.execute(select(registry_state).with_for_update())
            return int((await connection.execute(bump)).scalar_one())

    try:
        async with first.write() as connection:
            await connection.execute(bump)
            waiting = asyncio.create_task(write_on(second))
            await asyncio.sleep(0.2)
            assert not waiting.done()  # waiting for the lock, not failed
        assert await asyncio.wait_for(waiting, timeout=10) == 2
    finally:
        await first.close()
        await second.close()


def _schema_drift(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return list(compare_metadata(context, metadata))


async def test_migrations_run_twice_are_a_no_op_and_match_the_schema(database_url: str) -> None:
    store = await RegistryStore.open(database_url)
    await store.create_model(pb.Model(name="digits", task="infer"), actor="alice")
    await store.close()
    store = await RegistryStore.open(database_url)  # migrates again: nothing to do
    assert (await store.get_model("digits")).name == "digits"
    assert await store.feed.current_revision() == 1
    await store.close()
    database = await open_registry_database(database_url)
    try:
        async with database.read() as connection:
            stamped = (await connection.execute(text(f"SELECT * FROM {VERSION_TABLE}"))).all()
            assert stamped == [(head(MIGRATIONS),)]
            assert await connection.run_sync(_schema_drift) == []
    finally:
        await database.close()
