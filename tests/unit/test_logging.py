"""The canonical rpc line and the line buffer: whole lines, atomic writes, nothing left behind."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import select
from collections.abc import Iterator

import pytest

from services.runtime.logging import configure_logging, flush_logs, rpc_line


class _RecordingBuffer(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return len(data)


class _Stdout:
    def __init__(self) -> None:
        self.buffer = _RecordingBuffer()

    def isatty(self) -> bool:
        return False


@pytest.fixture
def stdout(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Stdout]:
    """A stdout that records each write; set in the test body (see _capture), because
    pytest puts its own capture back on sys.stdout between setup and the test."""
    fake = _Stdout()
    yield fake
    flush_logs()


def _capture(monkeypatch: pytest.MonkeyPatch, stdout: _Stdout) -> None:
    monkeypatch.setattr("sys.stdout", stdout)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging(level="info", fmt="json")  # what conftest set up for every other test


def _fields(i: int) -> dict[str, object]:
    return {"request_id": f"{i:024x}", "method": "/x.Y/Z", "status": "OK", "padding": "p" * 150}


async def test_lines_wait_for_the_flush_and_go_out_whole_in_atomic_writes(
    stdout: _Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    _capture(monkeypatch, stdout)
    configure_logging(level="info", fmt="json", flush_seconds=0.05)
    for i in range(100):
        rpc_line(logging.INFO, _fields(i))
    assert stdout.buffer.writes == []  # batched, not a write per call
    await asyncio.sleep(0.1)
    writes = stdout.buffer.writes
    assert writes, "the timer flushed nothing"
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)
    # Only this test's lines: servers of session fixtures may log meanwhile.
    lines = [line for line in b"".join(writes).splitlines() if b'"/x.Y/Z"' in line]
    assert [json.loads(line)["request_id"] for line in lines] == [f"{i:024x}" for i in range(100)]
    assert {json.loads(line)["event"] for line in lines} == {"rpc"}


async def test_a_warning_goes_out_at_once_with_what_was_waiting(
    stdout: _Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    _capture(monkeypatch, stdout)
    configure_logging(level="info", fmt="json", flush_seconds=10)
    rpc_line(logging.INFO, _fields(1))
    rpc_line(logging.WARNING, _fields(2))
    lines = b"".join(stdout.buffer.writes).splitlines()
    assert [json.loads(line)["level"] for line in lines] == ["info", "warning"]


async def test_flush_logs_writes_what_is_waiting(
    stdout: _Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    _capture(monkeypatch, stdout)
    configure_logging(level="info", fmt="json", flush_seconds=10)
    rpc_line(logging.INFO, _fields(1))  # waits for a flush ten seconds away
    rpc_line(logging.DEBUG, _fields(2))  # below the level: dropped
    assert stdout.buffer.writes == []
    flush_logs()  # what shutdown does
    assert len(b"".join(stdout.buffer.writes).splitlines()) == 1


def test_a_write_the_stream_takes_only_in_part_is_finished(
    stdout: _Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[bytes] = []

    def short_write(data: bytes) -> int:  # a pipe interrupted by a signal takes part
        part = bytes(data[:100])
        taken.append(part)
        return len(part)

    monkeypatch.setattr(stdout.buffer, "write", short_write)
    _capture(monkeypatch, stdout)
    configure_logging(level="info", fmt="json")
    rpc_line(logging.INFO, _fields(1))
    line = b"".join(taken)
    assert line.endswith(b"\n") and json.loads(line)["request_id"] == f"{1:024x}"
