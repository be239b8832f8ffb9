"""Redis for the tests that need one: the shared server TEST_REDIS_URL names (else
redis://127.0.0.1:6379/15), and a private redis-server a test may stop and start.

Without a reachable Redis the tests skip saying why, except when CI=true: CI must run
them, so there they fail instead. tests/conftest.py loads it as a plugin, so its
fixtures serve every test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.runtime.process import free_port

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
async def redis_url() -> str:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=1.0)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        _unavailable(f"no Redis at {REDIS_URL} ({exc}); set TEST_REDIS_URL")
    finally:
        await client.aclose()
    return REDIS_URL


async def delete_keys(url: str, pattern: str) -> None:
    """Deletes the keys matching `pattern` (what one test left in the shared Redis)."""
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=pattern, count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of the test's own in the shared Redis; its keys are deleted after."""
    name = f"tgtest:{uuid.uuid4().hex}:"
    yield name
    await delete_keys(redis_url, f"{name}*")


class PrivateRedis:
    """A redis-server of this test's own, to stop and start again."""

    def __init__(self) -> None:
        self.process_id = 0
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
        )
        self.process_id = self._process.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed (apt-get install redis-server)")
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()
