"""Fresh databases for store tests: a test taking `database_url` runs on SQLite and on
PostgreSQL, each time on a new, empty database.

PostgreSQL is the server TEST_DATABASE_URL names, or one on 127.0.0.1:5432 if it
answers; every test gets its own database there, created before and dropped after.
Without a reachable server the PostgreSQL cases are skipped saying why, except when
CI=true: CI must run them, so there they fail instead.

A test module uses it with `pytest_plugins = ("tests.databases",)`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg  # asyncpg ships no type hints
import pytest
from sqlalchemy import make_url

DEFAULT_SERVER = "postgresql://127.0.0.1:5432/postgres"
_CONNECT_TIMEOUT_S = 5


def server_url() -> str:
    """The PostgreSQL server's URL (any database on it we may create databases from)."""
    return os.environ.get("TEST_DATABASE_URL") or DEFAULT_SERVER


def _asyncpg_dsn(url: str) -> str:
    # asyncpg takes plain postgresql:// URLs; TEST_DATABASE_URL may name a driver.
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _server() -> asyncpg.Connection:
    return await asyncpg.connect(_asyncpg_dsn(server_url()), timeout=_CONNECT_TIMEOUT_S)


@pytest.fixture(scope="session")
async def _postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None. Asked once a session, so an unreachable
    server costs one timeout, not one per test."""
    try:
        connection = await _server()
    except (OSError, asyncpg.PostgresError) as error:
        return f"PostgreSQL at {make_url(server_url())} is unreachable ({error})"
    await connection.close()
    return None


async def _postgres_database() -> AsyncIterator[str]:
    name = f"tensorgate_test_{uuid.uuid4().hex[:12]}"
    connection = await _server()
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    try:
        url = make_url(server_url()).set(drivername="postgresql+asyncpg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        connection = await _server()
        try:
            # FORCE: a test that failed half-way may have left connections open.
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, _postgres_unreachable: str | None
) -> AsyncIterator[str]:
    """A SQLAlchemy async URL of a new, empty database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    if _postgres_unreachable is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{_postgres_unreachable}; CI must run the PostgreSQL cases")
        pytest.skip(f"{_postgres_unreachable}; set TEST_DATABASE_URL to run these cases")
    async for url in _postgres_database():
        yield url
